"""KL-Shampoo: the update rule against a dense float64 oracle (matrices, an axis without a
factor, vectors), its first call, a bitwise resume, and clear errors."""

import copy

import pytest
import torch
from torch import nn

import soaplab
from soaplab.experiments.models.gpt import GPT, GPTConfig
from soaplab.optim.kl_shampoo import KLShampoo

KW = dict(lr=0.05, betas=(0.9, 0.8), weight_decay=0.1, precondition_frequency=2,
          init_eigenvalue=0.1)


def _eig_desc(S):
    return torch.linalg.eigh(S)[1].flip(-1)


def _oracle(W0, grads, bases, factored, lr, betas, weight_decay, precondition_frequency,
            init_eigenvalue):
    """KL-Shampoo on one matrix written densely in float64: S⁻¹ = Q diag(1/λ) Qᵀ formed
    explicitly. ``bases``: the first call's bases (an unfactored axis: the identity)."""
    beta1, beta = betas
    m, n = W0.shape
    W, M = W0.clone(), torch.zeros(m, n)
    G0 = grads[0]
    S = [(1 - beta) * G0 @ G0.T / n, (1 - beta) * G0.T @ G0 / m]
    Q = [b if f else torch.eye(b.shape[0]) for b, f in zip(bases, factored, strict=True)]
    start = G0.square().mean().sqrt() if init_eigenvalue is None else init_eigenvalue
    lam = [torch.full((m,), start), torch.full((n,), start)]
    floor = [1 / max(10, min(d, 4000)) ** 2 for d in (m, n)]
    for t, G in enumerate(grads[1:], 1):
        M = beta1 * M + (1 - beta1) * G
        D = torch.outer(lam[0] ** -0.5, lam[1] ** -0.5)
        W = W - lr * Q[0] @ ((Q[0].T @ M @ Q[1]) * D) @ Q[1].T
        W = W - lr * weight_decay * W
        inverse = [Q[k] @ torch.diag(1 / lam[k]) @ Q[k].T for k in (0, 1)]
        C = [G @ inverse[1] @ G.T / n, G.T @ inverse[0] @ G / m]
        for k in (0, 1):
            S[k] = beta * S[k] + (1 - beta) * C[k]
            quotient = torch.diag(Q[k].T @ C[k] @ Q[k])
            lam[k] = torch.clamp(beta * lam[k] + (1 - beta) * quotient, min=floor[k])
        if t % precondition_frequency == 0:
            for k in (0, 1):
                if factored[k]:
                    order = torch.argsort(torch.diag(Q[k].T @ S[k] @ Q[k]), descending=True)
                    Q[k] = torch.linalg.qr(S[k] @ Q[k][:, order])[0]
                    lam[k] = lam[k][order]
    return W


def _grads(shape, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("init", [0.1, None])
@pytest.mark.parametrize(("shape", "max_dim"), [((4, 4), 100), ((3, 5), 100), ((5, 3), 100),
                                                ((3, 6), 4)])  # (3, 6): axis 1 unfactored
def test_update_matches_a_dense_float64_oracle(float64, shape, max_dim, init):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape, 7)
    p = nn.Parameter(W0.clone())
    kw = {**KW, "init_eigenvalue": init}
    opt = KLShampoo([p], max_precond_dim=max_dim, **kw)
    p.grad = grads[0].clone()
    opt.step()
    assert torch.equal(p.detach(), W0)  # the first call makes no update
    state = opt.state[p]
    factored = tuple(f"basis_{k}" in state for k in (0, 1))
    assert factored == (True, max(shape) <= max_dim)
    # The first bases diagonalize S, eigenvalues descending (a rank-deficient S_b's null space
    # has no preferred basis: the oracle starts from the optimizer's).
    for k in (0, 1):
        if factored[k]:
            Q, S = state[f"basis_{k}"], state[f"factor_{k}"]
            diagonal = Q.T @ S @ Q
            torch.testing.assert_close(diagonal, torch.diag(torch.diag(diagonal)),
                                       atol=1e-12, rtol=0)
            assert bool((torch.diag(diagonal).diff() <= 1e-12).all())
    bases = [state.get(f"basis_{k}", torch.eye(shape[k])).clone() for k in (0, 1)]
    for G in grads[1:]:
        p.grad = G.clone()
        opt.step()
    expected = _oracle(W0, grads, bases, factored, **kw)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


