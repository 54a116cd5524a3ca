r"""KL-Shampoo (Lin et al., 2025, arXiv 2509.03378) on soaplab's Kronecker-factor machinery.

Shampoo reads its factors as a Kronecker estimate S_a ⊗ S_b of the gradient covariance
E[vec G vec Gᵀ]. Estimating them by the KL divergence of two Gaussians, rather than one factor
at a time, couples them: each factor's statistic is whitened by the other's inverse. KL-Shampoo
also re-estimates the eigenvalues every step in the (stale) eigenbasis and needs no Adam second
moment (nor grafting). For a matrix W (m×n) with gradient G, bases Q_a, Q_b and per-column
eigenvalues λ_a, λ_b (S⁻¹ below means Q diag(1/λ) Qᵀ with the current, stale Q and λ):

.. math::
    m_t = β_1 m_{t-1} + (1-β_1) G_t,\qquad
    W_t = W_{t-1} - η\, Q_a \big[(Q_a^ᵀ m_t Q_b) ⊙ λ_a^{-1/2} λ_b^{-1/2\,ᵀ}\big] Q_b^ᵀ,

    S_a ← β S_a + (1-β)\,G S_b^{-1} G^ᵀ / n,\qquad S_b ← β S_b + (1-β)\,G^ᵀ S_a^{-1} G / m,

    λ_a ← β λ_a + (1-β)\,\mathrm{diag}(Q_a^ᵀ G S_b^{-1} G^ᵀ Q_a) / n,\quad λ_b \text{ likewise},

and every ``precondition_frequency`` steps Q ← QR(S·Q) (SOAP's power step; it sorts the
columns by Rayleigh quotient first, which the prototype does not, and λ follows its columns).
β is ``shampoo_beta`` (negative: β2). This is the rule of the authors' prototype
(github.com/yorkerlin/KL-Methods, ``optim/kl_opt.py``): the first call only builds
S_a = (1-β) G Gᵀ / n, S_b = (1-β) Gᵀ G / m and Q by eigh, and makes no update; the momentum
has no bias
correction; λ^{-1/2} is capped at max(10, min(d, 4000)) per axis (λ is kept at or above
1/cap², and there is no ε); decoupled weight decay W ← W − η·wd·W follows the update.

One deliberate difference: the prototype starts every λ at 0.1 (``init_eigenvalue=0.1`` does
that here). For gradients far smaller than that (clipped gradients of a small model: mean
square ~1e-5) λ^{-1/2} then stays too small for the first hundred-odd steps, which a short
run cannot afford (the micro GPT's lr grid in docs/optimizers.md). By default
(``init_eigenvalue=None``) every axis starts at mean(G²)^{1/order} of the first gradient, so
that the product of the λ's, the preconditioner's scale, starts at the gradient's mean square
and the first step is about m/RMS(G), as Adam's is.

A tensor of any order generalizes it axis by axis (the other axes' inverses whiten each
factor's statistic, normalised by their size). An axis without a factor (a vector's, or one
longer than ``max_precond_dim``) keeps the identity basis and only its diagonal λ,
re-estimated the same way: on a vector, λ = EMA(g²), Adam's second moment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from soaplab.optim._checks import (
    check_beta,
    check_betas,
    check_choice,
    check_int,
    check_lr,
    check_nonnegative,
    check_positive,
)
from soaplab.optim.base import Bucket, KroneckerOptimizer, factor_beta
from soaplab.optim.kronecker import gram, gram_diagonals, project, project_back
from soaplab.optim.matrix_functions import MatrixFunctionError, power_qr_step
from soaplab.optim.state import resolve_matrix_dtype

__all__ = ["KLShampoo"]


class KLShampoo(KroneckerOptimizer):
    """KL-Shampoo with momentum and decoupled weight decay.

    Args:
        params: parameters or param groups.
        lr: learning rate. betas: (β1 of the momentum, β2 of the factors and eigenvalues).
        shampoo_beta: EMA coefficient of the factors and eigenvalues; negative means "use β2".
        weight_decay: decoupled weight decay (p -= lr·wd·p after the update).
        precondition_frequency: steps between basis refreshes.
        init_eigenvalue: the eigenvalues' starting value (the prototype's ``init_factor``,
            0.1); None: mean(G²)^{1/order} of the first gradient on every axis.
        max_precond_dim, merge_dims, precondition_1d, data_format: as in SOAP.
        matrix_dtype, nonfinite, batched, maximize, foreach: as in SOAP.
        process_group: refused; there is no split mode (see docs/optimizers.md).
    """

    def __init__(self, params: Iterable, lr: float = 3e-3,
                 betas: tuple[float, float] = (0.95, 0.95), shampoo_beta: float = -1,
                 weight_decay: float = 0.0, precondition_frequency: int = 10,
                 init_eigenvalue: float | None = None, max_precond_dim: int = 10000,
                 merge_dims: bool = False, precondition_1d: bool = False,
                 data_format: str = "channels_first", *, matrix_dtype: Any = None,
                 nonfinite: str = "raise", batched: bool | None = None,
                 process_group: Any = None, **torch_flags: Any) -> None:
        if process_group is not None:
            raise ValueError("KLShampoo has no split mode: leave process_group out (under DDP "
                             "it then runs replicated, every rank doing the whole update)")
        check_lr(lr)
        check_betas(betas)
        if shampoo_beta is not None and shampoo_beta >= 0:
            check_beta("shampoo_beta", shampoo_beta)
        check_nonnegative("weight_decay", weight_decay)
        check_int("precondition_frequency", precondition_frequency, 1)
        if init_eigenvalue is not None:
            check_positive("init_eigenvalue", init_eigenvalue)
        check_int("max_precond_dim", max_precond_dim, 0)
        check_choice("data_format", data_format, ("channels_first", "channels_last"))
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        init_eigenvalue=init_eigenvalue, max_precond_dim=max_precond_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d,
                        data_format=data_format, batched=batched)
        super().__init__(params, defaults, nonfinite=nonfinite,
                         matrix_dtype=resolve_matrix_dtype(matrix_dtype), **torch_flags)

    def plan_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(max_precond_dim=group["max_precond_dim"], merge_dims=group["merge_dims"],
                    precondition_1d=group["precondition_1d"], data_format=group["data_format"])

    def _step_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        if "step" not in bucket.states[0]:
            self._init_bucket(bucket, group)
            return
        for s in bucket.states:
            s["step"] += 1
        bases = {axis: bucket.stack(f"basis_{axis}") for axis in bucket.plan.axes}
        roots = [_inverse_sqrt(bucket.stack(f"eigenvalues_{k}"))
                 for k in range(len(bucket.plan.shape))]
        exp_avg = bucket.stack("exp_avg").lerp_(bucket.grads, 1 - group["betas"][0])
        update = project_back(_scaled(project(exp_avg, bases), roots), bases)
        lr = float(group["lr"])
        bucket.apply_update(update, lr, lr, group["weight_decay"])
        bucket.store("exp_avg", exp_avg)
        _update_statistics(bucket, factor_beta(group), bases, roots)
        if bucket.states[0]["step"] % group["precondition_frequency"] == 0:
            self._refresh(bucket, bases)

    def _init_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """First call: the factors from this gradient, bases by eigh, eigenvalues at
        ``init_eigenvalue`` (or from the gradient's mean square); no update."""
        plan, G = bucket.plan, bucket.grads
        for s in bucket.states:
            s["step"] = 0
        bucket.store("exp_avg", torch.zeros_like(G))
        init = group["init_eigenvalue"]
        start = G.new_full((len(bucket.states), 1), init) if init is not None else \
            _mean_square(G).pow(1 / len(plan.shape)).unsqueeze(1)
        for k, d in enumerate(plan.shape):
            bucket.store(f"eigenvalues_{k}", start.expand(-1, d).clone())
        share = (1 - factor_beta(group)) / G[0].numel()
        for axis in plan.axes:
            factor = gram(G, axis) * (share * plan.shape[axis])
            bucket.store(f"factor_{axis}", factor)
            bucket.store(f"basis_{axis}", self._first_basis(factor, axis, G.dtype))

    def _refresh(self, bucket: Bucket, bases: dict[int, Tensor]) -> None:
        """One power step + QR per factor; the eigenvalues follow their sorted columns."""
        for axis, Q in bases.items():
            try:
                basis, order = power_qr_step(bucket.stack(f"factor_{axis}"), Q)
            except MatrixFunctionError as err:
                self._matrix_failed(err, f"basis refresh of axis {axis}")
                continue
            eigenvalues = bucket.stack(f"eigenvalues_{axis}")
            bucket.store(f"eigenvalues_{axis}", torch.gather(eigenvalues, 1, order))
            bucket.store(f"basis_{axis}", basis)


def _mean_square(G: Tensor) -> Tensor:
    """Each member's mean square, (B,), kept above the smallest normal number (a zero
    gradient must not start λ at 0)."""
    return G.square().flatten(1).mean(dim=1).clamp_min(torch.finfo(G.dtype).tiny)


def _cap(d: int) -> float:
    """The prototype's cap on λ^{-1/2} along an axis of length d."""
    return max(10.0, min(float(d), 4000.0))


def _inverse_sqrt(eigenvalues: Tensor) -> Tensor:
    """λ^{-1/2} per column: at most the cap, as λ is kept at or above 1/cap²."""
    return eigenvalues.rsqrt()


def _scaled(X: Tensor, vectors: list[Tensor], skip: int | None = None) -> Tensor:
    """X (B, d_0, ..., d_{n-1}) times each (B, d_k) vector along its axis k (but ``skip``)."""
    for k, v in enumerate(vectors):
        if k != skip:
            shape = [v.shape[0]] + [1] * (X.dim() - 1)
            shape[k + 1] = v.shape[1]
            X = X * v.view(shape)
    return X


def _update_statistics(bucket: Bucket, beta: float, bases: dict[int, Tensor],
                       roots: list[Tensor]) -> None:
    """The KL estimates of every factor and eigenvalue vector from this step's gradient, all
    with the stale bases and eigenvalues (``roots``: λ^{-1/2}).

    With R = G rotated into the bases, Z_k = R scaled by λ_j^{-1/2} along every axis j ≠ k and
    A_k = Z_(k) Z_(k)ᵀ / (the other axes' size): A_k is Q_kᵀ (G ⊗_{j≠k} S_j^{-1} Gᵀ) Q_k / size,
    so factor k takes Q_k A_k Q_kᵀ and its eigenvalues diag(A_k) (only the diagonal is
    formed along an axis without a factor)."""
    plan = bucket.plan
    rotated = project(bucket.grads, bases)
    size = bucket.grads[0].numel()
    new = {}
    for k, d in enumerate(plan.shape):
        Z = _scaled(rotated, roots, skip=k)
        if k in bases:
            A = gram(Z, k) * (d / size)
            Q = bases[k]
            factor = bucket.stack(f"factor_{k}").lerp_(Q @ A @ Q.mT, 1 - beta)
            bucket.store(f"factor_{k}", factor)
            statistic = A.diagonal(dim1=-2, dim2=-1)
        else:
            statistic = gram_diagonals(Z, (k,))[k] * (d / size)
        floor = 1 / _cap(d) ** 2
        new[k] = bucket.stack(f"eigenvalues_{k}").lerp(statistic, 1 - beta).clamp_min_(floor)
    for k, eigenvalues in new.items():
        bucket.store(f"eigenvalues_{k}", eigenvalues)

