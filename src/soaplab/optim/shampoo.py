r"""Shampoo (Gupta et al., 2018) on soaplab's Kronecker-factor machinery.

For a tensor with factored axes k = 1..n, the factors are L_k = EMA(G_(k) G_(k)ᵀ) and the
preconditioned direction is

.. math::  D = \hat m \times_1 (L_1 + εI)^{-2e/n} \cdots \times_n (L_n + εI)^{-2e/n}

with the overall exponent e = 1/4 (classic: L^{-1/4} G R^{-1/4} for a matrix) or 1/2 (the
variant that SOAP's paper shows equals Adafactor in Shampoo's eigenbasis). ``\hat m`` is the
bias-corrected EMA of gradients (β1; 0 turns momentum off). Inverse roots are recomputed every
``precondition_frequency`` steps from ``start_preconditioning_step`` on; before that, and for
axes without a factor, the grafted optimizer alone moves the parameter. Grafting rescales D
per parameter to the norm of Adam's, Adagrad's or SGD's step. Weight decay is decoupled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from soaplab.optim import grafting as graft_fns
from soaplab.optim import storage
from soaplab.optim._checks import (
    GROUP_CHECKS,
    check_beta,
    check_betas,
    check_choice,
    check_int,
    check_lr,
    check_nonnegative,
    check_positive,
)
from soaplab.optim.base import Bucket, KroneckerOptimizer
from soaplab.optim.kronecker import project
from soaplab.optim.matrix_functions import MatrixFunctionError, inverse_root
from soaplab.optim.state import resolve_matrix_dtype

__all__ = ["Shampoo"]


class Shampoo(KroneckerOptimizer):
    """Shampoo with grafting, momentum and decoupled weight decay.

    Args:
        params: parameters or param groups.
        lr: learning rate. betas: (β1 for the gradient EMA, β2 for Adam grafting).
        shampoo_beta: EMA coefficient of the factors; negative means "use β2".
        eps: ε·I added to each factor before its inverse root (must be > 0).
        weight_decay: decoupled weight decay (p -= lr·wd·p after the update).
        precondition_frequency: steps between inverse-root recomputations.
        start_preconditioning_step: first step that uses the roots (None: the group's current
            precondition_frequency, read each step).
        exponent: overall Kronecker exponent e: 0.25 (classic) or 0.5.
        grafting: "adam", "adagrad", "sgd" or "none". graft_eps: ε of the grafted optimizer.
        max_precond_dim, merge_dims, precondition_1d, data_format: as in SOAP.
        factor_storage, momentum_storage: as in SOAP (storage.py); the inverse roots are not
            orthogonal, so SOAP's basis storage has no counterpart here.
        matrix_dtype, nonfinite, batched, process_group, maximize, foreach: as in SOAP.
    """

    group_checks = {**GROUP_CHECKS, "eps": check_positive}  # an inverse root needs ε > 0

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 shampoo_beta: float = -1, eps: float = 1e-12, weight_decay: float = 0.0,
                 precondition_frequency: int = 10, start_preconditioning_step: int | None = None,
                 exponent: float = 0.25, grafting: str = "adam", graft_eps: float = 1e-8,
                 max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, data_format: str = "channels_first", *,
                 matrix_dtype: Any = None, factor_storage: str = "full",
                 momentum_storage: str = "full", nonfinite: str = "raise",
                 batched: bool | None = None, process_group: Any = None,
                 **torch_flags: Any) -> None:
        check_lr(lr)
        check_betas(betas)
        if shampoo_beta is not None and shampoo_beta >= 0:
            check_beta("shampoo_beta", shampoo_beta)
        check_positive("eps", eps)
        check_nonnegative("graft_eps", graft_eps)
        check_nonnegative("weight_decay", weight_decay)
        check_int("precondition_frequency", precondition_frequency, 1)
        if start_preconditioning_step is not None:
            check_int("start_preconditioning_step", start_preconditioning_step, 1)
        check_positive("exponent", exponent)
        check_choice("grafting", grafting, graft_fns.KINDS)
        check_int("max_precond_dim", max_precond_dim, 0)
        check_choice("data_format", data_format, ("channels_first", "channels_last"))
        storage.check_options(factor_storage=factor_storage, momentum_storage=momentum_storage)
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start_preconditioning_step,
                        exponent=exponent, grafting=grafting, graft_eps=graft_eps,
                        max_precond_dim=max_precond_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d,
                        data_format=data_format, factor_storage=factor_storage,
                        momentum_storage=momentum_storage, batched=batched)
        super().__init__(params, defaults, nonfinite=nonfinite,
                         matrix_dtype=resolve_matrix_dtype(matrix_dtype),
                         process_group=process_group, **torch_flags)

    def plan_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(max_precond_dim=group["max_precond_dim"], merge_dims=group["merge_dims"],
                    precondition_1d=group["precondition_1d"], data_format=group["data_format"])

    def _step_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        plan, G = bucket.plan, bucket.grads
        if "step" not in bucket.states[0]:
            _init_state(bucket, group["grafting"])
        for s in bucket.states:
            s["step"] += 1
        t = bucket.states[0]["step"]
        beta1 = group["betas"][0]
        bucket.update_factors(group)
        start, freq = _start(group), group["precondition_frequency"]
        if plan.axes and t >= start and (t - start) % freq == 0:
            factors = {axis: bucket.stack(f"factor_{axis}") for axis in plan.axes}
            self._compute_roots(bucket, factors, group)
        exp_avg = bucket.stack("exp_avg").lerp_(G, 1 - beta1)
        graft_state = {k: bucket.stack(k) for k in ("graft_sq",) if k in bucket.states[0]}
        direction = _direction(bucket, group, exp_avg / (1 - beta1**t), graft_state, t)
        lr, wd = float(group["lr"]), group["weight_decay"]
        bucket.apply_update(direction, lr, lr, wd)
        bucket.store("exp_avg", exp_avg)
        for key, value in graft_state.items():
            bucket.store(key, value)

    def _allocate_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """The state a first step starts from (step 0): the next call is that first step."""
        _init_state(bucket, group["grafting"])

    def _compute_roots(self, bucket: Bucket, factors: dict[int, Tensor],
                       group: dict[str, Any]) -> None:
        power = 2 * group["exponent"] / len(bucket.plan.axes)
        for axis, L in factors.items():
            try:
                root = inverse_root(L, power, group["eps"])
            except MatrixFunctionError as err:
                self._matrix_failed(err, f"inverse root of axis {axis}")
                continue
            if not bool(torch.isfinite(root).all()):
                self._matrix_failed(MatrixFunctionError("non-finite root"),
                                    f"inverse root of axis {axis}")
                continue
            bucket.store(f"root_{axis}", root)


def _start(group: dict[str, Any]) -> int:
    """The first preconditioned step, read each step: None follows precondition_frequency."""
    start = group["start_preconditioning_step"]
    return group["precondition_frequency"] if start is None else start


def _init_state(bucket: Bucket, grafting: str) -> None:
    plan, G = bucket.plan, bucket.grads
    for s in bucket.states:
        s["step"] = 0
    bucket.store("exp_avg", torch.zeros_like(G))
    for s in bucket.states:
        s.update(graft_fns.graft_state(grafting, plan.shape, dtype=G.dtype, device=G.device))
        for axis in plan.axes:
            d = plan.shape[axis]
            # Every state entry exists from the first step (checkpoint templates, e.g. DCP's,
            # are built from a fresh first step); the roots are used from the start step on.
            s[f"root_{axis}"] = torch.eye(d, dtype=G.dtype, device=G.device)
    for axis in plan.axes:
        d = plan.shape[axis]
        bucket.store(f"factor_{axis}", G.new_zeros(len(bucket.states), d, d))


def _direction(bucket: Bucket, group: dict[str, Any], moment: Tensor,
               graft_state: dict[str, Tensor], t: int) -> Tensor:
    """Shampoo's preconditioned momentum grafted to the norm of the grafted optimizer's step;
    the grafted step itself (or the momentum) while no inverse roots exist yet."""
    reference = graft_fns.graft_direction(group["grafting"], graft_state, bucket.grads, moment,
                                          group["betas"][1], t, group["graft_eps"])
    axes = bucket.plan.axes
    if not axes or t < _start(group):
        return moment if reference is None else reference
    roots = {axis: bucket.stack(f"root_{axis}") for axis in axes}
    direction = project(moment, roots)  # roots are symmetric, so this is X ×_k P_k
    return direction if reference is None else graft_fns.graft(direction, reference)
