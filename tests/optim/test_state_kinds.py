"""load_state_dict refuses another optimizer kind's state, and a group's hyperparameters set
after construction are checked at the next step as the constructor checks them (issue 23)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import soaplab


class Tiny(nn.Module):
    """Two hidden matrices and a bias: every optimizer of the registry takes it (muon reads
    param_roles)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))

    def param_roles(self) -> dict[str, str]:
        return {"a.weight": "hidden", "a.bias": "vector", "b.weight": "hidden"}


def stepped(name: str) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = Tiny()
    opt = soaplab.optimizer(name, model, lr=1e-2)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    return opt


@pytest.mark.parametrize(("saved", "loader"), [("soap", "shampoo"), ("shampoo", "soap"),
                                               ("adamw", "soap"), ("muon", "soap"),
                                               ("soap", "muon")])
def test_state_of_another_kind_is_one_value_error(saved, loader):
    state = stepped(saved).state_dict()
    target = stepped(loader)
    before = target.state_dict()
    with pytest.raises(ValueError, match=r"load_state_dict: param_groups\[0\] holds .* the "
                                         r"state dict is another optimizer's"):
        target.load_state_dict(state)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("name", ["soap", "soap_factorized", "shampoo", "muon"])
def test_same_kind_still_loads(name):
    opt = stepped(name)
    opt.load_state_dict(stepped(name).state_dict())


@pytest.mark.parametrize(("name", "key", "value", "message"), [
    ("soap", "precondition_frequency", 0, "precondition_frequency must be an integer >= 1"),
    ("shampoo", "precondition_frequency", 0, "precondition_frequency must be an integer >= 1"),
    ("soap", "betas", (0.9, 1.5), r"betas\[1\] must be in \[0, 1\)"),
    ("shampoo", "lr", -1.0, "lr must be a number >= 0"),
    ("shampoo", "eps", 0.0, "eps must be"),  # its constructor's bound: an inverse root needs ε > 0
])
def test_a_group_changed_mid_training_is_checked_at_the_next_step(name, key, value, message):
    opt = stepped(name)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {message}"):
        opt.step()
