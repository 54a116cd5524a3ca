"""torch-only replicas of timm's ViT and ResNet: timm's parameter names, shapes and metadata
(``pretrained_cfg``, ``no_weight_decay()``), for role tests where timm cannot be imported."""

from __future__ import annotations

import torch
from torch import nn


class _Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), _Mlp(dim)


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class VisionTransformer(nn.Module):
    """timm's ``vit_tiny_patch16_224`` layout, shrunk (img 32, patch 8, depth 2, dim 32)."""

    pretrained_cfg = {"first_conv": "patch_embed.proj", "classifier": "head"}

    def __init__(self, dim: int = 32, depth: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(dim, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*(_Block(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, downsample: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, 4 * width, 1, bias=False),
                                            nn.BatchNorm2d(4 * width))


class ResNet(nn.Module):
    """timm's ``resnet50`` layout, shrunk (one bottleneck per stage, two stages)."""

    pretrained_cfg = {"first_conv": "conv1", "classifier": "fc"}

    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, bias=False), nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(_Bottleneck(width, width, True))
        self.layer2 = nn.Sequential(_Bottleneck(4 * width, 2 * width, True))
        self.fc = nn.Linear(8 * width, classes)


def timm_muon_suitable(p: torch.Tensor) -> bool:
    """timm's ``_is_suitable_for_muon`` (timm/optim/muon.py, 1.0.31, as described in
    shared/reference/integrations.md): at least 2 dims longer than 1, no unit dim in positions
    0/1, shortest side of the flattened matrix at least 4, aspect at most 128."""
    if sum(d > 1 for d in p.shape) < 2 or 1 in p.shape[:2]:
        return False
    rows, cols = p.shape[0], p[0].numel()
    return min(rows, cols) >= 4 and max(rows, cols) / min(rows, cols) <= 128
