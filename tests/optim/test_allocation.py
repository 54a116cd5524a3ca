"""The zero-gradient, lr = 0 first call that torch's DCP helpers (and torchtitan, accelerate,
DeepSpeed) make on a fresh optimizer only allocates state: training after it equals training
without it, bitwise, for every soap and shampoo variant of the registry; the state keys it
makes are those of real steps; and real steps are never taken for it. Flat shards (FSDP1,
DeepSpeed) are refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import soaplab
from soaplab import SOAP, Shampoo

# Every Kronecker variant of the registry (the split modes and DCP contracts are theirs).
NAMES = [name for name, entry in soaplab.registry.OPTIMIZERS.items() if entry.distributed]
STEPS = 7  # precondition_frequency 3: two refreshes


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
                               torch.nn.LayerNorm(3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        model.zero_grad()
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        model(x).square().sum().backward()
        opt.step()


def _keys(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[set[str]]:
    return [set(opt.state[p]) for p in model.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_the_allocation_call_changes_no_step_and_makes_every_key(name: str) -> None:
    plain, allocated = _mlp(), _mlp()
    opt = soaplab.optimizer(name, plain.parameters(), lr=1e-2, precondition_frequency=3)
    twin = soaplab.optimizer(name, allocated.parameters(), lr=1e-2, precondition_frequency=3)
    get_optimizer_state_dict(allocated, twin)  # torch's zero-gradient, lr = 0 step
    assert all(twin.state[p] for p in allocated.parameters())
    assert [g["lr"] for g in twin.param_groups] == [1e-2]
    keys = _keys(twin, allocated)
    _train(plain, opt, range(STEPS))
    _train(allocated, twin, range(STEPS))
    assert keys == _keys(opt, plain) == _keys(twin, allocated)
    for p, q in zip(plain.parameters(), allocated.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(plain.parameters(), allocated.parameters(), strict=True):
        assert all(torch.equal(v, twin.state[q][k]) if torch.is_tensor(v) else
                   v == twin.state[q][k] for k, v in opt.state[p].items())


@pytest.mark.parametrize("make", [SOAP, Shampoo])
def test_real_steps_are_never_taken_for_the_allocation_call(make: type) -> None:
    """A warmup from lr = 0 with real gradients builds statistics; a zero gradient at lr > 0
    is a step that was asked for; a zero-gradient lr = 0 call on trained state is a step."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = make([p], lr=0.0)
    p.grad = torch.randn(4, 3)
    opt.step()
    assert opt.state[p]["step"] >= 0 and opt.state[p]["factor_0"].abs().sum() > 0
    q = torch.nn.Parameter(torch.randn(4, 3))
    twin = make([q], lr=1e-2)
    q.grad = torch.zeros(4, 3)
    twin.step()
    assert twin.state[q]["step"] >= 0
    step = opt.state[p]["step"]
    p.grad = torch.zeros(4, 3)
    opt.step()
    assert opt.state[p]["step"] == step + 1


@pytest.mark.parametrize(("attribute", "value", "match"), [
    ("_fsdp_flattened", True, "flat FSDP1 shard .*fully_shard"),
    ("ds_id", 3, "DeepSpeed ZeRO partition.*fully_shard"),
    ("ds_shape", (4, 3), "DeepSpeed ZeRO partition.*fully_shard"),
])
def test_flat_shards_are_refused_in_one_line(attribute: str, value: object, match: str) -> None:
    flat = torch.nn.Parameter(torch.randn(12))
    setattr(flat, attribute, value)
    for make in (SOAP, Shampoo):
        with pytest.raises(ValueError, match=match):
            make([flat])
        opt = make([torch.nn.Parameter(torch.randn(4, 3))])  # swapped in after construction
        opt.param_groups[0]["params"] = [flat]
        flat.grad = torch.randn(12)
        with pytest.raises(ValueError, match=match):
            opt.step()
