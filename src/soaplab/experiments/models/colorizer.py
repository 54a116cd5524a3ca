"""A small U-Net that predicts chrominance (Lab a, b) from luminance (L)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU())


class Colorizer(nn.Module):
    """Two down-sampling stages, a bottleneck and two up-sampling stages with skip links."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.down1, self.down2, self.mid = _conv(1, w), _conv(w, 2 * w), _conv(2 * w, 4 * w)
        self.up2, self.up1 = _conv(6 * w, 2 * w), _conv(3 * w, w)
        self.out = nn.Conv2d(w, 2, 1)

    def param_roles(self) -> dict[str, str]:
        """Each parameter's role (see ``soaplab.optim.muon``): the 3x3 kernels between hidden
        layers are the hidden matrices; the first kernel (from the grey input), the output
        layer and the biases are not."""
        def role(name: str) -> str:
            if name.endswith("bias"):
                return "vector"
            return {"down1.0.weight": "input", "out.weight": "head"}.get(name, "hidden")
        return {name: role(name) for name, _ in self.named_parameters()}

    def forward(self, luminance: torch.Tensor) -> torch.Tensor:
        if luminance.dim() != 4 or luminance.shape[1] != 1 or luminance.shape[-1] % 4:
            raise ValueError(f"expected (B, 1, H, W) with H, W divisible by 4, got "
                             f"{tuple(luminance.shape)}")
        d1 = self.down1(luminance)
        d2 = self.down2(F.avg_pool2d(d1, 2))
        m = self.mid(F.avg_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(m, scale_factor=2), d2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2), d1], 1))
        return torch.tanh(self.out(u1))
