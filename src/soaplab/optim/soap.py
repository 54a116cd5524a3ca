r"""SOAP: Shampoo with Adam in the Preconditioner's eigenbasis (Vyas et al., 2024).

For a matrix parameter with gradient G, SOAP keeps Shampoo's factors L = EMA(G Gᵀ) and
R = EMA(Gᵀ G), and their eigenbases Q_L, Q_R, refreshed every ``precondition_frequency`` steps by
one power-iteration step and QR. In between it runs Adam on the rotated gradient
G' = Q_Lᵀ G Q_R:

.. math::
    m_t = β_1 m_{t-1} + (1-β_1) G'_t,\quad v_t = β_2 v_{t-1} + (1-β_2) G'^2_t,\quad
    W_t = W_{t-1} - η \frac{\sqrt{1-β_2^t}}{1-β_1^t} Q_L \frac{m_t}{\sqrt{v_t}+ε} Q_R^ᵀ
          - η λ W_t^{(pre-decay)}

Semantics follow the reference implementation (nikhilvyas/SOAP): the first call only builds
the statistics and bases; ε is added to the un-corrected √v; decoupled weight decay comes after
the update; a refresh happens at the end of step t when t % precondition_frequency == 0, and
permutes v to follow the sorted basis. Unlike the reference, the first moment is rotated only
at refreshes (the same maths with fewer matmuls) and every hyperparameter is read from the
param group at each step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from soaplab.optim import second_moment
from soaplab.optim._checks import (
    check_beta,
    check_betas,
    check_choice,
    check_int,
    check_lr,
    check_nonnegative,
)
from soaplab.optim.base import Bucket, KroneckerOptimizer
from soaplab.optim.kronecker import from_plan_shape, project, project_back
from soaplab.optim.matrix_functions import (
    MatrixFunctionError,
    eigenbasis,
    eigh_step,
    power_qr_step,
)
from soaplab.optim.state import resolve_matrix_dtype

__all__ = ["SOAP"]


class SOAP(KroneckerOptimizer):
    """SOAP optimizer; a drop-in for the reference constructor.

    Args:
        params: parameters or param groups.
        lr: learning rate. betas: Adam's (β1, β2) in the eigenbasis.
        shampoo_beta: EMA coefficient of the factors L, R; negative means "use β2".
        eps: added to √v (not bias-corrected, as in the reference).
        weight_decay: decoupled, applied after the update with the raw lr.
        precondition_frequency: steps between basis refreshes.
        max_precond_dim: axes longer than this keep the identity basis (0 gives AdamW).
        merge_dims: merge consecutive axes while their product is at most max_precond_dim.
        precondition_1d: give 1-D parameters a full d×d basis.
        normalize_grads: rescale each update to unit RMS.
        data_format: "channels_last" means 4-D weights are stored (O, H, W, I) (TensorFlow
            layout, used only with merge_dims). PyTorch conv weights are (O, I, H, W) even in
            channels_last memory format: keep "channels_first" for them.
        correct_bias: fold Adam's bias correction into the step size.
        one_sided: rotate only the smallest factored axis (less memory, paper §7).
        factorized: Adafactor's factored second moment in the eigenbasis (paper §7).
        refresh: "qr" (one power step + QR, the reference) or "eigh" (exact eigenbasis).
        matrix_dtype: dtype of factors, bases and moments; None = float64 for float64
            parameters, float32 otherwise.
        nonfinite: "raise" (default) on a NaN/Inf gradient before touching state, or "skip".
        batched: stack same-shape parameters so each matmul runs once per shape (default).
        foreach: torch's name for ``batched``; None (default) means batched.
        maximize: maximize the objective (the gradient's sign is flipped before any statistic).
        differentiable, fused, capturable: torch.optim's flags; only their off values
            (False/None) are accepted, anything else raises ValueError saying why.
        process_group: under DDP, split the preconditioner work across this group's ranks
            (see soaplab.optim.distributed); None: every rank does all of it.
    """

    def __init__(self, params: Iterable, lr: float = 3e-3,
                 betas: tuple[float, float] = (0.95, 0.95), shampoo_beta: float = -1,
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000,
                 merge_dims: bool = False, precondition_1d: bool = False,
                 normalize_grads: bool = False, data_format: str = "channels_first",
                 correct_bias: bool = True, *, one_sided: bool = False, factorized: bool = False,
                 refresh: str = "qr", matrix_dtype: Any = None, nonfinite: str = "raise",
                 batched: bool | None = None, process_group: Any = None,
                 **torch_flags: Any) -> None:
        check_lr(lr)
        check_betas(betas)
        if shampoo_beta is not None and shampoo_beta >= 0:
            check_beta("shampoo_beta", shampoo_beta)
        check_nonnegative("eps", eps)
        check_nonnegative("weight_decay", weight_decay)
        check_int("precondition_frequency", precondition_frequency, 1)
        check_int("max_precond_dim", max_precond_dim, 0)
        check_choice("data_format", data_format, ("channels_first", "channels_last"))
        check_choice("refresh", refresh, ("qr", "eigh"))
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                        precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                        data_format=data_format, correct_bias=correct_bias, one_sided=one_sided,
                        factorized=factorized, refresh=refresh, batched=batched)
        super().__init__(params, defaults, nonfinite=nonfinite,
                         matrix_dtype=resolve_matrix_dtype(matrix_dtype),
                         process_group=process_group, **torch_flags)

    def plan_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(max_precond_dim=group["max_precond_dim"], merge_dims=group["merge_dims"],
                    precondition_1d=group["precondition_1d"], one_sided=group["one_sided"],
                    data_format=group["data_format"])

    def _step_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        if "step" not in bucket.states[0]:
            self._init_bucket(bucket, group)
            return
        _soap_update(bucket, group)
        bucket.update_factors(group)
        if bucket.states[0]["step"] % group["precondition_frequency"] == 0:
            self._refresh(bucket, group)

    def _init_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """First call: zero state, statistics from this gradient, bases by eigh; no update."""
        plan, G = bucket.plan, bucket.grads
        factored = second_moment.is_factored(plan.shape, group["factorized"])
        for s in bucket.states:
            s["step"] = 0
            s["exp_avg"] = torch.zeros(plan.shape, dtype=G.dtype, device=G.device)
            s.update(second_moment.zeros(plan.shape, factored, dtype=G.dtype, device=G.device))
            for axis in plan.axes:
                d = plan.shape[axis]
                s[f"factor_{axis}"] = torch.zeros(d, d, dtype=G.dtype, device=G.device)
        bucket.update_factors(group)
        for axis in plan.axes:
            factors = bucket.stack(f"factor_{axis}")
            try:
                basis = eigenbasis(factors)
            except MatrixFunctionError as err:
                self._matrix_failed(err, f"initial eigh of axis {axis}")
                basis = torch.eye(factors.shape[-1], dtype=G.dtype, device=G.device).expand_as(
                    factors)
            bucket.store(f"basis_{axis}", basis)

    def _refresh(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """New bases from the factors; v follows the sorted columns, m is carried exactly."""
        plan = bucket.plan
        refresh = eigh_step if group["refresh"] == "eigh" else power_qr_step
        bases = _bases(bucket)
        moment = project_back(bucket.stack("exp_avg"), bases)
        v = _second_moment(bucket)
        for axis in plan.axes:
            try:
                basis, order = refresh(bucket.stack(f"factor_{axis}"), bases[axis])
            except MatrixFunctionError as err:
                self._matrix_failed(err, f"basis refresh of axis {axis}")
                continue
            second_moment.permute(v, order, axis, len(plan.shape))
            bases[axis] = basis
        for key, value in {**v, "exp_avg": project(moment, bases)}.items():
            bucket.store(key, value)
        for axis, basis in bases.items():
            bucket.store(f"basis_{axis}", basis)


def _bases(bucket: Bucket) -> dict[int, Tensor]:
    return {axis: bucket.stack(f"basis_{axis}") for axis in bucket.plan.axes}


def _second_moment(bucket: Bucket) -> dict[str, Tensor]:
    keys = second_moment.FULL if "exp_avg_sq" in bucket.states[0] else second_moment.FACTORED
    return {key: bucket.stack(key) for key in keys}


def _soap_update(bucket: Bucket, group: dict[str, Any]) -> None:
    """Adam in the current eigenbasis, then the decoupled weight decay (reference order)."""
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), group["weight_decay"]
    bases = _bases(bucket)
    rotated = project(bucket.grads, bases)
    for s in bucket.states:
        s["step"] += 1
    t = bucket.states[0]["step"]
    exp_avg = bucket.stack("exp_avg").lerp_(rotated, 1 - beta1)
    v = _second_moment(bucket)
    second_moment.update(v, rotated, beta2)
    step_size = lr
    if group["correct_bias"]:
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    ratio = exp_avg / second_moment.estimate(v).sqrt().add_(group["eps"])
    if "exp_avg_sq" not in v:  # factored: Adafactor's update clipping
        correction = math.sqrt(1 - beta2**t) / (1 - beta1**t) if group["correct_bias"] else 1.0
        ratio = second_moment.clip_rms(ratio, correction)
    update = project_back(ratio, bases)
    if group["normalize_grads"]:
        dims = tuple(range(1, update.dim()))
        update = update / update.square().mean(dims, keepdim=True).sqrt().add_(1e-30)
    for p, u in zip(bucket.params, update.unbind(0), strict=True):
        p.add_(from_plan_shape(u, bucket.plan, p.shape).to(p.dtype), alpha=-step_size)
        if wd > 0:
            p.add_(p, alpha=-lr * wd)
    bucket.store("exp_avg", exp_avg)
    for key, value in v.items():
        bucket.store(key, value)
