"""2-D device meshes and tensor parallelism on 4 and 2 gloo processes: SOAP and Shampoo on
DTensor parameters placed by HSDP (Replicate, Shard), by data × tensor parallelism and by
``ColwiseParallel`` / ``RowwiseParallel`` equal the plain optimizer fed the same gradients
(difference 0 for SOAP, round-off for Shampoo's batched roots: each parameter is
gathered whole on its owner), every rank of the mesh owns a
share of the work, checkpoints resume bitwise on the same mesh and to 1e-6 on 4×1 and 1×4
meshes, and real tensor-parallel training tracks one process. Run by ``make test-mesh``."""

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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from soaplab import SOAP
from tests.distributed import harness
from tests.distributed.harness import OPTIMIZERS, STEPS, full, make_model, param_groups, set_grads

pytestmark = pytest.mark.mesh

Placer = Callable[[torch.Tensor], tuple[Placement, ...]]


def _mesh(shape: tuple[int, int]) -> DeviceMesh:
    """A 2-D mesh as HSDP wants it: replicas along the first dimension, shards the last."""
    return init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))


def _hsdp(mesh: DeviceMesh) -> Callable[[torch.nn.Module], None]:
    """FSDP2 over a 2-D mesh: HSDP, replicas along the first dimension, shards along the last."""
    return lambda model: fully_shard(model, mesh=mesh)


def _placed(mesh: DeviceMesh, placer: Placer) -> Callable[[torch.nn.ParameterList], None]:
    """Every parameter distributed as ``placer`` says (each rank keeps its own tile)."""
    def place(model: torch.nn.ParameterList) -> None:
        for i, p in enumerate(list(model)):
            model[i] = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, placer(p),
                                                            src_data_rank=None))
    return place


def _columns(p: torch.Tensor) -> Placement:
    """Tensor parallelism's column shards, rows for a vector."""
    return Shard(1) if p.dim() > 1 else Shard(0)


def _layouts(world_size: int) -> dict[str, Callable[[torch.nn.ParameterList], None]]:
    if world_size == 2:  # tensor parallelism on one mesh dimension
        tp = init_device_mesh("cpu", (2,))
        return {"TP Shard(0)/Shard(1)/Replicate":
                _placed(tp, lambda p: (Shard(p.dim() - 1) if p.dim() < 3 else Replicate(),))}
    mesh = _mesh((2, 2))
    return {"HSDP (Replicate, Shard(0))": _hsdp(mesh),
            "(Shard(0), Shard(1))": _placed(mesh, lambda p: (Shard(0), _columns(p))),
            "(Replicate, Shard(1))": _placed(mesh, lambda p: (Replicate(), _columns(p))),
            "(Shard(0), Shard(0))": _placed(mesh, lambda p: (Shard(0), Shard(0)))}


def _meshes_match_unsplit(rank: int, world_size: int) -> None:
    for layout, place in _layouts(world_size).items():
        for name, make in OPTIMIZERS.items():
            placed, plain = make_model(), make_model()
            place(placed)
            assert all(isinstance(p, DTensor) for p in placed)
            opt, reference = make(param_groups(placed)), make(param_groups(plain))
            worst = 0.0
            for step in range(STEPS):
                grads = harness.gradients(step)
                for model, optimizer in ((placed, opt), (plain, reference)):
                    set_grads(model, grads)
                    optimizer.step()
                worst = max(worst, harness.max_diff(placed, plain))
            # Shampoo's batched matrix roots round with the bucket's size, which differs on an
            # owner holding part of a shape's parameters (one process: 6e-8 for 2 vs 1+1)
            bound = 1e-6 if name == "shampoo" else 0.0
            assert worst <= bound, f"{name}, {layout}: differs from plain by {worst:.3g}"
            per_rank = harness.check_owned_state(name, placed, opt, reference)
            assert all(per_rank), f"{name}, {layout}: a rank owns nothing: {per_rank}"
            if rank == 0:
                print(f"{name}, {layout} on {world_size} ranks: max |split - plain| = "
                      f"{worst:.2g}; state KiB per rank [{harness.kib(per_rank)}] vs "
                      f"{reference.state_bytes() / 1024:.1f}")


