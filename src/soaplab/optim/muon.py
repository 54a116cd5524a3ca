"""Muon as it is normally used: Muon on the hidden weight matrices, AdamW on the rest.

Which parameters are hidden matrices is said by roles (``soaplab.roles``), not guessed from
shapes (a tied embedding/head is 2-D too, and Muon on it hurts): role ``"hidden"`` gets Muon,
``"stack"`` (3-D expert weights) gets Muon per expert, every other role AdamW. A hidden
parameter with more than two dimensions (a conv kernel ``(out, in, kh, kw)``) is orthogonalized
as the matrix ``(out, in * kh * kw)``, as in Keller Jordan's CIFAR runs.

``MuonAdamW`` takes a model, or param groups that carry ``"role"`` (or ``use_muon``). One ``lr``
drives both halves: Muon's update is rescaled with ``adjust_lr_fn="match_rms_adamw"`` (RMS
0.2, Moonlight's rule) so that an AdamW learning rate suits it, and a scheduler's factor
reaches both.

``Muon`` is torch.optim.Muon's update, step for step (equal bit for bit: tests/optim/test_muon.py),
with one choice added: the dtype of the Newton–Schulz iteration. torch computes it in bfloat16,
which is fast on GPUs and on CPUs with native bfloat16, but on a CPU without it (AVX2 only)
each bfloat16 matmul is emulated: Muon's step took 27× longer than in float32 on the tiny
GPT's shapes (docs/optimizers.md), more than the rest of training. ``ns_dtype="float32"``
computes it in float32 there: more exact, and no longer torch's numbers bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS

from soaplab.optim._checks import (
    check_beta,
    check_choice,
    check_int,
    check_lr,
    check_nonnegative,
    closure_loss,
)
from soaplab.optim.composite import Composite, Half
from soaplab.roles import STACK

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ADJUST_LR = {"original": lambda m, n: math.sqrt(max(1, m / n)),
             "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n))}


def ns_setting(ns_dtype: str) -> dict[str, str]:
    """``ns_dtype`` as a param-group entry: none for torch's bfloat16, so that such a group (and
    the state dict, and a run's recorded settings) is key for key torch.optim.Muon's."""
    check_choice("ns_dtype", ns_dtype, NS_DTYPES)
    return {} if ns_dtype == "bfloat16" else {"ns_dtype": ns_dtype}


def orthogonalize(U: Tensor, steps: int = DEFAULT_NS_STEPS, dtype: torch.dtype = torch.bfloat16,
                  coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                  eps: float = EPS) -> Tensor:
    """Muon's quintic Newton–Schulz iteration on the matrix ``U``, computed in ``dtype`` (torch's
    is bfloat16) and returned in U's dtype: U/‖U‖_F, then X ← aX + (bXXᵀ + c(XXᵀ)²)X, which
    maps every singular value s to a·s + b·s³ + c·s⁵ and keeps the singular vectors."""
    a, b, c = coefficients
    tall = U.size(0) > U.size(1)
    X = U.to(dtype)
    X = X.T if tall else X
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        gram = X @ X.T
        X = torch.addmm(X, torch.addmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return (X.T if tall else X).to(U.dtype)


class Orthogonalized(torch.optim.Optimizer):
    """What Muon and NorMuon share: each parameter with a gradient is updated alone
    (``_update``), from the Newton–Schulz orthogonalization of its momentum (``_direction``)."""

    def _check_shapes(self, what: str, fits: Callable[[Tensor], bool]) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if not fits(p):
                    raise ValueError(f"{type(self).__name__} updates {what}; got a parameter of "
                                     f"shape {tuple(p.shape)}: give it to AdamW (role other "
                                     "than 'hidden')")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _direction(self, G: Tensor, state: dict[str, Any], group: dict[str, Any],
                   eps: float = EPS) -> Tensor:
        """M ← μM + (1-μ)G in ``state``, then Newton–Schulz of M, or with Nesterov of
        (1-μ)G + μM (torch.optim.Muon's order of operations)."""
        mu = group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(G)
        M = state["momentum_buffer"].lerp_(G, 1 - mu)
        dtype = NS_DTYPES[group.get("ns_dtype", "bfloat16")]  # see ns_setting
        return orthogonalize(G.lerp(M, mu) if group["nesterov"] else M, group["ns_steps"], dtype,
                             group.get("ns_coefficients", (DEFAULT_A, DEFAULT_B, DEFAULT_C)), eps)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError


class Muon(Orthogonalized):
    """torch.optim.Muon's algorithm on 2-D parameters, with the Newton–Schulz dtype to choose.

    Args: as torch.optim.Muon (lr, weight_decay decoupled, momentum, nesterov, ns_coefficients,
    eps, ns_steps, adjust_lr_fn: ``"original"`` √max(1, m/n) or ``"match_rms_adamw"``
    0.2·√max(m, n)), and ``ns_dtype``: ``"bfloat16"`` (torch's) or ``"float32"``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                 eps: float = EPS, ns_steps: int = DEFAULT_NS_STEPS,
                 adjust_lr_fn: str | None = None, ns_dtype: str = "bfloat16") -> None:
        check_lr(lr)
        check_nonnegative("weight_decay", weight_decay)
        check_beta("momentum", momentum)
        check_nonnegative("eps", eps)
        check_int("ns_steps", ns_steps, 1)
        check_choice("adjust_lr_fn", adjust_lr_fn, (None, *ADJUST_LR))
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_coefficients=ns_coefficients,
                                      eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                                      **ns_setting(ns_dtype)))
        self._check_shapes("2-D matrices", lambda p: p.dim() == 2)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        O = self._direction(p.grad, self.state[p], group, group["eps"])
        lr = group["lr"]
        scale = ADJUST_LR[group["adjust_lr_fn"] or "original"](*p.shape)
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(O, alpha=-lr * scale)


def matrices(p: Tensor, role: str) -> list[tuple[Tensor, int | None]] | None:
    """2-D views for Muon: one per expert of a stack, (out, in·k...) for a conv kernel."""
    if role == STACK:
        return [(v.view(v.shape[0], -1), e) for e, v in enumerate(p.detach())]
    return None if p.dim() == 2 else [(p.detach().view(p.shape[0], -1), None)]


class MuonAdamW(Composite):
    """Muon on ``role="hidden"``/``"stack"`` groups, torch.optim.AdamW on the others; one
    object (see ``soaplab.optim.composite``)."""

    def __init__(self, params: nn.Module | Iterable[dict[str, Any]], lr: float = 3e-3,
                 weight_decay: float = 0.0, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adjust_lr_fn: str = "match_rms_adamw", ns_dtype: str = "bfloat16") -> None:
        def muon(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return Muon(groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)

        super().__init__("muon", params, [Half(muon, matrices)], lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps, shards=False)
