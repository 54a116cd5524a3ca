"""soaplab in a plain training loop: any nn.Module, roles checked first, one optimizer object.

    python examples/plain_loop.py [--optimizer soap_hidden] [--steps 60]
"""

import argparse

import torch
from torch import nn

import soaplab


class MLP(nn.Module):
    """Reads 16 features, predicts 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 64)
        self.hidden = nn.Sequential(nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU())
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.stem(x)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="soap_hidden", choices=sorted(soaplab.OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MLP()
    print(soaplab.describe_roles(model, args.optimizer))  # check the routing once
    opt = soaplab.optimizer(args.optimizer, model, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    x = torch.randn(256, 16)
    y = (x[:, :4] + 0.1 * torch.randn(256, 4)).argmax(1)
    for step in range(args.steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
