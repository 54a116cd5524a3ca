"""What each combination of storage options of SOAP's state (soaplab.optim.storage) costs in
memory and in loss.

Run from the repository root (it reuses the tests' problems)::

    python -m benchmarks.storage_loss --threads 1             # memory and both least squares
    python -m benchmarks.storage_loss --threads 1 --seed 1    # another draw of both problems
    python -m benchmarks.storage_loss --task lm --steps 300   # the lm task, minutes per variant

``ls`` (the default), one row per combination of ``factor_storage`` x ``basis_storage`` x
``momentum_storage`` (``full`` and ``bf16`` factors are left out: their packed forms hold the
same values in about half the bytes, ``test_packed_factors_lose_nothing``), plus soap's:

* state MB: SOAP's state after two steps on the GPT shapes of ``step_time.py --memory`` (width
  256, 4 layers; the same settings and gradients, so the same count), and its ratio to AdamW's;
* ill-conditioned: issue 22's problem (tests/optim/problems.py, ``IllConditionedRegression``:
  fp32, condition 1e4 × 1e3, noise floor 1e-6), the held-out MSE after 300 steps at the best lr
  of {0.03, 0.1, 0.3}, and its ratio to soap's;
* Σ⊗M: the float64 problem of tests/optim/problems.py (``KroneckerLeastSquares``, Hessian
  Σ ⊗ M, condition 1e4 × 1e3), eval loss after 200 and 300 steps at lr 0.03 from zero and its
  ratio to soap's; the maths runs in fp64, so only the storage rounds.

``lm``: the default lm task of ``soaplab compare lm`` (tuned SOAP lr and settings), final
validation loss per registered storage preset.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.step_time import COMMON, SOAP_KW, draw_grads, gpt_shapes, make_params, state_bytes
from soaplab.experiments import tuning
from soaplab.experiments.loop import TrainConfig, train
from soaplab.experiments.tasks import TaskOptions
from soaplab.optim.storage import OPTIONS
from soaplab.registry import OPTIMIZERS

STORAGE = tuple(OPTIONS)  # factor_storage, basis_storage, momentum_storage
LRS = (0.03, 0.1, 0.3)  # the ill-conditioned problem's lr grid
CHECKS = (200, 300)  # Σ⊗M steps reported


def presets() -> dict[str, dict[str, str]]:
    """Registered optimizers that are soap with storage options only: name -> options."""
    return {name: {k: e.presets[k] for k in STORAGE if k in e.presets}
            for name, e in OPTIMIZERS.items()
            if e.build is OPTIMIZERS["soap"].build and set(e.presets) <= set(STORAGE)}


def combinations() -> dict[str, dict[str, str]]:
    """Label -> storage kwargs: soap's full storage, then every combination worth weighing."""
    factors = [v for v in OPTIONS["factor_storage"] if v.startswith("packed")]
    out = {"full / full / full": {}}
    for values in itertools.product(factors, OPTIONS["basis_storage"],
                                    OPTIONS["momentum_storage"]):
        out[" / ".join(values)] = dict(zip(STORAGE, values, strict=True))
    return out


def gpt_state_bytes(build: Any, width: int = 256, layers: int = 4) -> int:
    """State after two steps on the GPT shapes, exactly as ``step_time.py --memory`` counts."""
    shapes = gpt_shapes(width, layers)
    params = [p.requires_grad_() for p in make_params(shapes, torch.device("cpu"))]
    opt = build(params)
    for grads in draw_grads(shapes, 2, torch.device("cpu")):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    return state_bytes(opt)


def soap_with(storage: dict[str, str]) -> Any:
    """A builder of SOAP with ``step_time.py``'s settings and the given storage."""
    return lambda ps: OPTIMIZERS["soap"](ps, **COMMON, **SOAP_KW, **storage)


def adamw(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, betas=(0.9, 0.95), foreach=True, **COMMON)


def least_squares(seed: int) -> None:
    from tests.optim.problems import IllConditionedRegression, KroneckerLeastSquares

    ill, kls = IllConditionedRegression(seed=seed), KroneckerLeastSquares(seed=seed)
    adamw_bytes = gpt_state_bytes(adamw)
    named = {tuple(sorted(kw.items())): name for name, kw in presets().items()}
    print(f"AdamW: {adamw_bytes / 2**20:.1f} MB on the same shapes\n")
    print("| factor / basis / momentum | state MB | × AdamW | ill-conditioned loss (lr) | "
          "× soap | " + " | ".join(f"Σ⊗M loss @{s} (× soap)" for s in CHECKS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(CHECKS))
    soap_ill = soap_kls = None
    for label, kw in combinations().items():
        n = gpt_state_bytes(soap_with(kw))
        by_lr = {lr: ill.run("soap", lr, **kw) for lr in LRS}
        lr = min(by_lr, key=by_lr.__getitem__)
        losses = kls.run("soap", CHECKS[-1], lr=0.03, weight_decay=0, **kw)
        at = [losses[s - 1] for s in CHECKS]
        soap_ill, soap_kls = soap_ill or by_lr[lr], soap_kls or at
        name = named.get(tuple(sorted(kw.items())), "")
        print(f"| {label}{f' (`{name}`)' if name else ''} | {n / 2**20:.1f} | "
              f"{n / adamw_bytes:.2f} | {by_lr[lr]:.3g} ({lr}) | {by_lr[lr] / soap_ill:.2f} | "
              + " | ".join(f"{a:.4g} ({a / s:.2f})" for a, s in zip(at, soap_kls, strict=True))
              + " |", flush=True)


def lm(steps: int, seed: int) -> None:
    kwargs = tuning.optimizer_kwargs("soap", 10)
    print("| storage | final val loss | train s |")
    print("|---|---|---|")
    for name, kw in presets().items():
        cfg = TrainConfig(optimizer="soap", lr=tuning.default_lr("lm", "soap"),
                          optimizer_kwargs={**kwargs, **kw}, steps=steps, seed=seed,
                          progress=False)
        with tempfile.TemporaryDirectory() as folder:
            last = train(TaskOptions(), cfg, Path(folder)).records[-1]
        print(f"| {name} | {last['val_loss']:.4f} | {last['train_time']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="ls", choices=("ls", "lm"))
    ap.add_argument("--steps", type=int, default=300, help="lm training steps")
    ap.add_argument("--seed", type=int, default=0, help="the problems' draw (ls), the run's (lm)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if args.task == "ls":
        least_squares(args.seed)
    else:
        lm(args.steps, args.seed)


if __name__ == "__main__":
    main()
