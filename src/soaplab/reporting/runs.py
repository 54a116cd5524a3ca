"""A run folder's files: atomic writes, ``config.json``, and ``metrics.jsonl`` (a JSON object a
line, appended as a run goes, so a kill can tear its last line and nothing else)."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def environment() -> dict[str, Any]:
    """What a reader needs to judge a timing: machine, threads, versions."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # processes of a data-parallel (torchrun) run; the batch is split across them
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that a kill leaves the old file or the new one, never a
    half-written one: a temporary file in the same folder, flushed to disk, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide results from other users
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def write_compact_json(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as JSON with one line per key, and per item of a list value: short, and a
    reader still sees one evaluation point, say, per line."""
    def line(value: Any) -> str:
        return json.dumps(value, default=str)

    parts = [f"  {line(key)}: [\n" + ",\n".join(f"    {line(v)}" for v in value) + "\n  ]"
             if isinstance(value, list) and value else f"  {line(key)}: {line(value)}"
             for key, value in data.items()]
    return atomic_write(path, "{\n" + ",\n".join(parts) + "\n}\n")


def write_config(run_dir: Path, config: Any) -> Path:
    """Write ``config`` (a dataclass or dict) and the environment to ``run_dir/config.json``."""
    data = asdict(config) if is_dataclass(config) else dict(config)
    return write_json(run_dir / "config.json", {"config": data, "environment": environment()})


ENVIRONMENT = {"threads": int, "machine": str, "torch": str, "cuda": (str, type(None)),
               "world_size?": int}


def read_config(run_dir: Path) -> dict[str, Any]:
    """``run_dir/config.json``: {"config": ..., "environment": ...}, checked."""
    path = Path(run_dir) / "config.json"
    config = check(path, read_json(path), {"config": dict, "environment": dict})
    check(path, config["environment"], ENVIRONMENT, "environment")
    return config


Schema = dict[str, Any]  # key ('?' at its end: optional) -> a type or a tuple of types
NUMBER = (int, float)


def read_text(path: Path) -> str:
    """A UTF-8 file's text; a file of other bytes is one line naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); repair or delete "
                         "it") from None


def read_json(path: Path) -> Any:
    """A JSON file's contents; a damaged one is one line naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged ({err.msg}); repair or delete it") from None


def check(path: Path, data: Any, schema: Schema, where: str = "") -> Any:
    """``data`` if it is a JSON object with the keys and value types of ``schema``, else a
    ValueError naming ``path`` (and ``where`` in it) and what is wrong."""
    at = f"{path}" + (f" ({where})" if where else "")
    if not isinstance(data, dict):
        raise ValueError(f"{at}: expected a JSON object, found {json.dumps(data)[:40]}")
    for key, kind in schema.items():
        name = key.rstrip("?")
        if name not in data:
            if key.endswith("?"):
                continue
            raise ValueError(f"{at}: {name!r} is missing")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = data[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{at}: {name!r} should be {expected}, found "
                             f"{json.dumps(value, default=str)[:40]}")
    return data


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def sync(path: Path) -> None:
    """Flush ``path``'s appended lines to disk (before a checkpoint that counts on them)."""
    with Path(path).open("ab") as f:
        os.fsync(f.fileno())


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r, default=float) + "\n" for r in records))


def read_jsonl(path: Path, schema: Schema | None = None) -> list[dict[str, Any]]:
    """The records of ``path`` (each checked against ``schema``). A torn last line (what a kill
    mid-write leaves) is dropped with a warning; a bad line anywhere else is an error naming
    the file and line."""
    lines = read_text(path).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg}); "
                                 "repair or delete that file") from None
            print(f"soaplab: warning: {path}: dropped its torn last line {number} (a run "
                  "killed mid-write leaves one)", file=sys.stderr)
            continue
        records.append(record if schema is None else check(path, record, schema,
                                                           f"line {number}"))
    return records
