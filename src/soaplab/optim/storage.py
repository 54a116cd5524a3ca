"""How a state entry is kept in memory: the storage options of SOAP's (and Shampoo's) state.

The maths always runs in the working dtype (fp32, or fp64 for fp64 parameters); a *codec*
turns a working-dtype batch (B, ...) into the tensors that are stored, and back:

* ``full``: as it is (the default; no copy either way);
* ``bf16``: rounded to bfloat16 (half the bytes; 8 significant bits);
* ``packed``, ``packed_bf16``: a symmetric d×d factor kept as its upper triangle, d(d+1)/2
  entries (as Distributed Shampoo does), in the working dtype or in bfloat16;
* ``int8``: blocks of 64 consecutive entries of a row as int8 with one fp32 scale each,
  absmax/127: 1 + 4/64 bytes per entry, 0.27 of fp32's. Stored under the key and the
  key + ``_scale``.

Which option applies to which entry is a param group's ``factor_storage`` (the factors L, R),
``basis_storage`` (SOAP's eigenbases) and ``momentum_storage`` (the first moment). The second
moment stays in the working dtype: its small entries set the step size.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from soaplab.optim._checks import check_choice

BLOCK = 64  # entries per int8 scale
OPTIONS = {"factor_storage": ("full", "bf16", "packed", "packed_bf16"),
           "basis_storage": ("full", "bf16", "int8"),
           "momentum_storage": ("full", "bf16")}
_OPTION = {"factor_": "factor_storage", "basis_": "basis_storage", "exp_avg": "momentum_storage"}

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # suffix -> (shape, dtype) per parameter


class Codec:
    """``encode``: working-dtype batch -> {suffix: stored batch}; ``decode``: the inverse (up
    to rounding); ``layout``: what one parameter's stored tensors look like."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.exact = name in ("full", "packed")
        self.low = torch.bfloat16 if name.endswith("bf16") else None
        self.suffixes = ("", "_scale") if name == "int8" else ("",)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> Layout:
        low = self.low or dtype
        if self.name.startswith("packed"):
            d = shape[-1]
            return {"": ((d * (d + 1) // 2,), low)}
        if self.name == "int8":
            return {"": (shape, torch.int8), "_scale": ((*shape[:-1], -(-shape[-1] // BLOCK)),
                                                        torch.float32)}
        return {"": (shape, low)}

    def encode(self, x: Tensor, compact: bool = False) -> dict[str, Tensor]:
        """``compact``: ``x`` is already in the stored layout (a packed triangle)."""
        x = x if compact else self.compact(x)
        if self.name == "int8":
            return _quantize(x)
        return {"": x if self.low is None else x.to(self.low)}

    def decode(self, stored: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        if self.name == "int8":
            return _dequantize(stored[""], stored["_scale"], dtype)
        return self.expand(stored[""].to(dtype))

    def compact(self, x: Tensor) -> Tensor:
        """A working-dtype (B, d, d) batch in the stored layout: its upper triangle if packed."""
        if not self.name.startswith("packed"):
            return x
        return x.flatten(-2).index_select(-1, _triangle(x.shape[-1], x.device)[0])

    def expand(self, y: Tensor) -> Tensor:
        """The inverse of :meth:`compact`."""
        if not self.name.startswith("packed"):
            return y
        d = _side(y.shape[-1])
        return y.index_select(-1, _triangle(d, y.device)[1]).unflatten(-1, (d, d))


_CODECS = {name: Codec(name) for names in OPTIONS.values() for name in names}


def check_options(**options: Any) -> None:
    """ValueError naming the first storage option that is not one of its choices."""
    for name, value in options.items():
        check_choice(name, value, OPTIONS[name])


def codec(group: dict[str, Any], key: str) -> Codec:
    """The codec of state entry ``key`` ("factor_1", "exp_avg", ...) under the group's storage
    options; ``full`` for entries they do not cover."""
    option = _OPTION.get(key.rstrip("0123456789"))
    return _CODECS[group.get(option, "full") if option else "full"]


def layouts(group: dict[str, Any], plan_shape: tuple[int, ...], axes: tuple[int, ...],
            dtype: torch.dtype) -> Layout:
    """Stored key -> (shape, dtype) of one parameter's factors, bases and first moment, for
    working dtype ``dtype``."""
    entries = {"exp_avg": plan_shape}
    for axis in axes:
        d = plan_shape[axis]
        entries |= {f"factor_{axis}": (d, d), f"basis_{axis}": (d, d)}
    return {key + suffix: spec for key, shape in entries.items()
            for suffix, spec in codec(group, key).layout(shape, dtype).items()}


@lru_cache(maxsize=64)
def _triangle(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat indices of the upper triangle of a d×d matrix (row-major), and for each of the
    d² entries the position of its (upper-triangle) value in the packed vector."""
    rows, cols = torch.triu_indices(d, d, device=device)
    pack = rows * d + cols
    where = torch.empty(d, d, dtype=torch.long, device=device)
    positions = torch.arange(pack.numel(), device=device)
    where[rows, cols] = positions
    where[cols, rows] = positions
    return pack, where.flatten()


def _side(packed: int) -> int:
    """d such that d(d+1)/2 = packed."""
    return (int((8 * packed + 1) ** 0.5) - 1) // 2


def _quantize(x: Tensor) -> dict[str, Tensor]:
    d = x.shape[-1]
    blocks = F.pad(x, (0, -d % BLOCK)).unflatten(-1, (-1, BLOCK)).float()
    scale = blocks.abs().amax(-1) / 127
    q = (blocks / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).round_()
    return {"": q.clamp_(-127, 127).to(torch.int8).flatten(-2)[..., :d].contiguous(),
            "_scale": scale}


def _dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    d = q.shape[-1]
    blocks = F.pad(q.to(dtype), (0, -d % BLOCK)).unflatten(-1, (-1, BLOCK))
    return (blocks * scale.to(dtype).unsqueeze(-1)).flatten(-2)[..., :d]
