"""soaplab inside the Hugging Face Trainer on tiny random-initialised models: the lr given in
the kwargs and the Trainer's schedule reach the optimizer, and a run resumed from checkpoint-N
equals the uninterrupted run bitwise, through every route (a prebuilt optimizer, an optimizer
class, a factory)."""

import pytest
import torch

import soaplab
from soaplab.registry import OPTIMIZERS, entry
from tests.integrations.hf_models import VOCAB, gpt2, llama, transformers

hf = pytest.importorskip("soaplab.integrations.hf")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[hf]')")

LR, STEPS = 3e-3, 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=16):
        self.data = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _train(tmp_path, make_model, route, name, resume_from=None):
    torch.manual_seed(0)
    model = make_model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1.0,  # must not reach the optimizer on these routes
        lr_scheduler_type="linear", save_strategy="steps", save_steps=2, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    kw = {}
    # a refresh of the bases between the checkpoint and the end
    opt_kw = {"lr": LR, **({"precondition_frequency": 3} if entry(name).frequency else {})}
    if route == "prebuilt":
        kw["optimizers"] = (soaplab.optimizer(name, model, weight_decay=0.1, **opt_kw), None)
    elif route == "class":
        kw["optimizer_cls_and_kwargs"] = (soaplab.SOAP, opt_kw)
    else:
        kw["optimizer_cls_and_kwargs"] = (hf.factory(name), {"weight_decay": 0.1, **opt_kw})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), **kw)
    lrs = []
    trainer.add_callback(type("Lrs", (transformers.TrainerCallback,), {
        "on_step_begin": lambda self, a, s, c, **k: lrs.append(
            [g["lr"] for g in k["optimizer"].param_groups])})())
    trainer.train(resume_from_checkpoint=resume_from and str(resume_from))
    return model, trainer, lrs


def _resumes_bitwise(tmp_path, make_model, route, name):
    full, trainer, lrs = _train(tmp_path / "full", make_model, route, name)
    resumed, _, _ = _train(tmp_path / "resumed", make_model, route, name,
                           resume_from=tmp_path / "full" / "checkpoint-2")
    for (n, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), (name, route, n)
    return trainer, lrs


ROUTES = [("soap", "prebuilt"), ("soap", "class"), ("soap", "factory"),
          ("muon", "prebuilt"), ("muon", "factory")]


@pytest.mark.parametrize(("name", "route"), ROUTES)
def test_soap_and_muon_through_every_route_on_tied_llama(tmp_path, name, route):
    trainer, lrs = _resumes_bitwise(tmp_path, lambda: llama(tied=True), route, name)
    # the kwargs' lr under the Trainer's linear schedule (no warmup): LR * (1 - step / STEPS)
    expected = [LR * (1 - s / STEPS) for s in range(STEPS)]
    assert [row[0] for row in lrs] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(row)) == 1 for row in lrs)  # one lr for every group
    if route == "factory":
        decay = hf.decay_names(trainer.model)
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        for g in trainer.optimizer.param_groups:
            for p in g["params"]:
                if id(p) in names:
                    assert (g["weight_decay"] > 0) == (names[id(p)] in decay)


def test_muon_as_an_optimizer_class_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="muon needs parameter roles"):
        model = llama()
        soaplab.optim.muon.MuonAdamW([{"params": list(model.parameters())}])


OTHERS = sorted(set(OPTIMIZERS) - {"soap", "muon"})


@pytest.mark.parametrize("name", OTHERS)
def test_other_names_through_the_factory(tmp_path, name):
    _resumes_bitwise(tmp_path, lambda: llama(tied=True), "factory", name)


@pytest.mark.parametrize("make_model", [lambda: llama(tied=False), gpt2],
                         ids=["llama_untied", "gpt2"])
def test_soap_hidden_on_untied_llama_and_gpt2(tmp_path, make_model):
    _resumes_bitwise(tmp_path, make_model, "factory", "soap_hidden")
