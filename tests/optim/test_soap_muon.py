"""soap_muon: SOAP on the MLP matrices, NorMuon on the attention, AdamW on the rest. Each half
steps bitwise as the optimizer it wraps (float64), the parts come from module structure before
names, and resume is bitwise."""

import copy

import pytest
import torch
from torch import nn

import soaplab
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.optim.normuon import NorMuon
from soaplab.optim.soap_muon import SoapMuon
from soaplab.roles import Part, infer_parts
from tests.replicas import ResNet, VisionTransformer

KW = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MUON_KW = dict(momentum=0.9, beta2=0.99)


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("micro", 11))


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _split(model):
    """The GPT's parameters as the three halves should see them, in the model's order."""
    named = list(model.named_parameters())
    mlp = [p for n, p in named if ".mlp." in n]
    attention = [p for n, p in named if ".attn." in n]
    vectors = [p for n, p in named if p.dim() == 1]
    rest = [p for n, p in named if p.dim() == 2 and ".mlp." not in n and ".attn." not in n]
    return mlp, attention, rest, vectors


def test_each_half_steps_bitwise_as_the_optimizer_it_wraps(float64):
    model = _gpt()
    twin = copy.deepcopy(model)
    opt = soaplab.optimizer("soap_muon", model, precondition_frequency=2, **KW, **MUON_KW)
    mlp, attention, rest, vectors = _split(twin)
    assert rest and vectors and len(mlp) == len(attention) == 4
    soap = soaplab.SOAP(mlp, precondition_frequency=2, **KW)
    normuon = NorMuon(attention, lr=KW["lr"], weight_decay=KW["weight_decay"], **MUON_KW)
    adamw = torch.optim.AdamW([{"params": rest}, {"params": vectors, "weight_decay": 0.0}],
                              **KW)
    for step in range(5):  # SOAP's refreshes at steps 2 and 4
        _grads(model.parameters(), step)
        _grads(twin.parameters(), step)
        for o in (opt, soap, normuon, adamw):
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    assert not torch.equal(model.blocks[0].mlp.fc.weight, _gpt().blocks[0].mlp.fc.weight.double())


def test_routing_on_soaplabs_gpt_comes_from_its_module_structure():
    model = _gpt()
    bare = copy.deepcopy(model)  # no hand-written roles: every role and part inferred
    bare.__class__ = type("BareGPT", (GPT,), {"param_roles": None})
    for m in (model, bare):
        parts = infer_parts(m)
        assert parts == {n: Part("mlp" if ".mlp." in n else "attention", "module")
                         for n, _ in m.named_parameters() if n.startswith("blocks.")
                         and n.endswith(".weight") and ".ln_" not in n}
        routes = {id(p): type(o).__name__ for p, o, _ in
                  soaplab.optimizer("soap_muon", m).routes()}
        want = {n: "SOAP" if ".mlp." in n else "NorMuon" if n in parts else "AdamW"
                for n, _ in m.named_parameters()}
        assert {n: routes[id(p)] for n, p in m.named_parameters()} == want


def test_describe_roles_shows_the_part_and_its_optimizer():
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in soaplab.describe_roles(_gpt(), "soap_muon").splitlines()[2:]}
    assert rows["blocks.0.attn.qkv.weight"] == ["96x32", "hidden", "explicit",
                                                "attention (module)", "NorMuon", "0.01"]
    assert rows["blocks.1.mlp.proj.weight"][3:] == ["mlp (module)", "SOAP", "0.01"]
    assert rows["ln_f.bias"][3:] == ["", "AdamW", "0"]


class _Block(nn.Module):
    def __init__(self, heads: bool) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))
        if heads:
            self.attn.num_heads = 2  # a head count marks the attention module


class _Net(nn.Module):
    def __init__(self, heads: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 8)
        self.layers = nn.ModuleList(_Block(heads) for _ in range(2))
        self.pool = nn.Linear(8, 8)
        self.out = nn.Linear(8, 5)


def test_structure_before_names_and_names_flagged():
    structured = infer_parts(_Net(heads=True))
    assert structured["layers.0.attn.0.weight"] == Part("attention", "module")
    assert structured["layers.1.mlp.0.weight"] == Part("mlp", "module")
    assert structured["pool.weight"] == Part("other", "module")  # outside every block
    named = infer_parts(_Net(heads=False))  # no structure: names, flagged
    assert named["layers.0.attn.0.weight"] == Part("attention", "name")
    assert named["layers.1.mlp.0.weight"] == Part("mlp", "name")
    assert named["pool.weight"] == Part("other", "unknown")
    assert all(p.guessed for p in named.values())
    assert infer_parts(VisionTransformer())["blocks.0.mlp.fc1.weight"] == Part("mlp", "name")
    assert {p for p in infer_parts(ResNet()).values()} == {Part("other", "unknown")}


def test_torch_multihead_attention_is_attention_by_module_type():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.ff = nn.MultiheadAttention(8, 2), nn.Linear(8, 8)

    net = nn.Sequential(nn.Embedding(5, 8), Block(), Block(), nn.Linear(8, 5))
    parts = infer_parts(net)
    assert parts["1.mix.out_proj.weight"] == Part("attention", "module")
    assert parts["2.ff.weight"] == Part("mlp", "module")


def test_explicit_parts_win_and_bad_ones_are_refused():
    model = _gpt()
    model.blocks[0].attn.qkv.weight._soaplab_part = "mlp"
    assert infer_parts(model)["blocks.0.attn.qkv.weight"] == Part("mlp", "explicit")
    model.blocks[0].attn.qkv.weight._soaplab_part = "ffn"
    with pytest.raises(ValueError, match="unknown part 'ffn'"):
        infer_parts(model)


def test_groups_without_a_part_go_to_normuon():
    w, v = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5, 3))
    opt = SoapMuon([{"params": [w], "role": "hidden"},
                    {"params": [v], "role": "hidden", "part": "mlp"}])
    assert {id(p): type(o).__name__ for p, o, _ in opt.routes()} == \
        {id(w): "NorMuon", id(v): "SOAP"}


def test_resume_from_a_state_dict_is_bitwise():
    def run(model, opt, seeds):
        for s in seeds:
            _grads(model.parameters(), s)
            opt.step()

    model = _gpt()
    opt = soaplab.optimizer("soap_muon", model, precondition_frequency=2, **KW)
    run(model, opt, range(3))
    resumed = copy.deepcopy(model)
    opt2 = soaplab.optimizer("soap_muon", resumed, precondition_frequency=2, **KW)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, range(3, 6))
    run(resumed, opt2, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
