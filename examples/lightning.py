"""soaplab in Lightning: configure_optimizers returns one soaplab optimizer and its scheduler.

    pip install -e ".[lightning]"
    python examples/lightning.py [--optimizer muon] [--steps 40]
"""

import argparse

import pytorch_lightning as pl
import torch

import soaplab
from soaplab.experiments.models.gpt import GPT, GPTConfig


class LitGPT(pl.LightningModule):
    def __init__(self, optimizer: str, vocab: int) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.model = GPT(GPTConfig.preset("micro", vocab))
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
        loss = self.model(batch[:, :-1], batch[:, 1:].contiguous())[1]
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> dict:
        opt = soaplab.optimizer(self.optimizer_name, self.model, lr=1e-2, weight_decay=0.01)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="soap", choices=sorted(soaplab.OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    pl.seed_everything(0)
    period = torch.randint(0, 16, (64, 8), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(period.repeat(1, 4)[:, :25], batch_size=8, shuffle=True)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    module = LitGPT(args.optimizer, vocab=16)
    trainer.fit(module, data)
    print(f"loss {module.losses[0]:.4f} at the start, {module.losses[-1]:.4f} at the end")


if __name__ == "__main__":
    main()
