"""Colour photographs for colorization: luminance in, chrominance out (CIE Lab).

The default set is the natural photos bundled with scikit-image, scikit-learn and matplotlib;
``--images DIR`` takes any folder of JPEG/PNG files. Training uses patches cut from the training
photos; validation uses whole held-out photos, resized, so it measures generalisation to
unseen scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "pip install scikit-image scikit-learn matplotlib (or pip install -e '.[data]')"
VALIDATION = ("chelsea", "flower", "grace_hopper")


def _bundled() -> dict[str, np.ndarray]:
    try:
        import matplotlib.cbook
        import matplotlib.image
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise FileNotFoundError(f"bundled photos need {err.name}: {INSTALL_HINT}") from None
    photos = {name: getattr(data, name)() for name in
              ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
               "immunohistochemistry")}
    left, right, _ = data.stereo_motorcycle()
    photos.update(motorcycle_left=left, motorcycle_right=right)
    samples = load_sample_images()
    for name, image in zip(samples.filenames, samples.images, strict=True):
        photos[Path(name).stem] = image
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = matplotlib.image.imread(f, format="jpg")
    return photos


def _folder(path: Path) -> dict[str, np.ndarray]:
    from skimage import io

    if not path.is_dir():
        raise FileNotFoundError(f"--images {path}: no such folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) < 2:
        raise FileNotFoundError(f"--images {path}: need at least 2 JPEG/PNG photos, found "
                                f"{len(files)}")
    photos = {}
    for f in files:
        try:
            image = io.imread(f)
        except Exception as err:  # noqa: BLE001 - any decoder error means an unreadable file
            raise ValueError(f"cannot read image {f}: {err}") from None
        if image.ndim != 3 or image.shape[2] < 3:
            raise ValueError(f"{f} is not a colour photo (shape {image.shape})")
        photos[f.stem] = image[..., :3]
    return photos


def to_lab(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8/float image -> (3, H, W) tensor: L/100 - 0.5 and ab/110, roughly in [-1, 1]."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb[..., :3])
    scaled = np.stack([lab[..., 0] / 100 - 0.5, lab[..., 1] / 110, lab[..., 2] / 110])
    return torch.from_numpy(scaled).float()


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    from skimage.transform import rescale

    return rescale(rgb, scale, channel_axis=-1, anti_aliasing=True)


@dataclass
class PhotoSet:
    """Training patches (N, 3, p, p) and validation photos (M, 3, s, s), both in scaled Lab."""

    train: torch.Tensor
    val: torch.Tensor
    train_names: list[str]
    val_names: list[str]

    @classmethod
    def load(cls, folder: str | Path | None = None, patch: int = 32,
             val_size: int = 96) -> PhotoSet:
        photos = _bundled() if folder is None else _folder(Path(folder))
        names = sorted(photos)
        val_names = [n for n in names if n in VALIDATION] if folder is None \
            else names[-max(1, len(names) // 5):]
        train_names = [n for n in names if n not in val_names]
        patches = []
        for name in train_names:
            lab = to_lab(_resize(photos[name], 256 / min(photos[name].shape[:2])))
            windows = lab.unfold(1, patch, patch // 2).unfold(2, patch, patch // 2)
            patches.append(windows.permute(1, 2, 0, 3, 4).reshape(-1, 3, patch, patch))
        val = [to_lab(_resize(_square(photos[n]), val_size / min(photos[n].shape[:2])))
               for n in val_names]
        return cls(torch.cat(patches), torch.stack([v[:, :val_size, :val_size] for v in val]),
                   train_names, val_names)


def _square(rgb: np.ndarray) -> np.ndarray:
    """The centred square crop of a photo."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return rgb[top:top + side, left:left + side]


def lab_to_rgb(lab: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_lab` for display: (3, H, W) scaled Lab -> (H, W, 3) RGB in [0, 1]."""
    from skimage.color import lab2rgb

    x = lab.detach().double().cpu().numpy()
    raw = np.stack([(x[0] + 0.5) * 100, x[1] * 110, x[2] * 110], axis=-1)
    return np.clip(lab2rgb(raw), 0, 1)
