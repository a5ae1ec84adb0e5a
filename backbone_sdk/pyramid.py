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
    """``[B, dim, h, w]`` map at any patch stride → ``{"p2".."p5": [B, out_channels, H/s, W/s]}``.

    The input map is first resampled to the stride-16 grid ``ceil(H/16) x ceil(W/16)`` (a no-op
    for patch-16 models), then scaled by 4, 2, 1 and 1/2 as in ViTDet.
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
        self.down2 = nn.MaxPool2d(2, stride=2)
        self.outputs = nn.ModuleList(
            nn.Sequential(_conv_norm(c, out_channels, 1), _conv_norm(out_channels, out_channels, 3))
            for c in (quarter, half, dim, dim)
        )

    def forward(self, x: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        grid = (-(-image_size[0] // 16), -(-image_size[1] // 16))
        if tuple(x.shape[-2:]) != grid:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        maps = (self.up4(x), self.up2(x), x, self.down2(x))
        return {f"p{i + 2}": head(m) for i, (head, m) in enumerate(zip(self.outputs, maps))}
