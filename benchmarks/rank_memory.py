"""Optimizer state per rank on GPT shapes, for each way of training on several ranks.

Run from the repository root::

    python -m benchmarks.rank_memory                   # 4 ranks; HSDP 2 x 2, TP over 4
    python -m benchmarks.rank_memory --ranks 8 --replicas 2
    python -m benchmarks.rank_memory --ranks 2 --replicas 1 --width 128 --layers 2 --block 64

Every optimizer steps twice on the GPT shapes of ``step_time.py --memory`` (width 256, 4
layers, the same settings and gradients), in one process; its state is then split over the
ranks as each mode holds it, and the fullest rank's bytes are reported (it sets the memory a
job needs). SOAP's owners are those the real split modes compute
(``soaplab.optim.distributed.ownership``, from the same plans as ``OwnerSplit``):

* DDP split (``process_group=``): each parameter's whole state on its owner rank. AdamW and
  Muon (torch's) run replicated under DDP: all of it on every rank.
* FSDP2 (DTensor parameters, ``Shard(0)``): SOAP as DDP split (the owner gathers the
  parameter whole and keeps plain full-size state). AdamW's state is sharded like the
  parameters (``torch.chunk`` of the rows); Muon's is *computed* the same way (torch's Muon
  does not take DTensors).
* HSDP, replicas x shards, and TP over all ranks (DTensor mode, ``soaplab.optim.distributed.
  fsdp``): SOAP's owners over all ranks of the mesh, each holding its parameters' whole
  state, so no replica repeats another's preconditioner work; the same numbers as DDP split
  (``tests/distributed/test_meshes.py`` prints the real ranks' state). AdamW's and Muon's
  state is *computed* sharded like the parameters: under HSDP over the shard dimension and
  repeated on every replica; under TP with the matrices placed as ``parallelize_module``
  places a GPT's (qkv and MLP-up ``ColwiseParallel``: ``Shard(0)``; attention and MLP-down
  projections ``RowwiseParallel``: ``Shard(1)``; the token embedding ``Shard(0)``; the
  position embedding and LayerNorms replicated).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from benchmarks.step_time import builders, draw_grads, gpt_shapes, make_params, state_bytes
from benchmarks.storage_loss import combinations, presets, soap_with
from soaplab.optim.distributed import assign_owners, param_cost
from soaplab.optim.kronecker import plan_factors

Shape = tuple[int, ...]


@dataclass
class ParamState:
    """One parameter's state bytes: element-wise entries (shaped like the parameter), entries
    that no shard splits (scalars), and per factored axis its factor and basis."""

    shape: Shape
    elementwise: int = 0
    whole: int = 0
    axes: dict[int, int] = field(default_factory=dict)  # factored axis -> factor + basis
    cost: int = 0  # ownership.param_cost of the parameter (0 for torch's optimizers)


def param_states(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[ParamState]:
    """Each parameter's state (in ``params`` order) as a :class:`ParamState`; SOAP's keys
    ``factor_<k>`` and ``basis_<k>`` (and ``basis_<k>_scale``) go to axis k."""
    plan = getattr(opt, "plan_kwargs", None)
    # by storage: muon keeps its hidden matrices' state under 2-D views of them
    stepped = {q.data_ptr(): (q, g) for g in opt.param_groups for q in g["params"]}
    out = []
    for p in params:
        q, group = stepped[p.data_ptr()]
        s = ParamState(tuple(p.shape))
        for key, t in opt.state[q].items():
            if not torch.is_tensor(t):
                continue
            n = t.numel() * t.element_size()  # a view: same-shape parameters' state is stacked
            if key.startswith(("factor_", "basis_")):
                axis = int(key.split("_")[1])
                s.axes[axis] = s.axes.get(axis, 0) + n
            elif t.numel() == p.numel() > 1:
                s.elementwise += n
            else:
                s.whole += n
        if plan is not None:
            planned = plan_factors(s.shape, **plan(group))
            s.cost = param_cost(planned.shape, planned.axes)
        out.append(s)
    return out


def total(s: ParamState) -> int:
    return s.elementwise + s.whole + sum(s.axes.values())


def rows(n: int, parts: int) -> list[int]:
    """Rows of each of ``parts`` shards of ``n`` rows, as ``torch.chunk`` splits them."""
    size = -(-n // parts) if n else 0
    return [max(0, min(size, n - r * size)) for r in range(parts)]


def sharded(s: ParamState, parts: int, dim: int = 0) -> list[int]:
    """Per shard: the element-wise bytes of a parameter split along ``dim``, plus the rest."""
    extent = s.shape[dim] if s.shape else 1
    per_row = s.elementwise // max(extent, 1)
    return [per_row * k + s.whole for k in rows(extent, parts)]


def by_owner(states: list[ParamState], ranks: int) -> list[int]:
    """Per rank: the whole state of the parameters it owns (ownership.assign_owners)."""
    held = [0] * ranks
    for s, r in zip(states, assign_owners([s.cost for s in states], ranks), strict=True):
        held[r] += total(s)
    return held


def tp_dims(shapes: list[Shape]) -> list[int | None]:
    """The sharded dim of each GPT parameter under TP (``gpt_shapes`` order), None if
    replicated: token embedding rows; per block qkv rows, attention projection columns, MLP
    up rows, MLP down columns, LayerNorms replicated; the position embedding replicated."""
    block = [0, 1, 0, 1, None, None, None, None]
    layers = (len(shapes) - 4) // len(block)
    return [0, None] + block * layers + [None, None]


def tensor_parallel(states: list[ParamState], dims: list[int | None], ranks: int) -> list[int]:
    """Per rank under TP for torch's optimizers: state sharded like its parameter, that of
    replicated parameters on every rank."""
    held = [0] * ranks
    for s, dim in zip(states, dims, strict=True):
        parts = [total(s)] * ranks if dim is None else sharded(s, ranks, dim)
        held = [h + b for h, b in zip(held, parts, strict=True)]
    return held


def per_rank(states: list[ParamState], ranks: int, replicas: int, soap: bool,
             dims: list[int | None]) -> dict[str, int]:
    """The fullest rank's bytes in each mode."""
    shards = ranks // replicas
    fsdp = [sum(col) for col in zip(*(sharded(s, ranks) for s in states), strict=True)]
    hsdp = [sum(col) for col in zip(*(sharded(s, shards) for s in states), strict=True)]
    split = by_owner(states, ranks)
    everything = sum(total(s) for s in states)
    return {"one rank": everything,
            "DDP split": max(split) if soap else everything,
            "FSDP2": max(split) if soap else max(fsdp),
            "HSDP": max(split) if soap else max(hsdp),
            "TP": max(split) if soap else max(tensor_parallel(states, dims, ranks))}


