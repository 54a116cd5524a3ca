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
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soaplab.reporting.manifest import first_difference
from soaplab.reporting.runs import (
    append_jsonl,
    atomic_write,
    read_jsonl,
    write_compact_json,
    write_config,
    write_jsonl,
)


@dataclass
class Saved:
    """What an earlier session of a run left: its summary if it finished, else its records up
    to its checkpoint and that checkpoint (None where there is none)."""

    records: list[dict[str, Any]]
    checkpoint: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None


class RunFolder:
    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = settings
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.summary = self.path / "summary.json"

    def read(self) -> Saved | None:
        """The finished run, or the records and checkpoint to continue from, or None to start
        afresh. Refuses (ValueError) anything saved under other settings."""
        if self.summary.is_file():
            summary = _read_json(self.summary)
            self._check(summary.pop("settings", None), self.summary)
            return Saved([], summary=summary)
        if not self.checkpoint.is_file():
            return None
        state = load_checkpoint(self.checkpoint)
        self._check(state.get("settings"), self.checkpoint)
        records = read_jsonl(self.metrics) if self.metrics.is_file() else []
        return Saved([r for r in records if r["step"] <= state["step"]], state)

    def _check(self, saved: Any, path: Path) -> None:
        difference = first_difference(saved if isinstance(saved, dict) else {}, self.settings)
        if difference is not None:
            raise ValueError(f"cannot resume from {path}: it was saved with other settings "
                             f"({difference}); delete it or choose another --out")

    def start(self, config: dict[str, Any], records: list[dict[str, Any]], fresh: bool) -> None:
        """Begin a session: the config, and the metrics cut back to ``records`` (the steps up to
        the checkpoint resumed from); a ``fresh`` start also drops an earlier checkpoint."""
        self.summary.unlink(missing_ok=True)
        if fresh:
            self.checkpoint.unlink(missing_ok=True)
        write_config(self.path, config)
        write_jsonl(self.metrics, records)

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, record)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "settings": self.settings}, buffer)
        atomic_write(self.checkpoint, buffer.getvalue())

    def finish(self, summary: dict[str, Any]) -> None:
        write_compact_json(self.summary, {**summary, "settings": self.settings})


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged ({err.msg}); delete it to train that run "
                         "again") from None
