"""soap_hidden under FSDP2 (built on the DTensors, 2 gloo ranks) equals the plain composite fed
the same gradients: its SOAP half takes DTensors as soap does, its AdamW half as torch's does.
(muon refuses DTensors in one line: tests/optim/test_composite.py.)"""

from __future__ import annotations

from soaplab.optim.soap_hidden import SoapAdamW
from tests.distributed import harness
from tests.distributed.harness import SHAPES, STEPS, make_model, set_grads


def _groups(model):
    params = list(model)
    return [{"params": params[:len(SHAPES) - 1], "role": "hidden"},
            {"params": params[len(SHAPES) - 1:], "role": "vector", "weight_decay": 0.0}]


def _soap_hidden_matches_unsplit(rank: int, world_size: int) -> None:
    sharded, plain = make_model(), make_model()
    harness.shard(sharded, 0)
    make = lambda m: SoapAdamW(_groups(m), lr=1e-2, precondition_frequency=3)  # noqa: E731
    opt, reference = make(sharded), make(plain)
    worst = 0.0
    for step in range(STEPS):
        grads = harness.gradients(step)
        for model, optimizer in ((sharded, opt), (plain, reference)):
            set_grads(model, grads)
            optimizer.step()
        worst = max(worst, harness.max_diff(sharded, plain))
    assert worst <= 1e-6, f"soap_hidden under FSDP2 differs by {worst:.3g}"


def test_soap_hidden_under_fsdp2_equals_the_plain_composite() -> None:
    harness.spawn(_soap_hidden_matches_unsplit, 2)
