"""A Task bundles data, model, loss and evaluation: the only place that knows both tasks.

``lm``: next-character prediction on Shakespeare with a nanoGPT (validation loss in nats).
``colorize``: predict Lab chrominance from luminance with a U-Net (validation MSE on whole
held-out photos).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class Task:
    name: str
    model: nn.Module
    sample: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    examples: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def build_task(opts: TaskOptions, device: torch.device) -> Task:
    if opts.task == "lm":
        return _language_model(opts, device)
    if opts.task == "colorize":
        return _colorization(opts, device)
    raise ValueError(f"unknown task {opts.task!r}; choose lm or colorize")


def _language_model(opts: TaskOptions, device: torch.device) -> Task:
    corpus = _corpus(opts.text, opts.max_chars)
    cfg = GPTConfig.preset(opts.size, corpus.vocab_size)
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


def _corpus(text: str | None, max_chars: int | None) -> shakespeare.CharCorpus:
    """Loaded once per process: every optimizer of a comparison reads the same corpus."""
    key = (text, max_chars)
    if key not in _CORPORA:
        _CORPORA[key] = shakespeare.CharCorpus.from_text(shakespeare.load_text(text, max_chars))
    return _CORPORA[key]


_PHOTOS: dict[str | None, photos.PhotoSet] = {}


def _colorization(opts: TaskOptions, device: torch.device) -> Task:
    if opts.images not in _PHOTOS:
        _PHOTOS[opts.images] = photos.PhotoSet.load(opts.images)
    data = _PHOTOS[opts.images]
    width = {"micro": 8, "tiny": 16, "small": 32, "paper": 48}.get(opts.size)
    if width is None:
        raise ValueError(f"unknown model size {opts.size!r}; choose micro, tiny, small or paper")
    model = Colorizer(width).to(device)
    val = data.val.to(device)

    def sample(gen: torch.Generator) -> Batch:
        patches = data.train[torch.randint(len(data.train), (opts.batch_size,), generator=gen)]
        flip = torch.rand(opts.batch_size, generator=gen) < 0.5
        patches = torch.where(flip[:, None, None, None], patches.flip(-1), patches)
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
