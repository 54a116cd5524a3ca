"""torchtitan's checkpoint format is torch's flat-FQN optimizer state dict
(``flatten_optimizer_state_dict=True``): a soaplab optimizer built the torchtitan way (groups
with ``param_names``, ``implementation="foreach"``) round-trips through it and resumes bitwise."""

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import soaplab
from soaplab.experiments.models.gpt import GPT, GPTConfig

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _build(name):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro", 11))
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    # torchtitan's implementation="foreach" passes foreach=True, fused=False
    opt = soaplab.optimizer(name, groups, lr=3e-3, foreach=True, fused=False,
                            precondition_frequency=2)
    return model, opt


def _steps(model, opt, seeds):
    for s in seeds:
        tokens = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:].contiguous())[1].backward()
        opt.step()


@pytest.mark.parametrize("name", ["soap", "shampoo", "soap_lowmem"])
def test_flat_fqn_state_dict_round_trip_resumes_bitwise(name):
    model, opt = _build(name)
    _steps(model, opt, range(3))
    flat = get_optimizer_state_dict(model, opt, options=OPTIONS)
    assert any(k.startswith("state.blocks.0.attn.qkv.weight.") for k in flat)
    twin, fresh = _build(name)
    twin.load_state_dict(model.state_dict())
    set_optimizer_state_dict(twin, fresh, flat, options=OPTIONS)
    _steps(model, opt, range(3, 6))
    _steps(twin, fresh, range(3, 6))
    for (n, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), n
