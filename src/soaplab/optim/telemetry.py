"""Refresh telemetry: how far each basis drifted, and what its refreshes cost.

Kept beside the optimizer state, not in it (checkpoints do not carry it). Drifts are stored as
device tensors and read only when :meth:`RefreshLog.report` is called, so recording adds no host
sync to the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

KEYS = ("refreshes", "skipped", "failures", "seconds")


@dataclass
class AxisLog:
    """One parameter's record for one factored axis."""

    drift: Tensor | None = None
    refreshes: int = 0
    skipped: int = 0
    failures: int = 0
    seconds: float = 0.0


@dataclass
class RefreshLog:
    """Per parameter state (keyed by the identity of its state dict) and axis."""

    axes: dict[int, dict[int, AxisLog]] = field(default_factory=dict)

    def axis(self, state: dict[str, Any], axis: int) -> AxisLog:
        return self.axes.setdefault(id(state), {}).setdefault(axis, AxisLog())

    def report(self, named_states: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """{"parameters": {name: {axis: {"drift", *KEYS}}}, plus totals of KEYS}."""
        parameters: dict[str, Any] = {}
        totals: dict[str, Any] = dict.fromkeys(KEYS, 0)
        for name, state in named_states:
            logs = self.axes.get(id(state))
            if not logs:
                continue
            parameters[name] = {}
            for axis, log in sorted(logs.items()):
                entry = {"drift": None if log.drift is None else float(log.drift)}
                entry.update({key: getattr(log, key) for key in KEYS})
                parameters[name][axis] = entry
                for key in KEYS:
                    totals[key] += entry[key]
        return {"parameters": parameters, **totals}
