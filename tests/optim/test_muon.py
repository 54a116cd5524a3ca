"""MuonAdamW: each half is exactly torch's optimizer; roles come from names; state resumes."""

import copy

import pytest
import torch
from torch import nn

import soaplab
from soaplab.experiments.models.colorizer import Colorizer
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.optim.muon import MuonAdamW
from soaplab.roles import role_groups

KW = dict(lr=0.02, weight_decay=0.01, momentum=0.9)


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_each_half_steps_exactly_as_torch_muon_and_adamw():
    gen = torch.Generator().manual_seed(0)
    w, conv, b = (nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4), (5, 3, 3, 3), (7,)])
    ref_w, ref_b = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    ref_conv = nn.Parameter(conv.detach().clone().view(5, -1))
    opt = MuonAdamW([{"params": [w, conv], "role": "hidden"}, {"params": [b], "role": "vector"}],
                    betas=(0.9, 0.95), **KW)
    muon = torch.optim.Muon([ref_w, ref_conv], adjust_lr_fn="match_rms_adamw", **KW)
    adamw = torch.optim.AdamW([ref_b], lr=KW["lr"], weight_decay=KW["weight_decay"],
                              betas=(0.9, 0.95))
    for step in range(5):
        _grads([w, conv, b], step)
        ref_w.grad, ref_conv.grad = w.grad.clone(), conv.grad.clone().view(5, -1)
        ref_b.grad = b.grad.clone()
        opt.step()
        muon.step()
        adamw.step()
        opt.zero_grad()
        assert w.grad is None and conv.grad is None
    assert torch.equal(w, ref_w) and torch.equal(conv.view(5, -1), ref_conv)
    assert torch.equal(b, ref_b)


def test_state_dict_round_trip_resumes_bitwise_with_a_scheduler():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro", 11))
    twin = copy.deepcopy(model)

    def make(m):
        opt = soaplab.optimizer("muon", m, lr=0.01, betas=(0.95, 0.95))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

    def steps(m, opt, sched, seeds):
        for s in seeds:
            _grads(m.parameters(), s)
            opt.step()
            sched.step()
            opt.zero_grad()

    opt, sched = make(model)
    steps(model, opt, sched, range(6))
    opt2, sched2 = make(twin)
    steps(twin, opt2, sched2, range(3))
    saved = copy.deepcopy((opt2.state_dict(), sched2.state_dict()))
    opt3, sched3 = make(twin)
    opt3.load_state_dict(saved[0])
    sched3.load_state_dict(saved[1])
    steps(twin, opt3, sched3, range(3, 6))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model", [GPT(GPTConfig.preset("micro", 11)), Colorizer(4)],
                         ids=["gpt", "colorizer"])
def test_roles_come_from_names(model):
    hidden, other = role_groups(model, weight_decay=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert hidden["params"] and other["params"]
    for p in hidden["params"]:
        assert p.dim() >= 2 and not names[id(p)].startswith(("wte", "wpe", "out", "down1.0"))
    assert sum(p.numel() for g in (hidden, other) for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


def test_muon_without_roles_is_a_clear_error():
    with pytest.raises(ValueError, match="muon needs parameter roles"):
        soaplab.optimizer("muon", [nn.Parameter(torch.randn(3, 3))])
