"""Kronecker approximations of a layer's curvature matrix (Morwani et al., arXiv 2406.17748).

A curvature matrix ``H`` of an m×n weight is an (mn)×(mn) matrix indexed by row-major
``vec(W) = W.flatten()``, so ``torch.kron(A, B)`` has ``A`` (m×m) acting on rows of ``W`` and
``B`` (n×n) on its columns. The Van Loan-Pitsianis rearrangement turns the best Frobenius
approximation ``min ‖H − A⊗B‖`` into the best rank-1 approximation of an m²×n² matrix, which
power iteration solves; started from identity, its first step returns Shampoo's factors
``L = E[G Gᵀ]`` and ``R = E[Gᵀ G]``, i.e. ``L⊗R`` ("Shampoo²") is one power step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rearrange(H: Tensor, m: int, n: int) -> Tensor:
    """𝓡(H) with 𝓡(H)[(i,k),(j,l)] = H[(i,j),(k,l)], so that 𝓡(A⊗B) = vec(A) vec(B)ᵀ."""
    return H.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)


def shampoo_factors(H: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    """Partial traces L (m×m), R (n×n) of H; for H = E[vec(G)vec(G)ᵀ]: L = E[GGᵀ], R = E[GᵀG]."""
    H4 = H.reshape(m, n, m, n)
    return torch.einsum("ijkj->ik", H4), torch.einsum("ijil->jl", H4)


def cosine(A: Tensor, B: Tensor) -> float:
    """Cosine similarity of matrices, ⟨A,B⟩_F / (‖A‖_F ‖B‖_F): the papers' scale-free metric."""
    return float((A * B).sum() / (torch.linalg.norm(A) * torch.linalg.norm(B)))


def kron_cosine(H: Tensor, A: Tensor, B: Tensor) -> float:
    """cosine(H, A⊗B) without forming A⊗B: ⟨H, A⊗B⟩ = vec(A)ᵀ 𝓡(H) vec(B), ‖A⊗B‖ = ‖A‖‖B‖."""
    m, n = A.shape[0], B.shape[0]
    inner = A.flatten() @ rearrange(H, m, n) @ B.flatten()
    return float(inner / (torch.linalg.norm(H) * torch.linalg.norm(A) * torch.linalg.norm(B)))


def kron_scale(H: Tensor, A: Tensor, B: Tensor) -> float:
    """The scalar c minimising ‖H − c·A⊗B‖_F."""
    m, n = A.shape[0], B.shape[0]
    inner = A.flatten() @ rearrange(H, m, n) @ B.flatten()
    return float(inner / (A.square().sum() * B.square().sum()))


def power_step(RH: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """One simultaneous power step on 𝓡(H): A' ∝ mat(𝓡 vec B), B' ∝ mat(𝓡ᵀ vec A), unit norm."""
    m, n = A.shape[0], B.shape[0]
    A_new = (RH @ B.flatten()).reshape(m, m)
    B_new = (RH.T @ A.flatten()).reshape(n, n)
    return A_new / torch.linalg.norm(A_new), B_new / torch.linalg.norm(B_new)


def optimal_kronecker(H: Tensor, m: int, n: int, *, iters: int = 500,
                      tol: float = 1e-9) -> tuple[Tensor, Tensor]:
    """The Frobenius-optimal A⊗B ≈ H by power iteration from identity (scale carried by A).

    Stops when both unit-norm factors move by less than ``tol``; the SVD gives the same answer
    (see :func:`optimal_kronecker_svd`) but costs a full decomposition of an m²×n² matrix.
    """
    RH = rearrange(H, m, n)
    A = torch.eye(m, dtype=H.dtype, device=H.device)
    B = torch.eye(n, dtype=H.dtype, device=H.device)
    for _ in range(iters):
        A_new, B_new = power_step(RH, A, B)
        moved = max(float(torch.linalg.norm(A_new - A)), float(torch.linalg.norm(B_new - B)))
        A, B = A_new, B_new
        if moved < tol:
            break
    return kron_scale(H, A, B) * A, B


def optimal_kronecker_svd(H: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    """The Frobenius-optimal A⊗B ≈ H from the top singular triple of 𝓡(H) (signs made PSD)."""
    U, S, Vh = torch.linalg.svd(rearrange(H, m, n), full_matrices=False)
    A, B = S[0] * U[:, 0].reshape(m, m), Vh[0].reshape(n, n)
    if torch.trace(A) < 0:  # (−A)⊗(−B) is the same product; pick the PSD-signed pair
        A, B = -A, -B
    return A, B


def psd_power(M: Tensor, power: float, floor: float = 0.0) -> Tensor:
    """M^power for symmetric PSD M via eigh; eigenvalues are clamped at ``floor`` first."""
    evals, evecs = torch.linalg.eigh(M)
    return (evecs * evals.clamp_min(floor).pow(power)) @ evecs.T


def kronecker_similarities(H: Tensor, m: int, n: int) -> dict[str, float]:
    """Cosine of H with its optimal Kronecker approximation, with L⊗R (Shampoo²) and with
    L^{1/2}⊗R^{1/2} (Shampoo), L and R being H's own partial traces."""
    L, R = shampoo_factors(H, m, n)
    A, B = optimal_kronecker(H, m, n)
    return {
        "optimal": kron_cosine(H, A, B),
        "shampoo2": kron_cosine(H, L, R),
        "shampoo": kron_cosine(H, psd_power(L, 0.5), psd_power(R, 0.5)),
    }


def factors_from_gradients(grads: Tensor) -> tuple[Tensor, Tensor]:
    """L = mean_k G_k G_kᵀ and R = mean_k G_kᵀ G_k from gradients (K, m, n), in O(K·mn) memory."""
    return (torch.einsum("kij,klj->il", grads, grads) / len(grads),
            torch.einsum("kji,kjl->il", grads, grads) / len(grads))
