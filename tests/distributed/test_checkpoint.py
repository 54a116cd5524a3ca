"""Checkpoints of split optimizers: save at step 10, resume, and step 20 equals 20 uninterrupted
steps, bit-exactly on the same world size and to 1e-6 from 2 ranks to 1 and 1 to 2 (every run
is fed the same gradients). Per-rank shards, consolidated state dicts and
torch.distributed.checkpoint (DCP) all work; wrong checkpoints raise ValueError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
from tests.distributed.harness import OPTIMIZERS, STEPS, make_model, param_groups, set_grads

SAVE_AT = 10
# DCP loads only the keys of a template made by a fresh optimizer's first step, so every
# optimizer must create all of its state entries on that step (both do).
DCP_OPTIMIZERS = ("soap", "shampoo")
Model = torch.nn.ParameterList
Loader = Callable[[Model, torch.optim.Optimizer], None]


def _train(model: Model, opt: torch.optim.Optimizer, steps: range,
           save: Callable[[], None] | None = None) -> None:
    for step in steps:
        if step == SAVE_AT and save is not None:
            save()
        set_grads(model, harness.gradients(step))
        opt.step()


def _resume(name: str, params: list[torch.Tensor], load: Loader,
            **kw) -> tuple[Model, torch.optim.Optimizer]:
    """A fresh model at the saved values and a fresh optimizer, loaded, then steps 10..19."""
    model = make_model(seed=1)
    with torch.no_grad():
        for p, saved in zip(model, params, strict=True):
            p.copy_(saved)
    opt = OPTIMIZERS[name](param_groups(model), **kw)
    load(model, opt)
    _train(model, opt, range(SAVE_AT, STEPS))
    return model, opt


def _from_file(path: Path, key: str | None = None) -> Loader:
    def load(model: Model, opt: torch.optim.Optimizer) -> None:
        saved = torch.load(path, weights_only=False)
        opt.load_state_dict(saved if key is None else saved[key])
    return load


def _from_dcp(path: Path, split: bool = False) -> Loader:
    """DCP's resume recipe. A split optimizer has no state for parameters it does not own, which
    set_optimizer_state_dict only accepts with strict=False; dcp.load still fails on any owned
    entry that the checkpoint lacks."""
    def load(model: Model, opt: torch.optim.Optimizer) -> None:
        state = get_optimizer_state_dict(model, opt)
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(strict=not split))
    return load


def _assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, model_a: Model,
                       model_b: Model) -> None:
    for p, q in zip(model_a, model_b, strict=True):
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            assert torch.equal(value, sb[key]) if torch.is_tensor(value) else value == sb[key]


def _assert_close(model: Model, params: list[torch.Tensor]) -> None:
    diff = max((p - q).abs().max().item() for p, q in zip(model, params, strict=True))
    assert diff <= 1e-6, f"resumed run differs from the uninterrupted one by {diff:.3g}"


def _run_and_save(name: str, tmp: Path, tag: str, rank: int, **kw) -> tuple:
    """20 steps; at step 10 save params, state dict (+ consolidated) and DCP under ``tag``."""
    model = make_model()
    opt = OPTIMIZERS[name](param_groups(model), **kw)
    params10: list[torch.Tensor] = []

    def save() -> None:
        params10.extend(p.detach().clone() for p in model)
        torch.save(opt.state_dict(), tmp / f"{name}-{tag}-shard{rank}.pt")
        full = full_state_dict(opt)
        if rank == 0:
            torch.save({"params": params10, "optimizer": full}, tmp / f"{name}-{tag}-full.pt")
        dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=tmp / f"{name}-{tag}-dcp")

    _train(model, opt, range(STEPS), save)
    if rank == 0:
        torch.save([p.detach() for p in model], tmp / f"{name}-{tag}-final.pt")
    return model, opt, params10


def _split_worker(rank: int, world_size: int, tmp: Path) -> None:
    world = dist.group.WORLD
    for name in OPTIMIZERS:
        model, opt, params10 = _run_and_save(name, tmp, "split", rank, process_group=world)
        # Same world size: this rank's shard, the consolidated dict or DCP, all bit-exact.
        for load in (_from_file(tmp / f"{name}-split-shard{rank}.pt"),
                     _from_file(tmp / f"{name}-split-full.pt", "optimizer"),
                     *_dcp_loaders(name, tmp / f"{name}-split-dcp", split=True)):
            resumed, resumed_opt = _resume(name, params10, load, process_group=world)
            assert all(torch.equal(p, q) for p, q in zip(model, resumed, strict=True))
            _assert_same_state(opt, resumed_opt, model, resumed)
        # 1 -> 2: the single process's checkpoints, as a file and through DCP.
        plain = torch.load(tmp / f"{name}-plain-full.pt", weights_only=False)
        plain20 = torch.load(tmp / f"{name}-plain-final.pt")
        for load in (_from_file(tmp / f"{name}-plain-full.pt", "optimizer"),
                     *_dcp_loaders(name, tmp / f"{name}-plain-dcp", split=True)):
            resumed, _ = _resume(name, plain["params"], load, process_group=world)
            _assert_close(resumed, plain20)
        # Another rank's shard is refused, saying what mismatched.
        other = torch.load(tmp / f"{name}-split-shard{1 - rank}.pt", weights_only=False)
        with pytest.raises(ValueError, match=f"shard of rank {1 - rank} of 2 .*rank {rank} of 2"):
            OPTIMIZERS[name](param_groups(make_model()), process_group=world).load_state_dict(other)


def _dcp_loaders(name: str, path: Path, split: bool = False) -> list[Loader]:
    return [_from_dcp(path, split)] if name in DCP_OPTIMIZERS else []


@pytest.mark.parametrize(("name", "route"), [
    ("soap", "file"), ("soap", "dcp"), ("shampoo", "file"),
    ("shampoo", "dcp"),
])
def test_single_process_checkpoints_round_trip(name: str, route: str, tmp_path: Path) -> None:
    model, opt, params10 = _run_and_save(name, tmp_path, "plain", 0)
    load = _from_file(tmp_path / f"{name}-plain-full.pt", "optimizer") if route == "file" \
        else _from_dcp(tmp_path / f"{name}-plain-dcp")
    resumed, resumed_opt = _resume(name, params10, load)
    assert all(torch.equal(p, q) for p, q in zip(model, resumed, strict=True))
    _assert_same_state(opt, resumed_opt, model, resumed)


def test_resume_bit_exact_and_across_world_sizes(tmp_path: Path) -> None:
    for name in OPTIMIZERS:
        _run_and_save(name, tmp_path, "plain", 0)
    harness.spawn(_split_worker, 2, tmp_path)
    for name in OPTIMIZERS:  # 2 -> 1: the consolidated dict and DCP, in a plain optimizer
        saved = torch.load(tmp_path / f"{name}-split-full.pt", weights_only=False)
        split20 = torch.load(tmp_path / f"{name}-split-final.pt")
        for load in (_from_file(tmp_path / f"{name}-split-full.pt", "optimizer"),
                     *_dcp_loaders(name, tmp_path / f"{name}-split-dcp")):
            resumed, _ = _resume(name, saved["params"], load)
            _assert_close(resumed, split20)
        shard = torch.load(tmp_path / f"{name}-split-shard0.pt", weights_only=False)
        with pytest.raises(ValueError, match="shard of rank 0 of 2 .*without a split"):
            OPTIMIZERS[name](param_groups(make_model())).load_state_dict(shard)


def test_checkpoint_of_another_model_is_refused() -> None:
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = SOAP(a)
    for p in a:
        p.grad = torch.randn_like(p)
    opt.step()
    other = SOAP([torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(5))])
    with pytest.raises(ValueError, match="12 elements but the parameter has shape \\(3, 3\\)"):
        other.load_state_dict(opt.state_dict())
