"""Kronecker approximations against dense float64 constructions (torch.kron, numpy SVD)."""

import numpy as np
import pytest
import torch

from soaplab.analysis.curvature import second_moment
from soaplab.analysis.kronecker import (
    cosine,
    factors_from_gradients,
    kron_cosine,
    kron_scale,
    kronecker_similarities,
    optimal_kronecker,
    optimal_kronecker_svd,
    power_step,
    psd_power,
    rearrange,
    shampoo_factors,
)

from .matrices import spd

D = torch.float64


def loop_rearrange(H: np.ndarray, m: int, n: int) -> np.ndarray:
    """𝓡(H)[(i,k),(j,l)] = H[(i,j),(k,l)], written out index by index."""
    out = np.empty((m * m, n * n))
    for i in range(m):
        for j in range(n):
            for k in range(m):
                for l in range(n):
                    out[i * m + k, j * n + l] = H[i * n + j, k * n + l]
    return out


def test_rearrange_matches_loop_and_maps_kron_to_rank_one():
    m, n = 3, 4
    H = torch.randn(m * n, m * n, dtype=D)
    np.testing.assert_allclose(rearrange(H, m, n).numpy(), loop_rearrange(H.numpy(), m, n))
    A, B = torch.randn(m, m, dtype=D), torch.randn(n, n, dtype=D)
    expected = torch.outer(A.flatten(), B.flatten())
    torch.testing.assert_close(rearrange(torch.kron(A, B), m, n), expected)


def test_one_power_step_from_identity_recovers_kronecker_factors():
    m, n = 4, 3
    A, B = spd(m), spd(n)
    H = torch.kron(A, B)
    A1, B1 = power_step(rearrange(H, m, n), torch.eye(m, dtype=D), torch.eye(n, dtype=D))
    torch.testing.assert_close(A1, A / A.norm())
    torch.testing.assert_close(B1, B / B.norm())
    assert kron_cosine(H, A1, B1) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(kron_scale(H, A1, B1) * torch.kron(A1, B1), H)


def test_shampoo_factors_are_the_gradient_grams_and_one_power_step():
    m, n, K = 5, 3, 40
    G = torch.randn(K, m, n, dtype=D)
    H = second_moment(G)
    L, R = shampoo_factors(H, m, n)
    torch.testing.assert_close(L, sum(g @ g.T for g in G) / K)
    torch.testing.assert_close(R, sum(g.T @ g for g in G) / K)
    torch.testing.assert_close(factors_from_gradients(G), (L, R))
    A1, B1 = power_step(rearrange(H, m, n), torch.eye(m, dtype=D), torch.eye(n, dtype=D))
    torch.testing.assert_close(A1, L / L.norm())
    torch.testing.assert_close(B1, R / R.norm())


def test_shampoo_squared_over_trace_is_exact_for_kronecker_matrices():
    m, n = 3, 5
    H = torch.kron(spd(m), spd(n))
    L, R = shampoo_factors(H, m, n)
    torch.testing.assert_close(torch.kron(L, R) / torch.trace(H), H)
    sims = kronecker_similarities(H, m, n)
    assert sims["optimal"] == pytest.approx(1.0, abs=1e-10)
    assert sims["shampoo2"] == pytest.approx(1.0, abs=1e-10)
    assert sims["shampoo"] < 1 - 1e-3  # the square root is a different matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_matches_numpy_svd(seed: int):
    torch.manual_seed(seed)
    m, n = 4, 6
    H = sum(torch.kron(spd(m), spd(n)) * w for w in (1.0, 0.5, 0.25))
    A, B = optimal_kronecker(H, m, n, iters=2000, tol=1e-12)
    S = np.linalg.svd(loop_rearrange(H.numpy(), m, n), compute_uv=False)
    assert kron_cosine(H, A, B) == pytest.approx(S[0] / np.linalg.norm(S), abs=1e-10)
    A_svd, B_svd = optimal_kronecker_svd(H, m, n)
    torch.testing.assert_close(torch.kron(A, B), torch.kron(A_svd, B_svd), rtol=1e-7, atol=1e-9)
    L, R = shampoo_factors(H, m, n)
    assert kron_cosine(H, A, B) >= kron_cosine(H, L, R) - 1e-12  # optimal beats one step


def test_kron_cosine_and_scale_match_dense():
    m, n = 3, 4
    H, A, B = torch.randn(m * n, m * n, dtype=D), spd(m), spd(n)
    K = torch.kron(A, B)
    assert kron_cosine(H, A, B) == pytest.approx(cosine(H, K), abs=1e-12)
    c = kron_scale(H, A, B)
    grad_at_c = ((H - c * K) * K).sum()  # d/dc ‖H − cK‖² / 2 vanishes at the optimum
    assert abs(float(grad_at_c)) < 1e-10


def test_psd_power_matches_eigendecomposition_identities():
    M = spd(6)
    torch.testing.assert_close(psd_power(M, 0.5) @ psd_power(M, 0.5), M)
    torch.testing.assert_close(psd_power(M, -0.5) @ M @ psd_power(M, -0.5), torch.eye(6, dtype=D))
