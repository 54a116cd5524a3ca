"""A run folder: ``config.json``, ``metrics.jsonl`` (one JSON object a line) and ``report.md``."""

from __future__ import annotations

import json
import platform
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


def write_config(run_dir: Path, config: Any) -> Path:
    """Write ``config`` (a dataclass or dict) and the environment to ``run_dir/config.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(config) if is_dataclass(config) else dict(config)
    path = run_dir / "config.json"
    path.write_text(json.dumps({"config": data, "environment": environment()}, indent=2,
                               default=str))
    return path


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
