"""DTensor mode: parameters sharded by FSDP2 (``fully_shard``), HSDP or tensor parallelism,
each gathered whole to its owner rank.

Every rank holds only a *tile* of each parameter (the block its placements give it) and of its
gradient, but SOAP and Shampoo need whole matrices: a factor G Gᵀ of a row shard is not a block
of the factor of G. So each parameter gets one owner among all the mesh's ranks (the same
cost-balanced assignment as DDP mode, so replicas split the work instead of repeating it), and
a step is

1. one ``all_to_all_single`` per param group (and dtype): for each distinct tile of a
   parameter, one rank holding it sends the tile's value and gradient to the owner, which
   writes them into full tensors;
2. the owner runs the unchanged single-process maths on the full tensors (so the result is the
   plain optimizer's, bit for bit, given the same gradients);
3. a second ``all_to_all_single`` sends every rank its tile of the updated values (replicas
   included).

Only the owner keeps a parameter's state, as plain full-size tensors, so a checkpoint's state
does not depend on how the parameters were placed. Supported: one device mesh of any
dimension spanning the ranks (1-D, or every rank of the default group), with ``Shard(d)`` and
``Replicate()`` placements: FSDP2's rows or columns, HSDP's (Replicate, Shard), and
``ColwiseParallel`` / ``RowwiseParallel``'s Shard(0), Shard(1) and replicated biases. Tiles
may be uneven or empty.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from soaplab.optim.distributed.ddp import OwnerSplit, all_gather_single, kinds
from soaplab.optim.interface import Shell, Target, local

# Where a rank's tile of a parameter starts in the whole tensor, and its shape.
Tile = tuple[tuple[int, ...], tuple[int, ...]]


class ShardedSplit(OwnerSplit):
    """Ownership of DTensor parameters, and the two all-to-alls of a step."""

    def __init__(self, optimizer: Shell, process_group: Any) -> None:
        super().__init__(optimizer, process_group)
        self._tiles: list[list[Tile]] = []  # [rank][parameter index]
        self._sources: list[list[int]] = []  # [parameter index]: ranks that send to the owner
        self._index: dict[Tensor, int] = {}

    @classmethod
    def create(cls, optimizer: Shell, process_group: Any) -> ShardedSplit | None:
        """A split over the parameters' device mesh if they are DTensors, else None."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sharded = [p for p in params if isinstance(p, DTensor)]
        if not sharded:
            return None
        if len(sharded) != len(params):
            raise ValueError("some parameters are DTensors (FSDP2, tensor parallelism) and some "
                             "are not; give the optimizer only sharded or only plain "
                             "parameters (distribute the rest as Replicate())")
        mesh = sharded[0].device_mesh
        for p in sharded:
            if p.device_mesh != mesh:
                raise ValueError("the DTensor parameters lie on different device meshes; "
                                 "soaplab splits over one mesh")
            if any(type(placement) not in (Shard, Replicate) for placement in p.placements):
                raise ValueError(f"DTensor parameter with shape {tuple(p.shape)} is placed as "
                                 f"{p.placements}; soaplab supports Shard(d) and Replicate() "
                                 "placements (FSDP2, HSDP, tensor parallelism)")
        group = _mesh_group(mesh)
        if process_group is not None and \
                dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group):
            raise ValueError("process_group differs from the device mesh of the DTensor "
                             "parameters; leave process_group=None for DTensor parameters")
        return cls(optimizer, group)

    def mesh(self) -> DeviceMesh:
        """The 1-D mesh of all the split's ranks: the parameters' own if it is 1-D."""
        mesh = next(p for g in self.optimizer.param_groups for p in g["params"]).device_mesh
        return mesh if mesh.ndim == 1 else super().mesh()

    def _new_layout(self, params: list[Tensor]) -> None:
        """Learn every rank's tile of every parameter (one all-gather per new layout), and
        which ranks send each parameter's distinct tiles to its owner."""
        mine = [self.rank]
        for p in params:
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                  p.placements)
            if tuple(local(p).shape) != tuple(shape):
                raise RuntimeError(f"the local shard of the parameter with shape "
                                   f"{tuple(p.shape)} placed {p.placements} is "
                                   f"{tuple(local(p).shape)}, not {tuple(shape)}")
            mine += [*offset, *shape]
        row = torch.tensor(mine, dtype=torch.int64, device=self._device(params))
        everyone = torch.empty(self.world_size * row.numel(), dtype=torch.int64,
                               device=row.device)
        all_gather_single(everyone, row, group=self.process_group)
        rows = everyone.view(self.world_size, -1).tolist()
        self._tiles = []
        for values in rows:
            tiles, k = [], 1
            for p in params:
                n = p.dim()
                tiles.append((tuple(values[k:k + n]), tuple(values[k + n:k + 2 * n])))
                k += 2 * n
            self._tiles.append(tiles)
        self._index = {p: i for i, p in enumerate(params)}
        self._sources = [self._cover(i, p, self._owners[p]) for i, p in enumerate(params)]

    def _cover(self, i: int, p: Tensor, owner: int) -> list[int]:
        """One rank per distinct non-empty tile of parameter ``i``: the owner where it holds
        that tile (it then sends nothing), else one of the tile's holders, taken in turn by
        parameter so that replicas share the sending. Together their tiles are the tensor."""
        holders: dict[Tile, list[int]] = {}
        for r in range(self.world_size):
            if math.prod(self._tiles[r][i][1]):
                holders.setdefault(self._tiles[r][i], []).append(r)
        chosen = {tile: owner if owner in ranks else ranks[i % len(ranks)]
                  for tile, ranks in holders.items()}
        if sum(math.prod(shape) for _, shape in chosen) != p.numel():
            raise RuntimeError(f"the tiles of the parameter with shape {tuple(p.shape)} placed "
                               f"{p.placements} do not cover it once")
        return sorted(chosen.values())

    # -- the two all-to-alls of a step ----------------------------------------------------------
    def targets(self, group: dict[str, Any]) -> list[Target]:
        """Gather the value and the gradient of each owned parameter whole, on its owner."""
        owners = self.owners()
        out = []
        for params in self._moving(group):
            grads = [_placed_like(p.grad, p) for p in params]
            mine = [p for p in params if owners[p] == self.rank]
            outgoing: list[list[Tensor]] = [[] for _ in range(self.world_size)]
            for p, g in zip(params, grads, strict=True):
                if self.rank in self._sources[self._index[p]]:
                    outgoing[owners[p]] += [local(p).detach().reshape(-1),
                                            local(g).reshape(-1).to(p.dtype)]
            incoming = [[self._numel(r, p) for p in mine if r in self._sources[self._index[p]]
                         for _ in "vg"] for r in range(self.world_size)]
            received = self._all_to_all(outgoing, incoming, local(params[0]))
            whole = {p: (local(p).new_empty(p.shape), local(p).new_empty(p.shape)) for p in mine}
            for r in range(self.world_size):
                pieces = iter(received[r])
                for p in mine:
                    if r in self._sources[self._index[p]]:
                        for full in whole[p]:
                            self._tile(full, r, p).copy_(next(pieces).view(self._shape(r, p)))
            out += [(p, *whole[p]) for p in mine]
        return out

    def finish(self, group: dict[str, Any], targets: list[Target]) -> None:
        """Send every rank its tile of the new values of the parameters this rank owns."""
        owners = self.owners()
        full = {p: tensor for p, tensor, _ in targets}
        for params in self._moving(group):
            outgoing: list[list[Tensor]] = [[] for _ in range(self.world_size)]
            for p in params:
                if owners[p] == self.rank:
                    for r in range(self.world_size):
                        outgoing[r].append(self._tile(full[p], r, p).reshape(-1))
            incoming = [[self._numel(self.rank, p) for p in params if owners[p] == r]
                        for r in range(self.world_size)]
            received = self._all_to_all(outgoing, incoming, local(params[0]))
            for r in range(self.world_size):
                for p, piece in zip([p for p in params if owners[p] == r], received[r],
                                    strict=True):
                    local(p).copy_(piece.view_as(local(p)))

    def _moving(self, group: dict[str, Any]) -> list[list[Tensor]]:
        """The parameters a step moves, split by dtype and device (one message each)."""
        return kinds(p for p in group["params"] if p.grad is not None and p.numel() > 0)

    def _all_to_all(self, outgoing: list[list[Tensor]], incoming: list[list[int]],
                    like: Tensor) -> list[list[Tensor]]:
        """Send the flat tensors ``outgoing[r]`` to rank r and receive from each rank r flat
        tensors of the sizes ``incoming[r]``, all in one message of ``like``'s dtype."""
        sent = [t for chunks in outgoing for t in chunks]
        send = torch.cat(sent) if sent else like.new_empty(0)
        out_splits = [sum(sizes) for sizes in incoming]
        received = like.new_empty(sum(out_splits))
        dist.all_to_all_single(received, send, out_splits,
                               [sum(t.numel() for t in chunks) for chunks in outgoing],
                               group=self.process_group)
        return [list(part.split(sizes))
                for part, sizes in zip(received.split(out_splits), incoming, strict=True)]

    # -- tile geometry --------------------------------------------------------------------------
    def _shape(self, rank: int, p: Tensor) -> tuple[int, ...]:
        return self._tiles[rank][self._index[p]][1]

    def _numel(self, rank: int, p: Tensor) -> int:
        """Elements of ``p`` in ``rank``'s tile."""
        return math.prod(self._shape(rank, p))

    def _tile(self, full: Tensor, rank: int, p: Tensor) -> Tensor:
        """``rank``'s tile of the whole tensor ``full`` of ``p`` (a view)."""
        offset, shape = self._tiles[rank][self._index[p]]
        return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def _mesh_group(mesh: DeviceMesh) -> Any:
    """The process group of all the mesh's ranks: a 1-D mesh's own; for a mesh of more
    dimensions (HSDP, data × tensor parallel) the default group, which it must span."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if sorted(mesh.mesh.flatten().tolist()) != list(range(dist.get_world_size())):
        raise ValueError(f"the parameters' {mesh.ndim}-D device mesh does not span every rank "
                         "of the default process group; soaplab splits a multi-dimensional "
                         "mesh over all ranks")
    return dist.group.WORLD


def _placed_like(grad: Tensor, p: Tensor) -> Tensor:
    """The gradient with its parameter's placements (a partial sum is reduced here)."""
    if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(p.placements):
        return grad.redistribute(p.device_mesh, p.placements)
    return grad
