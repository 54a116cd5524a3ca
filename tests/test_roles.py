"""soaplab.roles on torch-only models: soaplab's GPT and Colorizer (the rule equals their
hand-written param_roles()), replicas of timm's ViT and ResNet, wrappers, overrides, errors."""

import copy

import pytest
import torch
from torch import nn

import soaplab
from soaplab.experiments.models.colorizer import Colorizer
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.roles import infer_roles, param_roles, role_groups
from tests.replicas import ResNet, VisionTransformer, timm_muon_suitable


def _without_hand_written_roles(model: nn.Module) -> nn.Module:
    """The same model, but its class has no param_roles(): the rule must infer them."""
    bare = copy.deepcopy(model)
    bare.__class__ = type(f"Bare{type(model).__name__}", (type(model),), {"param_roles": None})
    return bare


@pytest.mark.parametrize("model", [GPT(GPTConfig.preset("micro", 11)), Colorizer(4)],
                         ids=["gpt", "colorizer"])
def test_the_rule_equals_the_hand_written_roles(model):
    hand = model.param_roles()
    inferred = infer_roles(_without_hand_written_roles(model))
    assert {n: r.role for n, r in inferred.items()} == hand
    assert all(r.evidence == "explicit" for r in infer_roles(model).values())


@pytest.mark.parametrize("name", ["muon", "soap_hidden", "soap"])
@pytest.mark.parametrize("model", [GPT(GPTConfig.preset("micro", 11)), Colorizer(4)],
                         ids=["gpt", "colorizer"])
def test_the_rule_routes_as_the_hand_written_roles(model, name):
    """Same optimizer and weight decay for every parameter, with and without param_roles()."""
    def routing(m):
        table = soaplab.describe_roles(m, name, weight_decay=0.1).splitlines()[2:]
        return [[c.strip() for c in row.split("|")[1:-1]] for row in table]
    hand, inferred = routing(model), routing(_without_hand_written_roles(model))
    assert [r[:3] + r[4:] for r in hand] == [r[:3] + r[4:] for r in inferred]


def test_gpt_golden_roles_and_evidence():
    roles = infer_roles(_without_hand_written_roles(GPT(GPTConfig.preset("micro", 11))))
    assert roles["wte.weight"] == soaplab.roles.Role("embedding", "tied")  # wte and head
    assert "head.weight" not in roles  # a tied tensor appears once
    assert roles["wpe.weight"].role == "embedding"
    assert roles["blocks.0.attn.qkv.weight"] == soaplab.roles.Role("hidden", "module")
    assert roles["ln_f.bias"] == soaplab.roles.Role("vector", "module")


def test_colorizer_ends_are_found_by_position_and_flagged():
    roles = infer_roles(_without_hand_written_roles(Colorizer(4)))
    assert roles["down1.0.weight"] == soaplab.roles.Role("input", "position")
    assert roles["out.weight"] == soaplab.roles.Role("head", "position")
    assert roles["down1.0.weight"].guessed and not roles["mid.0.weight"].guessed
    table = soaplab.describe_roles(_without_hand_written_roles(Colorizer(4)), "muon")
    assert table.count("position?") == 2 and "input" in table


VIT = {"patch_embed.proj.weight": "input", "patch_embed.proj.bias": "vector",
       "cls_token": "vector", "pos_embed": "embedding", "norm.weight": "vector",
       "norm.bias": "vector", "head.weight": "head", "head.bias": "vector"}
RESNET = {"conv1.weight": "input", "fc.weight": "head", "fc.bias": "vector"}


@pytest.mark.parametrize(("model", "golden"), [(VisionTransformer(), VIT), (ResNet(), RESNET)],
                         ids=["vit", "resnet"])
def test_timm_replicas_golden_roles(model, golden):
    roles, named = infer_roles(model), dict(model.named_parameters())
    assert set(roles) == set(named)
    for name, r in roles.items():  # besides the golden ones: norms and biases, and matrices
        expected = golden.get(name) or ("vector" if named[name].dim() == 1 else "hidden")
        assert r.role == expected, name
        assert not r.guessed, name  # timm's metadata names the ends


@pytest.mark.parametrize("model", [VisionTransformer(), ResNet()], ids=["vit", "resnet"])
def test_timm_replicas_against_timms_own_muon_rule(model):
    """Where soaplab's Muon routing differs from timm's shape rule, and why: the first layer
    (stem conv, patch embedding) and the classifier go to AdamW here (Keller Jordan's advice,
    KellerJordan/Muon #13), to Muon in timm unless its fallback_list names them."""
    roles = param_roles(model)
    named = dict(model.named_parameters())
    differ = {n: r for n, r in roles.items()
              if (r in ("hidden", "stack")) != timm_muon_suitable(named[n])}
    assert set(differ.values()) == {"input", "head"}
    assert len(differ) == 2


def test_roles_are_the_same_through_compile_and_ddp_style_wrappers():
    model = GPT(GPTConfig.preset("micro", 11))
    compiled = torch.compile(model, backend="eager")

    class DistributedDataParallel(nn.Module):  # the attribute layout of torch's DDP
        def __init__(self, module):
            super().__init__()
            self.module = module
    assert param_roles(compiled) == param_roles(model)
    assert param_roles(DistributedDataParallel(compiled)) == param_roles(model)


def test_overrides_win_and_unknown_roles_are_refused():
    model = Colorizer(4)
    roles = param_roles(model, overrides={"out.*": "hidden", "down1.0.bias": "vector"})
    assert roles["out.weight"] == "hidden" and roles["out.bias"] == "hidden"
    with pytest.raises(ValueError, match="unknown role 'hiden' in overrides"):
        param_roles(model, overrides={"out.*": "hiden"})


def test_a_bad_param_roles_is_a_one_line_error():
    model = Colorizer(4)
    model.param_roles = lambda: {"out.weight": "head"}
    with pytest.raises(ValueError, match="gives no role to down1.0.weight"):
        param_roles(model)
    model.param_roles = lambda: {**Colorizer.param_roles(model), "ghost": "head"}
    with pytest.raises(ValueError, match="names parameters it does not have: ghost"):
        param_roles(model)


def test_stacks_routers_raw_matrices_frozen_and_depthwise():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 3
            self.up = nn.Parameter(torch.randn(3, 8, 4))

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 3
            self.weight = nn.Parameter(torch.randn(3, 4))

    model = nn.Sequential(nn.Linear(4, 4), Router(), Experts(),
                          nn.Conv1d(4, 4, 3, groups=4), nn.Linear(4, 4), nn.Linear(4, 2))
    model.register_parameter("scale", nn.Parameter(torch.randn(4, 4)))
    model[4].weight.requires_grad_(False)
    roles = infer_roles(model)
    assert roles["2.up"].role == "stack" and roles["1.weight"].role == "hidden"
    assert roles["3.weight"] == soaplab.roles.Role("vector", "module")  # depthwise
    assert roles["scale"] == soaplab.roles.Role("vector", "unknown") and roles["scale"].guessed
    assert "4.weight" not in roles  # frozen
    assert roles["0.weight"].role == "input" and roles["5.weight"].role == "head"


def test_role_groups_follow_the_model_order_and_split_vectors_only_with_decay():
    model = GPT(GPTConfig.preset("micro", 11))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = role_groups(model, weight_decay=0.0)
    assert [g["role"] for g in groups] == ["hidden", "other"]
    order = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(order) == sorted(names.values())
    groups = role_groups(model, weight_decay=0.1)
    assert [g["role"] for g in groups] == ["hidden", "other", "vector"]
    assert groups[-1]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups[-1]["params"])
