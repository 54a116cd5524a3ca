"""Time one optimizer step on the parameter shapes of a small GPT, side by side.

Run (CPU, the default shapes: width 256, 4 layers, char-level vocabulary)::

    .venv/bin/python benchmarks/step_time.py
    .venv/bin/python benchmarks/step_time.py --width 512 --layers 8 --steps 40
    .venv/bin/python benchmarks/step_time.py --device cuda --only soap,pytorch_optimizer.SOAP
    .venv/bin/python benchmarks/step_time.py --parts     # what each part of a refresh costs
    .venv/bin/python benchmarks/step_time.py --memory    # state bytes per parameter, all

Every contestant steps its own copy of the same parameters on the same pre-drawn random
gradients, with ``precondition_frequency=10`` and equal hyperparameters. Timing runs in rounds:
each round runs one *window* of 10 consecutive steps (so exactly one basis refresh) of every
contestant in turn, in a rotating order, and also times the matmul floor, so that load from
other processes on a shared machine hits every contestant alike. Reported (medians over rounds):

* ``step ms``: median step time, i.e. an ordinary step (9 of every 10 steps are ordinary).
* ``amortized ms``: median window time / 10, refreshes included.
* ``refresh``: extra time of the refreshing step over an ordinary one, in ordinary steps:
  (window - 10·step) / step.
* ``/floor``: step ms over the matmul floor, the time of the ordinary SOAP step's unavoidable
  matrix products alone (for each m×n matrix: the grams G Gᵀ and Gᵀ G, the projection
  Q_Lᵀ G Q_R and the back-projection, 6·(m²n + mn²) flops), timed with torch.matmul on the
  same shapes, batched like the optimizers may batch them. ``/floor amort`` likewise for the
  amortized step.
* ``/peer``: amortized step over the fastest peer's (pytorch_optimizer.SOAP, heavyball.SOAP).
* ``state MB``: optimizer state memory.

Peers come from the ``bench`` extra (``pip install -e .[bench]``); a peer that is not installed
or fails to run is reported as skipped. heavyball compiles its step with torch.compile by default
(``--heavyball compiled``): the first run on a machine spends minutes compiling (the inductor
cache makes later runs faster); ``--heavyball eager`` turns compilation off and ``skip`` drops it.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import soaplab
from soaplab.optim import matrix_functions as mf
from soaplab.optim.kronecker import permute_axis, project, project_back

FREQ = 10
SOAPLAB = ("soap", "soap_adaptive", "soap_eigh", "soap_one_sided", "soap_factorized",
           "soap_one_sided_factorized", "soap_lowmem", "shampoo", "shampoo_half")
# Each storage option of SOAP's state on its own (soaplab.optim.storage): name -> kwargs of soap.
STORAGE = {f"soap_{kind}_{value}": {f"{kind}_storage": value} for kind, value in (
    ("factor", "bf16"), ("factor", "packed"), ("factor", "packed_bf16"), ("basis", "bf16"),
    ("basis", "int8"), ("momentum", "bf16"))}
PEERS = ("pytorch_optimizer.SOAP", "heavyball.SOAP")
COMMON = dict(lr=3e-3, weight_decay=0.01, eps=1e-8)
SOAP_KW = dict(betas=(0.95, 0.95), shampoo_beta=0.95, precondition_frequency=FREQ,
               max_precond_dim=10000, merge_dims=False, precondition_1d=False)

Shape = tuple[int, ...]
Builder = Callable[[list[Tensor]], torch.optim.Optimizer]


# -- shapes, parameters, gradients ----------------------------------------------------------------
def gpt_shapes(width: int, layers: int, vocab: int = 65, block: int = 256) -> list[Shape]:
    """nanoGPT-style parameters: token and position embeddings, and per layer a fused qkv
    (3d, d), the attention projection (d, d), the MLP (4d, d) and (d, 4d), two layernorms'
    weights and biases (d,); then the final layernorm. The head is tied to the embedding."""
    d = width
    block_shapes: list[Shape] = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] + [(d,)] * 4
    return [(vocab, d), (block, d)] + block_shapes * layers + [(d,), (d,)]


def make_params(shapes: list[Shape], device: torch.device, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(0.02 * torch.randn(s, generator=gen)).to(device) for s in shapes]


def draw_grads(shapes: list[Shape], count: int, device: torch.device,
               seed: int = 1) -> list[list[Tensor]]:
    """``count`` gradient sets, cycled through by every contestant in the same order."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(count)]


