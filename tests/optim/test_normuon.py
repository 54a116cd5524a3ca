"""NorMuon: the update rule against a dense float64 oracle, the Newton–Schulz input against
torch.optim.Muon's, the AdamW half against torch's, and a bitwise resume."""

import copy
import math

import pytest
import torch
from torch import nn

import soaplab
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.optim import muon
from soaplab.optim.normuon import NorMuon, NorMuonAdamW


def _polar(U):
    """The exact orthogonal polar factor U V^T of U = U S V^T."""
    u, _, vh = torch.linalg.svd(U, full_matrices=False)
    return u @ vh


def _oracle(W0, grads, lr, wd, mu, beta2, nesterov, eps):
    """NorMuon written out entry by entry, in float64, with the exact polar factor."""
    m = W0.shape[0]
    W = W0.reshape(m, -1).clone()
    n = W.shape[1]
    M, v = torch.zeros(m, n), [0.0] * m
    for G in grads:
        G = G.reshape(m, n)
        M = mu * M + (1 - mu) * G
        O = _polar((1 - mu) * G + mu * M if nesterov else M)
        for i in range(m):
            v[i] = beta2 * v[i] + (1 - beta2) * sum(O[i, j].item() ** 2 for j in range(n)) / n
        O_hat = torch.stack([O[i] / (math.sqrt(v[i]) + eps) for i in range(m)])
        W = W * (1 - lr * wd) - lr * 0.2 * math.sqrt(m * n) / O_hat.norm() * O_hat
    return W.reshape(W0.shape)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5), (4, 2, 2, 2)])
def test_update_matches_a_dense_float64_oracle(float64, monkeypatch, shape, nesterov):
    monkeypatch.setattr(muon, "orthogonalize", lambda U, *ns: _polar(U))
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=gen)
    # rows of very different scales: the per-row second moment matters
    grads = [torch.randn(shape, generator=gen) * torch.arange(1, shape[0] + 1).view(
        -1, *[1] * (len(shape) - 1)) for _ in range(4)]
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, beta2=0.8, nesterov=nesterov, eps=1e-6)
    p = nn.Parameter(W0.clone())
    opt = NorMuon([p], **kw)
    for G in grads:
        p.grad = G.clone()
        opt.step()
    expected = _oracle(W0, grads, kw["lr"], kw["weight_decay"], kw["momentum"], kw["beta2"],
                       nesterov, kw["eps"])
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_step_rms_is_a_fifth_of_the_lr(float64):
    p = nn.Parameter(torch.randn(5, 7))
    before = p.detach().clone()
    p.grad = torch.randn(5, 7)
    NorMuon([p], lr=0.1).step()
    assert (p.detach() - before).square().mean().sqrt().item() == pytest.approx(0.02, rel=1e-12)


def test_orthogonalizes_what_torch_muon_orthogonalizes(float64):
    """Per row, NorMuon's step times (√v + ε) is proportional to torch.optim.Muon's step: the
    same Newton–Schulz output O (bf16 inside both) of the same Nesterov momentum, at every
    step."""
    gen = torch.Generator().manual_seed(1)
    a = nn.Parameter(torch.randn(8, 5, generator=gen))
    b = nn.Parameter(a.detach().clone())
    ours = NorMuon([a], lr=0.01, momentum=0.9, beta2=0.9)
    muon = torch.optim.Muon([b], lr=0.01, momentum=0.9, weight_decay=0.0)
    for _ in range(3):
        G = torch.randn(8, 5, generator=gen)
        a.grad, b.grad = G.clone(), G.clone()
        a0, b0 = a.detach().clone(), b.detach().clone()
        ours.step()
        muon.step()
        v = ours.state[a]["second_moment"]
        ratio = (a.detach() - a0) * (v.sqrt() + 1e-10) / (b.detach() - b0)
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-10, atol=0)


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_adamw_half_is_torch_adamw_and_resume_is_bitwise():
    gen = torch.Generator().manual_seed(0)
    w, b = (nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4), (7,)])
    ref_b = nn.Parameter(b.detach().clone())
    opt = NorMuonAdamW([{"params": [w], "role": "hidden"}, {"params": [b], "role": "vector"}],
                       lr=0.02, weight_decay=0.01, betas=(0.9, 0.95))
    adamw = torch.optim.AdamW([ref_b], lr=0.02, weight_decay=0.01, betas=(0.9, 0.95))
    for step in range(4):
        _grads([w, b], step)
        ref_b.grad = b.grad.clone()
        opt.step()
        adamw.step()
    assert torch.equal(b, ref_b)

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro", 11))
    twin = copy.deepcopy(model)

    def run(m, opt, seeds):
        for s in seeds:
            _grads(m.parameters(), s)
            opt.step()
            opt.zero_grad()

    run(model, soaplab.optimizer("normuon", model, lr=0.01), range(6))
    first = soaplab.optimizer("normuon", twin, lr=0.01)
    run(twin, first, range(3))
    again = soaplab.optimizer("normuon", twin, lr=0.01)
    again.load_state_dict(copy.deepcopy(first.state_dict()))
    run(twin, again, range(3, 6))
    for x, y in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(x, y)


def test_clear_errors():
    with pytest.raises(ValueError, match="NorMuon updates matrices; got a parameter of shape"):
        NorMuon([nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="normuon needs parameter roles"):
        soaplab.optimizer("normuon", [nn.Parameter(torch.randn(3, 3))])
    with pytest.raises(ValueError, match="beta2 must be in"):
        NorMuon([nn.Parameter(torch.randn(3, 3))], beta2=1.0)
