"""Matrix functions on batches of symmetric PSD factors, robust by construction.

Every function takes a batch ``A`` of shape (B, d, d) and works in the dtype it is given (the
factors' dtype policy lives in ``state.py``). Failures are reported as :class:`MatrixFunctionError`
after an fp64 retry; callers decide what to keep (SOAP keeps the previous basis). Nothing here
ever returns NaN: non-finite input raises instead of flowing into the optimizer state.
"""

from __future__ import annotations

import torch
from torch import Tensor


class MatrixFunctionError(RuntimeError):
    """A factor could not be decomposed, even in float64."""


def _check_finite(A: Tensor, what: str) -> None:
    # One norm, a single pass (isfinite(A).all() makes four): NaN and Inf propagate into it.
    # A norm that overflows with finite entries is told apart by the exact test.
    if not bool(torch.isfinite(torch.linalg.vector_norm(A))) and \
            not bool(torch.isfinite(A).all()):
        raise MatrixFunctionError(f"{what}: factor or result contains NaN or Inf")


def _eigh_with_retry(A: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, retried in float64 when the working precision fails."""
    try:
        return torch.linalg.eigh(A)
    except torch.linalg.LinAlgError:
        if A.dtype == torch.float64:
            raise MatrixFunctionError("eigh failed in float64") from None
    try:
        evals, evecs = torch.linalg.eigh(A.double())
    except torch.linalg.LinAlgError:
        raise MatrixFunctionError("eigh failed in float32 and float64") from None
    return evals.to(A.dtype), evecs.to(A.dtype)


def eigenbasis(A: Tensor) -> Tensor:
    """Eigenvectors of each symmetric ``A`` as columns, in descending eigenvalue order.

    Adding c·I leaves eigenvectors unchanged, so no regulariser is needed here; an all-zero
    factor yields the identity.
    """
    _check_finite(A, "eigenbasis")
    _, evecs = _eigh_with_retry(A)
    return evecs.flip(-1)


def times_basis(A: Tensor, Q: Tensor) -> Tensor:
    """A·Q for symmetric ``A``, computed as (Qᵀ A)ᵀ: the same product, laid out column-major.

    That is LAPACK's layout, so the QR of its columns copies nothing in, and gathering its
    columns (:func:`power_qr_step`'s sort) copies whole rows of Qᵀ A."""
    return (Q.mT @ A).mT


def rayleigh(AQ: Tensor, Q: Tensor) -> Tensor:
    """The Rayleigh quotients diag(Qᵀ A Q), given the product ``AQ`` = A @ Q."""
    return (AQ * Q).sum(dim=-2)


def rayleigh_quotients(A: Tensor, Q: Tensor) -> Tensor:
    """diag(Qᵀ A Q) for symmetric ``A``, with one product."""
    return rayleigh(times_basis(A, Q), Q)


def sort_by_rayleigh(AQ: Tensor, Q: Tensor) -> Tensor:
    """Column order that sorts the Rayleigh quotients diag(Qᵀ A Q) in descending order,
    given the product ``AQ`` = A @ Q."""
    return _descending(rayleigh(AQ, Q))


def _descending(quotients: Tensor) -> Tensor:
    return torch.argsort(quotients, dim=-1, descending=True)


def drift_from_diagonal(A: Tensor, diagonal: Tensor) -> Tensor:
    """The drift of a basis Q of each ``A``, given only diag(QᵀAQ), in float64.

    ‖QᵀAQ‖_F = ‖A‖_F for orthogonal Q, so the off-diagonal mass is ‖A‖_F² − Σ diag². The
    subtraction limits the resolution to about √(working eps) (1e-3 in float32); an all-zero
    factor has drift 0.
    """
    total = torch.linalg.vector_norm(A, dim=(-2, -1)).double().square()
    on_diagonal = diagonal.square().sum(dim=-1, dtype=torch.float64)
    off = (total - on_diagonal).clamp_min(0).sqrt()
    return off / total.sqrt().clamp_min(torch.finfo(torch.float64).tiny)


def gather_columns(X: Tensor, order: Tensor) -> Tensor:
    """The columns of each X in ``order``, as rows of Xᵀ (whole-row copies when X is
    column-major, as :func:`times_basis` makes it)."""
    batch = torch.arange(X.shape[0], device=X.device).unsqueeze(-1)
    return X.mT[batch, order].mT


def _householder_q(Y: Tensor) -> Tensor:
    """Q of Y by LAPACK's (cuSOLVER's) Householder QR: geqrf, then the product of its
    reflectors, skipping the R that ``torch.linalg.qr`` would also form."""
    def q_of(X: Tensor) -> Tensor:
        reflectors, tau = torch.geqrf(X.mT.contiguous().mT)  # column-major: no copy if it is
        return torch.linalg.householder_product(reflectors, tau)

    try:
        Q = q_of(Y)
    except torch.linalg.LinAlgError:
        try:
            Q = q_of(Y.double()).to(Y.dtype)
        except torch.linalg.LinAlgError:
            raise MatrixFunctionError("QR failed in float32 and float64") from None
    _check_finite(Q, "Householder QR")
    return Q


def _cholesky_pass(Q: Tensor, looped: bool) -> tuple[Tensor, Tensor]:
    """One Cholesky QR pass, Q R⁻¹ with RᵀR = QᵀQ, and whether the Cholesky broke down.
    ``looped``: one Cholesky and one triangular solve per matrix of the batch rather than the
    batched kernels (which cuSOLVER and cuBLAS tune for small matrices)."""
    gram = Q.mT @ Q
    if looped:
        pieces = [torch.linalg.cholesky_ex(g, upper=True) for g in gram]
        R, info = torch.stack([r for r, _ in pieces]), torch.stack([i for _, i in pieces])
        Q = torch.stack([torch.linalg.solve_triangular(r, q, upper=True, left=False)
                         for r, q in zip(R, Q, strict=True)])
    else:
        R, info = torch.linalg.cholesky_ex(gram, upper=True)
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    return Q, info.any()


def _cholesky_qr2(Y: Tensor, looped: bool = False, series: bool = False) -> Tensor | None:
    """Q of Y by two passes of Cholesky QR, or None if it breaks down or Q is not orthogonal
    to working precision (so a Q returned is finite); one host sync decides.

    ``series``: the second pass by its first-order expansion. After the first pass QᵀQ = I + F
    with F tiny (about 1e-6 in float32 for a warm-started refresh), and chol(I + F) =
    I + Φ(F) + O(F²), Φ(F) the upper triangle of F with its diagonal halved, so
    Q (I + Φ(F))⁻¹ = Q − Q Φ(F) + O(F²): one matmul instead of a Cholesky and a triangular
    solve. Only where ‖F‖_max ≤ √eps, so that the O(F²) left out is below the working
    precision; otherwise None."""
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    Q, failed = _cholesky_pass(Y, looped)
    if series:
        F = Q.mT @ Q - eye
        failed = failed | ~(F.abs().amax() <= torch.finfo(Y.dtype).eps ** 0.5)
        half = F.triu()
        half.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        Q = Q - Q @ half
    else:
        Q, broke = _cholesky_pass(Q, looped)
        failed = failed | broke
    tolerance = 100 * Y.shape[-1] * torch.finfo(Y.dtype).eps
    failed |= ~((Q.mT @ Q - eye).abs().amax() <= tolerance)  # NaN compares False
    return None if bool(failed) else Q


# The orthonormalization that measures fastest on each device type (the parts table of
# benchmarks/step_time.py --parts; docs/benchmarks.md): LAPACK's Householder QR beats the
# Cholesky QRs on CPU; on GPUs, where the Cholesky and the triangular solve run far below
# matmul speed, Cholesky QR with its second pass by expansion wins.
FASTEST_QR = {"cpu": "householder"}
QR_METHODS = ("householder", "cholesky_qr2", "cholesky_qr2_looped", "cholesky_qr_series")


def fastest_qr(device_type: str) -> str:
    """The orthonormalization :func:`orthonormalize` uses on this device type by default."""
    return FASTEST_QR.get(device_type, "cholesky_qr_series")


def orthonormalize(Y: Tensor, method: str | None = None) -> Tensor:
    """The Q factor of each ``Y``'s QR decomposition (column signs arbitrary).

    ``method``: one of :data:`QR_METHODS`: "householder" (LAPACK/cuSOLVER QR), "cholesky_qr2",
    "cholesky_qr2_looped" (the same, one matrix at a time) or "cholesky_qr_series" (its
    second pass by a first-order expansion, one matmul; exact Cholesky QR2 where the expansion
    would not be exact to working precision); None picks the fastest for Y's device
    (:data:`FASTEST_QR`, "cholesky_qr_series" where not listed).

    SOAP's refresh calls this on Y = P·Q_old, whose columns are nearly orthogonal (the warm
    start is close to P's eigenvectors) with norms ≈ eigenvalues. Scaling the columns to unit
    norm leaves Q unchanged and makes Y·D well conditioned, so Cholesky QR (matmuls, a
    Cholesky and a triangular solve) is accurate; two passes make Q orthogonal to working
    precision. Where it breaks down (zero or dependent columns) or Q is not orthogonal,
    Householder QR takes over. Raises :class:`MatrixFunctionError` rather than return a
    non-finite Q.
    """
    method = method or fastest_qr(Y.device.type)
    if method not in QR_METHODS:
        raise ValueError(f"orthonormalize: method must be one of {QR_METHODS}, got {method!r}")
    if method.startswith("cholesky"):
        tiny = torch.finfo(Y.dtype).tiny
        scaled = Y / Y.norm(dim=-2, keepdim=True).clamp_min(tiny)
        Q = None
        if method == "cholesky_qr_series":
            Q = _cholesky_qr2(scaled, series=True)
        if Q is None:
            Q = _cholesky_qr2(scaled, looped=method.endswith("looped"))
        if Q is not None:
            return Q
    return _householder_q(Y)


def bjorck(Q: Tensor, iterations: int = 2) -> Tensor:
    """The nearest orthogonal matrix to each nearly orthogonal ``Q`` (its polar factor), by
    Björck's iteration Q <- Q (3I - QᵀQ)/2.

    For a basis stored in bf16 or int8 (off orthogonal by its rounding, see storage.py) the
    error squares at each iteration: two reach fp32's own orthogonality (that of Householder
    QR; tests/optim/test_storage.py).
    Unlike QR it keeps every column's sign and order, so the state attached to the columns
    (Adam's moments) stays valid. Two matmuls per iteration.
    """
    for _ in range(iterations):
        Q = 1.5 * Q - 0.5 * Q @ (Q.mT @ Q)
    return Q


def power_qr_step(A: Tensor, Q: Tensor, AQ: Tensor | None = None,
                  quotients: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One warm-started power-iteration step with QR (SOAP's Algorithm 4).

    Returns the new basis and the column order applied to the old one, which the caller must
    apply to any per-coordinate state (Adam's second moment) attached to the old columns.
    A·Q serves both the Rayleigh quotients and the power step: A·Q_sorted = (A·Q)_sorted;
    pass it as ``AQ`` (and the quotients, ``rayleigh(AQ, Q)``) when already computed.
    """
    # Y = A·Q_sorted is exactly the reference's input to QR. On a rank-deficient factor its
    # null-space columns are round-off; Cholesky QR then breaks down and Householder QR
    # reproduces the reference's behaviour there too. A non-finite A gives a non-finite Y,
    # which orthonormalize refuses (within the one host sync it needs anyway).
    AQ = times_basis(A, Q) if AQ is None else AQ
    order = _descending(rayleigh(AQ, Q) if quotients is None else quotients)
    return orthonormalize(gather_columns(AQ, order)), order


def eigh_step(A: Tensor, Q: Tensor, AQ: Tensor | None = None,
              quotients: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact refresh: a fresh eigenbasis, with the old columns matched to it by Rayleigh order."""
    if quotients is None:
        quotients = rayleigh_quotients(A, Q) if AQ is None else rayleigh(AQ, Q)
    return eigenbasis(A), _descending(quotients)


def inverse_root(A: Tensor, power: float, eps: float) -> Tensor:
    """(A + eps·I)^(-power) for symmetric PSD ``A``, through an eigendecomposition.

    Eigenvalues below zero (round-off on rank-deficient factors) are clamped to zero first, so
    eps is the smallest eigenvalue that is ever inverted.
    """
    _check_finite(A, "inverse_root")
    evals, evecs = _eigh_with_retry(A)
    scale = (evals.clamp(min=0) + eps).pow(-power)
    return (evecs * scale.unsqueeze(-2)) @ evecs.mT