# -- contestants ---------------------------------------------------------------------------------
def _muon(ps: list[Tensor], ns_dtype: str) -> torch.optim.Optimizer:
    """Muon on the blocks' matrices, AdamW on the two embeddings (first in gpt_shapes) and the
    vectors; its Newton–Schulz in bfloat16 (``muon``, torch's) or float32 (``muon_fp32``)."""
    return soaplab.optimizer("muon", [
        {"params": [p for p in ps[2:] if p.dim() == 2], "role": "hidden"},
        {"params": ps[:2] + [p for p in ps[2:] if p.dim() != 2], "role": "other"}],
        betas=(0.9, 0.95), ns_dtype=ns_dtype, **COMMON)


def builders(heavyball_mode: str) -> dict[str, Builder | str]:
    """Name -> constructor, or -> the reason it is skipped."""
    table: dict[str, Builder | str] = {
        "adamw": lambda ps: torch.optim.AdamW(ps, betas=(0.9, 0.95), foreach=True, **COMMON),
        "muon": functools.partial(_muon, ns_dtype="bfloat16"),
        "muon_fp32": functools.partial(_muon, ns_dtype="float32")}
    for name in SOAPLAB + tuple(STORAGE):
        kw = SOAP_KW if name.startswith("soap") else dict(
            precondition_frequency=FREQ, betas=(0.9, 0.95), shampoo_beta=0.95)
        kw = {**kw, **STORAGE.get(name, {})} if name.startswith("soap") else {**kw, "eps": 1e-12}
        table[name] = (lambda n, k: lambda ps: soaplab.optimizer(n, ps, **{**COMMON, **k}))(
            "soap" if name in STORAGE else name, kw)
    try:
        import pytorch_optimizer

        po_kw = {**SOAP_KW, "max_precondition_dim": SOAP_KW["max_precond_dim"]}
        del po_kw["max_precond_dim"]
        table["pytorch_optimizer.SOAP"] = lambda ps: pytorch_optimizer.SOAP(
            ps, **COMMON, **po_kw)
    except ImportError as err:
        table["pytorch_optimizer.SOAP"] = f"not installed ({err}); pip install -e .[bench]"
    if heavyball_mode == "skip":
        table["heavyball.SOAP"] = "--heavyball skip"
        return table
    try:
        import heavyball

        if heavyball_mode == "eager":
            heavyball.utils.compile_mode = None
            heavyball.utils.compile_mode_recommended_to_none = None
        table["heavyball.SOAP"] = lambda ps: heavyball.SOAP(
            ps, **COMMON, **SOAP_KW, use_precond_schedule=False)
    except ImportError as err:
        table["heavyball.SOAP"] = f"not installed ({err}); pip install -e .[bench]"
    return table


@dataclass
class Contestant:
    name: str
    params: list[Tensor]
    opt: torch.optim.Optimizer
    steps: int = 0
    warmup_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    window_s: list[float] = field(default_factory=list)
    error: str | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_window(c: Contestant, grads: list[list[Tensor]], device: torch.device,
               record: bool = True) -> None:
    """FREQ consecutive steps; each step's and the window's wall time are recorded."""
    times = []
    for _ in range(FREQ):
        for p, g in zip(c.params, grads[c.steps % len(grads)], strict=True):
            p.grad = g
        sync(device)
        start = time.perf_counter()
        c.opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
        c.steps += 1
    if record:
        c.step_s.extend(times)
        c.window_s.append(sum(times))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages reachable from ``opt.state`` (works for peers)."""
    seen: dict[int, int] = {}

    def walk(obj: Any) -> None:
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(list(opt.state.values()))
    return sum(seen.values())


# -- the matmul floor -----------------------------------------------------------------------------
def floor_flops(shapes: list[Shape]) -> float:
    """Flops of the ordinary SOAP step's matrix products: 6·(m²n + mn²) per m×n matrix."""
    return float(sum(6 * (s[0] ** 2 * s[1] + s[0] * s[1] ** 2) for s in shapes if len(s) == 2))


