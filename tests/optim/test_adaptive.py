"""Adaptive refresh (refresh_tolerance, refresh_budget) and its telemetry (refresh_stats)."""

import math

import pytest
import torch

from soaplab import SOAP

pytestmark = pytest.mark.usefixtures("float64")

SHAPES = [(6, 4), (6, 4), (4, 3, 5), (7,)]


def run(steps: int, seed: int = 0, **kwargs) -> tuple[list[torch.nn.Parameter], SOAP]:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = SOAP(ps, precondition_frequency=2, **kwargs)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, opt


def test_zero_tolerance_is_soap_exactly():
    ps, opt = run(9)
    qs, adaptive = run(9, refresh_tolerance=0.0)
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(adaptive.state[q][key]))


def test_infinite_tolerance_keeps_the_first_bases():
    ps, opt = run(1, refresh_tolerance=math.inf)
    first = {i: {k: v.clone() for k, v in opt.state[p].items() if k.startswith("basis_")}
             for i, p in enumerate(ps)}
    gen = torch.Generator().manual_seed(5)
    for _ in range(8):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for i, p in enumerate(ps):
        for key, basis in first[i].items():
            assert torch.equal(opt.state[p][key], basis)
    stats = opt.refresh_stats()
    assert stats["refreshes"] == 0 and stats["skipped"] == 4 * 7  # 4 checks, 7 factors


def test_telemetry_counts_match_a_hand_count():
    # frequency 3: checks at the ends of calls 4, 7 and 10 (t = 3, 6, 9)
    p, q = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    opt = SOAP([{"params": [p, q], "param_names": ["w", "b"]}], precondition_frequency=3)
    for _ in range(10):
        p.grad, q.grad = torch.randn(5, 3), torch.randn(4)
        opt.step()
    stats = opt.refresh_stats()
    assert set(stats["parameters"]) == {"w"}  # the vector has no factor
    for axis in (0, 1):
        entry = stats["parameters"]["w"][axis]
        assert (entry["refreshes"], entry["skipped"], entry["failures"]) == (3, 0, 0)
        assert 0 <= entry["drift"] <= 1 and entry["seconds"] > 0
    assert (stats["refreshes"], stats["skipped"], stats["failures"]) == (6, 0, 0)


def dense_drift(factor: torch.Tensor, basis: torch.Tensor) -> float:
    rotated = basis.T @ factor @ basis
    return float((rotated - torch.diag(rotated.diagonal())).norm() / factor.norm())


def test_only_bases_at_or_above_the_tolerance_are_refreshed():
    ps, opt = run(3, refresh_tolerance=0.0)
    for group in opt.param_groups:
        group["refresh_tolerance"] = 0.2
    gen = torch.Generator().manual_seed(7)
    seen = set()
    for _ in range(10):
        before = {(i, k): v.clone() for i, p in enumerate(ps) for k, v in opt.state[p].items()
                  if k.startswith("basis_")}
        for p in ps:
            p.grad = 3 * torch.randn(p.shape, generator=gen)
        opt.step()
        if opt.state[ps[0]]["step"] % 2:
            continue
        for (i, key), basis in before.items():
            factor = opt.state[ps[i]]["factor_" + key.split("_")[1]]
            refreshed = not torch.equal(opt.state[ps[i]][key], basis)
            assert refreshed == (dense_drift(factor, basis) >= 0.2)
            seen.add(refreshed)
    assert seen == {True, False}


def test_budget_zero_never_refreshes_and_a_large_budget_refreshes_all():
    _, starved = run(9, refresh_budget=0.0)
    assert starved.refresh_stats()["refreshes"] == 0
    ps, opt = run(9)
    qs, rich = run(9, refresh_budget=1e9)
    assert rich.refresh_stats()["skipped"] == 0
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)


def test_budget_spends_on_the_most_drifted_basis_first():
    # Two equal-shape parameters share a bucket; a budget that earns one refresh per check
    # (frequency 2, batch 2) goes to the basis with the largest drift.
    from soaplab.optim import adaptive

    shape = (5, 5)
    earned = adaptive.refresh_flops(shape, 0)
    budget = (1 + 1e-9) * earned / (2 * 2 * adaptive.ordinary_flops(shape, (0, 1)))
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(2)]
    opt = SOAP(ps, precondition_frequency=2, refresh_budget=budget)
    for _ in range(7):
        before = [{k: v.clone() for k, v in opt.state[p].items() if k.startswith("basis_")}
                  for p in ps]
        for p in ps:
            p.grad = torch.randn(shape, generator=gen)
        opt.step()
        if opt.state[ps[0]]["step"] % 2 or not before[0]:
            continue
        drifts = {(i, key): dense_drift(opt.state[p]["factor_" + key[-1]], basis)
                  for i, p in enumerate(ps) for key, basis in before[i].items()}
        changed = [(i, key) for (i, key) in drifts
                   if not torch.equal(opt.state[ps[i]][key], before[i][key])]
        assert changed == [max(drifts, key=drifts.get)]


@pytest.mark.parametrize("frequency", [1, 3])
def test_tracked_diagonals_give_the_dense_drift_at_every_step(frequency):
    # diag(QᵀLQ), tracked from the rotated gradients alone, is the dense float64 product's
    # diagonal at every step, across refreshes, for matrices and a 3-D tensor alike.
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = SOAP(ps, precondition_frequency=frequency, refresh_tolerance=0.3, betas=(0.9, 0.8))
    refreshed = 0
    for _ in range(12):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * torch.rand((), generator=gen) * 4
        opt.step()
        for p in ps[:3]:
            state = opt.state[p]
            for axis in (k for k in range(p.dim()) if f"diagonal_{k}" in state):
                factor, basis = state[f"factor_{axis}"], state[f"basis_{axis}"]
                torch.testing.assert_close(state[f"diagonal_{axis}"],
                                           (basis.T @ factor @ basis).diagonal(),
                                           rtol=1e-10, atol=1e-12)
        refreshed = opt.refresh_stats()["refreshes"]
    assert refreshed > 0 and opt.refresh_stats()["skipped"] > 0


def test_switching_adaptive_refresh_on_starts_the_diagonals_exactly():
    ps, opt = run(4)
    assert not any(k.startswith("diagonal_") for k in opt.state[ps[0]])
    for group in opt.param_groups:
        group["refresh_tolerance"] = 0.3
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    state = opt.state[ps[0]]
    rotated = state["basis_0"].T @ state["factor_0"] @ state["basis_0"]
    torch.testing.assert_close(state["diagonal_0"], rotated.diagonal(), rtol=1e-10, atol=1e-12)


def test_bad_tolerance_is_a_clear_error():
    with pytest.raises(ValueError, match="refresh_tolerance"):
        SOAP([torch.nn.Parameter(torch.randn(3, 3))], refresh_tolerance=-1.0)


def test_lossy_bases_are_reorthonormalized_only_where_a_refresh_happens(monkeypatch):
    from soaplab.optim import soap

    calls = []
    real = soap.bjorck
    monkeypatch.setattr(soap, "bjorck", lambda Q: calls.append(Q.shape) or real(Q))
    run(9, refresh_tolerance=math.inf, basis_storage="bf16")  # checks, but nothing to refresh
    assert calls == []
    run(9, basis_storage="bf16")  # the fixed schedule: every basis at every refresh
    assert len(calls) == 4 * 5  # 4 refreshes (t = 2, 4, 6, 8) × 5 stacked axes (2 + 3)
