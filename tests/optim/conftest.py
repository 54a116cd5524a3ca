"""Fixtures of the optimizer tests."""

import pytest
import torch


@pytest.fixture
def float64():
    """Make float64 the default dtype for one test (exact-maths tests), then restore it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
