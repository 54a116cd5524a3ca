"""FSDP2 mode: DTensor parameters (``fully_shard``), each gathered whole to its owner rank.

Under FSDP2 every rank holds only a shard of each parameter and of its (reduce-scattered)
gradient, but SOAP and Shampoo need whole matrices: a factor G Gᵀ of a row shard is not a block
of the factor of G. So each parameter gets one owner rank (the same cost-balanced assignment as
DDP mode), and a step is

1. one ``all_to_all_single`` per param group (and dtype): every rank sends the shards of each
   parameter's value and gradient to its owner, which concatenates them into full tensors;
2. the owner runs the unchanged single-process maths on the full tensors (so the result is the
   plain optimizer's, bit for bit, given the same gradients);
3. a second ``all_to_all_single`` sends each rank its shard of the updated values.

Only the owner keeps a parameter's state, as plain full-size tensors, so a checkpoint's state
does not depend on how the parameters were sharded. Supported layout: a 1-D device mesh with
``Shard(d)`` placements (FSDP2's default is ``Shard(0)``); shards may be uneven or empty.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from soaplab.optim.distributed.ddp import OwnerSplit, all_gather_single, kinds
from soaplab.optim.interface import Shell, Target, local


class ShardedSplit(OwnerSplit):
    """Ownership of DTensor parameters, and the two all-to-alls of a step."""

    def __init__(self, optimizer: Shell, process_group: Any) -> None:
        super().__init__(optimizer, process_group)
        # sizes[r][i]: elements of parameter i held by rank r; order: ranks by shard index.
        self._sizes: list[list[int]] = []
        self._order: list[int] = []
        self._index: dict[Tensor, int] = {}

    @classmethod
    def create(cls, optimizer: Shell, process_group: Any) -> ShardedSplit | None:
        """A split over the parameters' device mesh if they are DTensors, else None."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sharded = [p for p in params if isinstance(p, DTensor)]
        if not sharded:
            return None
        if len(sharded) != len(params):
            raise ValueError("some parameters are DTensors (FSDP2) and some are not; give the "
                             "optimizer only sharded or only plain parameters")
        mesh = sharded[0].device_mesh
        for p in sharded:
            if p.device_mesh != mesh or mesh.ndim != 1 or len(p.placements) != 1 \
                    or not isinstance(p.placements[0], Shard):
                raise ValueError(f"DTensor parameter with shape {tuple(p.shape)} is placed as "
                                 f"{p.placements} on a {p.device_mesh.ndim}-D mesh; soaplab "
                                 "supports Shard(d) on one 1-D mesh (fully_shard's default)")
        group = mesh.get_group()
        if process_group is not None and \
                dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group):
            raise ValueError("process_group differs from the device mesh of the DTensor "
                             "parameters; leave process_group=None under FSDP2")
        return cls(optimizer, group)

    def mesh(self) -> DeviceMesh:
        """The parameters' device mesh."""
        return next(p for g in self.optimizer.param_groups for p in g["params"]).device_mesh

    def _new_layout(self, params: list[Tensor]) -> None:
        """Learn every rank's shard sizes and shard index (one all-gather per new layout)."""
        mesh = params[0].device_mesh
        mine = torch.tensor([mesh.get_local_rank(), *(local(p).numel() for p in params)],
                            dtype=torch.int64, device=self._device(params))
        everyone = torch.empty(self.world_size * mine.numel(), dtype=torch.int64,
                               device=mine.device)
        all_gather_single(everyone, mine, group=self.process_group)
        rows = everyone.view(self.world_size, -1).tolist()
        self._order = sorted(range(self.world_size), key=lambda r: rows[r][0])
        self._sizes = [row[1:] for row in rows]
        self._index = {p: i for i, p in enumerate(params)}

    # -- the two all-to-alls of a step ----------------------------------------------------------
    def targets(self, group: dict[str, Any]) -> list[Target]:
        """Gather the value and the gradient of each owned parameter whole, on its owner."""
        owners = self.owners()
        out = []
        for params in self._moving(group):
            mine = [p for p in params if owners[p] == self.rank]
            outgoing: list[list[Tensor]] = [[] for _ in range(self.world_size)]
            for p in params:
                outgoing[owners[p]] += [local(p).detach().reshape(-1),
                                        local(p.grad).reshape(-1).to(p.dtype)]
            incoming = [[self._size(r, p) for p in mine for _ in "vg"]
                        for r in range(self.world_size)]
            received = self._all_to_all(outgoing, incoming, local(params[0]))
            for k, p in enumerate(mine):
                dim = p.placements[0].dim
                values = [self._shaped(received[r][2 * k], p) for r in self._order]
                grads = [self._shaped(received[r][2 * k + 1], p) for r in self._order]
                out.append((p, torch.cat(values, dim), torch.cat(grads, dim)))
        return out

    def finish(self, group: dict[str, Any], targets: list[Target]) -> None:
        """Send every rank its shard of the new values of the parameters this rank owns."""
        owners = self.owners()
        full = {p: tensor for p, tensor, _ in targets}
        for params in self._moving(group):
            outgoing: list[list[Tensor]] = [[] for _ in range(self.world_size)]
            for p in params:
                if owners[p] == self.rank:
                    pieces = full[p].split([self._extent(r, p) for r in self._order],
                                           p.placements[0].dim)
                    for r, piece in zip(self._order, pieces, strict=True):
                        outgoing[r].append(piece.reshape(-1))
            incoming = [[self._size(self.rank, p) for p in params if owners[p] == r]
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

    # -- shard geometry -------------------------------------------------------------------------
    def _size(self, rank: int, p: Tensor) -> int:
        """Elements of ``p`` in ``rank``'s shard."""
        return self._sizes[rank][self._index[p]]

    def _extent(self, rank: int, p: Tensor) -> int:
        """Length of ``rank``'s shard of ``p`` along the sharded dim."""
        return self._size(rank, p) // _slice_size(p)

    def _shaped(self, flat: Tensor, p: Tensor) -> Tensor:
        """A received flat shard of ``p`` in its shard shape."""
        shape = list(p.shape)
        shape[p.placements[0].dim] = flat.numel() // _slice_size(p)
        return flat.view(shape)


def _slice_size(p: Tensor) -> int:
    """Elements per index of the sharded dim of ``p`` (> 0: empty parameters never move)."""
    dim = p.placements[0].dim
    return math.prod(p.shape) // p.shape[dim]
