"""Optimizer step time and state memory on the parameter shapes of a small GPT.

Run: ``python benchmarks/step_time.py [--width 256 --layers 4 --device cpu]``
(peers need ``pip install -e '.[bench]'``; a peer that is missing or fails is reported and
skipped).

Every contestant gets the same parameters and the same pre-drawn gradients (a pool of
sets, cycled). Timing is done in
windows of ``precondition_frequency`` = 10 steps, so each window holds exactly one basis
refresh; windows of all contestants are interleaved round-robin, so slow drifts of this noisy
machine hit everyone alike. Per contestant we report

* ordinary step: median over windows of the median non-refresh step,
* amortized step: median window time / 10 (refresh included),
* refresh cost: (slowest step of a window - ordinary step) / ordinary step, in ordinary steps,
* ratio to the matmul floor: the time of SOAP's unavoidable products alone (per m×n matrix:
  G Gᵀ, Gᵀ G, Q_Lᵀ G Q_R and Q_L U Q_Rᵀ), timed in the same windows,
* state memory: bytes of tensors in the optimizer state (nested lists included).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import soaplab
from soaplab.reporting.tables import markdown_table

FREQ = 10
GRADIENT_POOL = 7


def gpt_shapes(width: int, layers: int, vocab: int = 65, block: int = 256) -> list[tuple]:
    shapes: list[tuple] = [(vocab, width), (block, width)]
    for _ in range(layers):
        shapes += [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
        shapes += [(width,)] * 4  # two LayerNorms, weight and bias
    return shapes


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@dataclass
class Contestant:
    name: str
    step: Callable[[], None]
    memory: Callable[[], int] = lambda: 0
    windows: list[list[float]] = field(default_factory=list)


def optimizer_contestant(name: str, build: Callable, shapes: list[tuple], grads: list,
                         device: str) -> Contestant:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    opt = build(params)

    steps = iter(range(10**9))

    def step() -> None:  # grads are set anew: some peers clear p.grad inside step()
        gradient_set = grads[next(steps) % len(grads)]
        for p, g in zip(params, gradient_set, strict=True):
            p.grad = g
        opt.step()

    step()  # SOAP's first call only builds statistics and bases
    return Contestant(name, step, lambda: tensor_bytes(list(opt.state.values())))


def floor_contestant(shapes: list[tuple], grads: list, max_dim: int) -> Contestant:
    mats = [(g, torch.linalg.qr(torch.randn(g.shape[0], g.shape[0], device=g.device)).Q,
             torch.linalg.qr(torch.randn(g.shape[1], g.shape[1], device=g.device)).Q)
            for g in grads[0] if g.dim() == 2 and max(g.shape) <= max_dim]

    def products() -> None:
        for G, QL, QR in mats:
            G @ G.T, G.T @ G
            QL @ (QL.T @ G @ QR) @ QR.T

    return Contestant("matmul floor", products)


def peers(shapes: list[tuple], grads: list, device: str) -> list[Contestant]:
    out = []
    try:
        import pytorch_optimizer

        out.append(optimizer_contestant("pytorch_optimizer.SOAP", lambda ps: pytorch_optimizer.SOAP(
            ps, lr=3e-3, betas=(0.95, 0.95), precondition_frequency=FREQ), shapes, grads, device))
    except Exception as err:  # noqa: BLE001 - any failure of a peer is reported, not fatal
        print(f"skipping pytorch_optimizer.SOAP: {err}")
    try:
        import heavyball

        out.append(optimizer_contestant("heavyball.SOAP", lambda ps: heavyball.SOAP(
            ps, lr=3e-3, betas=(0.95, 0.95), precondition_frequency=FREQ,
            use_precond_schedule=False, compile_step=False, merge_dims=False,
            max_precond_dim=10000), shapes, grads, device))
    except Exception as err:  # noqa: BLE001
        print(f"skipping heavyball.SOAP: {err}")
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_window(c: Contestant, device: str) -> None:
    times = []
    for _ in range(FREQ):
        sync(device)
        t0 = time.perf_counter()
        c.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    c.windows.append(times)


def summarize(c: Contestant, floor: float, fastest_peer: float | None) -> dict:
    ordinary = statistics.median(statistics.median(sorted(w)[:-1]) for w in c.windows)
    amortized = statistics.median(sum(w) for w in c.windows) / FREQ
    refresh = statistics.median((max(w) - ordinary) / ordinary for w in c.windows)
    return {"optimizer": c.name, "ordinary step (ms)": 1e3 * ordinary,
            "amortized step (ms)": 1e3 * amortized, "refresh cost (steps)": refresh,
            "ordinary / floor": ordinary / floor, "amortized / floor": amortized / floor,
            "amortized / fastest peer": amortized / fastest_peer if fastest_peer else None,
            "state (MB)": c.memory() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--windows", type=int, default=5, help="timed windows of 10 steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = gpt_shapes(args.width, args.layers)
    gen = torch.Generator().manual_seed(1)
    # A pool of gradient sets, cycled: like training, the factors accumulate different
    # gradients and become full rank (a single repeated gradient would keep them rank-deficient).
    grads = [[torch.randn(s, generator=gen).to(args.device) for s in shapes]
             for _ in range(GRADIENT_POOL)]
    ours = {"AdamW (torch, foreach)": lambda ps: torch.optim.AdamW(ps, lr=3e-3, foreach=True)}
    for name in ("soap", "soap_factorized", "soap_one_sided", "soap_eigh", "shampoo"):
        ours[f"soaplab {name}"] = (lambda n: lambda ps: soaplab.optimizer(
            n, ps, lr=3e-3, precondition_frequency=FREQ))(name)
    contestants = [optimizer_contestant(n, b, shapes, grads, args.device) for n, b in ours.items()]
    peer_list = [] if args.no_peers else peers(shapes, grads, args.device)
    floor = floor_contestant(shapes, grads, 10000)
    everyone = [floor, *contestants, *peer_list]
    for c in everyone:  # warm-up window, not recorded
        time_window(c, args.device)
        c.windows.clear()
    for _ in range(args.windows):
        for c in everyone:
            time_window(c, args.device)
    floor_time = statistics.median(statistics.median(w) for w in floor.windows)
    fastest = min((summarize(p, floor_time, None)["amortized step (ms)"] / 1e3
                   for p in peer_list), default=None)
    rows = [summarize(c, floor_time, fastest) for c in contestants + peer_list]
    print(f"\nGPT width {args.width}, {args.layers} layers, {len(shapes)} tensors, "
          f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"matmul floor {1e3 * floor_time:.1f} ms per step\n")
    print(markdown_table(rows, digits=3))


if __name__ == "__main__":
    main()
