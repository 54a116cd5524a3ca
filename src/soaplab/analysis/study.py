"""Train a small MLP with a chosen optimizer and measure its layers' curvature along the way.

At each snapshot step the model is copied to float64 and, for every weight matrix small enough
for dense (mn)² matrices, :func:`kronecker_record` or :func:`whitening_record` computes the
papers' similarities on a fixed probe set of training examples. Records go to
``metrics.jsonl`` in the run folder; :mod:`soaplab.analysis.report` turns them into report.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import soaplab
from soaplab.analysis import curvature, data
from soaplab.analysis.kronecker import factors_from_gradients, kron_cosine, kronecker_similarities
from soaplab.analysis.whitening import damp, whitening_similarities
from soaplab.reporting.manifest import manifest, prepare
from soaplab.reporting.runs import append_jsonl, write_config

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class StudyConfig:
    kind: str = "kronecker"  # "kronecker" or "whitening"
    dataset: str = "digits"
    optimizer: str = "adamw"
    lr: float = 3e-3
    steps: int = 400
    batch_size: int = 64
    hidden: int = 32
    activation: str = "relu"
    snapshots: tuple[int, ...] = (0, 25, 50, 100, 200, 400)
    probe: int = 512
    max_layer_size: int = 4096
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64, 256)
    batch_repeats: int = 16
    damping: float = 1e-3
    hessian_max_size: int = 1024
    seed: int = 0
    threads: int = 2
    data_dir: str = str(data.FASHION_MNIST_DIR)
    data_limit: int = 10_000
    out: str = "runs/analysis"


def mlp(features: int, hidden: int, classes: int, activation: str = "relu") -> nn.Sequential:
    """features → hidden → hidden → classes; weights are named 0.weight, 2.weight, 4.weight."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    return nn.Sequential(nn.Linear(features, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, classes))


def studied_layers(model: nn.Module, max_size: int) -> list[str]:
    """Weight matrices with m·n ≤ max_size (dense (mn)² matrices must fit in memory)."""
    return [k for k, v in model.named_parameters() if v.ndim == 2 and v.numel() <= max_size]


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled epochs of index batches (the last short batch of an epoch is dropped)."""
    while True:
        order = torch.randperm(n, generator=generator)
        yield from order[: n // batch_size * batch_size].split(batch_size)


def batch_effect(ggn: Tensor, grads: Tensor, probs: Tensor, y: Tensor, cfg: StudyConfig,
                 generator: torch.Generator) -> dict[str, float]:
    """cosine(GGN, L_b⊗R_b) with L_b, R_b from mean gradients of batches of b examples, for
    real labels and for labels sampled from the model. Each of ``cfg.batch_repeats`` rounds
    draws fresh labels and partitions the probe set once per b, so every b sees the same
    label draws (the sampled-label estimate is heavy-tailed once the model is confident)."""
    sizes = [b for b in cfg.batch_sizes if b <= len(y)]
    real = curvature.real_label_gradients(grads, y)
    batches: dict[str, list[Tensor]] = {}
    for _ in range(cfg.batch_repeats):
        sampled = curvature.sampled_label_gradients(grads, probs, generator)
        for labels, per_example in (("real", real), ("sampled", sampled)):
            for b in sizes:
                batches.setdefault(f"batch/{labels}/{b}", []).append(
                    curvature.batch_gradients(per_example, b, 1, generator))
    return {key: kron_cosine(ggn, *factors_from_gradients(torch.cat(parts)))
            for key, parts in batches.items()}


def kronecker_record(model: nn.Module, name: str, x: Tensor, y: Tensor, cfg: StudyConfig,
                     generator: torch.Generator) -> dict[str, float]:
    """Paper 3's similarities for one layer: GGN and empirical Fisher targets, batch effect."""
    grads, probs = curvature.class_gradients(model, name, x)
    m, n = grads.shape[-2:]
    ggn = curvature.gauss_newton(grads, probs)
    fisher = curvature.second_moment(curvature.real_label_gradients(grads, y))
    record = {f"ggn/{k}": v for k, v in kronecker_similarities(ggn, m, n).items()}
    record |= {f"fisher/{k}": v for k, v in kronecker_similarities(fisher, m, n).items()}
    record |= batch_effect(ggn, grads, probs, y, cfg, generator)
    if m * n <= cfg.hessian_max_size:
        hessian = curvature.layer_hessian(model, name, x, y)
        record["hessian/ggn_cosine"] = float((hessian * ggn).sum() / hessian.norm() / ggn.norm())
    return record


