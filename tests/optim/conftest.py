"""Fixtures of the optimizer tests."""

import pytest
import torch

from soaplab.optim.matrix_functions import MatrixFunctionError


@pytest.fixture
def float64():
    """Make float64 the default dtype for one test (exact-maths tests), then restore it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def eigh_fails_in_float32(monkeypatch):
    """torch.linalg.eigh raising LinAlgError on float32 input (float64 works); returns the
    list of dtypes it is called with."""
    real_eigh, calls = torch.linalg.eigh, []

    def flaky(A):
        calls.append(A.dtype)
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced")
        return real_eigh(A)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    return calls


@pytest.fixture
def break_refresh(monkeypatch):
    """``break_refresh("soaplab.optim.soap.power_qr_step")``: that function then always raises
    MatrixFunctionError("forced failure")."""

    def broken(*args, **kwargs):
        raise MatrixFunctionError("forced failure")

    return lambda target: monkeypatch.setattr(target, broken)
