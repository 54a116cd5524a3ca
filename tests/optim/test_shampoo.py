"""Shampoo against dense inverse roots, grafting reductions, and SOAP's Claim 1."""

import pytest
import torch

from soaplab import Shampoo
from soaplab.optim import second_moment
from soaplab.optim.matrix_functions import eigenbasis

from .dense import unfold

pytestmark = pytest.mark.usefixtures("float64")


def dense_root(L: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(L)
    return (evecs * (evals.clamp(min=0) + eps) ** -power) @ evecs.T


def apply_roots(g: torch.Tensor, roots: list[torch.Tensor]) -> torch.Tensor:
    for axis, P in enumerate(roots):
        g = torch.tensordot(P, g.movedim(axis, 0), dims=1).movedim(0, axis)
    return g


@pytest.mark.parametrize(("shape", "exponent"), [((6, 4), 0.25), ((6, 4), 0.5), ((3, 4, 2), 0.25)])
def test_ungrafted_step_equals_dense_inverse_roots(shape, exponent):
    p = torch.nn.Parameter(torch.randn(shape))
    eps, beta = 1e-6, 0.9
    opt = Shampoo([p], lr=0.1, betas=(0.0, beta), eps=eps, exponent=exponent, grafting="none",
                  precondition_frequency=1, start_preconditioning_step=1)
    factors = [torch.zeros(d, d) for d in shape]
    power = 2 * exponent / len(shape)
    for _ in range(4):
        g = torch.randn(shape)
        factors = [beta * L + (1 - beta) * unfold(g, k) @ unfold(g, k).T
                   for k, L in enumerate(factors)]
        expected = p.detach() - 0.1 * apply_roots(g, [dense_root(L, power, eps) for L in factors])
        p.grad = g
        opt.step()
        torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)


def adam_direction(grads: list[torch.Tensor], betas=(0.9, 0.95), eps=1e-8) -> torch.Tensor:
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    for g in grads:
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
    t = len(grads)
    return (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


@pytest.mark.parametrize("grafting", ["adam", "adagrad", "sgd"])
def test_grafting_takes_the_norm_of_the_grafted_step(grafting):
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = Shampoo([p], lr=1.0, grafting=grafting, precondition_frequency=1,
                  start_preconditioning_step=1)
    grads = [torch.randn(5, 3) for _ in range(3)]
    for g in grads:
        before = p.detach().clone()
        p.grad = g
        opt.step()
    step = before - p.detach()
    m = sum(0.9 ** (2 - i) * 0.1 * g for i, g in enumerate(grads)) / (1 - 0.9**3)
    reference = {"adam": adam_direction(grads),
                 "adagrad": m / (sum(g * g for g in grads).sqrt() + 1e-8),
                 "sgd": m}[grafting]
    torch.testing.assert_close(step.norm(), reference.norm(), atol=1e-12, rtol=1e-10)
    roots = [opt.state[p]["root_0"], opt.state[p]["root_1"]]
    shampoo = apply_roots(m, roots)
    torch.testing.assert_close(step / step.norm(), shampoo / shampoo.norm(), atol=1e-10, rtol=0)


def test_before_start_step_the_grafted_adam_alone_moves_the_parameter():
    p = torch.nn.Parameter(torch.randn(5, 3))
    q = torch.nn.Parameter(p.detach().clone())
    opt = Shampoo([p], lr=0.01, betas=(0.9, 0.95), start_preconditioning_step=6)
    ref = torch.optim.AdamW([q], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
    for _ in range(5):
        g = torch.randn(5, 3)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q, atol=1e-12, rtol=0)
    torch.testing.assert_close(opt.state[p]["root_0"], torch.eye(5))  # not computed yet
    p.grad = torch.randn(5, 3)
    opt.step()
    assert not torch.equal(opt.state[p]["root_0"], torch.eye(5))


def test_claim_shampoo_half_is_adafactor_in_shampoos_eigenbasis():
    """SOAP paper, Claim 1: with L = Σ β-weighted G Gᵀ, R = Σ GᵀG, Adafactor run on gradients
    rotated into the eigenbases of L and R steps exactly sqrt(tr L)·L^{-1/2} G R^{-1/2}."""
    beta, shape = 0.9, (6, 4)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Shampoo([p], lr=1.0, betas=(0.0, beta), eps=1e-30, exponent=0.5, grafting="none",
                  precondition_frequency=1, start_preconditioning_step=1)
    grads = [torch.randn(shape) for _ in range(12)]  # 12 > 6: full-rank factors
    for g in grads:
        before = p.detach().clone()
        p.grad = g
        opt.step()
    shampoo_step = before - p.detach()
    s = opt.state[p]
    QL, QR = eigenbasis(s["factor_0"][None])[0], eigenbasis(s["factor_1"][None])[0]
    v = second_moment.zeros(shape, True, dtype=torch.float64)
    v = {k: x[None] for k, x in v.items()}
    for g in grads:  # Adafactor's statistics of the rotated gradients, same EMA
        second_moment.update(v, (QL.T @ g @ QR)[None], beta)
    adafactor_step = QL @ ((QL.T @ grads[-1] @ QR) / second_moment.estimate(v)[0].sqrt()) @ QR.T
    trace = torch.trace(s["factor_0"])
    torch.testing.assert_close(adafactor_step, trace.sqrt() * shampoo_step, atol=1e-8, rtol=1e-8)
