"""``make photos``: 46 colour photos from three Debian packages, for ``--images debian``.

``apt-get download`` fetches the packages (about 160 MB; nothing is installed, no dependencies)
and only the photos are unpacked from them, into ``FOLDER``, named ``<package>-<photo>``:
mate-backgrounds' 12 nature photos, 13 of lomiri-wallpapers-16.04's 15 wallpapers (two are
abstract art) and 21 of opencv-doc's sample photos (its colour photographs, less one
painting). See docs/experiments.md for the set and its licences.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FOLDER = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "soaplab" / \
    "photos-debian"
MAKE_HINT = "run `make photos` in the soaplab checkout (apt-get download, about 160 MB)"

# package -> (short name, glob of its photos inside the package, the photos kept)
PACKAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mate-backgrounds": (
        "mate", "./usr/share/backgrounds/mate/nature/*.jpg",
        ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird",
         "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower")),
    "lomiri-wallpapers-16.04": (
        "lomiri", "./usr/share/backgrounds/*_by_*.jpg",
        ("Bridge", "Dragonfly", "Picture_0B", "Picture_1A", "Wine", "aitzgorri", "free",
         "friends", "greentock", "life", "picosdeeuropa", "seeding", "sunset")),
    "opencv-doc": (
        "opencv", "./usr/share/doc/opencv-doc/examples/data/*",
        ("aero1", "aero3", "aloeL", "apple", "baboon", "board", "building", "butterfly",
         "ela_original", "fruits", "graf1", "home", "left", "leuvenA", "licenseplate_motion",
         "messi5", "orange", "rubberwhale1", "smarties", "squirrel_cls", "stuff")),
}


def _keep(member: str, pattern: str, names: tuple[str, ...]) -> str | None:
    """The photo's name (without ``_by_<author>`` or suffix) if this package member is kept."""
    name = Path(member).stem.split("_by_")[0]
    return name if fnmatch.fnmatch(member, pattern) and name in names else None


def _missing(folder: Path, short: str, names: tuple[str, ...]) -> bool:
    return any(not any(folder.glob(f"{short}-{name}.*")) for name in names)


def _unpack(deb: Path, short: str, pattern: str, names: tuple[str, ...], folder: Path) -> int:
    """Stream the package's files (``dpkg --fsys-tarfile``) and write only its photos."""
    with subprocess.Popen(["dpkg", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as dpkg:
        count = 0
        with tarfile.open(fileobj=dpkg.stdout, mode="r|*") as tar:
            for member in tar:
                name = _keep(member.name, pattern, names)
                if name is None or not member.isfile():
                    continue
                target = folder / f"{short}-{name}{Path(member.name).suffix.lower()}"
                partial = target.with_suffix(".partial")
                partial.write_bytes(tar.extractfile(member).read())
                partial.replace(target)  # atomic: a killed run leaves no half photo
                count += 1
    if dpkg.returncode:
        raise RuntimeError(f"dpkg --fsys-tarfile {deb.name} failed")
    return count


def _download(packages: list[str], into: Path) -> None:
    """``apt-get download``; once more after ``apt-get update`` if the lists are stale."""
    def download() -> bool:
        return subprocess.run(["apt-get", "download", *packages], cwd=into).returncode == 0
    if not download() and not (subprocess.run(["apt-get", "update"]).returncode == 0
                               and download()):
        raise RuntimeError(f"apt-get download {' '.join(packages)} failed (see above); "
                           "`apt-get update` needs root")


def install(folder: Path = FOLDER) -> Path:
    """Fill ``folder`` with the photos (packages whose photos are all there are skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = {p: v for p, v in PACKAGES.items() if _missing(folder, v[0], v[2])}
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            _download(list(todo), Path(tmp))
            for package, (short, pattern, names) in todo.items():
                deb = next(Path(tmp).glob(f"{package}_*.deb"))
                got = _unpack(deb, short, pattern, names, folder)
                if got != len(names):
                    raise RuntimeError(f"{deb.name}: found {got} photos, expected {len(names)}")
    return folder


def main() -> int:
    try:
        folder = install()
    except (RuntimeError, FileNotFoundError) as err:  # FileNotFoundError: no apt-get or dpkg
        print(f"make photos: {err}", file=sys.stderr)
        return 1
    print(f"{len(list(folder.iterdir()))} photos in {folder}; use them with "
          "`soaplab compare colorize --images debian`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
