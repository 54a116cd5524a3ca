"""Each script in examples/ runs on CPU as a reader would run it (as ``__main__``, with its
command-line arguments; in this process, which saves importing torch again), and its loss
falls."""

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(monkeypatch, capsys):
    def run(script, *args):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(sys, "argv", [script, *args])
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
        out = capsys.readouterr()
        return out.out + out.err
    return run


def _losses(text, pattern):
    return [float(x) for x in re.findall(pattern, text)]


def test_plain_loop(run):
    out = run("plain_loop.py", "--steps", "40")
    assert "| stem.weight" in out and "| input" in out
    losses = _losses(out, r"loss (\d+\.\d+)")
    assert losses[-1] < losses[0] - 0.2


def test_hf_trainer(run):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install "
                        "-e '.[hf]' (Python >= 3.11)")
    out = run("hf_trainer.py", "--steps", "15")
    losses = _losses(out, r"'loss': '(\d+\.?\d*)'")
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.2, losses


def test_lightning(run):
    pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is not installed: pip "
                        "install -e '.[lightning]'")
    out = run("lightning.py")
    first, last = _losses(out, r"(\d+\.\d+) at the")
    assert last < first - 0.2


def test_the_describe_roles_table_in_the_docs_is_the_scripts_output(run):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install "
                        "-e '.[hf]' (Python >= 3.11)")
    docs = (ROOT / "docs" / "integrations.md").read_text()
    assert run("describe_roles.py").strip() in docs
