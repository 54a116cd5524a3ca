"""A warning, at construction, for factors that cost far more memory than their parameter.

Two traps: ``merge_dims=True`` on a small conv turns a (32, 32, 3, 3) kernel into one 9216-long
axis (a 9216² factor and basis, ~680 MB, for a 37 KB kernel), and an embedding just under
``max_precond_dim`` (vocab 4096 × 128) gets a 4096² factor while vocab 32000 gets none.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from soaplab.optim.kronecker import plan_factors

# An axis of length d costs a d×d factor and a d×d basis (or inverse root), in float32.
_FACTOR_BYTES = 2 * 4
RATIO = 16  # warn when one axis' factor has this many times the parameter's elements ...
FLOOR = 8 * 2**20  # ... and takes at least this many bytes


def costly_factors(optimizer: Any) -> list[str]:
    """One line per parameter whose factor plan costs far more than the parameter itself.

    ``optimizer`` is a soaplab Kronecker optimizer (``plan_kwargs``, ``describe``)."""
    lines = []
    for group in optimizer.param_groups:
        kwargs = optimizer.plan_kwargs(group)
        for i, p in enumerate(group["params"]):
            plan = plan_factors(tuple(p.shape), **kwargs)
            if not plan.axes or p.numel() == 0:
                continue
            d = max(plan.shape[k] for k in plan.axes)
            cost = _FACTOR_BYTES * sum(plan.shape[k] ** 2 for k in plan.axes)
            if d * d < RATIO * p.numel() or cost < FLOOR:
                continue
            merged = plan.shape != tuple(p.shape) and kwargs.get("merge_dims")
            fix = ("merge_dims=True merged its axes: pass merge_dims=False" if merged else
                   f"send it to AdamW (a role other than hidden in soap_hidden, or a group with "
                   f"max_precond_dim=0), or pass max_precond_dim < {d}")
            lines.append(f"{optimizer.describe(group, i)} gets a {d}x{d} factor: about "
                         f"{_mb(cost)} of optimizer state for a "
                         f"{_mb(p.numel() * p.element_size())} parameter; {fix}")
    return lines


def warn_costly_factors(optimizer: Any) -> None:
    """Warn once per costly parameter (see :func:`costly_factors`)."""
    for line in costly_factors(optimizer):
        warnings.warn(f"{type(optimizer).__name__}: {line}", stacklevel=3)


def _mb(n: int) -> str:
    return f"{n / 1e6:.{max(0, 2 - int(math.log10(max(n / 1e6, 1e-3))))}f} MB"