@pytest.mark.parametrize("world_size", [4, 2])
def test_meshes_equal_the_plain_optimizer_and_split_the_work(world_size: int) -> None:
    harness.spawn(_meshes_match_unsplit, world_size)


def _train(model: torch.nn.ParameterList, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        set_grads(model, harness.gradients(step))
        opt.step()


def _checkpoints(rank: int, world_size: int, tmp: Path) -> None:
    """HSDP 2×2: save at step 10 (DCP, sharded; and full with cpu_offload, as accelerate and
    Lightning do), resume on 2×2, 4×1 and 1×4, and compare step 20 with 20 straight steps."""
    mesh = _mesh((2, 2))
    for name in ("soap", "shampoo"):
        model = make_model()
        fully_shard(model, mesh=mesh)
        opt = OPTIMIZERS[name](param_groups(model))
        _train(model, opt, range(10))
        saved = [full(p).clone() for p in model]
        path = tmp / f"{name}-dcp"
        dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=path)
        whole = get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            assert len(whole["state"]) == len(saved), "the full dict lost other ranks' state"
            torch.save(whole, tmp / f"{name}-full.pt")
        dist.barrier()
        _train(model, opt, range(10, STEPS))
        expected = [full(p) for p in model]
        for shape in ((2, 2), (4, 1), (1, 4)):
            for source in ("dcp", "full"):
                resumed = make_model(seed=1)
                with torch.no_grad():
                    for p, value in zip(resumed, saved, strict=True):
                        p.copy_(value)
                fully_shard(resumed, mesh=_mesh(shape))
                fresh = OPTIMIZERS[name](param_groups(resumed))
                if source == "dcp":
                    state = get_optimizer_state_dict(resumed, fresh)
                    dcp.load(state, checkpoint_id=path)
                else:
                    state = torch.load(tmp / f"{name}-full.pt", weights_only=True) \
                        if rank == 0 else {}
                options = StateDictOptions(strict=True, full_state_dict=source == "full",
                                           broadcast_from_rank0=source == "full")
                set_optimizer_state_dict(resumed, fresh, state, options=options)
                _train(resumed, fresh, range(10, STEPS))
                diff = max((full(p) - q).abs().max().item()
                           for p, q in zip(resumed, expected, strict=True))
                if shape == (2, 2):
                    assert diff == 0, f"{name} {source}: resumed on 2×2 differs by {diff:.3g}"
                assert diff <= 1e-6, f"{name} {source}: resumed on {shape} differs by {diff:.3g}"
                if rank == 0 and name == "soap":
                    print(f"{name} saved on 2×2, {source}, resumed on {shape[0]}×{shape[1]}: "
                          f"max difference {diff:.2g}")


def test_hsdp_checkpoints_resume_on_the_same_and_other_mesh_shapes(tmp_path: Path) -> None:
    harness.spawn(_checkpoints, 4, tmp_path)


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))


def _tensor_parallel_training(rank: int, world_size: int) -> None:
    """``parallelize_module`` with ColwiseParallel then RowwiseParallel (weights Shard(0) and
    Shard(1), biases Shard(0) and Replicate), every rank on the same batch: the forward's
    all-reduce rounds differently from one process's matmul."""
    mesh = init_device_mesh("cpu", (world_size,))
    harness.tracks_one_process(
        _mlp, lambda m: parallelize_module(m, mesh, {"0": ColwiseParallel(),
                                                    "2": RowwiseParallel()}),
        "tensor-parallel MLP", split_batch=False)


def test_tensor_parallel_training_tracks_one_process() -> None:
    harness.spawn(_tensor_parallel_training, 2)


def _refusals(rank: int, world_size: int) -> None:
    mesh = _mesh((2, 2))
    flat = init_device_mesh("cpu", (4,))
    with pytest.raises(ValueError, match="different device meshes"):
        SOAP([torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), m, [Shard(0)] * m.ndim))
              for m in (mesh, flat)])


def test_bad_mesh_setups_fail_clearly() -> None:
    harness.spawn(_refusals, 4)
