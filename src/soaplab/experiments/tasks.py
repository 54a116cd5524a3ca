"""The tasks: the one place that describes each (``TASKS``) and builds its data and model.

``lm``: next-character prediction on Shakespeare with a nanoGPT (validation loss in nats).
``colorize``: predict Lab chrominance from luminance with a U-Net (validation MSE on whole
held-out photos). Adding a task is a builder below and one ``TaskSpec`` in ``TASKS``; the
command line, the report and the tuned lrs read it from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from soaplab.experiments.data import photos, shakespeare
from soaplab.experiments.models.colorizer import Colorizer
from soaplab.experiments.models.gpt import GPT, GPTConfig

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TaskOptions:
    """What defines the data and model of a task (written into every run folder)."""

    task: str = "lm"
    size: str = "tiny"
    text: str | None = None
    max_chars: int | None = None
    images: str | None = None
    batch_size: int = 32
    eval_batches: int = 8
    dropout: float = 0.0  # lm: the GPT's dropout (see models/gpt.py)


@dataclass
class Task:
    name: str
    model: nn.Module
    sample: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    examples: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def _language_model(opts: TaskOptions, device: torch.device) -> Task:
    corpus = _load_corpus(opts)
    cfg = GPTConfig.preset(opts.size, corpus.vocab_size, opts.dropout)
    model = GPT(cfg).to(device)
    val_gen = torch.Generator().manual_seed(1234)
    val_batches = [shakespeare.batch(corpus.val, cfg.block_size, opts.batch_size, val_gen)
                   for _ in range(opts.eval_batches)]

    def sample(gen: torch.Generator) -> Batch:
        x, y = shakespeare.batch(corpus.train, cfg.block_size, opts.batch_size, gen)
        return x.to(device), y.to(device)

    def loss(m: nn.Module, b: Batch) -> torch.Tensor:
        return m(*b)[1]

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return sum(m(x.to(device), y.to(device))[1].item() for x, y in val_batches) / len(
            val_batches)

    return Task("lm", model, sample, loss, evaluate)


_CORPORA: dict[tuple, shakespeare.CharCorpus] = {}


def _load_corpus(opts: TaskOptions) -> shakespeare.CharCorpus:
    """Loaded once per process: every optimizer of a comparison reads the same corpus."""
    key = (opts.text, opts.max_chars)
    if key not in _CORPORA:
        text = shakespeare.load_text(opts.text, opts.max_chars)
        _CORPORA[key] = shakespeare.CharCorpus.from_text(text)
    return _CORPORA[key]


def _check_corpus(opts: TaskOptions) -> shakespeare.CharCorpus:
    """The corpus, refused in one line when a split is shorter than the model's context."""
    corpus = _load_corpus(opts)
    block = GPTConfig.preset(opts.size, corpus.vocab_size).block_size
    if min(len(corpus.train), len(corpus.val)) < block + 2:
        raise ValueError(f"--text/--max-chars: the validation split (the last 10%) has "
                         f"{len(corpus.val)} characters, too few for the {opts.size} model's "
                         f"context of {block}; give a longer text")
    return corpus


_PHOTOS: dict[str | None, photos.PhotoSet] = {}
PATCH = 32  # training crops are PATCH x PATCH pixels


def _load_photos(opts: TaskOptions) -> photos.PhotoSet:
    """Loaded once per process, like the corpus."""
    if opts.images not in _PHOTOS:
        _PHOTOS[opts.images] = photos.PhotoSet.load(opts.images)
    return _PHOTOS[opts.images]


