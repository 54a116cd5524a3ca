"""``manifest.json``: what a run folder belongs to, so results from different settings never mix.

A command writes its manifest (command, task, the settings that define its runs, soaplab and
torch versions) before anything else. Later, ``--resume`` continues only a folder whose
manifest is the same; a non-empty folder is otherwise refused, unless ``--overwrite`` moves its
contents aside first. Settings that do not change the results (device, threads, progress
bars, checkpoint spacing) stay out of the manifest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import soaplab
from soaplab.reporting.runs import write_json

NAME = "manifest.json"


def manifest(command: str, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """A manifest in the form it has once written and read back (tuples become lists)."""
    record = {"command": command, "task": task, "settings": settings,
              "soaplab": soaplab.__version__, "torch": torch.__version__}
    return json.loads(json.dumps(record, default=str))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat |= _flat(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """'settings.train.steps: the folder has 30, this command 40', or None when equal."""
    a, b = _flat(old), _flat(new)
    for key in dict.fromkeys([*b, *a]):
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            return (f"{key}: the folder has {a.get(key, '(absent)')!r}, this command "
                    f"{b.get(key, '(absent)')!r}")
    return None


def prepare(out: Path, record: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Make ``out`` this command's run folder and write ``record`` there, or refuse in one line
    (ValueError) having written nothing. Call it after every other check of the command."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite moves it aside; "
                         "pass one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if resume:
            _check_same(out, record)
            return
        if not overwrite:
            raise ValueError(f"--out {out} is not empty; pass --resume to continue the run "
                             "there, --overwrite to move its contents aside, or another --out")
        print(f"--overwrite: moved the old contents of {out} to {_move_aside(out)}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / NAME, record)
    except PermissionError:
        raise ValueError(f"--out {out}: permission denied; choose a folder you can write "
                         "to") from None


def _check_same(out: Path, record: dict[str, Any]) -> None:
    path = out / NAME
    if not path.is_file():
        raise ValueError(f"--resume: {out} has no {NAME}, so no soaplab {record['command']} "
                         "run made it; choose another --out")
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--resume: {path} is damaged ({err.msg}); choose another --out") \
            from None
    difference = first_difference(old, record)
    if difference is not None:
        raise ValueError(f"--resume: {out} holds a different run ({difference}); rerun with "
                         "its settings, or choose another --out")


def _move_aside(out: Path) -> Path:
    """Rename ``out`` to a free ``<out>.old-<UTC time>`` beside it (nothing is deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.old-{stamp}-{n}")
    out.rename(aside)
    return aside
