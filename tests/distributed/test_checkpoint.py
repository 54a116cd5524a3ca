"""Checkpoints of split optimizers: save at step 10, resume, and step 20 equals 20 uninterrupted
steps, bit-exactly on the same world size and to 1e-6 from 2 ranks to 1 and 1 to 2 (every run
is fed the same gradients). Per-rank shards, consolidated state dicts and
torch.distributed.checkpoint (DCP) all work; wrong checkpoints raise ValueError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from soaplab import SOAP
from soaplab.optim.distributed import full_state_dict
from tests.distributed import harness
from tests.distributed.harness import (
    OPTIMIZERS,
    STEPS,
    full,
    make_model,
    param_groups,
    set_grads,
)

SAVE_AT = 10
# DCP loads only the keys of a template made by a fresh optimizer's zero-gradient lr = 0 call,
# so that call must create every state entry that steps hold (tests/optim/test_allocation.py).
DCP_OPTIMIZERS = ("soap", "soap_lowmem", "shampoo")
Model = torch.nn.ParameterList
Loader = Callable[[Model, torch.optim.Optimizer], None]


def _train(model: Model, opt: torch.optim.Optimizer, steps: range,
           save: Callable[[], None] | None = None) -> None:
    for step in steps:
        if step == SAVE_AT and save is not None:
            save()
        set_grads(model, harness.gradients(step))
        opt.step()


def _resume(name: str, params: list[torch.Tensor], load: Loader, sharded: bool = False,
            **kw) -> tuple[Model, torch.optim.Optimizer]:
    """A fresh model at the saved values and a fresh optimizer, loaded, then steps 10..19."""
    model = make_model(seed=1)
    with torch.no_grad():
        for p, saved in zip(model, params, strict=True):
            p.copy_(saved)
    if sharded:
        harness.shard(model)
    opt = OPTIMIZERS[name](param_groups(model), **kw)
    load(model, opt)
    _train(model, opt, range(SAVE_AT, STEPS))
    return model, opt


def _from_file(path: Path, key: str | None = None) -> Loader:
    def load(model: Model, opt: torch.optim.Optimizer) -> None:
        saved = torch.load(path, weights_only=True)
        opt.load_state_dict(saved if key is None else saved[key])
    return load


def _from_dcp(path: Path) -> Loader:
    """DCP's resume recipe, at torch's default strict=True: a split optimizer exports every
    parameter's state on every rank (docs/distributed.md, "State layout")."""
    def load(model: Model, opt: torch.optim.Optimizer) -> None:
        state = get_optimizer_state_dict(model, opt)
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(strict=True))
    return load


def _assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, model_a: Model,
                       model_b: Model) -> None:
    for p, q in zip(model_a, model_b, strict=True):
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            assert torch.equal(value, sb[key]) if torch.is_tensor(value) else value == sb[key]


def _assert_equal(a: Model, b: Model) -> None:
    pairs = [(full(p), full(q)) for p, q in zip(a, b, strict=True)]  # every rank gathers all
    assert all(torch.equal(p, q) for p, q in pairs)


def _assert_close(model: Model, params: list[torch.Tensor]) -> None:
    diff = max((full(p) - q).abs().max().item() for p, q in zip(model, params, strict=True))
    assert diff <= 1e-6, f"resumed run differs from the uninterrupted one by {diff:.3g}"


def _run_and_save(name: str, tmp: Path, tag: str, rank: int, sharded: bool = False,
                  **kw) -> tuple:
    """20 steps; at step 10 save params, state dict (+ consolidated) and DCP under ``tag``."""
    model = make_model()
    if sharded:
        harness.shard(model)
    opt = OPTIMIZERS[name](param_groups(model), **kw)
    params10: list[torch.Tensor] = []

    def save() -> None:
        params10.extend(full(p).clone() for p in model)
        torch.save(opt.state_dict(), tmp / f"{name}-{tag}-shard{rank}.pt")
        consolidated = full_state_dict(opt)
        if rank == 0:
            torch.save({"params": params10, "optimizer": consolidated},
                       tmp / f"{name}-{tag}-full.pt")
        dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=tmp / f"{name}-{tag}-dcp")

    _train(model, opt, range(STEPS), save)
    final = [full(p) for p in model]  # a collective under FSDP2: every rank takes part
    if rank == 0:
        torch.save(final, tmp / f"{name}-{tag}-final.pt")
    return model, opt, params10


def _split_kwargs(mode: str) -> dict[str, Any]:
    """How a test asks for a split: DDP mode through process_group, FSDP2 by sharding."""
    return {"process_group": dist.group.WORLD} if mode == "ddp" else {"sharded": True}


def _split_worker(rank: int, world_size: int, tmp: Path, mode: str) -> None:
    kw = _split_kwargs(mode)
    for name in OPTIMIZERS:
        model, opt, params10 = _run_and_save(name, tmp, mode, rank, **kw)
        # Same world size: this rank's shard, the consolidated dict or DCP, all bit-exact.
        for load in (_from_file(tmp / f"{name}-{mode}-shard{rank}.pt"),
                     _from_file(tmp / f"{name}-{mode}-full.pt", "optimizer"),
                     *_dcp_loaders(name, tmp / f"{name}-{mode}-dcp")):
            resumed, resumed_opt = _resume(name, params10, load, **kw)
            _assert_equal(model, resumed)
            _assert_same_state(opt, resumed_opt, model, resumed)
        # 1 -> 2: the single process's checkpoints, as a file and through DCP.
        plain = torch.load(tmp / f"{name}-plain-full.pt", weights_only=True)
        plain20 = torch.load(tmp / f"{name}-plain-final.pt", weights_only=True)
        for load in (_from_file(tmp / f"{name}-plain-full.pt", "optimizer"),
                     *_dcp_loaders(name, tmp / f"{name}-plain-dcp")):
            resumed, _ = _resume(name, plain["params"], load, **kw)
            _assert_close(resumed, plain20)
        # Another rank's shard is refused, saying what mismatched.
        other = torch.load(tmp / f"{name}-{mode}-shard{1 - rank}.pt", weights_only=True)
        with pytest.raises(ValueError, match=f"shard of rank {1 - rank} of 2 .*rank {rank} of 2"):
            _, fresh = _resume(name, params10, lambda model, opt: None, **kw)
            fresh.load_state_dict(other)


