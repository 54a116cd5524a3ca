"""soaplab inside Lightning: configure_optimizers returns a soaplab optimizer (with a per-step
scheduler), a run resumed with ckpt_path equals the uninterrupted run bitwise, and bf16-mixed
runs, with the closure called once per step."""

import pytest
import torch

import soaplab
from soaplab.experiments.models.gpt import GPT, GPTConfig

pl = pytest.importorskip(
    "pytorch_lightning", reason="pytorch-lightning is not installed: pip install -e '.[lightning]'")

VOCAB, STEPS = 11, 4


class LitGPT(pl.LightningModule):
    def __init__(self, name: str):
        super().__init__()
        torch.manual_seed(0)
        self.name, self.model, self.forwards = name, GPT(GPTConfig.preset("micro", VOCAB)), 0

    def training_step(self, batch, _):
        self.forwards += 1
        return self.model(batch[:, :-1], batch[:, 1:].contiguous())[1]

    def configure_optimizers(self):
        frequency = {"precondition_frequency": 3} if soaplab.registry.entry(self.name).frequency \
            else {}
        opt = soaplab.optimizer(self.name, self.model, lr=3e-3, weight_decay=0.1, **frequency)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data():
    tokens = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(tokens, batch_size=4)  # 2 steps an epoch, no shuffle


def _fit(name, folder, ckpt_path=None, precision="32-true"):
    module = LitGPT(name)
    save = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[save], precision=precision, deterministic=True)
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("name", ["soap", "muon", "soap_hidden", "shampoo"])
def test_ckpt_path_resume_equals_the_uninterrupted_run(tmp_path, name):
    full = _fit(name, tmp_path / "full")
    resumed = _fit(name, tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=0-step=2.ckpt")
    for (n, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_bf16_mixed_runs_with_one_closure_call_per_step(tmp_path):
    module = _fit("soap", tmp_path, precision="bf16-mixed")
    start = LitGPT("soap")
    assert module.forwards == STEPS
    assert all(torch.isfinite(p).all() for p in module.parameters())
    fc = module.model.blocks[0].mlp.fc.weight
    assert not torch.equal(fc, start.model.blocks[0].mlp.fc.weight)