def test_first_call_builds_the_factors_from_the_gradient(float64):
    G = torch.randn(3, 5) * 1e-3
    p, q = nn.Parameter(torch.zeros(3, 5)), nn.Parameter(torch.zeros(3, 5))
    opt = KLShampoo([p], betas=(0.9, 0.8))
    prototype = KLShampoo([q], betas=(0.9, 0.8), init_eigenvalue=0.1)
    p.grad, q.grad = G.clone(), G.clone()
    opt.step()
    prototype.step()
    torch.testing.assert_close(opt.state[p]["factor_0"], 0.2 * G @ G.T / 5)
    torch.testing.assert_close(opt.state[p]["factor_1"], 0.2 * G.T @ G / 3)
    # by default the product of the eigenvalues starts at the gradient's mean square
    start = G.square().mean().sqrt()
    for k, d in ((0, 3), (1, 5)):
        torch.testing.assert_close(opt.state[p][f"eigenvalues_{k}"], start.expand(d))
        assert torch.equal(prototype.state[q][f"eigenvalues_{k}"], torch.full((d,), 0.1))


def test_a_vector_takes_adam_like_steps(float64):
    """No factor: λ = EMA(g²) from init_eigenvalue, the step m ⊙ λ^{-1/2}, without bias
    correction (the cap at 10 binds where λ < 0.01)."""
    grads = _grads((6,), 5)
    p = nn.Parameter(torch.zeros(6))
    opt = KLShampoo([p], lr=0.1, betas=(0.9, 0.8), init_eigenvalue=0.5)
    w, m, lam = torch.zeros(6), torch.zeros(6), torch.full((6,), 0.5)
    for t, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        if t == 0:
            continue
        m = 0.9 * m + 0.1 * g
        w = w - 0.1 * m / lam.sqrt()
        lam = torch.clamp(0.8 * lam + 0.2 * g**2, min=0.01)
    torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_resume_is_bitwise_and_state_is_smaller_than_soap():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro", 11))
    twin = copy.deepcopy(model)

    def run(m, opt, seeds):
        for s in seeds:
            gen = torch.Generator().manual_seed(s)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    kw = dict(lr=0.01, precondition_frequency=2)
    run(model, soaplab.optimizer("kl_shampoo", model, **kw), range(6))
    first = soaplab.optimizer("kl_shampoo", twin, **kw)
    run(twin, first, range(3))
    again = soaplab.optimizer("kl_shampoo", twin, **kw)
    again.load_state_dict(copy.deepcopy(first.state_dict()))
    run(twin, again, range(3, 6))
    for x, y in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(x, y)
    soap = soaplab.optimizer("soap", twin, lr=0.01)
    run(twin, soap, range(2))
    assert again.state_bytes() < soap.state_bytes()


def test_clear_errors():
    p = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="init_eigenvalue must be a number > 0"):
        KLShampoo(p, init_eigenvalue=0.0)
    with pytest.raises(ValueError, match="precondition_frequency must be an integer >= 1"):
        KLShampoo(p, precondition_frequency=0)
    with pytest.raises(ValueError, match="KLShampoo has no split mode"):
        KLShampoo(p, process_group=object())


def test_kl_shampoo_and_normuon_run_in_compare(tmp_path):
    from soaplab.cli import main

    assert main(["compare", "lm", "--size", "micro", "--steps", "6", "--eval-every", "3",
                 "--batch-size", "4", "--max-chars", "40000", "--optimizers",
                 "kl_shampoo,normuon", "--freqs", "2", "--threads", "1", "--out",
                 str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| kl_shampoo | 2 |" in report and "| normuon | - |" in report
    assert "| True |" not in report  # neither diverged
