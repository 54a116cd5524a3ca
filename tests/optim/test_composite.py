"""The composite optimizers (muon, soap_hidden): each half steps bitwise as the optimizer it
wraps, stacks go per expert, group flags alias roles, and stale or sharded groups are refused."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import soaplab
from soaplab.optim.muon import MuonAdamW
from soaplab.optim.soap_hidden import SoapAdamW

SOAP_KW = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
               precondition_frequency=2)


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.LayerNorm(8),
                         nn.Conv1d(8, 5, 3), nn.Linear(5, 10))


def test_soap_hidden_halves_step_bitwise_as_soap_and_adamw():
    model = _model()
    twin = copy.deepcopy(model)
    opt = soaplab.optimizer("soap_hidden", model, **SOAP_KW)
    hidden = [twin[1].weight, twin[3].weight]
    rest = [twin[0].weight, twin[4].weight]  # embedding; input (first layer) none; head
    vectors = [twin[1].bias, twin[2].weight, twin[2].bias, twin[3].bias, twin[4].bias]
    soap = soaplab.SOAP(hidden, **SOAP_KW)
    adamw = torch.optim.AdamW([{"params": rest}, {"params": vectors, "weight_decay": 0.0}],
                              lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):  # refreshes at steps 2 and 4
        _grads(model.parameters(), step)
        _grads(twin.parameters(), step)
        for o in (opt, soap, adamw):
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_stacks_are_stepped_per_expert():
    gen = torch.Generator().manual_seed(1)
    stack = nn.Parameter(torch.randn(3, 6, 4, generator=gen))
    experts = [nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    muon_stack = nn.Parameter(stack.detach().clone())
    muon_experts = [nn.Parameter(e.clone()) for e in muon_stack.detach()]
    soap = SoapAdamW([{"params": [stack], "role": "stack"}], **SOAP_KW)
    ref = soaplab.SOAP(experts, **SOAP_KW)
    muon = MuonAdamW([{"params": [muon_stack], "role": "stack"}], lr=0.02)
    muon_ref = torch.optim.Muon(muon_experts, lr=0.02, weight_decay=0.0,
                                adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        _grads([stack, muon_stack], step)
        for e in range(3):
            experts[e].grad = stack.grad[e].clone()
            muon_ref.param_groups[0]["params"][e].grad = muon_stack.grad[e].clone()
        for o in (soap, ref, muon, muon_ref):
            o.step()
    assert torch.equal(stack, torch.stack(experts))
    assert torch.equal(muon_stack, torch.stack(muon_experts))


@pytest.mark.parametrize("flags", [({"use_muon": True}, {"use_muon": False}),
                                   ({"use_fallback": False}, {"use_fallback": True})])
def test_use_muon_and_use_fallback_are_aliases_of_role(flags):
    runs = []
    for hidden, other in (({"role": "hidden"}, {"role": "other"}), flags):
        model = _model()
        opt = MuonAdamW([{"params": [model[1].weight], **hidden},
                         {"params": [model[0].weight, model[1].bias], **other}], lr=0.02)
        for step in range(3):
            _grads(model.parameters(), step)
            opt.step()
        runs.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_groups_rebound_after_construction_are_a_one_line_error():
    model = _model()
    opt = soaplab.optimizer("muon", model)
    _grads(model.parameters(), 0)
    opt.step()
    for group in opt.param_groups:  # as accelerate does when it swaps in sharded parameters
        group["params"] = [p.detach().clone().requires_grad_() for p in group["params"]]
    with pytest.raises(ValueError, match="muon: its parameter groups were rebound"):
        opt.step()


def test_sharded_parameters_are_refused_by_muon_in_one_line():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="muon does not support FSDP2's sharded"):
            MuonAdamW([{"params": [w], "role": "hidden"}])
        SoapAdamW([{"params": [w], "role": "hidden"}])  # SOAP takes DTensors itself
    finally:
        dist.destroy_process_group()


def test_describe_roles_reads_the_routing_of_the_built_optimizer():
    table = soaplab.describe_roles(_model(), "soap_hidden", weight_decay=0.1)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in table.splitlines()[2:]}
    assert rows["1.weight"] == ["8x6", "hidden", "module", "SOAP", "0.1"]
    assert rows["0.weight"][2:] == ["module", "AdamW", "0.1"]
    assert rows["2.bias"][1:] == ["vector", "module", "AdamW", "0"]
