"""Each script in examples/ runs on CPU, as a reader would run it, and its loss falls."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def _losses(text, pattern):
    return [float(x) for x in re.findall(pattern, text)]


def test_plain_loop():
    out = _run("plain_loop.py", "--steps", "40")
    assert "| stem.weight" in out and "| input" in out
    losses = _losses(out, r"loss (\d+\.\d+)")
    assert losses[-1] < losses[0] - 0.2


def test_hf_trainer():
    pytest.importorskip("transformers", reason="transformers is not installed: pip install "
                        "-e '.[hf]' (Python >= 3.11)")
    out = _run("hf_trainer.py", "--steps", "15")
    losses = _losses(out, r"'loss': '(\d+\.?\d*)'")
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.2, losses


def test_lightning():
    pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is not installed: pip "
                        "install -e '.[lightning]'")
    out = _run("lightning.py")
    first, last = _losses(out, r"(\d+\.\d+) at the")
    assert last < first - 0.2


def test_the_describe_roles_table_in_the_docs_is_the_scripts_output():
    pytest.importorskip("transformers", reason="transformers is not installed: pip install "
                        "-e '.[hf]' (Python >= 3.11)")
    docs = (ROOT / "docs" / "integrations.md").read_text()
    assert _run("describe_roles.py").strip() in docs