def floor_operands(shapes: list[Shape], grads: list[Tensor],
                   device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(G, Q_L, Q_R) stacks for each distinct matrix shape, with random orthogonal bases."""
    groups: dict[Shape, list[Tensor]] = defaultdict(list)
    for s, g in zip(shapes, grads, strict=True):
        if len(s) == 2:
            groups[s].append(g)
    operands = []
    for (m, n), gs in groups.items():
        G = torch.stack(gs)
        QL = torch.linalg.qr(torch.randn(len(gs), m, m, device=device)).Q
        QR = torch.linalg.qr(torch.randn(len(gs), n, n, device=device)).Q
        operands.append((G, QL, QR))
    return operands


def floor_products(operands: list[tuple[Tensor, Tensor, Tensor]]) -> None:
    for G, QL, QR in operands:
        torch.matmul(G, G.mT)
        torch.matmul(G.mT, G)
        X = torch.matmul(torch.matmul(QL.mT, G), QR)
        torch.matmul(torch.matmul(QL, X), QR.mT)


def time_floor(operands: list[tuple[Tensor, Tensor, Tensor]], device: torch.device,
               repeats: int = 5) -> float:
    """Median seconds of the floor's products (best case: no optimizer bookkeeping)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        floor_products(operands)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- the refresh's parts --------------------------------------------------------------------------
def median_s(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_factors(shape: Shape, count: int, device: torch.device) -> tuple[Tensor, ...]:
    """Per axis of ``count`` stacked m×n gradients: a full-rank factor A (an EMA of 30 grams)
    and a basis Q near its eigenbasis (eigh of an older factor), as at a real refresh."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(count, *shape, generator=gen).to(device) for _ in range(30)]
    out = []
    for axis in (0, 1):
        grams = [g @ g.mT if axis == 0 else g.mT @ g for g in grads]
        old = sum(0.95 ** (30 - i) * x for i, x in enumerate(grams[:20]))
        A = sum(0.95 ** (30 - i) * x for i, x in enumerate(grams))
        out += [A, mf.eigenbasis(old)]
    return tuple(out)


PARTS = ("A·Q", "sort+drift", *mf.QR_METHODS, "eigh", "transport", "v perm", "sync")


def refresh_parts(shapes: list[Shape], device: torch.device,
                  repeats: int) -> dict[tuple[Shape, int], dict[str, float]]:
    """Seconds of each part of one refresh, per matrix shape (batched over its copies) and axis.

    ``A·Q`` is the power step; ``sort+drift`` the Rayleigh quotients, their sort, the column
    gather and the drift; ``householder``, ``cholesky_qr2`` and ``cholesky_qr2_looped``
    (both with the orthogonality check and its one host sync; the last calls the Cholesky and
    the triangular solve once per matrix) the orthonormalizations; ``eigh`` the exact one;
    ``transport`` carrying m to the new basis (both axes, on the axis-0 row); ``v perm`` the
    second moment's permutation; ``sync`` one finiteness check read by the host."""
    counts: dict[Shape, int] = defaultdict(int)
    for s in shapes:
        if len(s) == 2:
            counts[s] += 1
    parts = {}
    for shape, count in counts.items():
        A0, Q0, A1, Q1 = warm_factors(shape, count, device)
        m = torch.randn(count, *shape, device=device)
        for axis, (A, Q) in enumerate(((A0, Q0), (A1, Q1))):
            parts[(shape, axis)] = axis_parts(A, Q, m, axis, device, repeats)
        bases = {0: Q0, 1: Q1}
        parts[(shape, 0)]["transport"] = median_s(
            lambda: project(project_back(m, bases), bases), device, repeats)  # noqa: B023
    return parts


def axis_parts(A: Tensor, Q: Tensor, m: Tensor, axis: int, device: torch.device,
               repeats: int) -> dict[str, float]:
    AQ = mf.times_basis(A, Q)
    order = mf.sort_by_rayleigh(AQ, Q)
    Y = mf.gather_columns(AQ, order)

    def sort_and_drift() -> None:
        quotients = mf.rayleigh(AQ, Q)
        mf.gather_columns(AQ, torch.argsort(quotients, dim=-1, descending=True))
        mf.drift_from_diagonal(A, quotients)

    return {
        "A·Q": median_s(lambda: mf.times_basis(A, Q), device, repeats),
        "sort+drift": median_s(sort_and_drift, device, repeats),
        **{method: median_s(lambda m=method: mf.orthonormalize(Y, m), device, repeats)
           for method in mf.QR_METHODS},
        "eigh": median_s(lambda: mf.eigenbasis(A), device, max(1, repeats // 2)),
        "transport": 0.0,
        "v perm": median_s(lambda: permute_axis(m, order, axis), device, repeats),
        "sync": median_s(lambda: bool(torch.isfinite(torch.linalg.vector_norm(Y))), device,
                          repeats),
    }


def parts_table(parts: dict[tuple[Shape, int], dict[str, float]]) -> str:
    counts = defaultdict(int)
    rows = ["| matrix (count) | axis, d | " + " | ".join(f"{p} ms" for p in PARTS) + " |",
            "|" + "---|" * (len(PARTS) + 2)]
    for (shape, axis), row in parts.items():
        counts[shape] += 1
        rows.append(f"| {shape} | {axis}, {shape[axis]} | "
                    + " | ".join(f"{row[p] * 1e3:.1f}" for p in PARTS) + " |")
    total = {p: sum(r[p] for r in parts.values()) for p in PARTS}
    rows.append("| **all factors** | | " + " | ".join(f"{total[p] * 1e3:.1f}" for p in PARTS)
                + " |")
    return "\n".join(rows)


# -- report ---------------------------------------------------------------------------------------
def table(contestants: list[Contestant], floor_s: float, skipped: dict[str, str]) -> str:
    ordinary = {c.name: statistics.median(c.step_s) for c in contestants}
    amortized = {c.name: statistics.median(c.window_s) / FREQ for c in contestants}
    peers = [amortized[c.name] for c in contestants if c.name in PEERS]
    best_peer = min(peers) if peers else float("nan")
    rows = ["| optimizer | step ms | amortized ms | refresh (steps) | /floor | /floor amort "
            "| /peer (amort) | state MB |", "|" + "---|" * 8]
    for c in contestants:
        o, a = ordinary[c.name], amortized[c.name]
        refresh = (a * FREQ - FREQ * o) / o
        vs_peer = f"{a / best_peer:.2f}" if peers else "-"
        rows.append(f"| {c.name} | {o * 1e3:.1f} | {a * 1e3:.1f} | {refresh:.1f} | "
                    f"{o / floor_s:.2f} | {a / floor_s:.2f} | {vs_peer} | "
                    f"{state_bytes(c.opt) / 2**20:.1f} |")
    for name, why in skipped.items():
        rows.append(f"| {name} | skipped: {why} | | | | | | |")
    return "\n".join(rows)


def memory_table(contestants: list[Contestant], skipped: dict[str, str], n_params: int) -> str:
    """State held after two steps (every entry exists by then): MB, bytes per parameter, and
    the ratio to AdamW's."""
    held = {c.name: state_bytes(c.opt) for c in contestants}
    adamw = held.get("adamw")
    rows = ["| optimizer | state MB | bytes/param | / AdamW |", "|---|---|---|---|"]
    for name, n in held.items():
        ratio = f"{n / adamw:.2f}" if adamw else "-"
        rows.append(f"| {name} | {n / 2**20:.1f} | {n / n_params:.1f} | {ratio} |")
    rows += [f"| {name} | skipped: {why} | | |" for name, why in skipped.items()]
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--block", type=int, default=256, help="position-embedding rows")
    ap.add_argument("--steps", type=int, default=30,
                    help="timed steps per optimizer (rounded up to windows of 10)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--only", default=None, help="comma-separated contestants to run")
    ap.add_argument("--heavyball", default="compiled", choices=("compiled", "eager", "skip"))
    ap.add_argument("--qr", choices=mf.QR_METHODS,
                    help="the orthonormalization soaplab's refreshes use on this device "
                         "(default: matrix_functions.FASTEST_QR)")
    ap.add_argument("--windows", type=int, default=None,
                    help="timed windows of 10 steps per optimizer (overrides --steps)")
    ap.add_argument("--no-peers", action="store_true", help="skip pytorch_optimizer and heavyball")
    ap.add_argument("--parts", action="store_true",
                    help="print only the table of a refresh's parts per matrix shape and axis")
    ap.add_argument("--memory", action="store_true",
                    help="print only the state memory of every contestant after two steps")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats per part (--parts)")
    ap.add_argument("--grad-sets", type=int, default=7,
                    help="distinct pre-drawn gradient sets, cycled (7: coprime with the window, "
                         "so windows differ, and the factors become full rank as in training)")
    return ap.parse_args(argv)


def setup(args: argparse.Namespace) -> torch.device:
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere, as on CPU
    if args.qr:
        mf.FASTEST_QR[device.type] = args.qr
    return device


def build(args: argparse.Namespace, shapes: list[Shape],
          device: torch.device) -> tuple[list[Contestant], dict[str, str]]:
    wanted = args.only.split(",") if args.only else None
    contestants, skipped = [], {}
    for name, make in builders(args.heavyball).items():
        if (wanted and name not in wanted) or (args.no_peers and name in PEERS):
            continue
        if isinstance(make, str):
            skipped[name] = make
            continue
        params = [p.requires_grad_() for p in make_params(shapes, device)]
        try:
            contestants.append(Contestant(name, params, make(params)))
        except Exception as err:  # a peer that cannot be built is reported, not fatal
            skipped[name] = f"{type(err).__name__}: {err}"
    return contestants, skipped


def warm_up(contestants: list[Contestant], grads: list[list[Tensor]],
            device: torch.device) -> dict[str, str]:
    """First step (state init) plus one full window per contestant; failures are dropped."""
    failed = {}
    for c in list(contestants):
        start = time.perf_counter()
        try:
            for p, g in zip(c.params, grads[0], strict=True):
                p.grad = g
            c.opt.step()
            c.steps = 1
            run_window(c, grads, device, record=False)
        except Exception as err:  # e.g. a peer whose torch.compile fails on this machine
            failed[c.name] = f"failed to run: {type(err).__name__}: {str(err)[:200]}"
            contestants.remove(c)
        c.warmup_s = time.perf_counter() - start
        print(f"  warm-up {c.name}: {c.warmup_s:.1f} s", file=sys.stderr, flush=True)
    return failed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup(args)
    shapes = gpt_shapes(args.width, args.layers, args.vocab, args.block)
    if args.parts:
        print(f"refresh parts, GPT width {args.width}, {args.layers} layers; device "
              f"{device.type}, {torch.get_num_threads()} threads; median of {args.repeats}\n")
        print(parts_table(refresh_parts(shapes, device, args.repeats)))
        return
    grads = draw_grads(shapes, args.grad_sets, device)
    contestants, skipped = build(args, shapes, device)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    if args.memory:
        for c in contestants:
            for g in grads[:2]:
                for p, gp in zip(c.params, g, strict=True):
                    p.grad = gp
                c.opt.step()
        print(f"state after two steps, GPT width {args.width}, {args.layers} layers: "
              f"{n_params / 1e6:.2f} M parameters\n")
        print(memory_table(contestants, skipped, n_params))
        return
    skipped.update(warm_up(contestants, grads, device))
    operands = floor_operands(shapes, grads[0], device)
    floor_products(operands)  # warm-up
    floor_times = []
    rounds = args.windows or max(1, -(-args.steps // FREQ))
    for r in range(rounds):
        floor_times.append(time_floor(operands, device))
        shift = r % len(contestants)
        for c in contestants[shift:] + contestants[:shift]:
            run_window(c, grads, device)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    floor_s = statistics.median(floor_times)
    flops = floor_flops(shapes)
    cpu = platform.processor() or platform.machine()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"GPT width {args.width}, {args.layers} layers, vocab {args.vocab}, block "
          f"{args.block}: {len(shapes)} tensors, {n_params / 1e6:.2f} M parameters")
    qr = mf.fastest_qr(device.type)
    print(f"device {device.type} ({where}); torch {torch.__version__}; "
          f"precondition_frequency {FREQ}; {rounds} rounds of {FREQ} steps; soaplab QR: {qr}")
    print(f"matmul floor: {flops / 1e9:.2f} GFLOP per step at {flops / floor_s / 1e9:.0f} "
          f"GFLOP/s measured = {floor_s * 1e3:.1f} ms\n")
    print(table(contestants, floor_s, skipped))


if __name__ == "__main__":
    main()
