"""SOAP under torch.compile: graph breaks of an ordinary and a refresh step, and the ordinary
step's time compiled (inductor) against eager, measured side by side in one run.

    python benchmarks/compile.py                 # CPU, width 256, 4 square layers
    python benchmarks/compile.py --device cuda --width 512

Compiling takes minutes on CPU (the first compile of each step kind; later runs use torch's
cache). SOAP keeps ``step`` as a Python int, as the reference does, so dynamo recompiles as it
changes until its recompile limit and then runs that frame eagerly: the compiled timings say
what a user who wraps ``opt.step`` in ``torch.compile`` gets today.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from soaplab import SOAP


def setup(width: int, layers: int, device: torch.device) -> tuple[torch.nn.Module, SOAP]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model.to(device)
    return model, SOAP(model.parameters(), lr=1e-3, precondition_frequency=10)


def backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).square().mean().backward()


def breaks(width: int, layers: int, device: torch.device) -> dict[str, int]:
    """Graph breaks of ``opt.step`` at t = 11 (ordinary) and t = 20 (refresh)."""
    model, opt = setup(width, layers, device)
    x = torch.randn(64, width, device=device)
    found = {}
    for call in range(21):  # call c runs step t = c (the first call builds the bases)
        backward(model, x)
        if call in (11, 20):
            name = "ordinary" if call == 11 else "refresh"
            found[name] = torch._dynamo.explain(opt.step)().graph_break_count
        else:
            opt.step()
    torch._dynamo.reset()
    return found


def ordinary_ms(step, model: torch.nn.Module, x: torch.Tensor, steps: int,
                device: torch.device) -> float:
    """Median milliseconds of the ordinary steps (not multiples of 10) after a warm-up."""
    times = []
    for call in range(steps):
        backward(model, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if call > 20 and call % 10:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=61)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        torch.set_num_threads(args.threads)
    print("graph breaks:", breaks(args.width, args.layers, device), flush=True)
    timings = {}
    for mode in ("eager", "compiled"):
        model, opt = setup(args.width, args.layers, device)
        step = opt.step if mode == "eager" else torch.compile(opt.step)
        x = torch.randn(64, args.width, device=device)
        timings[mode] = ordinary_ms(step, model, x, args.steps, device)
        print(f"{mode}: ordinary step {timings[mode]:.2f} ms", flush=True)
    print(f"compiled / eager: {timings['compiled'] / timings['eager']:.2f}")


if __name__ == "__main__":
    main()
