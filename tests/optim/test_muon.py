"""MuonAdamW: each half is exactly torch's optimizer; roles come from names; state resumes."""

import copy

import pytest
import torch
from torch import nn

import soaplab
from soaplab.experiments.models.colorizer import Colorizer
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.optim.muon import NS_DTYPES, Muon, MuonAdamW, orthogonalize
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


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)], ids=["tall", "wide", "square"])
def test_orthogonalize_in_bfloat16_is_torchs_newton_schulz_bit_for_bit(shape):
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    U = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = orthogonalize(U, 5, torch.bfloat16)
    assert ours.dtype == U.dtype
    assert torch.equal(ours, _zeropower_via_newtonschulz(U, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5,
                                                         EPS).float())


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(7, 3), (3, 7)], ids=["tall", "wide"])
def test_orthogonalize_maps_singular_values_by_the_quintic(float64, shape, dtype, tol):
    """Against an explicit SVD: U = P diag(s) Qᵀ goes to P diag(p⁵(s/‖U‖_F)) Qᵀ with
    p(x) = a x + b x³ + c x⁵, the iteration's polynomial."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C

    a, b, c = DEFAULT_A, DEFAULT_B, DEFAULT_C
    U = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    P, s, Qh = torch.linalg.svd(U, full_matrices=False)
    x = s / s.square().sum().sqrt()
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    expected = P @ torch.diag(x) @ Qh
    assert (orthogonalize(U, 5, dtype) - expected).abs().max() < tol


def test_float32_newton_schulz_steps_as_bfloat16_within_its_rounding():
    """ns_dtype only changes the precision of the orthogonalization: one step from the same
    gradient moves the weights by the same matrix up to the rounding that five bfloat16
    iterations accumulate (8 significant bits each: a few per cent)."""
    gen = torch.Generator().manual_seed(3)
    W0, G = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    moved = {}
    for dtype in NS_DTYPES:
        p = nn.Parameter(W0.clone())
        p.grad = G.clone()
        Muon([p], lr=0.1, weight_decay=0.0, ns_dtype=dtype).step()
        moved[dtype] = p.detach() - W0
    exact = nn.Parameter(W0.double())
    exact.grad = G.double()
    Muon([exact], lr=0.1, weight_decay=0.0, ns_dtype="float32").step()
    assert torch.allclose(moved["float32"].double(), exact.detach() - W0.double(), atol=1e-6)
    gap = (moved["bfloat16"] - moved["float32"]).norm() / moved["float32"].norm()
    assert 0 < gap < 0.05


@pytest.mark.parametrize("name", ["muon", "normuon", "soap_muon"])
def test_ns_dtype_reaches_the_newton_schulz_half(name):
    opt = soaplab.optimizer(name, GPT(GPTConfig.preset("micro", 11)), ns_dtype="float32")
    dtypes = {g.get("ns_dtype") for g in opt.param_groups}
    assert "float32" in dtypes and "bfloat16" not in dtypes


def test_an_unknown_ns_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="ns_dtype must be one of 'bfloat16', 'float32'"):
        Muon([nn.Parameter(torch.randn(3, 3))], ns_dtype="float16")


def test_a_bfloat16_muon_state_dict_is_torchs_key_for_key():
    """So checkpoints move between the two, and runs recorded before ns_dtype still match."""
    ours, theirs = (nn.Parameter(torch.randn(4, 3)) for _ in range(2))
    a = Muon([ours], lr=0.01)
    b = torch.optim.Muon([theirs], lr=0.01)
    for p, opt in ((ours, a), (theirs, b)):
        p.grad = torch.ones(4, 3)
        opt.step()
    assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]
    assert a.state_dict()["state"].keys() == b.state_dict()["state"].keys()
    a.load_state_dict(b.state_dict())
    assert "ns_dtype" not in a.param_groups[0]
