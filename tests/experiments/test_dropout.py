"""The GPT's dropout: nanoGPT's placement, and at 0 bitwise the model without dropout."""

import copy
import json

import pytest
import torch
from torch import nn

from soaplab.cli import main
from soaplab.experiments.models.gpt import GPT, GPTConfig


def _batches(vocab, block, count=4):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(vocab, (3, block), generator=gen),
             torch.randint(vocab, (3, block), generator=gen)) for _ in range(count)]


def _train(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in batches:
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_dropout_zero_trains_bitwise_as_the_model_without_dropout():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("micro", 11)
    model = GPT(cfg).train()
    without = copy.deepcopy(model)  # the model as it was before dropout: identities instead
    for module in list(without.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 1 + 2 * cfg.n_layer
    batches = _batches(11, cfg.block_size)
    assert _train(model, batches) == _train(without, batches)
    for a, b in zip(model.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


def test_dropout_acts_in_training_only_at_nanogpts_places():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro", 11, dropout=0.5))
    x, y = _batches(11, 32, 1)[0]
    model.eval()
    assert torch.equal(model(x, y)[1], model(x, y)[1])
    model.train()
    assert not torch.equal(model(x, y)[1], model(x, y)[1])
    seen = []
    for name in ("drop", "blocks.0.attn.resid_dropout", "blocks.0.mlp.dropout"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen.append(
            (n, float((o == 0).float().mean()))))
    model(x, y)
    assert [n for n, _ in seen] == ["drop", "blocks.0.attn.resid_dropout", "blocks.0.mlp.dropout"]
    assert all(0.3 < zeros < 0.7 for _, zeros in seen)  # about half dropped
    assert model.blocks[0].attn.dropout == 0.5  # the attention probabilities' dropout_p
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        GPTConfig.preset("micro", 11, dropout=1.0)


def test_dropout_flag_reaches_the_run_settings(tmp_path, capsys):
    assert main(["compare", "lm", "--dropout", "1.5"]) == 2
    assert "--dropout must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert main(["compare", "lm", "--size", "micro", "--steps", "2", "--eval-every", "1",
                 "--batch-size", "2", "--max-chars", "40000", "--optimizers", "adamw",
                 "--dropout", "0.2", "--threads", "1", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "summary.json").read_text())["settings"]["task"]["dropout"] == 0.2
