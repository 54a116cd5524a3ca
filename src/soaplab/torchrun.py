"""Commands under ``torchrun``: which rank this is, and the few collectives the loop needs.

torchrun starts one process per rank with RANK, WORLD_SIZE and LOCAL_RANK in its environment;
:func:`session` joins them into the default process group for one command and leaves it again.
Without torchrun (or with one process) every helper is the single-process identity, so the
loop has one code path. Every rank runs the same command on the same data; only rank 0 writes
files or prints, and what rank 0 alone reads (a checkpoint) reaches the others by
:func:`from_main`, so no shared filesystem is assumed.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from soaplab.optim.base import KroneckerOptimizer
from soaplab.optim.distributed import full_state_dict
from soaplab.optim.distributed.ddp import all_gather_single

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def restarted() -> bool:
    """True in the workers torchrun started again after one failed (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def device(name: str) -> str:
    """Under torchrun ``cuda`` means this rank's own GPU, ``cuda:LOCAL_RANK``."""
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


@contextlib.contextmanager
def session(device_name: str) -> Iterator[None]:
    """Join torchrun's ranks (gloo on CPU, nccl on CUDA) for the body, then leave.

    Does nothing without torchrun, or when the caller already made a process group (which it
    then owns). Other ranks' stdout is dropped: they run the same code and would print every
    line N times; their stderr stays, so an error says which rank raised it.
    """
    made = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if made:
        cuda = device_name.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group("nccl" if cuda else "gloo")
    clean = False
    try:
        with open(os.devnull, "w") as null, \
                contextlib.nullcontext() if is_main() else contextlib.redirect_stdout(null):
            yield
        clean = True
    finally:
        if made:
            leave(clean)


def leave(clean: bool) -> None:
    """``destroy_process_group()``, without the crash at exit that gloo can cause.

    A gloo worker thread lets go of a finished collective's tensors just after the caller
    has gone on. If that falls into the interpreter's shutdown, the release needs the GIL and
    the process aborts ("terminate called without an active exception", pytorch PR 179291):
    torchrun would see a failed worker after a successful run. So, after a run that every rank
    finished (``clean``; after an error a rank may be gone), a barrier lets those releases
    happen first. Collecting garbage then drops the last references to the groups (DDP's
    reducer, the optimizers), so destroying them joins their threads; FSDP2's groups stay
    referenced by DTensor's caches until exit, and for them the barrier is what helps.
    """
    if clean:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def _init_process_group(backend: str) -> None:
    """``init_process_group(backend)``, with each torchrun attempt's keys kept apart.

    torchrun (2.5 on) lends its workers its own rendezvous store, which outlives a restart, so
    the keys of the failed attempt are still there: restarted gloo workers read the dead
    workers' addresses and fail with "Connection refused" (pytorch issue 135712). A prefix per
    attempt (TORCHELASTIC_RESTART_COUNT) keeps them apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"soaplab/attempt{attempt}", store),
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def group() -> Any:
    """The process group soaplab's optimizers split their work over; None in one process."""
    return dist.group.WORLD if world_size() > 1 else None


def wrap(model: nn.Module) -> nn.Module:
    """``model`` under DistributedDataParallel: backward all-reduces the mean gradient."""
    if world_size() == 1:
        return model
    on_cuda = next(model.parameters()).device.type == "cuda"
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if on_cuda else None)
    wrapped.register_comm_hook(None, _sum_in_rank_order)
    return wrapped


def _sum_in_rank_order(state, bucket):  # unannotated: DDP checks annotations by identity
    """DDP's all-reduce of one bucket of gradients, summed in rank order: the mean gradient,
    with the same bits whatever the bucket layout.

    DDP regroups the gradients into new buckets after the first step of every (re)start, and on
    more than 2 ranks an all-reduce adds up an element in an order that depends on where it sits
    in its bucket, so a run restarted from a checkpoint would drift from an uninterrupted one in
    the last bits. Gathering every rank's bucket and adding rank 0, 1, 2, ... costs N buckets'
    worth of traffic per rank instead of about 2: small, for the models of these experiments.
    """
    grad, n = bucket.buffer(), world_size()
    parts = torch.empty(n * grad.numel(), dtype=grad.dtype, device=grad.device)
    all_gather_single(parts, grad)
    grad.copy_(parts.view(n, -1).sum(0).div_(n))
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(grad)
    return future


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state, as one process would hold it: what a checkpoint needs to
    resume on any world size (a collective for soaplab's split optimizers; torch's optimizers
    run replicated, so every rank's state dict is already the whole state)."""
    return full_state_dict(opt) if isinstance(opt, KroneckerOptimizer) else opt.state_dict()


def shard(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of the global batch (every rank draws the whole batch)."""
    n = world_size()
    if batch[0].shape[0] % n:
        raise ValueError(f"--batch-size {batch[0].shape[0]} does not split evenly over {n} "
                         f"ranks; pass a multiple of {n}")
    return tuple(t.chunk(n)[rank()] for t in batch)


def _reduce(value: torch.Tensor, op: Any) -> torch.Tensor:
    if world_size() == 1:
        return value
    value = value.detach().clone()
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=op)
    return value


def mean(value: torch.Tensor) -> torch.Tensor:
    """The average of ``value`` over the ranks (a collective)."""
    return _reduce(value, dist.ReduceOp.SUM) / world_size()


def maximum(value: int) -> int:
    """The largest ``value`` of any rank (a collective)."""
    return int(_reduce(torch.tensor(value, dtype=torch.int64), dist.ReduceOp.MAX).item())


def from_main(read: Callable[[], T]) -> T:
    """``read()`` run on rank 0 only; its result, or the exception it raised, on every rank.

    The exception travels too, so that when rank 0 cannot read a file every rank raises the
    same error, instead of rank 0 exiting while the others wait for it in a collective.
    """
    if world_size() == 1:
        return read()
    box: list[Any] = [None, None]
    if is_main():
        try:
            box[0] = read()
        except Exception as err:  # re-raised below, on every rank
            box[1] = err
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]
