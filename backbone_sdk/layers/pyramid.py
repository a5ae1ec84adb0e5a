"""Simple feature pyramid (ViTDet, Li et al. 2022, https://arxiv.org/abs/2203.16527).

Turns the single stride-16 (or 14, 32) map of a plain ViT into maps at strides 4, 8, 16 and 32 with
deconvolutions and pooling. Its parameters are randomly initialized until trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d", "SimpleFeaturePyramid"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _conv_norm(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """``[B, dim, h, w]`` map at any patch stride → ``{"p2".."p5": [B, out_channels, ceil(H/s), ceil(W/s)]}``.

    The input map is first resampled to the stride-16 grid ``ceil(H/16) x ceil(W/16)`` (a no-op
    for patch-16 models), then scaled by 4, 2, 1 and 1/2 as in ViTDet. Map sizes follow the
    convention of strided convolutions (``ceil(H / stride)``, as ResNet and Swin): where ``H`` is not
    a multiple of 16, the up-sampled p2/p3 are resampled to that size (a no-op otherwise).
    """

    def __init__(self, dim: int, out_channels: int = 256):
        super().__init__()
        self.out_channels = out_channels
        half, quarter = dim // 2, dim // 4
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
            nn.ConvTranspose2d(half, quarter, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, half, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.outputs = nn.ModuleList(
            nn.Sequential(_conv_norm(c, out_channels, 1), _conv_norm(out_channels, out_channels, 3))
            for c in (quarter, half, dim, dim)
        )

    def forward(self, x: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        h, w = image_size
        x = _resize(x, (-(-h // 16), -(-w // 16)))
        maps = (_resize(self.up4(x), (-(-h // 4), -(-w // 4))), _resize(self.up2(x), (-(-h // 8), -(-w // 8))),
                x, self.down2(x))
        return {f"p{i + 2}": head(m) for i, (head, m) in enumerate(zip(self.outputs, maps))}


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
