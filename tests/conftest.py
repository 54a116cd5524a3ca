"""Shared test set-up: deterministic seeds and CPU flush-denormal."""

import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
