"""Idealized preconditioners against C^{-1/2} in float64 (whitening paper; SOAP Claim 1)."""

import numpy as np
import pytest
import scipy.linalg
import torch

from soaplab.analysis.kronecker import shampoo_factors
from soaplab.analysis.whitening import (
    adafactor_eigenbasis_preconditioner,
    adam_preconditioner,
    damp,
    eigenbasis,
    preconditioners,
    shampoo_preconditioner,
    soap_preconditioner,
    whiteness,
    whitening_matrix,
    whitening_similarities,
)

from .matrices import spd

D = torch.float64


def test_whitening_matrix_matches_scipy_and_whitens():
    C = spd(12)
    expected = np.linalg.inv(scipy.linalg.sqrtm(C.numpy()).real)
    np.testing.assert_allclose(whitening_matrix(C).numpy(), expected, rtol=1e-8, atol=1e-10)
    assert whiteness(whitening_matrix(C), C) == pytest.approx(1.0, abs=1e-12)


def test_for_kronecker_c_soap_equals_shampoo_equals_whitening():
    m, n = 4, 3
    C = torch.kron(spd(m), spd(n))
    target = whitening_matrix(C)
    torch.testing.assert_close(shampoo_preconditioner(C, m, n), target)
    torch.testing.assert_close(soap_preconditioner(C, m, n), target)
    torch.testing.assert_close(adafactor_eigenbasis_preconditioner(C, m, n), target)
    sims = whitening_similarities(C, m, n)
    assert sims["soap/cosine"] == pytest.approx(1.0, abs=1e-10)
    assert sims["shampoo/whiteness"] == pytest.approx(1.0, abs=1e-10)
    assert sims["adam/whiteness"] < 0.99  # dense A, B: a diagonal cannot whiten


def test_claim1_shampoo_equals_adafactor_in_its_eigenbasis_for_any_c():
    m, n = 4, 5
    C = torch.kron(spd(m), spd(n)) + torch.kron(spd(m), spd(n)) + 0.3 * spd(m * n)
    torch.testing.assert_close(adafactor_eigenbasis_preconditioner(C, m, n),
                               shampoo_preconditioner(C, m, n))
    assert not torch.allclose(soap_preconditioner(C, m, n), shampoo_preconditioner(C, m, n))


def test_soap_diagonal_fits_c_better_than_shampoo_in_the_same_basis():
    m, n = 3, 4
    C = torch.kron(spd(m), spd(n)) + 0.5 * spd(m * n)
    Q = eigenbasis(C, m, n)
    soap_estimate = torch.linalg.inv(soap_preconditioner(C, m, n)) @ torch.linalg.inv(
        soap_preconditioner(C, m, n))
    L, R = shampoo_factors(C, m, n)
    shampoo_estimate = torch.kron(L, R) / torch.trace(C)
    # both estimates are diagonal in Q; SOAP's diagonal is the Frobenius-best one there
    for E in (soap_estimate, shampoo_estimate):
        rotated = Q.T @ E @ Q
        torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)))
    assert (C - soap_estimate).norm() < (C - shampoo_estimate).norm()


def test_adam_is_exact_for_diagonal_c_and_preconditioners_are_symmetric():
    C = torch.diag(torch.rand(6, dtype=D) + 0.5)
    torch.testing.assert_close(adam_preconditioner(C), whitening_matrix(C))
    for P in preconditioners(spd(6), 2, 3).values():
        torch.testing.assert_close(P, P.T)


def test_damp_adds_relative_multiple_of_identity():
    C = torch.zeros(4, 4, dtype=D)
    C[0, 0] = 8.0
    torch.testing.assert_close(damp(C, 0.5), C + torch.eye(4, dtype=D))
