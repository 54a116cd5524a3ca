"""FSDP2 (``fully_shard``) on 2 and 3 gloo processes: SOAP and Shampoo on DTensor parameters
equal the plain optimizer fed the same gradients (each parameter is gathered whole on its owner,
so the maths is the single-process one), each rank keeps only its owned state, real sharded
training tracks one process on the global batch, and bad set-ups fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial

from soaplab import SOAP
from tests.distributed import harness
from tests.distributed.harness import OPTIMIZERS, STEPS, full, make_model, param_groups, set_grads


def _fsdp_matches_unsplit(rank: int, world_size: int) -> None:
    for name, make in OPTIMIZERS.items():
        for dim in (0, 1):  # FSDP2's default rows, and columns (1-D parameters keep rows)
            sharded, plain = make_model(), make_model()
            harness.shard(sharded, dim)
            opt, reference = make(param_groups(sharded)), make(param_groups(plain))
            assert all(isinstance(p, DTensor) for p in sharded)
            worst = 0.0
            for step in range(STEPS):
                grads = harness.gradients(step)
                for model, optimizer in ((sharded, opt), (plain, reference)):
                    set_grads(model, grads)
                    optimizer.step()
                worst = max(worst, harness.max_diff(sharded, plain))
            assert worst <= 1e-6, f"{name}, Shard({dim}): FSDP2 differs by {worst:.3g}"

            per_rank = harness.check_owned_state(name, sharded, opt, reference)
            if rank == 0 and dim == 0:
                print(f"{name} FSDP2 on {world_size} ranks: max |sharded - plain| = "
                      f"{worst:.2g}; state KiB per rank [{harness.kib(per_rank)}] vs "
                      f"{reference.state_bytes() / 1024:.1f} in one process")


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp_equals_the_plain_optimizer_and_holds_only_owned_state(world_size: int) -> None:
    harness.spawn(_fsdp_matches_unsplit, world_size)


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8),
                               torch.nn.GELU(), torch.nn.Linear(8, 4))


def _shard_layers(model: torch.nn.Module) -> None:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            harness.shard(layer)
    harness.shard(model)


def _training_tracks_one_process(rank: int, world_size: int) -> None:
    """Real forward/backward under fully_shard (per layer and root), each rank on its slice of
    the global batch: the gradients differ from one process on the whole batch only by the
    rounding of the reduce-scatter (about 1e-8)."""
    harness.tracks_one_process(_mlp, _shard_layers, "fully_shard MLP", split_batch=True)


def test_fully_shard_training_tracks_one_process() -> None:
    harness.spawn(_training_tracks_one_process, 2)


def _faults(rank: int, world_size: int) -> None:
    # A NaN in one rank's shard of a gradient stops the step on every rank, state untouched.
    model = harness.shard(make_model())
    opt = OPTIMIZERS["soap"](param_groups(model))
    set_grads(model, harness.gradients(0))
    opt.step()
    before = [full(p).clone() for p in model]
    set_grads(model, harness.gradients(1))
    if rank == 1:
        model[0].grad.to_local()[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN" if rank == 1 else "on another rank"):
        opt.step()
    assert all(torch.equal(full(p), q) for p, q in zip(model, before, strict=True))
    # Gradients on one rank only would desynchronise the all-to-all: refused.
    set_grads(model, harness.gradients(2))
    if rank == 1:
        model[0].grad = None
    with pytest.raises(RuntimeError, match="disagree on which parameters have a gradient"):
        opt.step()

    plain = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="some parameters are DTensors"):
        SOAP([*model, plain])
    partial = torch.nn.Parameter(DTensor.from_local(torch.zeros(4, 4), model[0].device_mesh,
                                                    [Partial()]))
    with pytest.raises(ValueError, match=r"placed as \(Partial\(sum\),\); soaplab supports"):
        SOAP([partial])
    with pytest.raises(ValueError, match="process_group differs from the device mesh"):
        SOAP(model.parameters(), process_group=dist.new_group([0]))


def test_bad_fsdp_setups_fail_clearly() -> None:
    harness.spawn(_faults, 2)
