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
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from soaplab.optim import adaptive, second_moment, storage
from soaplab.optim._checks import (
    check_beta,
    check_betas,
    check_choice,
    check_int,
    check_lr,
    check_nonnegative,
)
from soaplab.optim.base import Bucket, KroneckerOptimizer, factor_beta
from soaplab.optim.kronecker import project, project_back
from soaplab.optim.matrix_functions import (
    MatrixFunctionError,
    bjorck,
    drift_from_diagonal,
    eigh_step,
    power_qr_step,
    rayleigh,
    rayleigh_quotients,
    times_basis,
)
from soaplab.optim.state import resolve_matrix_dtype
from soaplab.optim.telemetry import RefreshLog

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
        refresh_tolerance: at each scheduled refresh, refresh only the bases whose drift
            ‖QᵀLQ − diag(QᵀLQ)‖_F / ‖L‖_F is at least this (None or 0: all of them, the
            reference's fixed schedule; inf: never after the first).
        refresh_budget: spend on refreshes at most this fraction of the ordinary step's
            matmul flops on average, most-drifted bases first (None: no budget).
        matrix_dtype: dtype the maths runs in; None = float64 for float64 parameters,
            float32 otherwise.
        factor_storage: how L, R are stored: "full" (matrix_dtype), "bf16", "packed" (upper
            triangle) or "packed_bf16" (see storage.py).
        basis_storage: how the bases are stored: "full", "bf16" or "int8" (blocks of 64 with
            an fp32 scale); lossy ones are re-orthonormalized (Björck) at each refresh.
        momentum_storage: how Adam's first moment is stored: "full" or "bf16".
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
                 refresh: str = "qr", refresh_tolerance: float | None = None,
                 refresh_budget: float | None = None, matrix_dtype: Any = None,
                 factor_storage: str = "full", basis_storage: str = "full",
                 momentum_storage: str = "full",
                 nonfinite: str = "raise", batched: bool | None = None,
                 process_group: Any = None, **torch_flags: Any) -> None:
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
        for name, value in (("refresh_tolerance", refresh_tolerance),
                            ("refresh_budget", refresh_budget)):
            if value is not None:
                check_nonnegative(name, value)
        storage.check_options(factor_storage=factor_storage, basis_storage=basis_storage,
                              momentum_storage=momentum_storage)
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                        precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                        data_format=data_format, correct_bias=correct_bias, one_sided=one_sided,
                        factorized=factorized, refresh=refresh,
                        refresh_tolerance=refresh_tolerance, refresh_budget=refresh_budget,
                        factor_storage=factor_storage, basis_storage=basis_storage,
                        momentum_storage=momentum_storage, batched=batched)
        super().__init__(params, defaults, nonfinite=nonfinite,
                         matrix_dtype=resolve_matrix_dtype(matrix_dtype),
                         process_group=process_group, **torch_flags)
        self._refresh_log = RefreshLog()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Telemetry is keyed by the identity of state dicts, which a copy changes: a copy
        # starts it afresh (like a checkpoint, which does not carry it). The budget's credit
        # lives in the state ("refresh_credit") and travels with copies and checkpoints.
        self.__dict__.setdefault("_refresh_log", RefreshLog())

    def refresh_stats(self) -> dict[str, Any]:
        """Per parameter and factored axis: the drift at the last check, refreshes done and
        skipped, matrix-function failures and host seconds in the refresh's matrix functions
        (on CUDA: launch time); then totals of the counts. Since construction, not saved."""
        named = []
        for number, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"{number}.{i}" for i in
                                                  range(len(group["params"]))]
            named += [(name, self.state[p]) for name, p in zip(names, group["params"],
                                                                strict=True) if p in self.state]
        return self._refresh_log.report(named)

    def plan_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(max_precond_dim=group["max_precond_dim"], merge_dims=group["merge_dims"],
                    precondition_1d=group["precondition_1d"], one_sided=group["one_sided"],
                    data_format=group["data_format"])

    def _step_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        if bucket.states[0].get("step", -1) < 0:  # no state, or only allocated
            self._init_bucket(bucket, group)
            return
        rotated = _soap_update(bucket, group)
        bucket.update_factors(group)
        if _adaptive(group):
            _track_diagonals(bucket, group, rotated)
        if bucket.states[0]["step"] % group["precondition_frequency"] == 0:
            self._refresh(bucket, group)

    def _allocate_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """Every entry of a stepped state, zero, with ``step`` -1: "allocated, no statistics
        yet", so that the next real gradient builds the bases (see :meth:`_init_bucket`)."""
        self._zero_state(bucket, group)
        plan, G = bucket.plan, bucket.grads
        for axis in plan.axes:
            bucket.store(f"basis_{axis}", G.new_zeros(len(bucket.states), *(plan.shape[axis],) * 2))
            if _adaptive(group):
                bucket.store(f"diagonal_{axis}", G.new_zeros(len(bucket.states), plan.shape[axis]))
        for s in bucket.states:
            s["step"] = -1
            if plan.axes and group["refresh_budget"] is not None:  # as _choose keeps it
                s["refresh_credit"] = 0.0

    def _zero_state(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """Fresh state: step 0, zero moments and factors (whatever was allocated is dropped)."""
        plan, G = bucket.plan, bucket.grads
        factored = second_moment.is_factored(plan.shape, group["factorized"])
        for s in bucket.states:
            s.clear()
            s["step"] = 0
        bucket.store("exp_avg", torch.zeros_like(G))
        for s in bucket.states:
            s.update(second_moment.zeros(plan.shape, factored, dtype=G.dtype, device=G.device))
        for axis in plan.axes:
            d = plan.shape[axis]
            bucket.store(f"factor_{axis}", G.new_zeros(len(bucket.states), d, d))

    def _init_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """First call: zero state, statistics from this gradient, bases by eigh; no update."""
        plan, G = bucket.plan, bucket.grads
        self._zero_state(bucket, group)
        bucket.update_factors(group)
        for axis in plan.axes:
            bucket.store(f"basis_{axis}",
                         self._first_basis(bucket.stack(f"factor_{axis}"), axis, G.dtype))

    def _refresh(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """New bases for the factors that drifted (all of them on the fixed schedule); v follows
        the sorted columns, m is carried exactly along the refreshed axes.

        The fixed schedule reads the drift from the power step's A·Q, which it computes for
        every factor anyway; the adaptive one from the tracked diagonals (no matmul), and
        computes A·Q only for the bases it refreshes."""
        plan = bucket.plan
        if not plan.axes:
            return
        adaptive_ = _adaptive(group)
        refresh = eigh_step if group["refresh"] == "eigh" else power_qr_step
        # Bases stored lossy are made orthonormal before use: all of them on the fixed
        # schedule, on the adaptive one only along axes with something to refresh.
        bases = _bases(bucket)
        if not adaptive_:
            bases = {axis: _orthonormal(bucket, Q) for axis, Q in bases.items()}
        start = time.perf_counter()
        factors = {axis: bucket.stack(f"factor_{axis}") for axis in plan.axes}
        if adaptive_:
            products = quotients = dict.fromkeys(plan.axes)
            diagonals = {axis: bucket.stack(f"diagonal_{axis}") for axis in plan.axes}
        else:
            products = {axis: times_basis(factors[axis], bases[axis]) for axis in plan.axes}
            quotients = diagonals = {axis: rayleigh(products[axis], bases[axis])
                                     for axis in plan.axes}
        drifts = {axis: drift_from_diagonal(factors[axis], diagonals[axis]) for axis in plan.axes}
        rows = self._choose(bucket, group, drifts)
        checked = (time.perf_counter() - start) / len(plan.axes)
        new, orders = {}, {}
        for axis in plan.axes:
            logs = [self._refresh_log.axis(s, axis) for s in bucket.states]
            chosen = rows.get(axis)  # None: every row
            start = time.perf_counter()
            try:
                if chosen is None:
                    new[axis], orders[axis] = refresh(factors[axis], bases[axis], products[axis],
                                                       quotients[axis])
                elif chosen:
                    bases[axis] = _orthonormal(bucket, bases[axis])
                    index = torch.tensor(chosen, device=bases[axis].device)
                    basis, order = refresh(factors[axis][index], bases[axis][index])
                    new[axis] = bases[axis].index_copy(0, index, basis)
                    keep = torch.arange(order.shape[-1], device=order.device)
                    orders[axis] = keep.expand(len(bucket.states), -1).index_copy(0, index, order)
                    diagonals[axis].index_copy_(
                        0, index, rayleigh_quotients(factors[axis][index], basis))
            except MatrixFunctionError as err:
                self._matrix_failed(err, f"basis refresh of axis {axis}")
                chosen = []
                for log in logs:
                    log.failures += 1
            seconds = checked + time.perf_counter() - start
            for row, log in enumerate(logs):
                done = chosen is None or row in chosen
                log.refreshes += done
                log.skipped += not done
                log.seconds += seconds / len(logs)
                log.drift = drifts[axis][row]
        if not new:
            return
        moment = project_back(bucket.stack("exp_avg"), {axis: bases[axis] for axis in new})
        v = _second_moment(bucket)
        for axis, order in orders.items():
            second_moment.permute(v, order, axis, len(plan.shape))
        for key, value in {**v, "exp_avg": project(moment, new)}.items():
            bucket.store(key, value)
        for axis, basis in new.items():
            bucket.store(f"basis_{axis}", basis)

    def _choose(self, bucket: Bucket, group: dict[str, Any],
                drifts: dict[int, Tensor]) -> dict[int, list[int] | None]:
        """Rows to refresh per axis (None: all, with no host sync: the fixed schedule).

        Under ``refresh_budget`` a bucket earns the budget's share of its ordinary steps' flops
        since the last check (banking at most one full refresh) and spends it here; each member
        keeps an equal share of what is left as ``state["refresh_credit"]``."""
        if not _adaptive(group):
            return dict.fromkeys(drifts)
        budget, plan, batch = group["refresh_budget"], bucket.plan, len(bucket.states)
        credit = None
        if budget is not None:
            full = batch * sum(adaptive.refresh_flops(plan.shape, k) for k in plan.axes)
            earned = budget * group["precondition_frequency"] * batch * \
                adaptive.ordinary_flops(plan.shape, plan.axes)
            banked = sum(s.get("refresh_credit", 0.0) for s in bucket.states)
            credit = min(banked + earned, full)
        chosen, credit = adaptive.choose(drifts, group["refresh_tolerance"] or 0.0, plan.shape,
                                         credit)
        if credit is not None:  # kept in the state, equal shares, so checkpoints carry it
            for s in bucket.states:
                s["refresh_credit"] = credit / batch
        return chosen


def _adaptive(group: dict[str, Any]) -> bool:
    """Whether the group refreshes only drifted bases (a tolerance above 0, or a budget)."""
    return bool(group["refresh_tolerance"]) or group["refresh_budget"] is not None


def _track_diagonals(bucket: Bucket, group: dict[str, Any], rotated: Tensor) -> None:
    """Keep diag(QᵀLQ) of every factor current, so that a check costs no matmul. A bucket
    without them yet (adaptive refresh just switched on, an older checkpoint) starts from the
    exact value, with one product A·Q per factor."""
    axes = bucket.plan.axes
    if not axes:
        return
    if f"diagonal_{axes[0]}" not in bucket.states[0]:
        for axis in axes:
            factor, basis = bucket.stack(f"factor_{axis}"), bucket.stack(f"basis_{axis}")
            bucket.store(f"diagonal_{axis}", rayleigh_quotients(factor, basis))
        return
    adaptive.track_diagonals({axis: bucket.stack(f"diagonal_{axis}") for axis in axes},
                             rotated, factor_beta(group))


def _bases(bucket: Bucket) -> dict[int, Tensor]:
    return {axis: bucket.stack(f"basis_{axis}") for axis in bucket.plan.axes}


def _orthonormal(bucket: Bucket, Q: Tensor) -> Tensor:
    """``Q``, or where bases are stored lossy, ``Q`` made orthonormal again (Björck), so that
    a refresh's drift, power step and transport of m start from an orthonormal basis."""
    return Q if storage.codec(bucket.group, "basis_").exact else bjorck(Q)


def _second_moment(bucket: Bucket) -> dict[str, Tensor]:
    keys = second_moment.FULL if "exp_avg_sq" in bucket.states[0] else second_moment.FACTORED
    return {key: bucket.stack(key) for key in keys}


def _soap_update(bucket: Bucket, group: dict[str, Any]) -> Tensor:
    """Adam in the current eigenbasis, then the decoupled weight decay (reference order).
    Returns the rotated gradient G'."""
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
    bucket.apply_update(update, step_size, lr, wd)
    bucket.store("exp_avg", exp_avg)
    for key, value in v.items():
        bucket.store(key, value)
    return rotated