def _dcp_loaders(name: str, path: Path) -> list[Loader]:
    return [_from_dcp(path)] if name in DCP_OPTIMIZERS else []


@pytest.mark.parametrize(("name", "route"), [
    ("soap", "file"), ("soap", "dcp"), ("soap_lowmem", "file"), ("soap_lowmem", "dcp"),
    ("shampoo", "file"), ("shampoo", "dcp"),
])
def test_single_process_checkpoints_round_trip(name: str, route: str, tmp_path: Path) -> None:
    model, opt, params10 = _run_and_save(name, tmp_path, "plain", 0)
    load = _from_file(tmp_path / f"{name}-plain-full.pt", "optimizer") if route == "file" \
        else _from_dcp(tmp_path / f"{name}-plain-dcp")
    resumed, resumed_opt = _resume(name, params10, load)
    _assert_equal(model, resumed)
    _assert_same_state(opt, resumed_opt, model, resumed)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_bit_exact_and_across_world_sizes(mode: str, tmp_path: Path) -> None:
    for name in OPTIMIZERS:
        _run_and_save(name, tmp_path, "plain", 0)
    harness.spawn(_split_worker, 2, tmp_path, mode)
    for name in OPTIMIZERS:  # 2 -> 1: the consolidated dict and DCP, in a plain optimizer
        saved = torch.load(tmp_path / f"{name}-{mode}-full.pt", weights_only=True)
        split20 = torch.load(tmp_path / f"{name}-{mode}-final.pt", weights_only=True)
        for load in (_from_file(tmp_path / f"{name}-{mode}-full.pt", "optimizer"),
                     *_dcp_loaders(name, tmp_path / f"{name}-{mode}-dcp")):
            resumed, _ = _resume(name, saved["params"], load)
            _assert_close(resumed, split20)
        shard = torch.load(tmp_path / f"{name}-{mode}-shard0.pt", weights_only=True)
        with pytest.raises(ValueError, match="shard of rank 0 of 2 .*without a split"):
            OPTIMIZERS[name](param_groups(make_model())).load_state_dict(shard)


def _saved_soap(**kw: Any) -> dict[str, Any]:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = SOAP(params, **kw)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt.state_dict()


def _corrupt(state: dict[str, Any]) -> dict[str, Any]:
    state["state"][0]["factor_1"][1, 2] = float("nan")
    return state


def _claims_other_settings(state: dict[str, Any]) -> dict[str, Any]:
    """State of max_precond_dim=3 under a group that says 10000 (the plan follows the group)."""
    state["param_groups"][0]["max_precond_dim"] = 10000
    return state


def _no_step(state: dict[str, Any]) -> dict[str, Any]:
    del state["state"][1]["step"]
    return state


@pytest.mark.parametrize(("saved", "shapes", "match"), [
    (_saved_soap, [(3, 3), (5,)], r"'exp_avg' of parameter #0 .* \(3, 3\) has 12 elements"),
    (_saved_soap, [(3, 4), (5,)], r"'factor_0' of parameter #0 .* has shape \(4, 4\)"),
    (lambda: _claims_other_settings(_saved_soap(max_precond_dim=3)), [(4, 3), (5,)],
     "lacks 'factor_0'.*max_precond_dim"),
    (lambda: _corrupt(_saved_soap()), [(4, 3), (5,)], "'factor_1' .* contains NaN or Inf"),
    (lambda: _no_step(_saved_soap()), [(4, 3), (5,)], "parameter #1 .* no valid 'step'"),
    (lambda: {"weights": []}, [(4, 3), (5,)], "not an optimizer state dict"),
    (_saved_soap, [(4, 3)], "the state dict has 2 parameters in param group 0, the optimizer 1"),
])
def test_wrong_or_corrupt_checkpoints_are_refused(saved: Callable, shapes: list, match: str
                                                  ) -> None:
    state = saved()
    opt = SOAP([torch.nn.Parameter(torch.randn(s)) for s in shapes])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert not opt.state  # nothing was loaded


def _one_rank_loads_a_corrupt_shard(rank: int, world_size: int, tmp: Path) -> None:
    """Only rank 1's file is bad, yet every rank raises (none waits in a collective). Tensor
    entries are gathered whole on loading, so a bad slice reaches every rank: the bad entry
    here is a step, which only rank 1 reads."""
    model = make_model()
    opt = OPTIMIZERS["soap"](param_groups(model), process_group=dist.group.WORLD)
    _train(model, opt, range(2))
    state = opt.state_dict()
    if rank == 1:
        next(iter(state["state"].values()))["step"] = -5
    fresh = OPTIMIZERS["soap"](param_groups(make_model()), process_group=dist.group.WORLD)
    match = "no valid 'step'" if rank == 1 else "on rank 1: state of parameter .* no valid 'step'"
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)


def test_a_corrupt_shard_on_one_rank_fails_every_rank(tmp_path: Path) -> None:
    harness.spawn(_one_rank_loads_a_corrupt_shard, 2, tmp_path)
