"""One run's folder: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json``.

The training loop hands this module what to keep and asks it what an earlier session left;
all file I/O of a run lives here. A run's *settings* (task and training settings, without
device, progress bars or checkpoint spacing) go into its config, its checkpoints and its
summary, and nothing saved under other settings is ever reused.

``summary.json`` is the compact record of a finished run (final losses, times, state size,
and every evaluation point): reports are built from it alone, so a folder whose per-step
``metrics.jsonl`` was removed can still be re-reported with ``--resume``.
"""

from __future__ import annotations

import io
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soaplab.reporting.manifest import first_difference
from soaplab.reporting.runs import (
    append_jsonl,
    atomic_write,
    check,
    read_json,
    read_jsonl,
    sync,
    write_compact_json,
    write_config,
    write_jsonl,
)

NUMBER = (int, float)
SUMMARY = {"steps": int, "diverged": bool, "final_train_loss": (*NUMBER, type(None)),
           "train_seconds": NUMBER, "optimizer_seconds": NUMBER,
           "peak_memory_mb": (*NUMBER, type(None)), "state_bytes": int, "evals": list,
           "refreshes?": dict, "settings?": dict}
EVAL = {"step": int, "train_time": NUMBER, "val_loss": NUMBER,
        "train_loss": (*NUMBER, type(None)), "drift?": dict}
METRIC = {"step": int, "train_time": NUMBER, "train_loss?": NUMBER, "step_time?": NUMBER,
          "optimizer_time?": NUMBER, "val_loss?": NUMBER, "peak_memory_mb?": NUMBER,
          "refresh_stats?": dict}


@dataclass
class Saved:
    """What an earlier session of a run left: its summary if it finished, else its records up
    to its checkpoint and that checkpoint (None where there is none)."""

    records: list[dict[str, Any]]
    checkpoint: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None


class RunFolder:
    """``defaults``: what a settings field missing from an older folder counts as
    (``reporting.manifest.first_difference``)."""

    def __init__(self, path: Path, settings: dict[str, Any],
                 defaults: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.settings = settings
        self.defaults = defaults
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.summary = self.path / "summary.json"

    def read(self) -> Saved | None:
        """The finished run, or the records and checkpoint to continue from, or None to start
        afresh. Refuses (ValueError) anything saved under other settings, a file of the wrong
        shape, and metrics that miss steps the checkpoint has passed."""
        if self.summary.is_file():
            summary = read_summary(self.summary)
            self._check(summary.pop("settings", None), self.summary)
            return Saved([], summary=summary)
        if not self.checkpoint.is_file():
            return None
        state = load_checkpoint(self.checkpoint)
        self._check(state.get("settings"), self.checkpoint)
        return Saved(self._records(state), state)

    def _records(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """The records up to the checkpoint: its own copy where it has one (metrics.jsonl may
        have lost lines a crash did not flush), else metrics.jsonl's if they cover every step."""
        found = read_jsonl(self.metrics, METRIC) if self.metrics.is_file() else []
        found = [r for r in found if r["step"] <= state["step"]]
        kept = state.get("records")
        if kept is not None:
            if [r["step"] for r in found] != [r["step"] for r in kept]:
                print(f"soaplab: warning: {self.metrics} did not hold every step up to "
                      f"{state['step']}; rebuilt it from {self.checkpoint}", file=sys.stderr)
            return kept
        steps = [r["step"] for r in found]
        first = steps[0] if steps and steps[0] == 0 else 1
        if steps != list(range(first, state["step"] + 1)):
            missing = len(set(range(1, state["step"] + 1)) - set(steps))
            raise ValueError(f"cannot resume from {self.checkpoint}: {self.metrics} misses "
                             f"{missing} of the steps 1-{state['step']} it has passed, so its "
                             "report would be wrong; delete the checkpoint to train that run "
                             "afresh")
        return found

    def _check(self, saved: Any, path: Path) -> None:
        difference = first_difference(saved if isinstance(saved, dict) else {}, self.settings,
                                      self.defaults)
        if difference is not None:
            raise ValueError(f"cannot resume from {path}: it was saved with other settings "
                             f"({difference}); delete it or choose another --out")

    def start(self, config: dict[str, Any], records: list[dict[str, Any]], fresh: bool) -> None:
        """Begin a session: the config, and the metrics cut back to ``records`` (the steps up to
        the checkpoint resumed from); a ``fresh`` start also drops an earlier checkpoint, and
        every start the temporary files a killed write left."""
        self.summary.unlink(missing_ok=True)
        if fresh:
            self.checkpoint.unlink(missing_ok=True)
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink()
        write_config(self.path, config)
        write_jsonl(self.metrics, records)

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, record)

    def save_checkpoint(self, state: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """The metrics on disk first, then the checkpoint, which keeps a copy of them too."""
        sync(self.metrics)
        buffer = io.BytesIO()
        torch.save({**state, "records": records, "settings": self.settings}, buffer)
        atomic_write(self.checkpoint, buffer.getvalue())

    def finish(self, summary: dict[str, Any]) -> None:
        write_compact_json(self.summary, {**summary, "settings": self.settings})


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, checked against its schema (each evaluation point too)."""
    summary = check(path, read_json(path), SUMMARY)
    for i, point in enumerate(summary["evals"]):
        check(path, point, EVAL, f"evals[{i}]")
    return summary


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True``: tensors and plain data only,
    so a pickle planted in a run folder cannot run code. Every failure is one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"cannot resume from {path}: it holds objects other than tensors "
                         "and plain data, which are refused (they could run code); delete it "
                         "to train that run afresh") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot resume from {path}: {reason} (delete it to train that run "
                         "afresh)") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"cannot resume from {path}: not a soaplab checkpoint")
    return state
