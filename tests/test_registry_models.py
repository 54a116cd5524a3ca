"""Every registry name on any nn.Module: default lrs, groups built from the model (vectors
without weight decay), soaplab.SOAP(model), and the experiments' grouping left as it was."""

import pytest
import torch
from torch import nn

import soaplab
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.registry import OPTIMIZERS, entry


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                         nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_name_trains_any_module_and_leaves_vectors_undecayed(name):
    model = _model()
    opt = soaplab.optimizer(name, model, weight_decay=0.1)
    assert opt.param_groups[0]["lr"] == entry(name).lr
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for p in model.parameters():
        if p.dim() == 1 and id(p) in decay:  # composites hold views of their matrices
            assert decay[id(p)] == 0.0
    x = torch.randn(8, 3, 5, 5)
    y = torch.randn(8, 3)
    losses = []
    for _ in range(8):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], name


def test_adafactor_defaults_to_its_own_relative_step_size():
    assert entry("adafactor").lr == 1e-1 and entry("adamw").lr == 1e-3
    assert soaplab.optimizer("adafactor", _model()).param_groups[0]["lr"] == 1e-1


def test_soap_of_a_model_is_the_registrys_soap_of_it():
    a, b = _model(), _model()
    opt_a, opt_b = soaplab.SOAP(a), soaplab.optimizer("soap", b)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt_a.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in opt_b.param_groups]
    assert opt_a.param_groups[-1]["weight_decay"] == 0.0  # the vectors
    assert opt_a.param_groups[0]["weight_decay"] == 0.01  # SOAP's default, on the rest


@pytest.mark.parametrize("name", ["adamw", "soap", "shampoo", "adafactor"])
def test_without_weight_decay_the_model_is_one_group_in_its_order(name):
    """The experiments pass weight_decay=0: their groups, and so `make main`, are as before."""
    model = GPT(GPTConfig.preset("micro", 11))
    opt = soaplab.optimizer(name, model, lr=1e-3, weight_decay=0.0)
    assert len(opt.param_groups) == 1
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_muon_on_soaplabs_gpt_keeps_the_groups_it_had():
    """Before roles, muon grouped by param_roles(): [hidden, other], each in model order."""
    model = GPT(GPTConfig.preset("micro", 11))
    roles = model.param_roles()
    named = list(model.named_parameters())
    opt = soaplab.optimizer("muon", model, lr=1e-3, weight_decay=0.0)
    assert [g["role"] for g in opt.param_groups] == ["hidden", "other"]
    assert [id(p) for p in opt.param_groups[1]["params"]] == \
        [id(p) for n, p in named if roles[n] != "hidden"]
    assert [p.data_ptr() for p in opt.param_groups[0]["params"]] == \
        [p.data_ptr() for n, p in named if roles[n] == "hidden"]
