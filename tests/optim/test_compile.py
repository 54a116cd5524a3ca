"""torch.compile: SOAP's ordinary step traces into one graph but for the host read of the
gradient check, and the traced step updates exactly as the eager one."""

import copy

import torch

from soaplab import SOAP


def model_and_optimizer(**kwargs) -> tuple[torch.nn.Module, SOAP]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    return model, SOAP(model.parameters(), lr=1e-2, precondition_frequency=3, **kwargs)


def backward(model: torch.nn.Module, seed: int) -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x).square().sum().backward()


def test_an_ordinary_step_has_one_graph_break_the_gradient_check():
    model, opt = model_and_optimizer()
    for seed in range(4):  # the first call builds the bases; t = 3 refreshes
        backward(model, seed)
        opt.step()
    backward(model, 4)  # t = 4: an ordinary step
    explained = torch._dynamo.explain(opt.step)()
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_break_count == 1, reasons
    assert "tolist" in reasons[0]  # the one host read that decides raise/skip on a bad gradient


def test_the_traced_step_matches_the_eager_step_exactly():
    model, opt = model_and_optimizer(refresh_tolerance=0.05)
    twin = copy.deepcopy(model)
    twin_opt = SOAP(twin.parameters(), lr=1e-2, precondition_frequency=3, refresh_tolerance=0.05)
    traced = torch.compile(twin_opt.step, backend="eager")
    for seed in range(8):
        backward(model, seed)
        backward(twin, seed)
        opt.step()
        traced()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    torch._dynamo.reset()
