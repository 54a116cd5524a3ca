"""The torch.optim shell shared by SOAP and Shampoo: gradient intake, batching, checkpoints.

Subclasses implement ``_step_bucket`` for a *bucket*: the parameters of one group that share a
factor plan, a dtype, a device and a step count, stacked so that each matmul runs once per
bucket rather than once per parameter.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from soaplab.optim._checks import check_choice
from soaplab.optim.distributed.checkpoint import mark_shard, state_to_load
from soaplab.optim.distributed.ddp import OwnerSplit, Target
from soaplab.optim.distributed.fsdp import ShardedSplit, local
from soaplab.optim.kronecker import FactorPlan, plan_factors, to_plan_shape, update_factors
from soaplab.optim.matrix_functions import MatrixFunctionError
from soaplab.optim.state import load_state_preserving_dtypes, state_bytes, state_dtype


@dataclass
class Bucket:
    """Same-plan parameters of one group, with their gradients stacked as (B, *plan.shape).

    ``params`` are the tensors the maths updates in place: the parameters themselves, or under
    FSDP2 full-size copies that the split writes back to the shards."""

    params: list[Tensor]
    states: list[dict[str, Any]]
    plan: FactorPlan
    grads: Tensor

    def stack(self, key: str) -> Tensor:
        """The (B, ...) stack of one state entry across the bucket.

        Entries are kept as views of one stacked tensor (see :meth:`store`), so after the
        first step this costs nothing, and in-place updates of the stack reach every parameter.
        """
        tensors = [s[key] for s in self.states]
        base = tensors[0]._base
        if (base is not None and base.shape == (len(tensors), *tensors[0].shape)
                and all(t._base is base and t.data_ptr() == base[i].data_ptr()
                        for i, t in enumerate(tensors))):
            return base
        stacked = torch.stack(tensors)
        self.store(key, stacked)
        return stacked

    def update_factors(self, group: dict[str, Any]) -> dict[int, Tensor]:
        """EMA of this step's gradient Gram matrices into the factors; returns them stacked.

        The EMA coefficient is the group's ``shampoo_beta``, or β2 when that is negative."""
        beta = group["shampoo_beta"]
        beta = group["betas"][1] if beta is None or beta < 0 else beta
        factors = {axis: self.stack(f"factor_{axis}") for axis in self.plan.axes}
        update_factors(factors, self.grads, beta)
        for axis, value in factors.items():
            self.store(f"factor_{axis}", value)
        return factors

    def store(self, key: str, stacked: Tensor) -> None:
        """Make each parameter's entry a view of ``stacked`` (no copy)."""
        if stacked._base is not None or not stacked.is_contiguous():
            stacked = stacked.clone(memory_format=torch.contiguous_format)
        for s, view in zip(self.states, stacked.unbind(0), strict=True):
            s[key] = view


class KroneckerOptimizer(torch.optim.Optimizer):
    """Common machinery; not used directly."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, nonfinite: str,
                 matrix_dtype: torch.dtype | None, process_group: Any = None) -> None:
        check_choice("nonfinite", nonfinite, ("raise", "skip"))
        super().__init__(params, defaults)
        # DDP or FSDP2 mode (see soaplab.optim.distributed); None: this process does it all.
        self._split = ShardedSplit.create(self, process_group) or \
            OwnerSplit.create(self, process_group)
        self.nonfinite = nonfinite
        self.matrix_dtype = matrix_dtype
        self.skipped_steps = 0
        self.matrix_failures = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters "
                                     f"({self._name(group, i)}); pass torch.view_as_real(p)")

    # -- subclass interface -------------------------------------------------------------------
    def _plan_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _step_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            self.skipped_steps += 1
            warnings.warn(f"{type(self).__name__}: non-finite gradient, step skipped "
                          f"({self.skipped_steps} so far)", RuntimeWarning, stacklevel=2)
            return loss
        for group in self.param_groups:
            targets = self._targets(group)
            for bucket in self._buckets(group, targets):
                self._step_bucket(bucket, group)
            if self._split is not None:
                self._split.finish(group, targets)
        return loss

    def _targets(self, group: dict[str, Any]) -> list[Target]:
        """(parameter, tensor to update, gradient) for what this rank steps: every parameter
        with a gradient, or under a split only the owned ones, whole (see distributed)."""
        if self._split is not None:
            return self._split.targets(group)
        return [(p, p, p.grad) for p in group["params"] if p.grad is not None]

    def _name(self, group: dict[str, Any], index: int) -> str:
        names = group.get("param_names")
        p = group["params"][index]
        number = next(k for k, g in enumerate(self.param_groups) if g is group)
        where = f"'{names[index]}'" if names else f"#{index} of group {number}"
        return f"parameter {where} with shape {tuple(p.shape)}"

    def _grads_finite(self) -> bool:
        """Check every gradient before any state changes: raise, or report False to skip."""
        checked = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"({self._name(group, i)}); use torch.optim.SparseAdam")
                if p.grad.is_complex():
                    raise RuntimeError(f"{type(self).__name__} got a complex gradient for "
                                       f"{self._name(group, i)}")
                checked.append((group, i, torch.isfinite(local(p.grad)).all()))
        finite = not checked or bool(torch.stack([c[2].to("cpu") for c in checked]).all())
        if self._split is not None:  # every rank must take the same branch below
            finite = self._split.all_agree(finite)
        if finite:
            return True
        if self.nonfinite == "skip":
            return False
        bad = next((c for c in checked if not bool(c[2])), None)
        where = "a parameter on another rank" if bad is None else self._name(bad[0], bad[1])
        raise ValueError(f"{type(self).__name__}: gradient of {where} contains "
                         "NaN or Inf; no state was changed (pass nonfinite='skip' to skip such "
                         "steps)")

    def _buckets(self, group: dict[str, Any], targets: list[Target]) -> list[Bucket]:
        plan_kwargs = self._plan_kwargs(group)
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
            buckets.append(Bucket(list(tensors), [self.state[p] for p in params], plans[0],
                                  stacked))
        return buckets

    def _matrix_failed(self, err: MatrixFunctionError, what: str) -> None:
        self.matrix_failures += 1
        warnings.warn(f"{type(self).__name__}: {what} failed ({err}); keeping the previous "
                      f"matrices ({self.matrix_failures} failures so far)", RuntimeWarning,
                      stacklevel=3)

    # -- checkpoints ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint, keeping every state tensor in its saved dtype (fp32 factors of a
        bf16 parameter stay fp32)."""
        load_state_preserving_dtypes(self, state_to_load(self, state_dict))

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; in DDP mode only this rank's share, marked with its rank."""
        return mark_shard(super().state_dict(), self._split)

    def state_bytes(self) -> int:
        """Bytes of optimizer state currently held."""
        return state_bytes(self)
