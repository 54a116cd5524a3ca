"""DDP mode on 2 and 3 gloo processes: the split optimizer equals the unsplit one fed the same
all-reduced gradients, each rank keeps only the state it owns, and a non-finite gradient on one
rank stops (or skips) the step on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import harness
from tests.distributed.harness import OPTIMIZERS, STEPS, make_model, param_groups, set_grads


def _allreduced_grads(step: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """What DDP hands every rank: the mean of the ranks' local gradients."""
    grads = harness.gradients(step, source=rank)
    for g in grads:
        dist.all_reduce(g)
        g.div_(world_size)
    return grads


def _split_matches_unsplit(rank: int, world_size: int) -> None:
    singletons = [dist.new_group([r]) for r in range(world_size)]
    for name, make in OPTIMIZERS.items():
        split_model, plain_model, solo_model = make_model(), make_model(), make_model()
        split = make(param_groups(split_model), process_group=dist.group.WORLD)
        plain = make(param_groups(plain_model))
        solo = make(param_groups(solo_model), process_group=singletons[rank])
        assert split.split is not None and solo.split is None
        worst = 0.0
        for step in range(STEPS):
            grads = _allreduced_grads(step, rank, world_size)
            for model, opt in ((split_model, split), (plain_model, plain), (solo_model, solo)):
                set_grads(model, grads)
                opt.step()
            worst = max(worst, harness.max_diff(split_model, plain_model))
            assert all(torch.equal(p, q) for p, q in zip(solo_model, plain_model, strict=True))
        assert worst <= 1e-6, f"{name}: split differs from unsplit by {worst:.3g}"
        # The replicas stay bitwise identical: rank 0's values reach everyone unchanged.
        for p in split_model:
            reference = p.detach().clone()
            dist.broadcast(reference, src=0)
            assert torch.equal(reference, p)

        per_rank = harness.check_owned_state(name, split_model, split, plain)
        if rank == 0:
            print(f"{name} on {world_size} ranks: max |split - unsplit| = {worst:.2g}; state "
                  f"KiB per rank [{harness.kib(per_rank)}] vs "
                  f"{plain.state_bytes() / 1024:.1f} unsplit")


@pytest.mark.parametrize("world_size", [2, 3])
def test_split_matches_unsplit_and_holds_only_owned_state(world_size: int) -> None:
    harness.spawn(_split_matches_unsplit, world_size)


def _nonfinite_on_one_rank(rank: int, world_size: int) -> None:
    for nonfinite in ("raise", "skip"):
        model = make_model()
        opt = OPTIMIZERS["soap"](param_groups(model), process_group=dist.group.WORLD,
                                 nonfinite=nonfinite)
        set_grads(model, harness.gradients(0))
        opt.step()
        before = [p.detach().clone() for p in model]
        grads = harness.gradients(1)
        if rank == world_size - 1:  # only this rank's gradient is bad (no all-reduce here)
            grads[0][0, 0] = float("nan")
        set_grads(model, grads)
        if nonfinite == "raise":
            match = "contains NaN" if rank == world_size - 1 else "on another rank"
            with pytest.raises(ValueError, match=match):
                opt.step()
        else:
            with pytest.warns(RuntimeWarning, match="step skipped"):
                opt.step()
            assert opt.skipped_steps == 1
        assert all(torch.equal(p, q) for p, q in zip(model, before, strict=True))
        assert all(s["step"] == 0 for s in opt.state.values())


def _mismatched_models(rank: int, world_size: int) -> None:
    model = make_model() if rank == 0 else torch.nn.ParameterList([torch.randn(3, 3)])
    opt = OPTIMIZERS["soap"]([{"params": list(model)}], process_group=dist.group.WORLD)
    set_grads(model, [torch.ones_like(p) for p in model])
    with pytest.raises(ValueError, match="ranks disagree on the optimizer's parameters"):
        opt.step()


def _faults(rank: int, world_size: int) -> None:
    _nonfinite_on_one_rank(rank, world_size)
    _mismatched_models(rank, world_size)


def test_nonfinite_gradient_on_one_rank_and_mismatched_ranks_fail_clearly() -> None:
    harness.spawn(_faults, 2)
