"""Colour photographs for colorization: luminance in, chrominance out (CIE Lab).

Three sources (``--images``): the natural photos bundled with scikit-image, scikit-learn and
matplotlib (the default); ``debian``, 46 photos from three Debian packages that ``make photos``
installs (see ``debian_photos``); or any folder of JPEG/PNG files. Whole photos are held out
for validation, so it measures generalisation to unseen scenes. Training crops are cut at
random from the other photos, each kept at several scales, and flipped at random.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "pip install scikit-image scikit-learn matplotlib (or pip install -e '.[data]')"
VALIDATION = ("chelsea", "flower", "grace_hopper")
SCALES = (96, 160, 256)  # short sides a training photo is kept at: whole scenes to textures
VAL_SIZE = 96  # held-out photos: centre squares at this size, as whole as the smallest scale
MIN_SIDE = 32  # a photo's short side in pixels: a training crop (tasks.PATCH) must fit
MAX_ASPECT = 4  # long side over short side: a strip would be resized to a huge image
BUNDLED = "scikit-image, scikit-learn and matplotlib sample photos"  # the default set's name


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


def _read(path: Path) -> np.ndarray:
    """An RGB photo decoded at no more than twice the largest size it is used at: JPEG's draft
    mode decodes a 16-megapixel wallpaper at 1/8 scale in milliseconds instead of seconds."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            short, long = sorted(image.size)
            if short < MIN_SIDE or long > MAX_ASPECT * short:
                raise ValueError(f"{image.size[0]}x{image.size[1]} pixels; a photo needs a "
                                 f"short side of at least {MIN_SIDE} and at most "
                                 f"{MAX_ASPECT}:1 sides")
            image.draft("RGB", (2 * SCALES[-1], 2 * SCALES[-1]))
            return np.asarray(image.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - any decoder error means an unreadable file
        raise ValueError(f"cannot read image {path}: {err}") from None


def _files(path: Path) -> list[Path]:
    """The folder's JPEG/PNG files, one per name: of ``a.jpg`` and ``a.png`` the first by
    file name is kept, with a warning (photos are known by name)."""
    if not path.is_dir():
        raise FileNotFoundError(f"--images {path}: no such folder")
    files: dict[str, Path] = {}
    for f in sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        if f.stem in files:
            print(f"soaplab: warning: --images {path}: {files[f.stem].name} and {f.name} share "
                  f"the name {f.stem!r}; using {files[f.stem].name}", file=sys.stderr)
            continue
        files[f.stem] = f
    return list(files.values())


def fingerprint(files: list[Path]) -> str:
    """SHA-256 of the photos' names and bytes: a run folder's record of its data."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()


def _source(images: str | None) -> tuple[dict[str, np.ndarray], list[str], str]:
    """The photos of ``--images``, the names held out for validation (the bundled set's three,
    else every fifth photo by name: the Debian set's names start with their package, so each
    package gives some) and the data's fingerprint. Both parts must hold a photo."""
    if images is None:
        photos = _bundled()
        return photos, [n for n in sorted(photos) if n in VALIDATION], BUNDLED
    if images == "debian":
        from soaplab.experiments.data.debian_photos import FOLDER, MAKE_HINT

        if not FOLDER.is_dir():
            raise FileNotFoundError(f"--images debian: no photos in {FOLDER}; {MAKE_HINT}")
    files = _files(FOLDER if images == "debian" else Path(images))
    if len(files) < 5:
        raise FileNotFoundError(f"--images {images}: need at least 5 JPEG/PNG photos (every "
                                f"fifth is held out for validation), found {len(files)}")
    photos = {f.stem: _read(f) for f in files}
    return photos, sorted(photos)[4::5], fingerprint(files)


def to_lab(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8/float image -> (3, H, W) tensor: L/100 - 0.5 and ab/110, roughly in [-1, 1]."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb[..., :3])
    scaled = np.stack([lab[..., 0] / 100 - 0.5, lab[..., 1] / 110, lab[..., 2] / 110])
    return torch.from_numpy(scaled).float()


def _at(rgb: np.ndarray, short_side: int) -> torch.Tensor:
    """The photo resized (Lanczos, by PIL: skimage's rescale takes seconds a photo) to this
    short side, in scaled Lab."""
    from PIL import Image

    h, w = rgb.shape[:2]
    size = (round(w * short_side / min(h, w)), round(h * short_side / min(h, w)))
    image = Image.fromarray(np.asarray(rgb[..., :3], dtype=np.uint8))
    return to_lab(np.asarray(image.resize(size, Image.Resampling.LANCZOS)) / 255.0)


@dataclass
class PhotoSet:
    """Training photos (scaled Lab, one (3, H, W) tensor per photo and scale) and validation
    photos (M, 3, VAL_SIZE, VAL_SIZE)."""

    train: list[torch.Tensor]
    val: torch.Tensor
    train_names: list[str]
    val_names: list[str]
    source: str = BUNDLED  # the fingerprint of the data (see fingerprint)

    @classmethod
    def load(cls, images: str | Path | None = None) -> PhotoSet:
        photos, val_names, source = _source(None if images is None else str(images))
        train_names = [n for n in sorted(photos) if n not in val_names]
        train = [_at(photos[n], side) for n in train_names for side in SCALES]
        val = torch.stack([_at(_square(photos[n]), VAL_SIZE)[:, :VAL_SIZE, :VAL_SIZE]
                           for n in val_names])
        return cls(train, val, train_names, val_names, source)

    def crops(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` random ``size``-square crops (N, 3, size, size): each from a random photo and
        scale, at a random place, flipped left-right half the time."""
        out = []
        for i in torch.randint(len(self.train), (n,), generator=gen).tolist():
            image = self.train[i]
            top, left = (int(torch.randint(d - size + 1, (1,), generator=gen))
                         for d in image.shape[1:])
            crop = image[:, top:top + size, left:left + size]
            out.append(crop.flip(-1) if torch.rand(1, generator=gen) < 0.5 else crop)
        return torch.stack(out)


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
