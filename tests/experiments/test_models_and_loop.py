"""Models, the shared loop (losses fall, determinism, resume) and the schedule."""

import dataclasses

import pytest
import torch

from soaplab.experiments.loop import TrainConfig, lr_factor, train
from soaplab.experiments.models.colorizer import Colorizer
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.experiments.run_folder import load_checkpoint
from soaplab.experiments.tasks import TaskOptions
from soaplab.reporting.runs import read_jsonl

LM = TaskOptions(task="lm", size="micro", max_chars=50_000, batch_size=8, eval_batches=2)
COLOR = TaskOptions(task="colorize", size="micro", batch_size=16)


def records(task, cfg, run_dir, resume=False):
    """Every training step's metrics of one run, as written to its metrics.jsonl (after the
    evaluation at step 0)."""
    train(task, cfg, run_dir, resume=resume)
    step0, *steps = read_jsonl(run_dir / "metrics.jsonl")
    assert step0["step"] == 0 and set(step0) == {"step", "train_time", "val_loss"}
    return steps


def test_gpt_shapes_and_weight_tying():
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=32))
    logits, loss = model(torch.randint(30, (3, 16)), torch.randint(30, (3, 16)))
    assert logits.shape == (3, 16, 30) and loss.item() == pytest.approx(3.4, abs=0.3)
    assert model.head.weight is model.wte.weight
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.randint(30, (1, 17)))


def test_colorizer_shapes_and_range():
    out = Colorizer(8)(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 2, 32, 32) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="divisible by 4"):
        Colorizer(8)(torch.randn(2, 1, 30, 30))


@pytest.mark.parametrize(("task", "optimizer"), [(LM, "adamw"), (LM, "soap"),
                                                 (COLOR, "adamw"), (COLOR, "shampoo")])
def test_loss_falls_for_each_task(tmp_path, task, optimizer):
    cfg = TrainConfig(optimizer=optimizer, steps=40, warmup=5, eval_every=40, lr=1e-2,
                      progress=False)
    steps = records(task, cfg, tmp_path)
    first = sum(r["train_loss"] for r in steps[:5]) / 5
    last = sum(r["train_loss"] for r in steps[-5:]) / 5
    assert last < 0.9 * first
    assert all(k in steps[-1] for k in ("val_loss", "step_time", "optimizer_time",
                                          "peak_memory_mb", "train_time", "lr"))


def test_same_seed_same_losses(tmp_path):
    cfg = TrainConfig(optimizer="soap", steps=12, warmup=3, eval_every=6, progress=False)
    a = records(LM, cfg, tmp_path / "a")
    b = records(LM, cfg, tmp_path / "b")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    c = records(LM, dataclasses.replace(cfg, seed=1), tmp_path / "c")
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in c]


@pytest.mark.parametrize("optimizer", ["adamw", "soap"])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    cfg = TrainConfig(optimizer=optimizer, steps=16, warmup=3, eval_every=4,
                      checkpoint_every=8, progress=False,
                      optimizer_kwargs={"precondition_frequency": 3} if optimizer == "soap"
                      else {})
    whole = records(LM, cfg, tmp_path / "whole")
    train(LM, dataclasses.replace(cfg, stop_at=10), tmp_path / "split")  # dies after step 10
    resumed = records(LM, cfg, tmp_path / "split", resume=True)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in whole]


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
    cfg = TrainConfig(steps=4, warmup=1, eval_every=2, checkpoint_every=2, progress=False)
    train(LM, dataclasses.replace(cfg, stop_at=2), tmp_path)  # interrupted after its checkpoint
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot resume from"):
        train(LM, cfg, tmp_path, resume=True)


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_finished_run_is_read_back_on_resume(tmp_path):
    cfg = TrainConfig(steps=6, warmup=1, eval_every=3, progress=False)
    first = train(LM, cfg, tmp_path)
    again = train(LM, cfg, tmp_path, resume=True)
    assert again.task is None and again.summary == first.summary
    assert first.summary["state_bytes"] > 0 and first.summary["steps"] == 6
    assert [p["step"] for p in first.summary["evals"]] == [0, 3, 6]
    assert first.summary["evals"][0]["train_loss"] is None


def test_summary_matches_the_metrics(tmp_path):
    cfg = TrainConfig(steps=6, warmup=1, eval_every=3, progress=False)
    summary = train(LM, cfg, tmp_path).summary
    steps = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(p["step"], p["val_loss"]) for p in summary["evals"]] == \
        [(r["step"], r["val_loss"]) for r in steps if "val_loss" in r]
    assert summary["evals"][1]["train_loss"] == pytest.approx(
        sum(r["train_loss"] for r in steps[1:4]) / 3)
    assert summary["train_seconds"] == pytest.approx(sum(r["step_time"] for r in steps[1:]))


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    cfg = TrainConfig(steps=4, warmup=1, eval_every=2, checkpoint_every=2, progress=False)
    train(LM, dataclasses.replace(cfg, stop_at=2), tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(train.steps: the folder has 4, "
                                         r"this command 8\)"):
        train(LM, dataclasses.replace(cfg, steps=8), tmp_path, resume=True)


@pytest.mark.parametrize("optimizer", ["adamw", "soap"])
def test_bf16_autocast_trains_close_to_fp32_with_fp32_state(tmp_path, optimizer):
    cfg = TrainConfig(optimizer=optimizer, steps=30, warmup=5, eval_every=15, lr=1e-2,
                      checkpoint_every=30, progress=False)
    fp32 = records(LM, cfg, tmp_path / "fp32")
    bf16 = records(LM, dataclasses.replace(cfg, precision="bf16"), tmp_path / "bf16")
    first = bf16[0]["train_loss"] / fp32[0]["train_loss"]
    assert first != 1 and first == pytest.approx(1, abs=1e-2)  # bf16 rounding, nothing more
    assert sum(r["train_loss"] for r in bf16[-5:]) < 0.9 * sum(r["train_loss"] for r in bf16[:5])
    assert bf16[-1]["val_loss"] == pytest.approx(fp32[-1]["val_loss"], rel=0.05)
    state = load_checkpoint(tmp_path / "bf16" / "checkpoint.pt")
    assert state["settings"]["train"]["precision"] == "bf16"
    tensors = [*state["model"].values(), *(v for s in state["optimizer"]["state"].values()
                                           for v in s.values() if torch.is_tensor(v))]
    floats = [t for t in tensors if t.is_floating_point() and t.numel() > 1]
    assert floats and all(t.dtype == torch.float32 for t in floats)
