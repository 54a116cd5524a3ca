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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import soaplab
from soaplab.reporting import lock
from soaplab.reporting.runs import check, read_json, write_json

NAME = "manifest.json"
SAME = object()  # a default that counts as the command's own value (see first_difference)


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


def _default(key: str, defaults: Mapping[str, Any], mine: Any) -> Any:
    """What ``key``, missing from an older folder, counts as: the default of the longest
    dotted suffix of ``key`` (or of a prefix of it) in ``defaults``, else '(absent)'."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        for start in range(end):
            name = ".".join(parts[start:end])
            if name in defaults and (end == len(parts) or defaults[name] is SAME):
                return mine if defaults[name] is SAME else defaults[name]
    return "(absent)"


def first_difference(old: dict[str, Any], new: dict[str, Any],
                     defaults: Mapping[str, Any] | None = None) -> str | None:
    """'settings.train.steps: the folder has 30, this command 40', or None when equal. A key
    the folder lacks counts as its value in ``defaults`` (a folder made before it existed);
    ``SAME`` there counts as this command's own value."""
    a, b = _flat(old), _flat(new)
    for key in dict.fromkeys([*b, *a]):
        mine = b.get(key, "(absent)")
        theirs = a[key] if key in a else _default(key, defaults or {}, mine)
        if theirs != mine:
            return f"{key}: the folder has {theirs!r}, this command {mine!r}"
    return None


def prepare(out: Path, record: dict[str, Any], *, resume: bool, overwrite: bool,
            defaults: Mapping[str, Any] | None = None, resumable: bool = True) -> None:
    """Make ``out`` this command's run folder, locked for this process (``reporting.lock``),
    and write ``record`` there, or refuse in one line (ValueError) having written nothing. Call
    it after every other check of the command. ``defaults``: see :func:`first_difference`."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite moves it aside; "
                         "pass one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir():
        lock.check_free(out)
    if out.is_dir() and any(p.name != lock.NAME for p in out.iterdir()):
        if resume:
            _check_same(out, record, defaults)
            lock.acquire(out)
            return
        if not overwrite:
            hint = "pass --resume to continue the run there, " if resumable else "pass "
            raise ValueError(f"--out {out} is not empty; {hint}--overwrite to move its "
                             "contents aside, or another --out")
        if out.resolve() == Path.cwd() or out.resolve().parent == out.resolve():
            raise ValueError(f"--out {out} is the current folder or the root; --overwrite "
                             "cannot move it aside, choose another --out")
        print(f"--overwrite: moved the old contents of {out} to {_move_aside(out)}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire(out)
        write_json(out / NAME, record)
    except PermissionError:
        raise ValueError(f"--out {out}: permission denied; choose a folder you can write "
                         "to") from None


def _check_same(out: Path, record: dict[str, Any], defaults: Mapping[str, Any] | None) -> None:
    path = out / NAME
    if not path.is_file():
        raise ValueError(f"--resume: {out} has no {NAME}, so no soaplab {record['command']} "
                         "run made it; choose another --out")
    old = read_manifest(path)
    difference = first_difference(old, record, defaults)
    if difference is not None:
        raise ValueError(f"--resume: {out} holds a different run ({difference}); rerun with "
                         "its settings, or choose another --out")


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest checked against its schema; any fault is one line naming ``path``."""
    return check(path, read_json(path), {"command": str, "task": str, "settings": dict})


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
