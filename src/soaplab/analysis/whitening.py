"""Idealized preconditioners as approximations of the whitening matrix C^{-1/2} (arXiv 2509.22938).

``C = E[vec(G) vec(G)ᵀ]`` is a layer's gradient second moment. A whitening step multiplies the
gradient by ``C^{-1/2}``; Adam, Shampoo and SOAP replace C by a structured estimate built from
the same C ("idealized": exact expectations, no running averages, no staleness):

* Adam: ``diag(C)``;
* Shampoo (power 1/2, trace-scaled): ``L⊗R / tr C`` with L, R the partial traces of C;
* SOAP: the diagonal of C in the eigenbasis ``Q = Q_L⊗Q_R`` of L and R, rotated back;
* Adafactor in that eigenbasis: the rank-1 fit of the rotated diagonal; equals Shampoo exactly
  (SOAP paper, Claim 1);
* original Shampoo: ``(L⊗R)^{1/2}``, i.e. preconditioner ``L^{-1/4}⊗R^{-1/4}``.

If C = A⊗B, Shampoo, SOAP and C^{-1/2} coincide. Matrices are dense (mn)×(mn): small layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from soaplab.analysis.kronecker import cosine, psd_power, shampoo_factors


def damp(C: Tensor, relative: float) -> Tensor:
    """C + λI with λ = relative · tr(C)/dim: makes a rank-deficient gradient moment invertible."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return C + relative * torch.trace(C) / C.shape[0] * eye


def whitening_matrix(C: Tensor) -> Tensor:
    """C^{-1/2}: the preconditioner whose output has identity second moment."""
    return psd_power(C, -0.5)


def adam_preconditioner(C: Tensor) -> Tensor:
    """diag(C)^{-1/2}, Adam's elementwise 1/sqrt(E[g²])."""
    return torch.diag(torch.diagonal(C).rsqrt())


def shampoo_preconditioner(C: Tensor, m: int, n: int) -> Tensor:
    """(L⊗R / tr C)^{-1/2} = sqrt(tr C) · L^{-1/2}⊗R^{-1/2}."""
    L, R = shampoo_factors(C, m, n)
    return torch.trace(C).sqrt() * torch.kron(psd_power(L, -0.5), psd_power(R, -0.5))


def shampoo_quarter_preconditioner(C: Tensor, m: int, n: int) -> Tensor:
    """L^{-1/4}⊗R^{-1/4}: original Shampoo, which treats (L⊗R)^{1/2} as the estimate of C."""
    L, R = shampoo_factors(C, m, n)
    return torch.kron(psd_power(L, -0.25), psd_power(R, -0.25))


def eigenbasis(C: Tensor, m: int, n: int) -> Tensor:
    """Q = Q_L⊗Q_R, the Kronecker eigenbasis of Shampoo's factors (SOAP's rotation)."""
    L, R = shampoo_factors(C, m, n)
    return torch.kron(torch.linalg.eigh(L).eigenvectors, torch.linalg.eigh(R).eigenvectors)


def soap_preconditioner(C: Tensor, m: int, n: int) -> Tensor:
    """Q diag(QᵀCQ)^{-1/2} Qᵀ: Adam's exact second moment taken in Shampoo's eigenbasis."""
    Q = eigenbasis(C, m, n)
    rotated = torch.einsum("ia,ij,ja->a", Q, C, Q)
    return (Q * rotated.rsqrt()) @ Q.T


def adafactor_eigenbasis_preconditioner(C: Tensor, m: int, n: int) -> Tensor:
    """Q diag(V̂)^{-1/2} Qᵀ with V̂ = a cᵀ / Σa the rank-1 fit of the rotated diagonal."""
    Q = eigenbasis(C, m, n)
    rotated = torch.einsum("ia,ij,ja->a", Q, C, Q).reshape(m, n)
    rows, cols = rotated.sum(1), rotated.sum(0)
    fitted = torch.outer(rows, cols) / rows.sum()
    return (Q * fitted.flatten().rsqrt()) @ Q.T


def preconditioners(C: Tensor, m: int, n: int) -> dict[str, Tensor]:
    """Every idealized preconditioner of this module, keyed by optimizer name."""
    return {
        "adam": adam_preconditioner(C),
        "shampoo": shampoo_preconditioner(C, m, n),
        "shampoo_quarter": shampoo_quarter_preconditioner(C, m, n),
        "soap": soap_preconditioner(C, m, n),
    }


def whiteness(P: Tensor, C: Tensor) -> float:
    """cosine(P C Pᵀ, I): 1 exactly when P whitens C up to a scalar."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return cosine(P @ C @ P.T, eye)


def whitening_similarities(C: Tensor, m: int, n: int) -> dict[str, float]:
    """For each preconditioner: cosine with C^{-1/2} and whiteness of the preconditioned moment."""
    target = whitening_matrix(C)
    out = {"whitening/whiteness": whiteness(target, C)}
    for name, P in preconditioners(C, m, n).items():
        out[f"{name}/cosine"] = cosine(P, target)
        out[f"{name}/whiteness"] = whiteness(P, C)
    return out
