"""Matrix functions against closed forms and explicit float64 eigendecompositions."""

import pytest
import torch

from soaplab.optim import matrix_functions as mf


def random_spd(d: int, spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64)).Q
    return (Q * spectrum) @ Q.T, Q


def test_eigenbasis_is_descending_and_diagonalizes():
    spectrum = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1], dtype=torch.float64)
    A, _ = random_spd(5, spectrum)
    Q = mf.eigenbasis(A[None])[0]
    diag = Q.T @ A @ Q
    torch.testing.assert_close(diag, torch.diag(spectrum.sort(descending=True).values),
                               atol=1e-12, rtol=0)


def test_eigenbasis_of_zero_factor_is_a_permutation_of_identity():
    Q = mf.eigenbasis(torch.zeros(1, 4, 4, dtype=torch.float64))[0]
    torch.testing.assert_close(Q.abs().sum(0), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=torch.float64))


def test_nonfinite_factor_raises_typed_error():
    A = torch.eye(3).unsqueeze(0).clone()
    A[0, 1, 1] = float("nan")
    with pytest.raises(mf.MatrixFunctionError, match="NaN or Inf"):
        mf.eigenbasis(A)
    with pytest.raises(mf.MatrixFunctionError):
        mf.power_qr_step(A, torch.eye(3)[None])


