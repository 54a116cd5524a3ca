r"""NorMuon (Li et al., 2025, arXiv 2510.05491): Muon with a per-neuron second moment on the
orthogonalized update, as the strongest Muon baseline.

Muon's orthogonalized update O has roughly equal singular values but very unequal row norms,
so some neurons take far larger steps than others. NorMuon keeps one second moment per row
(per output neuron) of O and divides it out, then rescales the whole step. For a hidden
matrix W (m×n; a conv kernel is seen as (out, in·kh·kw)) with gradient G:

.. math::
    M_t = μ M_{t-1} + (1-μ) G_t, \qquad U_t = (1-μ) G_t + μ M_t \ \text{(Nesterov; else } M_t),
    O_t = \mathrm{NS}_5(U_t), \qquad v_t = β_2 v_{t-1} + (1-β_2)\,\mathrm{mean}_j\, O_{t,ij}^2,
    \hat O_t = O_t / (\sqrt{v_t} + ε) \ \text{(row by row)},
    W_t = (1 - ηλ) W_{t-1} - η\, \frac{0.2 \sqrt{mn}}{\lVert \hat O_t \rVert_F}\, \hat O_t .

NS₅ is torch.optim.Muon's Newton–Schulz iteration (``soaplab.optim.muon.orthogonalize``), in
bfloat16 as torch runs it or, with ``ns_dtype="float32"``, in float32 (see ``muon``). The step
has RMS 0.2·η exactly: the paper's rule, and the RMS that Muon's ``match_rms_adamw`` gives, so
one AdamW-scale lr drives both halves. (The authors' released code instead keeps ‖O‖_F and
scales by √max(1, m/n), Keller Jordan's rule; that is this step times a constant per shape.)
v needs no bias correction: it starts at 0, and a common factor of all rows cancels in the
rescaling. Weight decay is decoupled and applied first, as in torch.optim.Muon.

``NorMuonAdamW`` is what ``soaplab.optimizer("normuon", model)`` builds: NorMuon on the
``role="hidden"`` parameters (roles from ``soaplab.roles``, as ``muon``), torch.optim.AdamW on
the rest, one lr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim._muon import DEFAULT_NS_STEPS

from soaplab.optim._checks import check_beta, check_int, check_lr, check_nonnegative
from soaplab.optim.composite import Composite, Half
from soaplab.optim.muon import Orthogonalized, matrices, ns_setting

__all__ = ["NorMuon", "NorMuonAdamW"]

RMS = 0.2  # the step's RMS over the lr, AdamW's typical update RMS (Moonlight's rule)


class NorMuon(Orthogonalized):
    """NorMuon on matrices (parameters of two or more dimensions, seen as (shape[0], -1)).

    Args:
        params: parameters or param groups. lr: learning rate (AdamW scale: the step's RMS is
            0.2·lr). weight_decay: decoupled. momentum: μ. beta2: β₂ of the per-row second
            moment. nesterov: Nesterov momentum (as torch.optim.Muon). eps: added to √v.
        ns_steps: Newton–Schulz iterations. ns_dtype: their dtype, ``"bfloat16"``
            (torch.optim.Muon's) or ``"float32"``.
    """

    def __init__(self, params: Iterable, lr: float = 3e-3, weight_decay: float = 0.0,
                 momentum: float = 0.95, beta2: float = 0.95, nesterov: bool = True,
                 eps: float = 1e-10, ns_steps: int = DEFAULT_NS_STEPS,
                 ns_dtype: str = "bfloat16") -> None:
        check_lr(lr)
        check_nonnegative("weight_decay", weight_decay)
        check_beta("momentum", momentum)
        check_beta("beta2", beta2)
        check_nonnegative("eps", eps)
        check_int("ns_steps", ns_steps, 1)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      beta2=beta2, nesterov=nesterov, eps=eps,
                                      ns_steps=ns_steps, **ns_setting(ns_dtype)))
        self._check_shapes("matrices", lambda p: p.dim() >= 2)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        G = p.grad.view(p.shape[0], -1)
        state = self.state[p]
        O = self._direction(G, state, group)
        if "second_moment" not in state:
            state["second_moment"] = G.new_zeros(G.shape[0], 1)
        lr = group["lr"]
        v = state["second_moment"].lerp_(O.square().mean(dim=1, keepdim=True),
                                         1 - group["beta2"])
        O = O / (v.sqrt() + group["eps"])
        scale = RMS * math.sqrt(O.numel()) / torch.linalg.vector_norm(O).clamp_min(1e-30)
        p.mul_(1 - lr * group["weight_decay"])
        p.add_((O * scale).view(p.shape), alpha=-lr)


class NorMuonAdamW(Composite):
    """NorMuon on ``role="hidden"``/``"stack"`` groups (a stack per expert), torch.optim.AdamW
    on the others; one object (see ``soaplab.optim.composite``)."""

    def __init__(self, params: nn.Module | Iterable[dict[str, Any]], lr: float = 3e-3,
                 weight_decay: float = 0.0, momentum: float = 0.95, beta2: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 ns_dtype: str = "bfloat16") -> None:
        def normuon(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return NorMuon(groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           beta2=beta2, ns_dtype=ns_dtype)

        super().__init__("normuon", params, [Half(normuon, matrices)], lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps, shards=False)
