"""soaplab under FSDP2 as the engines drive it, on 2 gloo processes: accelerate's rebinding of
an optimizer built before ``fully_shard``, and accelerate's and Lightning's checkpoint options
(torch's ``get/set_optimizer_state_dict`` at the default ``strict=True``, sharded with DCP and
full with ``cpu_offload``), emulated with their exact ``StateDictOptions``. Every soap and
shampoo variant of the registry; every comparison bitwise."""

from __future__ import annotations

from datetime import timedelta
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import soaplab
from tests.distributed import harness
from tests.distributed.harness import full

# Every Kronecker variant of the registry (the split modes and DCP contracts are theirs).
NAMES = [name for name, entry in soaplab.registry.OPTIMIZERS.items() if entry.distributed]
SAVE_AT = 3  # precondition_frequency 2: refreshes before and after the checkpoint


def _mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4),
                               torch.nn.LayerNorm(4))


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    return fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    return soaplab.optimizer(name, model.parameters(), lr=1e-2, precondition_frequency=2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:  # every rank the same batch: FSDP2's mean gradient is the batch's
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        model.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [full(p).clone() for p in model.parameters()]


def _rebound(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """accelerate's FSDP2 order: the optimizer first, on plain parameters, then fully_shard,
    then the DTensors swapped into its groups by data pointer
    (``fsdp2_switch_optimizer_parameters``)."""
    model = _mlp()
    return model, _shard_and_rebind(model, _optimizer(name, model))


def _shard_and_rebind(model: torch.nn.Module, opt: torch.optim.Optimizer
                      ) -> torch.optim.Optimizer:
    """fully_shard ``model``, then swap its DTensors into ``opt``'s groups by data pointer."""
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    _shard(model)
    mapping = {pointers[n]: p for n, p in model.named_parameters()}
    for group in opt.param_groups:
        group["params"] = [mapping[p.data_ptr()] for p in group["params"]]
    return opt


def _assert_trains_like(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                        built_after: torch.nn.Module, reference: torch.optim.Optimizer) -> None:
    """Four steps of each: the rebound optimizer equals the one built after sharding."""
    _train(model, opt, range(4))
    _train(built_after, reference, range(4))
    diff = max((p - q).abs().max().item()
               for p, q in zip(_params(model), _params(built_after), strict=True))
    assert diff == 0, f"{name}: rebound after fully_shard differs by {diff:.3g}"


def _rebinding(rank: int, world_size: int) -> None:
    for name in NAMES:
        model, opt = _rebound(name)
        built_after = _shard(_mlp())
        _assert_trains_like(name, model, opt, built_after, _optimizer(name, built_after))


def test_optimizer_rebound_to_fsdp2_dtensors_trains_like_one_built_after_sharding() -> None:
    harness.spawn(_rebinding, 2)


def _deep_mlp() -> torch.nn.Sequential:
    """An input layer, a hidden matrix, a head and a norm: both halves of a composite."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                               torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))


def _composites_rebound(rank: int, world_size: int) -> None:
    """The composites built from the model (role groups), rebound as accelerate does:
    soap_hidden trains like the one built after sharding, muon refuses in one line."""
    def build(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
        kw = {"precondition_frequency": 2} if soaplab.registry.entry(name).frequency else {}
        return soaplab.optimizer(name, model, lr=1e-2, **kw)

    for name in ("soap_hidden", "muon"):
        model = _deep_mlp()
        opt = _shard_and_rebind(model, build(name, model))
        if name == "muon":
            with pytest.raises(ValueError, match="^muon does not support FSDP2's sharded") as e:
                _train(model, opt, range(1))
            assert "\n" not in str(e.value)
            continue
        built_after = _shard(_deep_mlp())
        _assert_trains_like(name, model, opt, built_after, build(name, built_after))


def test_composites_rebound_to_fsdp2_dtensors_train_like_built_after_or_refuse() -> None:
    harness.spawn(_composites_rebound, 2)


# -- checkpoints ---------------------------------------------------------------------------------
# (save options, how the saved dict is written, load options, which ranks read a full file)
ROUTES: dict[str, tuple[StateDictOptions, str, StateDictOptions, str]] = {
    # accelerate, fsdp_utils._prepare_sd_options: SHARDED_STATE_DICT (offload_to_cpu) and
    # FULL_STATE_DICT (offload_to_cpu, rank0_only); set_optimizer_state_dict with those options.
    "accelerate-sharded": (StateDictOptions(full_state_dict=False, cpu_offload=True), "dcp",
                           StateDictOptions(full_state_dict=False, cpu_offload=True), ""),
    "accelerate-full": (StateDictOptions(full_state_dict=True, cpu_offload=True,
                                         broadcast_from_rank0=True), "rank0",
                        StateDictOptions(full_state_dict=True, cpu_offload=True,
                                         broadcast_from_rank0=True), "rank0"),
    # Lightning ModelParallelStrategy: save_distributed_checkpoint True and False.
    "lightning-sharded": (StateDictOptions(full_state_dict=False, cpu_offload=True), "dcp",
                          StateDictOptions(cpu_offload=True), ""),
    "lightning-full": (StateDictOptions(full_state_dict=True, cpu_offload=True), "rank0",
                       StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                        strict=True), "all"),
}


def _save(route: str, model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    options, writer, _, _ = ROUTES[route]
    state = get_optimizer_state_dict(model, opt, options=options)
    if writer == "dcp":
        dcp.save(state, checkpoint_id=path)
        return
    if dist.get_rank() == 0:
        names = {n for n, p in model.named_parameters()}
        assert set(state["state"]) == names, f"{route}: state of {names - set(state['state'])}"
        torch.save(state, path)


def _load(route: str, model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    _, writer, options, readers = ROUTES[route]
    if writer == "dcp":
        state = get_optimizer_state_dict(model, opt, options=options)
        dcp.load(state, checkpoint_id=path)
    else:
        reads = readers == "all" or dist.get_rank() == 0
        state = torch.load(path, weights_only=True) if reads else {}
    set_optimizer_state_dict(model, opt, state, options=options)


def _checkpoints(rank: int, world_size: int, tmp: Path) -> None:
    for name in NAMES:
        model = _shard(_mlp())
        opt = _optimizer(name, model)
        _train(model, opt, range(SAVE_AT))
        saved = _params(model)
        for route in ROUTES:
            _save(route, model, opt, tmp / f"{name}-{route}")
        dist.barrier()
        _train(model, opt, range(SAVE_AT, 2 * SAVE_AT))
        for route in ROUTES:
            resumed = _shard(_mlp(seed=1))
            with torch.no_grad():
                for p, value in zip(resumed.parameters(), saved, strict=True):
                    p.to_local().copy_(value.chunk(world_size)[rank])
            resumed_opt = _optimizer(name, resumed)
            _load(route, resumed, resumed_opt, tmp / f"{name}-{route}")
            _train(resumed, resumed_opt, range(SAVE_AT, 2 * SAVE_AT))
            assert all(torch.equal(p, q) for p, q in
                       zip(_params(model), _params(resumed), strict=True)), f"{name}, {route}"
            for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
                a, b = opt.state.get(p, {}), resumed_opt.state.get(q, {})
                assert a.keys() == b.keys(), f"{name}, {route}: {a.keys()} != {b.keys()}"
                assert all(torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k]
                           for k, v in a.items()), f"{name}, {route}"


def test_accelerate_and_lightning_fsdp2_checkpoints_resume_bitwise(tmp_path: Path) -> None:
    harness.spawn(_checkpoints, 2, tmp_path)


# -- the zero-gradient, lr = 0 call --------------------------------------------------------------
def _allocation_alone(rank: int, world_size: int) -> None:
    """Only rank 1 makes the call, on a group whose collectives time out after 10 s: a
    collective in it would raise there instead of returning."""
    group = dist.new_group(timeout=timedelta(seconds=10))
    for name in NAMES:
        model = _mlp()
        opt = soaplab.optimizer(name, model.parameters(), lr=0.0, process_group=group)
        if rank == 1:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            owners = opt.split.assignment()
            held = {p for p in model.parameters() if opt.state.get(p)}
            assert held == {p for p in model.parameters() if owners[p] == rank}, name
        dist.barrier()


def test_the_allocation_call_runs_no_collective() -> None:
    harness.spawn(_allocation_alone, 2)