def measure(build: Callable[[list[Tensor]], torch.optim.Optimizer],
            shapes: list[Shape]) -> list[ParamState]:
    params = [p.requires_grad_() for p in make_params(shapes, torch.device("cpu"))]
    opt = build(params)
    for grads in draw_grads(shapes, 2, torch.device("cpu")):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    states = param_states(opt, params)
    if sum(map(total, states)) != state_bytes(opt):  # the views cover the storages exactly
        raise RuntimeError("per-parameter state does not add up to the optimizer's")
    return states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=2, help="HSDP replicas (divides --ranks)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block", type=int, default=256, help="position-embedding rows")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.ranks % args.replicas:
        ap.error(f"--replicas {args.replicas} does not divide --ranks {args.ranks}")
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    shapes = gpt_shapes(args.width, args.layers, block=args.block)
    dims = tp_dims(shapes)
    table = builders("skip")
    named = {tuple(sorted(kw.items())): name for name, kw in presets().items()}
    contestants: dict[str, tuple[Callable, bool]] = {"adamw": (table["adamw"], False),
                                                     "muon": (table["muon"], False)}
    for label, kw in combinations().items():
        name = named.get(tuple(sorted(kw.items())))
        contestants[f"soap {label}" + (f" (`{name}`)" if name else "")] = (soap_with(kw), True)
    shards = args.ranks // args.replicas
    columns = ["one rank", "DDP split", "FSDP2", "HSDP", "TP"]
    heads = ["1 rank", f"DDP split ×{args.ranks}", f"FSDP2 ×{args.ranks}",
             f"HSDP {args.replicas}×{shards}", f"TP ×{args.ranks}"]
    n_params = sum(math.prod(s) for s in shapes)
    print(f"state MB (2^20 bytes) of the fullest rank, GPT width {args.width}, {args.layers} "
          f"layers ({n_params / 1e6:.2f} M parameters); in brackets: × AdamW's in that mode; "
          "SOAP rows name factor / basis / momentum storage\n")
    print("| optimizer | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    adamw = None
    for name, (build, soap) in contestants.items():
        held = per_rank(measure(build, shapes), args.ranks, args.replicas, soap, dims)
        adamw = adamw or held
        print(f"| {name} | " + " | ".join(
            f"{held[c] / 2**20:.1f} ({held[c] / adamw[c]:.2f})" for c in columns) + " |",
            flush=True)


if __name__ == "__main__":
    main()