@pytest.mark.parametrize("method", mf.QR_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_power_step_refuses_a_nonfinite_factor_with_either_qr(method, bad, monkeypatch):
    monkeypatch.setattr(mf, "FASTEST_QR", {"cpu": method})
    A, Q = random_spd(4, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    A = A.float()[None].clone()
    A[0, 2, 3] = A[0, 3, 2] = bad
    with pytest.raises(mf.MatrixFunctionError, match="NaN or Inf"):
        mf.power_qr_step(A, Q.float()[None])


def test_times_basis_is_a_times_q_laid_out_column_major():
    A = torch.randn(3, 7, 9, dtype=torch.float64)
    A = A @ A.mT
    Q = torch.linalg.qr(torch.randn(3, 7, 7, dtype=torch.float64)).Q
    AQ = mf.times_basis(A, Q)
    torch.testing.assert_close(AQ, A @ Q, atol=1e-12, rtol=0)
    assert AQ.mT.is_contiguous()


@pytest.mark.parametrize("column_major", [False, True])
def test_gather_columns_takes_each_batch_members_columns_in_its_order(column_major):
    X = torch.randn(4, 6, 6)
    X = X.mT.contiguous().mT if column_major else X
    order = torch.stack([torch.randperm(6) for _ in range(4)])
    expected = torch.stack([X[b][:, order[b]] for b in range(4)])
    torch.testing.assert_close(mf.gather_columns(X, order), expected, atol=0, rtol=0)


def test_eigh_failure_in_float32_is_retried_in_float64(eigh_fails_in_float32):
    calls = eigh_fails_in_float32
    A, _ = random_spd(4, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    Q = mf.eigenbasis(A.float()[None])[0]
    assert calls == [torch.float32, torch.float64]
    assert Q.dtype == torch.float32
    torch.testing.assert_close(torch.diag(Q.double().T @ A @ Q.double()),
                               torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_power_qr_step_sorts_columns_and_returns_the_order():
    spectrum = torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64)
    A, Q = random_spd(3, spectrum)
    new, order = mf.power_qr_step(A[None], Q[None])
    assert order[0].tolist() == [1, 2, 0]
    # Q already diagonalizes A: one power step keeps each (sorted) column up to sign.
    torch.testing.assert_close((new[0].T @ Q[:, order[0]]).abs(), torch.eye(3, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_repeated_power_qr_steps_converge_to_eigh():
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    A, _ = random_spd(6, spectrum)
    Q = torch.linalg.qr(torch.randn(1, 6, 6, dtype=torch.float64)).Q
    for _ in range(80):
        Q, _ = mf.power_qr_step(A[None], Q)
    exact = mf.eigenbasis(A[None])[0]
    torch.testing.assert_close((Q[0].T @ exact).abs(), torch.eye(6, dtype=torch.float64),
                               atol=1e-8, rtol=0)


def test_eigh_step_returns_exact_basis():
    A, Q = random_spd(4, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    new, order = mf.eigh_step(A[None], torch.eye(4, dtype=torch.float64)[None])
    reversed_identity = torch.eye(4, dtype=torch.float64)[[3, 2, 1, 0]]
    torch.testing.assert_close((new[0].T @ Q).abs(), reversed_identity, atol=1e-12, rtol=0)
    assert order.shape == (1, 4)


@pytest.mark.parametrize("power", [0.25, 0.5, 1.0])
def test_inverse_root_matches_explicit_spectral_formula(power):
    spectrum = torch.tensor([2.0, 1e-3, 0.5, 7.0], dtype=torch.float64)
    A, Q = random_spd(4, spectrum)
    eps = 1e-6
    expected = (Q * (spectrum + eps) ** -power) @ Q.T
    torch.testing.assert_close(mf.inverse_root(A[None], power, eps)[0], expected,
                               atol=1e-10, rtol=1e-10)


def test_inverse_root_of_rank_deficient_factor_is_finite():
    v = torch.randn(5, 1, dtype=torch.float64)
    root = mf.inverse_root((v @ v.T)[None], 0.25, 1e-12)
    assert torch.isfinite(root).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", [None, *mf.QR_METHODS])
def test_orthonormalize_equals_householder_q_up_to_signs(dtype, method):
    A = torch.randn(3, 24, 40, dtype=dtype)
    P = A @ A.mT
    warm = torch.linalg.eigh(P + 0.1 * torch.eye(24, dtype=dtype)).eigenvectors
    Y = P @ warm
    Q = mf.orthonormalize(Y, method)
    reference = torch.linalg.qr(Y).Q
    eye = torch.eye(24, dtype=dtype).expand(3, 24, 24)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close((Q.mT @ reference).abs(), eye, atol=tol, rtol=0)


@pytest.mark.parametrize("method", ["cholesky_qr2", "cholesky_qr2_looped"])
def test_orthonormalize_falls_back_on_rank_deficient_input(monkeypatch, method):
    B = torch.randn(10, 3, dtype=torch.float64)
    Y = ((B @ B.T) @ torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64)).Q)[None]
    calls = []
    real_geqrf = torch.geqrf
    monkeypatch.setattr(torch, "geqrf", lambda X: calls.append(1) or real_geqrf(X))
    Q = mf.orthonormalize(Y, method)
    assert calls  # Cholesky QR broke down, Householder QR answered
    torch.testing.assert_close(Q[0].T @ Q[0], torch.eye(10, dtype=torch.float64))


def test_drift_is_the_relative_off_diagonal_mass_of_the_rotated_factor():
    A = torch.randn(4, 12, 30, dtype=torch.float64)
    P = A @ A.mT
    Q = torch.linalg.qr(torch.randn(4, 12, 12, dtype=torch.float64)).Q
    rotated = Q.mT @ P @ Q
    off = rotated - torch.diag_embed(rotated.diagonal(dim1=-2, dim2=-1))
    expected = off.norm(dim=(-2, -1)) / P.norm(dim=(-2, -1))
    def drift(A, Q):
        return mf.drift_from_diagonal(A, mf.rayleigh_quotients(A, Q))

    torch.testing.assert_close(drift(P, Q), expected)
    exact = torch.linalg.eigh(P).eigenvectors
    assert drift(P, exact).max() < 1e-7
    assert drift(torch.zeros(1, 3, 3), torch.eye(3)[None]).item() == 0


def test_orthonormalize_names_its_methods_when_given_another():
    with pytest.raises(ValueError, match="householder"):
        mf.orthonormalize(torch.eye(3)[None], "gram_schmidt")


def _counting_passes(monkeypatch) -> list[int]:
    passes: list[int] = []
    real = mf._cholesky_pass
    monkeypatch.setattr(mf, "_cholesky_pass",
                        lambda Q, looped: passes.append(1) or real(Q, looped))
    return passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_qr_series_is_cholesky_qr2_with_one_cholesky_when_warm(monkeypatch, dtype):
    # A refresh's input: A times a basis close to A's eigenvectors. The second pass by
    # expansion then matches the exact second pass to round-off, with one Cholesky, not two.
    A, _ = random_spd(48, torch.linspace(0.1, 10.0, 48, dtype=torch.float64))
    old, _ = random_spd(48, torch.linspace(0.1, 10.0, 48, dtype=torch.float64))
    warm = torch.linalg.eigh(A + 0.05 * old).eigenvectors
    Y = (A @ warm).to(dtype)[None]
    passes = _counting_passes(monkeypatch)
    Q = mf.orthonormalize(Y, "cholesky_qr_series")
    assert len(passes) == 1
    exact = mf.orthonormalize(Y, "cholesky_qr2")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(Q, exact, atol=tol, rtol=0)
    torch.testing.assert_close(Q[0].mT @ Q[0], torch.eye(48, dtype=dtype), atol=tol, rtol=0)


def test_cholesky_qr_series_hands_a_cold_start_to_the_exact_second_pass(monkeypatch):
    # Columns far from orthogonal: the first pass leaves QᵀQ - I above √eps, so the
    # expansion would not be exact; Cholesky QR2 answers, still without Householder.
    gen = torch.Generator().manual_seed(1)
    U, V = (torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64)).Q
            for _ in range(2))
    # Condition about 900 after scaling the columns: beyond the expansion, within Cholesky QR2.
    Y = (U @ torch.diag(torch.logspace(0, -3, 40, dtype=torch.float64)) @ V.T).float()[None]
    passes = _counting_passes(monkeypatch)
    geqrf = []
    real_geqrf = torch.geqrf
    monkeypatch.setattr(torch, "geqrf", lambda X: geqrf.append(1) or real_geqrf(X))
    Q = mf.orthonormalize(Y, "cholesky_qr_series")
    assert len(passes) == 3 and not geqrf
    reference = torch.linalg.qr(Y.double()).Q.float()
    torch.testing.assert_close((Q[0].mT @ reference[0]).abs(), torch.eye(40), atol=1e-4, rtol=0)
