"""End to end: `soaplab analyze kronecker|whitening` on a tiny run, and clean errors."""

import shlex

import pytest

from soaplab.analysis.commands import _config, command_line
from soaplab.cli import build_parser, main
from soaplab.reporting.runs import read_jsonl

TINY = ["--steps", "3", "--snapshots", "0,3", "--probe", "24", "--hidden", "4", "--threads", "1"]


def snapshots(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "snapshot"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of each analysis, shared by the tests below."""
    root = tmp_path_factory.mktemp("analyze")
    assert main(["analyze", "kronecker", "--out", str(root / "kron"), *TINY,
                 "--batch-sizes", "1,8", "--batch-repeats", "2"]) == 0
    assert main(["analyze", "whitening", "--out", str(root / "white"), *TINY,
                 "--damping", "1e-2"]) == 0
    return root / "kron", root / "white"


def test_analyze_kronecker_end_to_end(runs):
    out = runs[0]
    rows = snapshots(out)
    assert {r["step"] for r in rows} == {0, 3} and len(rows) == 6  # 3 layers × 2 snapshots
    for r in rows:
        assert r["ggn/optimal"] >= r["ggn/shampoo2"] - 1e-9  # optimal is optimal
        assert 0 < r["ggn/shampoo"] <= 1
        assert 0 < r["batch/real/8"] <= 1 and 0 < r["batch/sampled/1"] <= 1
    report = (out / "report.md").read_text()
    assert "Shampoo² (L⊗R)" in report and "soaplab analyze kronecker --out" in report
    assert (out / "batch_size_0_weight.png").stat().st_size > 0
    assert (out / "kronecker_0_weight.png").stat().st_size > 0


def test_analyze_whitening_end_to_end(runs):
    out = runs[1]
    for r in snapshots(out):
        assert r["fisher/whitening/whiteness"] == pytest.approx(1.0, abs=1e-8)
        assert all(-1 <= r[f"ggn/{k}/cosine"] <= 1 for k in ("adam", "shampoo", "soap"))
    assert "cosine(P, C^-½)" in (out / "report.md").read_text()
    assert (out / "whitening_fisher_0_weight.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # argparse rejects an unregistered optimizer name
        main(["analyze", "whitening", "--out", str(out), *TINY, "--optimizer", "sgd"])


def test_both_analyses_follow_the_same_training_trajectory(runs):
    kron, white = (snapshots(d) for d in runs)  # the kronecker analysis draws random labels
    assert [r["train_loss"] for r in kron] == [r["train_loss"] for r in white]


@pytest.mark.parametrize(("file", "damage", "message"), [
    ("metrics.jsonl", lambda text: '{"kind": "snapshot"}\n' + text,
     r"metrics.jsonl \(line 1\): 'step' is missing"),
    ("metrics.jsonl", lambda text: text.replace('"test_acc": ', '"test_acc": "x", "_": ', 1),
     r"\(step 0\): 'test_acc' should be int or float"),
    ("config.json", lambda text: text.replace('"hidden": 4', '"hidden": "4"'),
     r"config.json \(config\): 'hidden' should be int"),
])
def test_the_report_checks_what_it_reads_back(runs, tmp_path, file, damage, message):
    """A damaged analysis folder gives one line naming the file and what is wrong."""
    import shutil

    from soaplab.analysis.report import write_report

    folder = shutil.copytree(runs[1], tmp_path / "copy")
    (folder / file).write_text(damage((folder / file).read_text()))
    with pytest.raises(ValueError, match=message):
        write_report(folder, "soaplab analyze whitening")


def test_command_line_rebuilds_the_config():
    args = build_parser().parse_args(["analyze", "kronecker", *TINY, "--batch-sizes", "2,4"])
    cfg = _config("kronecker", args)
    again = build_parser().parse_args(shlex.split(command_line(cfg))[1:])
    assert _config("kronecker", again) == cfg


def test_errors_are_one_clean_line(tmp_path, capsys):
    missing = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "none")]
    assert main(["analyze", "kronecker", "--out", str(tmp_path), *missing]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["analyze", "kronecker", "--out", str(tmp_path), "--snapshots", "0,999"]) == 2
    assert "snapshots" in capsys.readouterr().err
    assert main(["analyze", "kronecker", "--out", str(tmp_path), "--max-layer-size", "3"]) == 2
    assert "max_layer_size" in capsys.readouterr().err
