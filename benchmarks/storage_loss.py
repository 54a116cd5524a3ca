"""What each storage option of SOAP's state (soaplab.optim.storage) costs in loss.

Run from the repository root (it reuses the tests' problem)::

    python -m benchmarks.storage_loss                         # float64 Kronecker least squares
    python -m benchmarks.storage_loss --task lm --steps 300   # the lm task, minutes per variant

``kls``: the float64 problem of tests/optim/problems.py (Hessian Σ ⊗ M, condition 1e4 × 1e3),
300 steps at lr 0.03 from zero, eval loss at steps 100, 200 and 300 and its ratio to full
storage's; the maths runs in fp64, so only the storage rounds. ``lm``: the default lm task of
``soaplab compare lm`` (tuned SOAP lr and settings), final validation loss per variant.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from soaplab.experiments import tuning
from soaplab.experiments.loop import TrainConfig, train
from soaplab.experiments.tasks import TaskOptions
from soaplab.registry import OPTIMIZERS

VARIANTS = {"full": {}, "factor bf16": {"factor_storage": "bf16"},
            "factor packed": {"factor_storage": "packed"},
            "factor packed_bf16": {"factor_storage": "packed_bf16"},
            "basis bf16": {"basis_storage": "bf16"}, "basis int8": {"basis_storage": "int8"},
            "momentum bf16": {"momentum_storage": "bf16"},
            "soap_lowmem": dict(OPTIMIZERS["soap_lowmem"].presets)}


def kls() -> None:
    from tests.optim.problems import KroneckerLeastSquares

    problem = KroneckerLeastSquares()
    checks = (100, 200, 300)
    print("| storage | " + " | ".join(f"loss @{s} (× full)" for s in checks) + " |")
    print("|---|" + "---|" * len(checks))
    full = None
    for name, kw in VARIANTS.items():
        losses = problem.run("soap", checks[-1], lr=0.03, weight_decay=0, **kw)
        at = [losses[s - 1] for s in checks]
        full = full or at
        print(f"| {name} | " + " | ".join(f"{a:.4g} ({a / f:.2f})" for a, f in
                                          zip(at, full, strict=True)) + " |", flush=True)


def lm(steps: int, seed: int) -> None:
    kwargs = tuning.optimizer_kwargs("soap", 10)
    print("| storage | final val loss | train s |")
    print("|---|---|---|")
    for name, kw in VARIANTS.items():
        cfg = TrainConfig(optimizer="soap", lr=tuning.default_lr("lm", "soap"),
                          optimizer_kwargs={**kwargs, **kw}, steps=steps, seed=seed,
                          progress=False)
        with tempfile.TemporaryDirectory() as folder:
            last = train(TaskOptions(), cfg, Path(folder)).records[-1]
        print(f"| {name} | {last['val_loss']:.4f} | {last['train_time']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="kls", choices=("kls", "lm"))
    ap.add_argument("--steps", type=int, default=300, help="lm training steps")
    ap.add_argument("--seed", type=int, default=0, help="lm seed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if args.task == "kls":
        kls()
    else:
        lm(args.steps, args.seed)


if __name__ == "__main__":
    main()
