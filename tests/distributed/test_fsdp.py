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


def _training_tracks_one_process(rank: int, world_size: int) -> None:
    """Real forward/backward under fully_shard (per layer and root), each rank on its slice of
    the global batch, against one process on the whole batch: the gradients differ only by the
    rounding of the reduce-scatter (about 1e-8).

    With max_precond_dim=0 (Adam in the identity basis, the same code path) the parameters must
    agree to 1e-6. SOAP's first basis comes from one gradient, so every non-square factor is
    rank-deficient and eigh picks an arbitrary basis of its null space, where Adam normalizes
    rounding noise into O(1) steps: there only the losses can agree (within 1%)."""
    for kwargs in ({"max_precond_dim": 0}, {}):
        sharded, plain = _mlp(), _mlp()
        for layer in sharded:
            if isinstance(layer, torch.nn.Linear):
                harness.shard(layer)
        harness.shard(sharded)
        opt = SOAP(sharded.parameters(), lr=1e-2, precondition_frequency=3, **kwargs)
        reference = SOAP(plain.parameters(), lr=1e-2, precondition_frequency=3, **kwargs)
        gen = torch.Generator().manual_seed(0)
        worst = 0.0
        for _ in range(STEPS):
            x, y = torch.randn(24, 12, generator=gen), torch.randn(24, 4, generator=gen)
            mine = slice(rank * 24 // world_size, (rank + 1) * 24 // world_size)
            losses = []
            for model, optimizer, (xs, ys) in ((sharded, opt, (x[mine], y[mine])),
                                               (plain, reference, (x, y))):
                loss = torch.nn.functional.mse_loss(model(xs), ys)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            dist.all_reduce(losses[0])
            worst = max(worst, abs(losses[0].item() / world_size / losses[1].item() - 1))
        diff = max((full(p) - q).abs().max().item()
                   for p, q in zip(sharded.parameters(), plain.parameters(), strict=True))
        if kwargs:
            assert diff <= 1e-6, f"identity basis: parameters differ by {diff:.3g}"
        assert worst <= 1e-2, f"{kwargs}: losses differ from one process by {worst:.2%}"
        if rank == 0:
            print(f"fully_shard MLP {kwargs or 'SOAP'}, {world_size} ranks: largest relative "
                  f"loss difference {worst:.2g}, parameter difference {diff:.2g}")


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
