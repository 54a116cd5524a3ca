"""Argument checks shared by the optimizers: each message names the argument, value and range.
And the closure protocol every ``step`` follows."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch


def check_nonnegative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_beta(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])


def check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_lr(lr: Any) -> None:
    """A number >= 0, or (as torch.optim accepts) a one-element tensor holding one."""
    if torch.is_tensor(lr):
        if lr.numel() != 1 or lr.requires_grad:
            raise ValueError(f"lr as a tensor must hold one value and need no grad, got {lr!r}")
        lr = lr.item()
    check_nonnegative("lr", lr)


_UNSUPPORTED = {
    "differentiable": "the basis refreshes (QR, eigh) and the gradient checks run outside "
                      "autograd",
    "fused": "there is no fused kernel; batched=True (the default) already stacks same-shape "
             "parameters",
    "capturable": "the step count and refresh schedule are host-side Python ints, which a "
                  "CUDA graph cannot capture",
}


def check_torch_flags(name: str, **flags: Any) -> None:
    """torch.optim's ``differentiable``, ``fused`` and ``capturable``: only off (False/None)."""
    for flag, value in flags.items():
        if value:
            raise ValueError(f"{name} does not support {flag}=True: {_UNSUPPORTED[flag]}")


def resolve_batched(batched: bool | None, foreach: bool | None) -> bool:
    """``foreach`` is torch's name for ``batched``; None means the default (True)."""
    if batched is not None and foreach is not None and bool(batched) != bool(foreach):
        raise ValueError(f"foreach={foreach!r} and batched={batched!r} disagree; foreach is "
                         "torch's name for batched, pass one of them")
    chosen = batched if batched is not None else foreach
    return True if chosen is None else bool(chosen)


def _optional_int(minimum: int):
    def check(name: str, value: Any) -> None:
        if value is not None:
            check_int(name, value, minimum)
    return check


def _shampoo_beta(name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value < 0):
        check_beta(name, value)  # negative: follow betas[1]


# The constructors' checks of the hyperparameters a param group holds, for values set on a
# group after construction (schedulers, users): step() runs them on every group.
GROUP_CHECKS = {
    "lr": lambda name, value: check_lr(value),
    "betas": lambda name, value: check_betas(value),
    "shampoo_beta": _shampoo_beta,
    "eps": check_nonnegative,
    "graft_eps": check_nonnegative,
    "weight_decay": check_nonnegative,
    "precondition_frequency": lambda name, value: check_int(name, value, 1),
    "start_preconditioning_step": _optional_int(1),
    "max_precond_dim": lambda name, value: check_int(name, value, 0),
    "exponent": check_positive,
}


def check_group(owner: str, index: int, group: dict[str, Any],
                checks: Mapping[str, Callable[[str, Any], None]] = GROUP_CHECKS) -> None:
    """One ValueError naming the optimizer, the group and the value, before a step uses it
    (``checks``: an optimizer's own, where its constructor differs from ``GROUP_CHECKS``)."""
    for key, check in checks.items():
        if key in group:
            try:
                check(key, group[key])
            except ValueError as err:
                raise ValueError(f"{owner}: param_groups[{index}]: {err}") from None


def check_kind(owner: torch.optim.Optimizer, state_dict: Any) -> None:
    """Refuse, in one ValueError, the state dict of another kind of optimizer: its param
    groups hold hyperparameters this optimizer's groups do not (a group missing some of this
    optimizer's keys is an older soaplab's, which loading fills in)."""
    saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(saved, list):
        return  # torch's own checks name what is wrong
    for index, (old, new) in enumerate(zip(saved, owner.param_groups, strict=False)):
        extra = sorted(set(old) - set(new) - {"params", "param_names"}) \
            if isinstance(old, dict) else []
        if extra:
            name = type(owner).__name__
            raise ValueError(f"{name}.load_state_dict: param_groups[{index}] holds "
                             f"{', '.join(extra)}, which {name} does not have: the state dict "
                             "is another optimizer's; load it into the kind that saved it")


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """torch.optim's closure protocol: re-evaluate the model with gradients on, return its loss
    (None without a closure)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
