"""Loss curves against peer libraries from PyPI (the ``peers`` extra): not exact oracles.

pytorch_optimizer.SOAP is a near-verbatim port of the reference, but SOAP amplifies rounding
(degenerate eigenspaces of rank-deficient factors), so parameters drift apart while losses
stay close. We compare losses on identical full-batch data.
"""

import pytest
import torch

from soaplab import SOAP

peers = pytest.importorskip("pytorch_optimizer")


def train(make_optimizer, steps: int = 150) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.randn(512, 12)
    y = torch.tanh(x @ torch.randn(12, 4))
    opt = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.filterwarnings("ignore")
def test_loss_curve_matches_pytorch_optimizer_soap():
    settings = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)
    ours = train(lambda ps: SOAP(ps, **settings))
    theirs = train(lambda ps: peers.SOAP(ps, **settings))
    assert ours[-1] < 0.5 * ours[0]
    for a, b in zip(ours[::10], theirs[::10], strict=True):
        assert abs(a - b) <= 0.02 * b, (a, b)
