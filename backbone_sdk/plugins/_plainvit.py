"""Shared machinery of plain (non-hierarchical) ViT families: ViT/DeiT/DINO, DINOv2, CLIP.

A subclass wraps a transformers model and supplies four things: :meth:`embed_tokens` (patch
embedding + prefix tokens + interpolated position embeddings), :attr:`blocks`, :meth:`final_norm`
and :meth:`embed`. Everything else (``block{i}`` features with early stop, the simple feature
pyramid, ``tokens()``, gradient checkpointing) lives here once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import Backbone
from ..pyramid import SimpleFeaturePyramid
from ..specs import BackboneSpec, FeatureInfo, Tokens
from ._common import run


def block_features(dim: int, depth: int, patch: int) -> list[FeatureInfo]:
    """``block0..block{depth-1}``: every block's output as a ``[B, dim, H/patch, W/patch]`` map."""
    return [FeatureInfo(f"block{i}", dim, patch) for i in range(depth)]


class PlainViT(Backbone):
    """Base class for single-scale transformer backbones with prefix tokens (CLS, registers...)."""

    optional_key_prefixes = ("simple_pyramid.",)
    #: tokens before the patch tokens: CLS first, then ``num_prefix_tokens - 1`` others
    num_prefix_tokens = 1

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        self.grad_checkpointing = False
        self.patch_size = spec.input.patch_size
        if spec.config.get("with_pyramid", True):
            self.simple_pyramid = SimpleFeaturePyramid(spec.embed_dim, spec.config.get("pyramid_channels", 256))
        else:
            self.simple_pyramid = None

    # -- supplied by subclasses ---------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in order (a property: assigning the list would register it twice)."""
        raise NotImplementedError

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, num_prefix_tokens + N, D]`` token sequence entering the first block."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stem(self) -> nn.Module:
        raise NotImplementedError

    def call_block(self, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        return block(x)

    # -- shared implementation ---------------------------------------------------------------
    def run_blocks(self, images: torch.Tensor, upto: int, keep=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks ``0..upto`` (inclusive); return the last output and those of blocks in ``keep``."""
        kept = {}
        with self.trunk_context():
            x = self.embed_tokens(images)
            for i, block in enumerate(self.blocks[: upto + 1]):
                x = run(self.call_block, x, self.grad_checkpointing, block, owner=block)
                if i in keep:
                    kept[i] = x
        return x, kept

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches = x[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)

    def block_index(self, layer: int) -> int:
        depth = len(self.blocks)
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise IndexError(f"{self.spec.name} has {depth} blocks; layer must be in [-{depth}, {depth - 1}], got {layer}")
        return index

    def _features(self, images, levels):
        indices = [int(name[5:]) for name in levels]
        _, kept = self.run_blocks(images, max(indices), keep=set(indices))
        grid = self.grid(images)
        return {name: self.to_map(kept[i], grid) for name, i in zip(levels, indices)}

    def pyramid(self, images):
        """Strides 4-32 from the last block via the simple feature pyramid (trainable, random until trained)."""
        if self.simple_pyramid is None:
            raise RuntimeError(f"{self.spec.name} was created with with_pyramid=False; pyramid() is unavailable")
        last = self.spec.feature_names[-1]
        fmap = self.features(images, last)[last]
        return self.simple_pyramid(fmap, tuple(images.shape[-2:]))

    @property
    def pyramid_channels(self):
        return (self.simple_pyramid.out_channels if self.simple_pyramid is not None else self.spec.embed_dim,) * 4

    def tokens(self, images, layer: int = -1, norm: bool = False) -> Tokens:
        """Tokens after block ``layer`` (LLaVA convention: -1 last block, -2 the one before).

        ``norm=True`` applies the model's final LayerNorm (as its ``last_hidden_state`` does).
        """
        self.check_images(images)
        x, _ = self.run_blocks(images, self.block_index(layer))
        if norm:
            x = self.final_norm(x)
        return self.split_tokens(x, self.grid(images))

    def split_tokens(self, x: torch.Tensor, grid) -> Tokens:
        n = self.num_prefix_tokens
        return Tokens(patches=x[:, n:], grid=grid, cls=x[:, 0], registers=x[:, 1:n] if n > 1 else None)

    def last_hidden_state(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed token sequence (what the transformers model returns as ``last_hidden_state``)."""
        self.check_images(images)
        x, _ = self.run_blocks(images, len(self.blocks) - 1)
        return self.final_norm(x)

    def stage_modules(self):
        return [self.stem(), *self.blocks]

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

