"""Random test matrices shared by the analysis tests."""

import torch


def spd(d: int) -> torch.Tensor:
    """A well-conditioned random symmetric positive definite matrix in float64."""
    X = torch.randn(d, 2 * d, dtype=torch.float64)
    return X @ X.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
