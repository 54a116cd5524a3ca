"""Split vs redundant SOAP/Shampoo under torch.distributed: step time, per-rank optimizer
memory and per-rank preconditioner work, for 1, 2 and 4 CPU processes (gloo).

Run: ``python benchmarks/distributed.py [--world-sizes 1 2 4 --width 128 --layers 2]``

Every rank of a world size holds the same GPT-shaped parameters and gets the same gradients
(as after DDP's all-reduce). Three optimizers run side by side in each process, in alternating
windows of ``--freq`` steps (one basis refresh per window), so drifts of a shared machine hit
all alike:

* redundant: the plain optimizer, every rank doing all the work (what DDP does today);
* split: ``process_group=WORLD``, each rank owning a cost-balanced share of the parameters, plus
  one all-gather of the parameter values per param group;
* fsdp: the parameters and gradients are DTensors sharded by rows (FSDP2's layout); the owners
  are split's, plus two all-to-alls per param group (shards to the owner, new values back).

Per step we take the slowest rank (it sets the pace of a synchronous job) and report the median
over steps (an ordinary step) and the mean (refreshes amortized). Memory is the optimizer
state held by the fullest rank; work is the fullest rank's share of the estimated
preconditioner cost (soaplab.optim.distributed.ownership). Each process runs one thread;
with more processes than cores the times measure contention, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from soaplab import SOAP, Shampoo
from soaplab.optim.distributed import param_cost
from soaplab.optim.kronecker import plan_factors
from soaplab.reporting.tables import markdown_table

OPTIMIZERS = {"soap": SOAP, "shampoo": Shampoo}
MODES = ("redundant", "split", "fsdp")


def shapes(width: int, layers: int, vocab: int = 65, block: int = 64) -> list[tuple[int, ...]]:
    """The weight shapes of a small GPT (embeddings, attention, MLP, LayerNorms)."""
    out: list[tuple[int, ...]] = [(vocab, width), (block, width)]
    for _ in range(layers):
        out += [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
        out += [(width,)] * 4
    return out


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        result = _measure(rank, world_size, args)
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, result)
        if rank == 0:
            Path(out).write_text(json.dumps(everyone))
    finally:
        dist.destroy_process_group()


def _measure(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    sizes = shapes(args.width, args.layers)
    grads = [[torch.randn(s, generator=gen) for s in sizes] for _ in range(args.grad_pool)]
    mesh = init_device_mesh("cpu", (world_size,))

    def sharded(t: torch.Tensor) -> DTensor:  # FSDP2's layout: rows split across ranks
        return distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)

    cls = OPTIMIZERS[args.optimizer]
    modes: dict[str, Any] = {}
    for mode in MODES:
        pool = [[sharded(g) for g in gs] for gs in grads] if mode == "fsdp" else grads
        params = [torch.nn.Parameter(sharded(torch.zeros(s)) if mode == "fsdp"
                                     else torch.zeros(s)) for s in sizes]
        group = dist.group.WORLD if mode == "split" else None
        modes[mode] = (params, pool, cls(params, lr=1e-3, precondition_frequency=args.freq,
                                         process_group=group))
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for window in range(args.windows + 1):  # window 0 warms up (first step, allocations)
        for mode, (params, pool, opt) in modes.items():
            for k in range(args.freq):
                for p, g in zip(params, pool[(window * args.freq + k) % len(pool)],
                                strict=True):
                    p.grad = g
                dist.barrier()
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                if window > 0:
                    times[mode].append(elapsed)
    result: dict[str, Any] = {"times": times}
    for mode, (params, _, opt) in modes.items():
        split = opt.split
        mine = [p for p in params if split is None or split.owns(p)]
        result[f"{mode}_bytes"] = opt.state_bytes()
        result[f"{mode}_work"] = sum(_cost(p) for p in mine)
    result["total_work"] = sum(_cost(p) for p in modes["split"][0])
    return result


def _cost(p: torch.Tensor) -> int:
    plan = plan_factors(tuple(p.shape), max_precond_dim=10000)
    return param_cost(plan.shape, plan.axes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world_size, _free_port(), args, out), nprocs=world_size)
        ranks = json.loads(Path(out).read_text())
    rows = []
    for mode in MODES:
        slowest = [max(r["times"][mode][i] for r in ranks)
                   for i in range(len(ranks[0]["times"][mode]))]
        rows.append({
            "ranks": world_size, "mode": mode,
            "step ms": 1e3 * statistics.median(slowest),
            "mean step ms": 1e3 * statistics.mean(slowest),
            "state MiB / rank (max)": max(r[f"{mode}_bytes"] for r in ranks) / 2**20,
            "precond work / rank (max, % of all)":
                100 * max(r[f"{mode}_work"] for r in ranks) / ranks[0]["total_work"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4],
                        help="numbers of gloo processes to compare")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="soap")
    parser.add_argument("--width", type=int, default=128, help="GPT width (d_model)")
    parser.add_argument("--layers", type=int, default=2, help="GPT blocks")
    parser.add_argument("--freq", type=int, default=5, help="precondition_frequency (steps)")
    parser.add_argument("--windows", type=int, default=4, help="timed windows per mode")
    parser.add_argument("--grad-pool", type=int, default=3, help="gradient sets, cycled")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = [row for w in args.world_sizes for row in run(w, args)]
    print(f"{args.optimizer}, GPT width {args.width} x {args.layers} layers, "
          f"precondition_frequency {args.freq}, {os.cpu_count()} CPU cores, 1 thread/process; "
          "times are the slowest rank's, median over steps")
    print(markdown_table(rows, digits=3))


if __name__ == "__main__":
    main()
