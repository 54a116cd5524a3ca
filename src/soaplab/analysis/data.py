"""Small offline image-classification sets for curvature studies, as 8×8 = 64 features.

* ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8×8), no download.
* ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` package (70k images, 28×28),
  average-pooled to 8×8 so that its layers stay small enough for dense (mn)² matrices.

Features are standardised with the training split's statistics; the split is seeded.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist")


@dataclass(frozen=True)
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise RuntimeError("the digits dataset needs scikit-learn: "
                           "pip install scikit-learn") from err
    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def _fashion_mnist(root: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {root}; install it with "
            "`apt-get install dataset-fashion-mnist` (Debian) or pass --data-dir")
    x = torch.from_numpy(_idx(images, 16).reshape(-1, 1, 28, 28)[:limit].astype(np.float32))
    x = F.adaptive_avg_pool2d(x, 8).squeeze(1).double().numpy()
    return x, _idx(labels, 8)[:limit].astype(np.int64)


def load(name: str = "digits", *, seed: int = 0, test_fraction: float = 0.2,
         limit: int = 10_000, data_dir: Path = FASHION_MNIST_DIR,
         dtype: torch.dtype = torch.float32) -> Split:
    """A seeded, standardised train/test split of ``name`` (one of :data:`DATASETS`)."""
    if name == "digits":
        images, labels = _digits()
    elif name == "fashion-mnist":
        images, labels = _fashion_mnist(Path(data_dir), limit)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    x = torch.from_numpy(images.reshape(len(images), -1))
    y = torch.from_numpy(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)  # constant border pixels
    x = ((x - mean) / std).to(dtype)
    return Split(x[train], y[train], x[test], y[test])