def _colorization(opts: TaskOptions, device: torch.device) -> Task:
    data = _load_photos(opts)
    width = {"micro": 8, "tiny": 16, "small": 32, "paper": 48}.get(opts.size)
    if width is None:
        raise ValueError(f"unknown model size {opts.size!r}; choose micro, tiny, small or paper")
    model = Colorizer(width).to(device)
    val = data.val.to(device)

    def sample(gen: torch.Generator) -> Batch:
        patches = data.crops(opts.batch_size, PATCH, gen)
        return patches[:, :1].to(device), patches[:, 1:].to(device)

    def loss(m: nn.Module, b: Batch) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return F.mse_loss(m(val[:, :1]), val[:, 1:]).item()

    @torch.no_grad()
    def examples(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return val[:, :1], m(val[:, :1]), val[:, 1:]

    return Task("colorize", model, sample, loss, evaluate, examples)


@dataclass(frozen=True)
class Baseline:
    """A model-free prediction every report row is measured against."""

    name: str
    train_loss: float  # on training batches, like a run's final_train_loss
    val_loss: float


def _mean_colour(opts: TaskOptions) -> Baseline:
    """Predict the mean chrominance of the training crops everywhere: what a colorizer that
    learned nothing from the luminance scores (its fit on 4,096 fixed random crops)."""
    data = _load_photos(opts)
    ab = data.crops(4096, PATCH, torch.Generator().manual_seed(0))[:, 1:].double()
    mean = ab.mean(dim=(0, 2, 3), keepdim=True)
    return Baseline("mean colour", F.mse_loss(ab, mean.expand_as(ab)).item(),
                    F.mse_loss(data.val[:, 1:].double(), mean.expand_as(data.val[:, 1:])).item())


Flag = tuple[str, dict[str, Any]]  # an argparse flag and its add_argument kwargs


@dataclass(frozen=True)
class TaskSpec:
    """One task as the command line, the report and the tuned lrs see it."""

    help: str
    metric: str  # the validation loss, named with its unit, for reports and plots
    build: Callable[[TaskOptions, torch.device], Task]
    load: Callable[[TaskOptions], object]  # reads the data (cached): fails before any write
    tuned_lrs: Mapping[str, float]  # by optimizer family (registry), see experiments/tuning.py
    flags: tuple[Flag, ...] = ()
    steps: int = 400
    baseline: Callable[[TaskOptions], Baseline] | None = None  # a row in every report


TASKS: dict[str, TaskSpec] = {
    "lm": TaskSpec(
        "character-level Shakespeare with a nanoGPT", "cross-entropy (nats/char)",
        _language_model, _check_corpus,
        {"adamw": 4e-3, "adafactor": 1e-1, "shampoo": 1e-2, "soap": 5e-3, "muon": 5e-3,
         # issue 21's grids on tiny with AdamW's recipe (beta1 0.9, weight decay 0.1) and
         # momentum 0.9 (docs/results.md, "Where SOAP wins"): normuon's best of 2e-3 ... 1.6e-2;
         # kl_shampoo's of 1.25e-3 ... 2e-2; soap_muon's of 2e-3 ... 1.6e-2 (one lr drives its
         # SOAP, NorMuon and AdamW parts)
         "normuon": 8e-3, "kl_shampoo": 2.5e-3, "soap_muon": 4e-3},
        (("--text", {"default": None, "help": "train on this text file instead"}),
         ("--max-chars", {"type": int, "default": None,
                          "help": "use only the first N characters of the corpus"}),
         ("--dropout", {"type": float, "default": 0.0,
                        "help": "dropout of the GPT, where nanoGPT puts it: embeddings, "
                                "attention probabilities, residual branches (default 0)"})),
        steps=1200),  # takes AdamW past the bigram plateau (val <= 1.8 nats/char)
    "colorize": TaskSpec(
        "grey photo -> colour with a small U-Net", "MSE of Lab chrominance",
        _colorization, _load_photos,
        # 600-step grids on the Debian photos (docs/results.md, "Colorization")
        {"adamw": 6e-3, "adafactor": 1e-2, "shampoo": 5e-3, "soap": 7.5e-3, "muon": 5e-3},
        (("--images", {"default": None, "metavar": "debian|DIR",
                       "help": "photos instead of the bundled set: debian (the 46 Debian photos "
                               "`make photos` installs) or a folder of JPEG/PNG colour "
                               "photos"}),),
        baseline=_mean_colour),
}


def spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def build_task(opts: TaskOptions, device: torch.device) -> Task:
    return spec(opts.task).build(opts, device)