def whitening_record(model: nn.Module, name: str, x: Tensor, y: Tensor, cfg: StudyConfig,
                     generator: torch.Generator) -> dict[str, float]:
    """Paper 2's comparison for one layer, with C the (damped) empirical Fisher and the GGN."""
    grads, probs = curvature.class_gradients(model, name, x)
    m, n = grads.shape[-2:]
    targets = {
        "fisher": curvature.second_moment(curvature.real_label_gradients(grads, y)),
        "ggn": curvature.gauss_newton(grads, probs),
    }
    record = {}
    for target, C in targets.items():
        sims = whitening_similarities(damp(C, cfg.damping), m, n)
        record |= {f"{target}/{k}": v for k, v in sims.items()}
    return record


RECORDERS: dict[str, Callable[..., dict[str, float]]] = {
    "kronecker": kronecker_record,
    "whitening": whitening_record,
}


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a full split."""
    with torch.no_grad():
        logits = model(x)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).double().mean())


def snapshot(model: nn.Module, step: int, split: data.Split, layers: list[str], cfg: StudyConfig,
             generator: torch.Generator) -> list[dict[str, Any]]:
    """One record per studied layer at ``step``, computed on a float64 copy of the model."""
    model64 = copy.deepcopy(model).double()
    x, y = split.x_train[: cfg.probe].double(), split.y_train[: cfg.probe]
    train_loss, _ = evaluate(model64, split.x_train.double(), split.y_train)
    _, test_acc = evaluate(model64, split.x_test.double(), split.y_test)
    params = dict(model64.named_parameters())
    records = []
    for name in layers:
        record = RECORDERS[cfg.kind](model64, name, x, y, cfg, generator)
        shape = "x".join(str(d) for d in params[name].shape)
        records.append({"kind": "snapshot", "step": step, "layer": name, "shape": shape,
                        "train_loss": train_loss, "test_acc": test_acc, **record})
    return records


def validate(cfg: StudyConfig) -> None:
    """Reject bad settings before any training, naming the setting and the allowed range."""
    if cfg.kind not in RECORDERS:
        raise ValueError(f"unknown analysis {cfg.kind!r}; choose one of {sorted(RECORDERS)}")
    for name in ("steps", "threads", "hidden", "batch_repeats"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if any(s < 0 or s > cfg.steps for s in cfg.snapshots):
        raise ValueError(f"snapshots={cfg.snapshots} must lie in [0, steps={cfg.steps}]")
    if cfg.probe < 2 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"need probe >= 2, batch_size >= 1, lr > 0; got {cfg.probe=}, "
                         f"{cfg.batch_size=}, {cfg.lr=}")


def settings(cfg: StudyConfig) -> dict[str, Any]:
    """What defines the study's results: its manifest's settings (not its folder or threads)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "threads")}


def run(cfg: StudyConfig, overwrite: bool = False) -> Path:
    """Train, snapshot at ``cfg.snapshots``, append records to run_dir/metrics.jsonl.

    Nothing is written before the settings, the data and the folder pass their checks; a
    non-empty folder is refused unless ``overwrite`` (see ``reporting.manifest.prepare``)."""
    validate(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    split = data.load(cfg.dataset, seed=cfg.seed, limit=cfg.data_limit,
                      data_dir=Path(cfg.data_dir))
    for flag, value in (("--batch-size", cfg.batch_size), ("--probe", cfg.probe)):
        if value > len(split.x_train):
            raise ValueError(f"{flag} {value} is more than the {len(split.x_train)} training "
                             f"examples of {cfg.dataset}")
    model = mlp(split.x_train.shape[1], cfg.hidden, int(split.y_train.max()) + 1, cfg.activation)
    opt = soaplab.optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr)
    layers = studied_layers(model, cfg.max_layer_size)
    if not layers:
        raise ValueError(f"no weight matrix has at most {cfg.max_layer_size=} entries")
    run_dir = Path(cfg.out)
    prepare(run_dir, manifest("analyze", cfg.kind, settings(cfg)), resume=False,
            overwrite=overwrite, resumable=False)
    write_config(run_dir, cfg)
    metrics = run_dir / "metrics.jsonl"
    # separate streams: the analysis must not change which batches the optimizer sees
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = minibatches(len(split.x_train), cfg.batch_size,
                          torch.Generator().manual_seed(cfg.seed + 1))
    for step in tqdm(range(cfg.steps + 1), desc=f"analyze {cfg.kind}", unit="step"):
        if step in cfg.snapshots:
            for record in snapshot(model, step, split, layers, cfg, generator):
                append_jsonl(metrics, record)
        if step == cfg.steps:
            break
        idx = next(batches)
        loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            append_jsonl(metrics, {"kind": "train", "step": step, "loss": loss.item()})
    return run_dir
