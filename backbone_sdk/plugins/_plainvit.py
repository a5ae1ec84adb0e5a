"""Shared machinery of plain (non-hierarchical) ViT families: ViT/DeiT/DINO, DINOv2, CLIP.

A subclass wraps a transformers model and supplies :meth:`embed_tokens` (patch embedding + prefix
tokens + interpolated position embeddings), :attr:`blocks`, :meth:`final_norm`, :meth:`stem` and
:meth:`embed`; blocks that take more than the tokens (RoPE tables) get them from :meth:`block_inputs`.
``block{i}`` features with early stop, ``run_layers``/``tokens()``, gradient checkpointing and
transformers-directory reading live here once; the pyramid neck is the :class:`~backbone_sdk.Backbone` base's.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from ..backbone import Backbone
from ..specs import BackboneConfig, FeatureInfo, PrefixTokens, Tokens, divides, positive
from ._common import read_hf_pretrained, run


def block_features(dim: int, depth: int, patch: int) -> list[FeatureInfo]:
    """``block0..block{depth-1}``: every block's output as a ``[B, dim, H/patch, W/patch]`` map."""
    return [FeatureInfo(f"block{i}", dim, patch) for i in range(depth)]


@attrs.frozen(kw_only=True)
class PlainViTConfig(BackboneConfig):
    """What every plain ViT family's config has: ``dim``, ``depth``, ``heads`` (dividing ``dim``) and
    ``patch_size``; ``block{i}`` levels at stride ``patch_size``, a CLS token, H and W multiples of the patch."""

    dim: int = attrs.field(validator=positive)
    depth: int = attrs.field(validator=positive)
    heads: int = attrs.field(validator=divides("dim"))
    patch_size: int = attrs.field(default=16, validator=positive)

    @property
    def plain(self):
        return True

    def feature_info(self, input):
        return block_features(self.dim, self.depth, self.patch_size)

    def embedding_dim(self):
        return self.dim

    def prefix_tokens(self):
        return PrefixTokens(cls=True)

    def input_spec(self, input):
        p = self.patch_size
        return attrs.evolve(input, patch_size=p, size_divisibility=p, min_size=p)


class PlainViT(Backbone):
    """Base class for single-scale transformer backbones with prefix tokens (CLS, registers...)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.grad_checkpointing = False
        self.patch_size = spec.input.patch_size

    # -- supplied by subclasses ---------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in order (a property: assigning the list would register it twice)."""
        raise NotImplementedError

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, P + N, D]`` token sequence entering the first block."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stem(self) -> nn.Module:
        raise NotImplementedError

    def block_inputs(self, images: torch.Tensor) -> tuple:
        """Extra inputs every block takes besides the tokens (e.g. RoPE tables for this grid),
        computed once per forward and passed to :meth:`call_block` after ``block``; default none."""
        return ()

    def call_block(self, x: torch.Tensor, block: nn.Module, *inputs) -> torch.Tensor:
        return block(x)

    # -- shared implementation ---------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return self.spec.prefix_tokens.count

    def run_blocks(self, images: torch.Tensor, upto: int, keep=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks ``0..upto`` (inclusive); return the last output and those of blocks in ``keep``."""
        kept = {}
        with self.trunk_context():
            x = self.embed_tokens(images)
            inputs = self.block_inputs(images)
            for i, block in enumerate(self.blocks[: upto + 1]):
                x = run(self.call_block, x, self.grad_checkpointing, block, *inputs, owner=block)
                if i in keep:
                    kept[i] = x
        return x, kept

    def run_layers(self, images, layers):
        indices = {self.layer_index(i) for i in layers}
        return self.run_blocks(images, max(indices), keep=indices)[1]

    def stem_tokens(self, images):
        with self.trunk_context():
            return self.embed_tokens(images)

    def to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches = x[:, self.spec.prefix_tokens.count:]
        return patches.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)

    def _features(self, images, levels):
        names = self.spec.feature_names
        indices = [names.index(name) for name in levels]
        _, kept = self.run_blocks(images, max(indices), keep=set(indices))
        grid = self.grid(images)
        return {name: self.to_map(kept[i], grid) for name, i in zip(levels, indices)}

    def tokens(self, images, layer: int = -1, norm: bool = False) -> Tokens:
        """Tokens after block ``layer`` (LLaVA convention: -1 last block, -2 the one before).

        ``norm=True`` applies the model's final LayerNorm (as its ``last_hidden_state`` does).
        """
        index = self.layer_index(layer)
        self.check_images(images)
        x, _ = self.run_blocks(images, index)
        if norm:
            x = self.final_norm(x)
        return self.split_tokens(x, self.grid(images))

    def last_hidden_state(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed token sequence (what the transformers model returns as ``last_hidden_state``)."""
        self.check_images(images)
        x, _ = self.run_blocks(images, len(self.blocks) - 1)
        return self.final_norm(x)

    def stage_modules(self):
        return [self.stem(), *self.blocks]

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def read_pretrained(self, directory):
        return read_hf_pretrained(self.model, directory)

    def no_weight_decay(self) -> set[str]:
        """Position tables and special tokens (CLS, distillation, registers, mask) of the embeddings."""
        stem = {id(p) for p in self.stem().parameters()}
        return {n for n, p in self.named_parameters() if id(p) in stem and not n.endswith(".weight")
                or id(p) in stem and "position" in n}
