"""The torch.optim shell shared by SOAP and Shampoo: gradient intake, batching, checkpoints.

Subclasses implement ``_step_bucket`` for a *bucket*: the parameters of one group that share a
factor plan, a dtype, a device and a step count, stacked so that each matmul runs once per
bucket rather than once per parameter.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from soaplab.optim import storage
from soaplab.optim._checks import (
    GROUP_CHECKS,
    check_choice,
    check_group,
    check_kind,
    check_torch_flags,
    resolve_batched,
)
from soaplab.optim.distributed.checkpoint import export, state_to_load
from soaplab.optim.distributed.ddp import OwnerSplit
from soaplab.optim.distributed.fsdp import ShardedSplit
from soaplab.optim.guardrails import warn_costly_factors
from soaplab.optim.interface import Target, local
from soaplab.optim.kronecker import (
    FactorPlan,
    from_plan_shape,
    plan_factors,
    to_plan_shape,
    update_factors,
)
from soaplab.optim.matrix_functions import MatrixFunctionError, eigenbasis
from soaplab.optim.state import state_bytes, state_dtype
from soaplab.roles import decay_groups

# What a copy (deepcopy, pickle) keeps beyond torch's defaults/state/param_groups (every public
# attribute), with the value an object pickled by an older soaplab gets.
_COPIED = {"nonfinite": "raise", "matrix_dtype": None, "skipped_steps": 0, "matrix_failures": 0}


def factor_beta(group: dict[str, Any]) -> float:
    """The factors' EMA coefficient: the group's ``shampoo_beta``, or β2 when that is negative."""
    beta = group["shampoo_beta"]
    return group["betas"][1] if beta is None or beta < 0 else beta


@dataclass
class Bucket:
    """Same-plan parameters of one group, with their gradients stacked as (B, *plan.shape).

    ``params`` are the tensors the maths updates in place: the parameters themselves, or under
    FSDP2 full-size copies that the split writes back to the shards. ``group`` says how each
    state entry is stored (see storage.py)."""

    params: list[Tensor]
    states: list[dict[str, Any]]
    plan: FactorPlan
    grads: Tensor
    group: dict[str, Any] = field(default_factory=dict)

    def stack(self, key: str) -> Tensor:
        """The (B, ...) stack of one state entry across the bucket, in the working dtype.

        Stored entries are kept as views of one stacked tensor (see :meth:`store`), so for
        ``full`` storage this costs nothing after the first step and in-place updates of the
        stack reach every parameter; other storage decodes a copy: :meth:`store` it back."""
        codec = storage.codec(self.group, key)
        stored = {suffix: self._stored(key + suffix) for suffix in codec.suffixes}
        return codec.decode(stored, self.grads.dtype)

    def store(self, key: str, value: Tensor, compact: bool = False) -> None:
        """Encode the (B, ...) ``value`` in the entry's storage and make each parameter's
        entry a view of it (no copy for ``full`` storage). ``compact``: ``value`` is already
        in the stored layout (see :meth:`update_factors`)."""
        for suffix, stacked in storage.codec(self.group, key).encode(value, compact).items():
            if stacked._base is not None or not stacked.is_contiguous():
                stacked = stacked.clone(memory_format=torch.contiguous_format)
            for s, view in zip(self.states, stacked.unbind(0), strict=True):
                s[key + suffix] = view

    def update_factors(self, group: dict[str, Any]) -> None:
        """EMA of this step's gradient Gram matrices into the factors.

        The EMA coefficient is :func:`factor_beta`. It runs in the stored layout (a packed
        factor takes the Gram's packed triangle), in the working dtype."""
        codec = storage.codec(self.group, "factor_")
        factors = {axis: self._stored(f"factor_{axis}").to(self.grads.dtype)
                   for axis in self.plan.axes}
        update_factors(factors, self.grads, factor_beta(group), codec.compact)
        for axis, value in factors.items():
            self.store(f"factor_{axis}", value, compact=True)

    def apply_update(self, update: Tensor, step_size: float, lr: float,
                     weight_decay: float) -> None:
        """p <- p - step_size·u, then the decoupled decay p <- p - lr·wd·p (the reference's
        order), for the (B, *plan.shape) ``update``: two multi-tensor ops for the bucket
        rather than two ops per parameter (on CUDA, per-op launches dominate small layers)."""
        updates = [from_plan_shape(u, self.plan, p.shape).to(p.dtype)
                   for p, u in zip(self.params, update.unbind(0), strict=True)]
        torch._foreach_add_(self.params, updates, alpha=-step_size)
        if weight_decay > 0:
            torch._foreach_add_(self.params, self.params, alpha=-lr * weight_decay)

    def _stored(self, key: str) -> Tensor:
        """The (B, ...) stack of one stored tensor, as stored."""
        tensors = [s[key] for s in self.states]
        # A view's _base is not traceable (it reads None inside a compiled graph): compiled
        # code restacks, which costs a copy but updates the same entries.
        base = None if torch.compiler.is_compiling() else tensors[0]._base
        if (base is not None and base.shape == (len(tensors), *tensors[0].shape)
                and all(t._base is base for t in tensors) and _in_order(tensors, base)):
            return base
        stacked = torch.stack(tensors)
        for s, view in zip(self.states, stacked.unbind(0), strict=True):
            s[key] = view
        return stacked


def _in_order(views: list[Tensor], base: Tensor) -> bool:
    """Whether ``views`` (each known to be a view of ``base``) are its rows 0, 1, ... in
    order, read from storage offsets (making no views). Compiled code skips the check and
    trusts the order that :meth:`Bucket.store` gave them: a bucket's members keep their
    param-group order."""
    if torch.compiler.is_compiling():
        return True
    offset, stride = base.storage_offset(), base.stride(0)
    return all(t.storage_offset() == offset + i * stride for i, t in enumerate(views))


class KroneckerOptimizer(torch.optim.Optimizer):
    """Common machinery; not used directly.

    ``maximize`` and ``foreach`` (torch's name for ``batched``) are torch.optim's; of its other
    flags, ``differentiable``, ``fused`` and ``capturable`` are accepted only when off.
    """

    # what step() checks in each group (values a scheduler or a user set after construction)
    group_checks: Mapping[str, Callable[[str, Any], None]] = GROUP_CHECKS

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, nonfinite: str,
                 matrix_dtype: torch.dtype | None, process_group: Any = None,
                 maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None,
                 capturable: bool = False) -> None:
        check_choice("nonfinite", nonfinite, ("raise", "skip"))
        check_torch_flags(type(self).__name__, differentiable=differentiable, fused=fused,
                          capturable=capturable)
        defaults = {**defaults, "maximize": bool(maximize), "differentiable": False,
                    "batched": resolve_batched(defaults.get("batched"), foreach)}
        if isinstance(params, nn.Module):  # as soaplab.optimizer(name, model): see soaplab.roles
            params = decay_groups(params, defaults["weight_decay"])
        super().__init__(params, defaults)
        # DDP or DTensor mode (see soaplab.optim.distributed); None: this process does it all.
        # Decided again whenever the parameters change (see :attr:`split`).
        self._process_group = process_group
        self._split_layout: tuple[int, ...] | None = None
        self._split: OwnerSplit | None = None
        self._sync_split()
        self.nonfinite = nonfinite
        self.matrix_dtype = matrix_dtype
        warn_costly_factors(self)
        self.skipped_steps = 0
        self.matrix_failures = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, but a parameter listed twice, or of a dtype the maths cannot update, is an
        error rather than a warning or a parameter silently left alone."""
        params = param_group["params"]
        params = [params] if torch.is_tensor(params) else params
        if not isinstance(params, set):  # torch raises its own error for sets
            params = list(params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError(f"{type(self).__name__}: a param group lists the same tensor "
                                 "twice, so it would be updated twice per step; list it once")
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            if _flat_shard(p):
                self.param_groups.pop()
                raise ValueError(f"{type(self).__name__}: {self.describe(group, i)} "
                                 f"{_flat_shard(p)}")
            if p.is_complex() or not p.is_floating_point():
                self.param_groups.pop()
                kind, fix = ("complex", "pass torch.view_as_real(p)") if p.is_complex() else \
                    (f"{p.dtype}", "only floating-point tensors can be optimized")
                raise ValueError(f"{type(self).__name__} does not support {kind} parameters "
                                 f"({self.describe(group, i)}); {fix}")

    # -- copies: torch keeps only defaults, state and param_groups ----------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self._split is not None:
            raise TypeError(f"a split {type(self).__name__} (process_group or FSDP2) cannot be "
                            "copied or pickled, its process group cannot; save "
                            "soaplab.optim.distributed.full_state_dict(optimizer) instead")
        return {**super().__getstate__(),
                **{k: v for k, v in self.__dict__.items() if not k.startswith("_")}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Copies have no split (and no process group); their mode is decided at first use.
        for key, value in {**_COPIED, "_split": None, "_process_group": None,
                           "_split_layout": None}.items():
            self.__dict__.setdefault(key, value)
        for group in self.param_groups:  # keys an older soaplab did not have
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -- public interface of the layers below (see interface.Shell) ----------------------------
    @property
    def split(self) -> OwnerSplit | None:
        """The distributed split (DDP or DTensor mode), or None in a single process."""
        self._sync_split()
        return self._split

    def _sync_split(self) -> None:
        """Decide the mode for the current parameters, again whenever they changed: accelerate
        builds the optimizer on plain parameters and then swaps FSDP2's DTensors into its
        param groups (matched by data pointer), which must give FSDP2 mode as if the
        optimizer had been built after ``fully_shard``. Flat shards swapped in (DeepSpeed ZeRO,
        FSDP1) are refused here, before the maths would treat them as vectors."""
        params = [p for g in self.param_groups for p in g["params"]]
        layout = tuple(id(p) for p in params)
        if layout == self._split_layout:
            return
        for p in params:
            if _flat_shard(p):
                raise ValueError(f"{type(self).__name__}: a parameter with shape "
                                 f"{tuple(p.shape)} {_flat_shard(p)}")
        split = ShardedSplit.create(self, self._process_group) or \
            OwnerSplit.create(self, self._process_group)
        old = self._split
        if split is None or old is None or type(split) is not type(old) \
                or split.process_group is not old.process_group:
            self._split = split  # else the split follows the new list itself (owners())
        self._split_layout = layout

    def plan_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``kronecker.plan_factors`` for the group's parameters."""
        raise NotImplementedError

    def describe(self, group: dict[str, Any], index: int) -> str:
        """'parameter <name or number> with shape <shape>', for messages."""
        names = group.get("param_names")
        p = group["params"][index]
        number = next((k for k, g in enumerate(self.param_groups)
                       if g["params"] is group["params"]), len(self.param_groups))
        where = f"'{names[index]}'" if names else f"#{index} of group {number}"
        return f"parameter {where} with shape {tuple(p.shape)}"

    # -- subclass interface -------------------------------------------------------------------
    def _step_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _allocate_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """Create the bucket's state entries, every one that steps hold, without statistics
        (see :meth:`_allocation_call`)."""
        raise NotImplementedError

    # -- step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None  # inline, not _checks.closure_loss: that call costs torch.compile 4 more
        if closure is not None:  # graph breaks (tests/optim/test_compile.py)
            with torch.enable_grad():
                loss = closure()
        split = self.split
        if self._allocation_call():
            self._allocate()
            return loss
        if not self._grads_usable():
            self.skipped_steps += 1
            warnings.warn(f"{type(self).__name__}: non-finite or overflowing gradient, step "
                          f"skipped ({self.skipped_steps} so far)", RuntimeWarning, stacklevel=2)
            return loss
        for index, group in enumerate(self.param_groups):
            check_group(type(self).__name__, index, group, self.group_checks)
            targets = self._targets(group)
            for bucket in self._buckets(group, targets):
                self._step_bucket(bucket, group)
            if split is not None:
                split.finish(group, targets)
        return loss

    def _allocation_call(self) -> bool:
        """Whether this call only asks for state to exist: the zero-gradient, lr = 0 step by
        which torch's DCP helpers (``get/set_optimizer_state_dict``), torchtitan, accelerate
        and DeepSpeed materialise a fresh optimizer's state.

        All three must hold: no parameter has state yet, every group's lr is 0, and every
        gradient is exactly zero. A real step fails one of them: after the first step there is
        state; a warmup that starts at lr = 0 still has non-zero gradients; a zero gradient
        at lr > 0 is a (degenerate) step that was asked for. The check reads the gradients
        only when the first two hold, and runs no collective: under DDP every rank sees the
        same gradients, under FSDP2 a rank sees its shards, which are all zero only when the
        full gradients are (or when a rank holds empty shards of every parameter)."""
        if any(self.state.values()) or any(float(g["lr"]) != 0 for g in self.param_groups):
            return False
        grads = [torch.count_nonzero(local(p.grad)) for g in self.param_groups
                 for p in g["params"] if p.grad is not None]
        return bool(grads) and not any(_to_host(grads))

    def _allocate(self) -> None:
        """Every state entry that steps will hold, for the parameters this rank owns, with
        no statistics in it: the next real gradient initialises them as a first step would,
        so training after this call equals training without it."""
        split = self.split
        owners = None if split is None else split.assignment()
        for group in self.param_groups:
            targets = []
            for p in group["params"]:
                if p.grad is None or (owners is not None and owners[p] != split.rank):
                    continue
                zero = torch.zeros(p.shape, dtype=p.dtype, device=local(p).device)
                targets.append((p, zero, zero))
            for bucket in self._buckets(group, targets):
                self._allocate_bucket(bucket, group)

    def _targets(self, group: dict[str, Any]) -> list[Target]:
        """(parameter, tensor to update, gradient) for what this rank steps: every parameter
        with a gradient, or under a split only the owned ones, whole (see distributed)."""
        if self._split is not None:
            return self._split.targets(group)
        return [(p, p, p.grad) for p in group["params"] if p.grad is not None]

    def _grads_usable(self) -> bool:
        """Check every gradient before any state changes: raise, or report False to skip.

        Refused: NaN or Inf, and entries so large that the statistics would overflow the state
        dtype (see :func:`_largest_safe`), which would leave Inf in the state for good."""
        checked = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None or local(p.grad).numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"({self.describe(group, i)}); use torch.optim.SparseAdam")
                if p.grad.is_complex():
                    raise RuntimeError(f"{type(self).__name__} got a complex gradient for "
                                       f"{self.describe(group, i)}")
                limit = _largest_safe(p, state_dtype(p, self.matrix_dtype))
                checked.append((group, i, torch.linalg.vector_norm(local(p.grad), math.inf),
                                limit))
        # One transfer per device (stack promotes to the widest dtype); NaN stays NaN, and
        # fails every comparison below.
        largest = _to_host([c[2] for c in checked])
        ok = all(m <= c[3] for m, c in zip(largest, checked, strict=True))
        if self._split is not None:  # every rank must take the same branch below
            ok = self._split.all_agree(ok)
        if ok:
            return True
        if self.nonfinite == "skip":
            return False
        bad = next(((c, m) for m, c in zip(largest, checked, strict=True) if not m <= c[3]),
                   None)
        if bad is None:
            where, what = "a parameter on another rank", "contains NaN or Inf, or overflows"
        else:
            (group, i, _, limit), m = bad
            where = self.describe(group, i)
            what = "contains NaN or Inf" if not math.isfinite(m) else \
                f"has entries up to {m:.3g} (above {limit:.3g}), whose statistics would " \
                "overflow the state dtype (scale the loss down or use matrix_dtype=float64)"
        raise ValueError(f"{type(self).__name__}: gradient of {where} {what}; no state was "
                         "changed (pass nonfinite='skip' to skip such steps)")

    def _buckets(self, group: dict[str, Any], targets: list[Target]) -> list[Bucket]:
        plan_kwargs = self.plan_kwargs(group)
        members: dict[tuple, list[tuple[Tensor, Tensor, Tensor, FactorPlan]]] = defaultdict(list)
        for p, tensor, grad in targets:
            if tensor.numel() == 0:
                continue
            plan = plan_factors(tuple(tensor.shape), **plan_kwargs)
            if not group.get("batched", True):
                key: tuple = (id(p),)
            else:
                key = (plan.key, plan.channels_last, tensor.dtype, tensor.device,
                       self.state[p].get("step", -1))
            members[key].append((p, tensor, grad, plan))
        buckets = []
        for same in members.values():
            params, tensors, grads, plans = zip(*same, strict=True)
            dtype = state_dtype(tensors[0], self.matrix_dtype)
            stacked = torch.stack([to_plan_shape(g.to(dtype), plans[0]) for g in grads])
            if group["maximize"]:
                stacked.neg_()
            buckets.append(Bucket(list(tensors), [self.state[p] for p in params], plans[0],
                                  stacked, group))
        return buckets

    def _first_basis(self, factors: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
        """The eigenbasis of a first factor; the identity (with a warning) where eigh fails."""
        try:
            return eigenbasis(factors)
        except MatrixFunctionError as err:
            self._matrix_failed(err, f"initial eigh of axis {axis}")
            return torch.eye(factors.shape[-1], dtype=dtype, device=factors.device).expand_as(
                factors)

    def _matrix_failed(self, err: MatrixFunctionError, what: str) -> None:
        self.matrix_failures += 1
        warnings.warn(f"{type(self).__name__}: {what} failed ({err}); keeping the previous "
                      f"matrices ({self.matrix_failures} failures so far)", RuntimeWarning,
                      stacklevel=3)

    # -- checkpoints ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's contract (hooks, the saved param groups with this optimizer's parameters),
        with the state checked and cast to this optimizer's dtype policy (see state.py): fp32
        factors of a bf16 parameter stay fp32. Nothing changes when a check fails."""
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        check_kind(self, state_dict)
        groups, state = state_to_load(self, state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; in DDP or DTensor mode a collective that exports every
        parameter's state on every rank, as DTensor slices (see distributed/checkpoint.py)."""
        return export(self, super().state_dict())

    def state_bytes(self) -> int:
        """Bytes of optimizer state currently held."""
        return state_bytes(self)


def _flat_shard(p: Tensor) -> str:
    """Why ``p`` is a flat shard whose shape the maths cannot see ('' if it is not): FSDP1's
    flattened parameters and DeepSpeed ZeRO's partitions are 1-D pieces of several
    parameters, on which SOAP and Shampoo would silently become Adam."""
    if getattr(p, "_fsdp_flattened", False):
        return ("is a flat FSDP1 shard (FullyShardedDataParallel); shard with FSDP2 "
                "(fully_shard) or use DDP with process_group= instead")
    if hasattr(p, "ds_id") or hasattr(p, "ds_shape"):
        return ("is a DeepSpeed ZeRO partition, which hides its shape; use FSDP2 "
                "(fully_shard) or DDP with process_group= instead")
    return ""


def _to_host(scalars: list[Tensor]) -> list[float]:
    """The values of 0-d tensors, with one device-to-host transfer per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for k, x in enumerate(scalars):
        by_device[x.device].append(k)
    values = [0.0] * len(scalars)
    for indices in by_device.values():
        read = torch.stack([scalars[k] for k in indices]).double().tolist()
        for k, value in zip(indices, read, strict=True):
            values[k] = value
    return values


def _largest_safe(p: Tensor, dtype: torch.dtype) -> float:
    """The largest gradient entry whose statistics cannot overflow ``dtype``.

    With a = max |g| and n = p.numel(), every statistic is at most n·a² (‖G‖²_F bounds each
    Gram entry, factor, rotated g'² and v), a factored v̂ at most n²·a²; keeping n·a below
    √(max float) (1.8e19 in fp32) leaves all of them, and the refresh's column norms, finite."""
    return math.sqrt(torch.finfo(dtype).max) / max(p.numel(), 1)
