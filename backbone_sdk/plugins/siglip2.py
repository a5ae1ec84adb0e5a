"""SigLIP 2 NaFlex (Tschannen et al. 2025, https://arxiv.org/abs/2502.14786) on transformers'
``Siglip2Model``: images at their native aspect ratio, as many patches as a token budget allows.

Same towers as SigLIP (:mod:`backbone_sdk.plugins.siglip`: no CLS token, MAP-head ``embed``, text
tower pooling the last position, sigmoid logits) with two differences: the patch embedding is a
linear layer on flattened ``(row, column, channel)`` patches, and the 16x16 position table is
resized to every image's own patch grid (bilinear with antialiasing).

Two ways in:

* the common interface on a ``[B, 3, H, W]`` batch (H and W multiples of the patch size, every
  image the same size): ``features`` (``block{i}``, stride 16), ``pyramid``, ``embed``, ``tokens``;
* variable-size batches: :meth:`SigLIP2NaFlex.naflex_inputs` resizes each image (PIL, ``uint8``
  arrays/tensors or float ``[3, H, W]`` tensors in 0-1) to the largest patch grid of its aspect ratio
  within ``max_num_patches``, normalizes, patchifies and pads them into a :class:`NaFlexBatch`;
  :meth:`SigLIP2NaFlex.naflex_tokens` and :meth:`SigLIP2NaFlex.naflex_embed` run it with the padding
  masked out of attention, and ``Tokens.mask`` says which tokens are real.

Weights: transformers checkpoints (``google/siglip2-*-naflex``; ``Siglip2Model`` / ``Siglip2VisionModel``
state dicts) and timm's ``naflexvit_*_siglip`` towers (format ``"timm"``, image tower only).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputShapeError
from ..hookspecs import hookimpl
from ..specs import BackboneSpec, InputSpec, Tokens, positive
from . import siglip
from ..layers.convert import convert_detected
from ._common import has_keys, hf_model, run

FAMILY = "siglip2_naflex"
TEXT = siglip.TEXT
POS_GRID = 16  # the released models' position table: 16x16 (256 patches)

__all__ = ["NaFlexBatch", "SigLIP2Config", "SigLIP2NaFlex", "build", "naflex_size"]


@attrs.frozen(kw_only=True)
class SigLIP2Config(siglip.SigLIPConfig):
    """A SigLIP 2 NaFlex variant: SigLIP's fields, a ``pos_grid x pos_grid`` position table and the
    default token budget ``max_num_patches``."""

    pos_grid: int = attrs.field(default=POS_GRID, validator=positive)
    max_num_patches: int = attrs.field(default=256, validator=positive)
    vocab_size: int = attrs.field(default=siglip.VOCAB_V2, validator=positive)


@attrs.frozen
class NaFlexBatch:
    """Patchified, padded images: ``pixel_values [B, N, p*p*3]`` (patches in row-major order, each
    flattened as ``(row, column, channel)``), ``spatial_shapes [B, 2]`` (each image's patch grid) and
    ``mask [B, N]`` (``True`` for real patches)."""

    pixel_values: torch.Tensor
    spatial_shapes: torch.Tensor
    mask: torch.Tensor

    def to(self, *args, **kwargs) -> "NaFlexBatch":
        return NaFlexBatch(self.pixel_values.to(*args, **kwargs), self.spatial_shapes.to(kwargs.get("device")),
                           self.mask.to(kwargs.get("device")))


def naflex_size(height: int, width: int, patch: int, max_num_patches: int) -> tuple[int, int]:
    """Target ``(H, W)`` in pixels (multiples of ``patch``) keeping the aspect ratio with at most
    ``max_num_patches`` patches: the largest scale whose rounded-up grid fits, found by bisection
    (to a relative precision of 1e-5, as SigLIP 2's image processor does)."""
    def side(scale, size):
        return max(patch, math.ceil(size * scale / patch) * patch)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        mid = (low + high) / 2
        if (side(mid, height) // patch) * (side(mid, width) // patch) <= max_num_patches:
            low = mid
        else:
            high = mid
    return side(low, height), side(low, width)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]``, each patch flattened as (row, column, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class SigLIP2NaFlex(siglip.SigLIP):
    """transformers ``Siglip2Model`` (weights under ``model.``) behind the backbone_sdk interface."""

    def _build_model(self, cfg, vision, text):
        from transformers import Siglip2Config as HFConfig, Siglip2Model

        vision = {k: v for k, v in vision.items() if k != "image_size"}
        return hf_model(Siglip2Model, HFConfig(vision_config=dict(vision, num_patches=cfg.pos_grid ** 2),
                                               text_config=text))

    # -- embeddings --------------------------------------------------------------------------------
    def _table(self) -> torch.Tensor:
        table = self.vision.embeddings.position_embedding.weight
        side = self.spec.config.pos_grid
        return table.reshape(1, side, side, -1).permute(0, 3, 1, 2)

    def pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings ``[1, N, D]`` for a ``height x width`` pixel image (bilinear, antialiased)."""
        return self._grid_pos(height // self.patch_size, width // self.patch_size)

    def _grid_pos(self, rows: int, cols: int) -> torch.Tensor:
        table = self._table()
        resized = F.interpolate(table.float(), size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
        return resized.to(table.dtype).flatten(2).transpose(1, 2)

    def embed_tokens(self, images):
        proj = self.vision.embeddings.patch_embedding
        x = proj(patchify(images, self.patch_size).to(proj.weight.dtype))
        return x + self.pos_embed(images.shape[-2], images.shape[-1])

    def _naflex_embed_tokens(self, batch: NaFlexBatch) -> torch.Tensor:
        proj = self.vision.embeddings.patch_embedding
        x = proj(batch.pixel_values.to(proj.weight.dtype))
        pos = torch.zeros_like(x)
        tables: dict[tuple[int, int], torch.Tensor] = {}  # one resize per distinct grid of the batch
        for i, (rows, cols) in enumerate(batch.spatial_shapes.tolist()):
            if (rows, cols) not in tables:
                tables[rows, cols] = self._grid_pos(rows, cols)[0]
            pos[i, : rows * cols] = tables[rows, cols]
        return x + pos

    # -- NaFlex batches ----------------------------------------------------------------------------
    def naflex_inputs(self, images: Sequence[Any], max_num_patches: int | None = None) -> NaFlexBatch:
        """Resize (bilinear, antialiased), normalize, patchify and pad images of any sizes into one batch.

        ``images``: PIL images, ``uint8`` ``[H, W, 3]`` arrays / ``[3, H, W]`` tensors, or float ``[3, H, W]``
        tensors in 0-1. ``max_num_patches`` (default: the spec's) bounds each image's patch count and
        is the padded length ``N``.
        """
        budget = max_num_patches or self.spec.config.max_num_patches
        if budget < 1:
            raise ValueError(f"max_num_patches must be positive, got {budget}")
        items = [images] if not isinstance(images, (list, tuple)) else list(images)
        if not items:
            raise ValueError("naflex_inputs() got no images")
        p = self.patch_size
        mean = torch.tensor(self.spec.input.mean).view(3, 1, 1)
        std = torch.tensor(self.spec.input.std).view(3, 1, 1)
        rows, shapes = [], []
        for item in items:
            img = _as_float_chw(item)
            h, w = naflex_size(img.shape[-2], img.shape[-1], p, budget)
            img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
            rows.append(patchify(((img - mean) / std)[None], p)[0])
            shapes.append((h // p, w // p))
        pixels = torch.zeros(len(rows), budget, p * p * 3)
        mask = torch.zeros(len(rows), budget, dtype=torch.bool)
        for i, r in enumerate(rows):
            pixels[i, : len(r)], mask[i, : len(r)] = r, True
        ref = next(self.parameters())
        return NaFlexBatch(pixels.to(ref.device, ref.dtype), torch.tensor(shapes, device=ref.device), mask.to(ref.device))

    def _run_naflex(self, batch: NaFlexBatch, upto: int) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        if not isinstance(batch, NaFlexBatch):
            raise TypeError(f"expected a NaFlexBatch (from model.naflex_inputs(images)), got {type(batch).__name__}")
        with self.trunk_context():
            x = self._naflex_embed_tokens(batch)
            mask = create_bidirectional_mask(config=self.vision.config, inputs_embeds=x, attention_mask=batch.mask)
            for block in self.blocks[: upto + 1]:
                x = run(lambda h, blk: blk(h, mask), x, self.grad_checkpointing, block, owner=block)
        return x

    def naflex_tokens(self, batch: NaFlexBatch, layer: int = -1, norm: bool = False) -> Tokens:
        """Tokens ``[B, N, D]`` after block ``layer`` (padding positions included; ``Tokens.mask`` marks the
        real ones, ``Tokens.grids`` gives each image's patch grid)."""
        x = self._run_naflex(batch, self.layer_index(layer))
        if norm:
            x = self.final_norm(x)
        grids = [tuple(g) for g in batch.spatial_shapes.tolist()]
        return Tokens(patches=x, grid=grids[0] if len(set(grids)) == 1 else None, mask=batch.mask, grids=grids)

    def naflex_embed(self, batch: NaFlexBatch) -> torch.Tensor:
        """The MAP head's embedding ``[B, dim]`` over each image's real patches."""
        x = self.final_norm(self._run_naflex(batch, len(self.blocks) - 1))
        return self.vision.head(x, batch.mask)


def _as_float_chw(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        t = image
    else:
        arr = np.array(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputShapeError(f"expected an RGB image [H, W, 3], got an array of shape {arr.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if t.dim() != 3 or t.shape[0] != 3:
        raise InputShapeError(f"expected an image tensor [3, H, W], got {tuple(t.shape)}")
    return t.float() / 255.0 if not t.is_floating_point() else t.float()


def build(spec: BackboneSpec) -> SigLIP2NaFlex:
    return SigLIP2NaFlex(spec)


# name: (image tower, text tower, hub id)
_VARIANTS = {
    "siglip2_vitb16_naflex": (siglip._B, siglip._B, "google/siglip2-base-patch16-naflex"),
    "siglip2_so400m16_naflex": (siglip._SO400M, siglip._SO400M, "google/siglip2-so400m-patch16-naflex"),
}


def make_spec(name, vision, text, *, patch=16, pos_grid=POS_GRID, vocab=siglip.VOCAB_V2, hub_id=None,
              description="", test=False, neck=256, context_length=siglip.CONTEXT_LENGTH) -> BackboneSpec:
    dim, depth, heads, mlp = vision
    tdim, tdepth, theads, tmlp = text
    config = SigLIP2Config(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, patch_size=patch, text_dim=tdim,
                           text_depth=tdepth, text_heads=theads, text_mlp_dim=tmlp, vocab_size=vocab,
                           context_length=context_length, pos_grid=pos_grid, max_num_patches=pos_grid ** 2,
                           pos_embed_size=pos_grid * patch, neck_channels=neck)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=siglip.SIGLIP_MEAN, std=siglip.SIGLIP_STD, image_size=pos_grid * patch, crop_pct=1.0,
                        interpolation="bilinear"),
        hub_id=hub_id, is_test=test, capabilities={TEXT}, description=description,
    )


@hookimpl
def register_backbones(registry):
    for name, (vision, text, hub) in _VARIANTS.items():
        size = "so400m" if vision == siglip._SO400M else "base"
        registry.add(make_spec(name, vision, text, hub_id=hub, description=f"SigLIP 2 {size}/16 NaFlex"))
    registry.add(make_spec("siglip2_naflex_test", (32, 2, 2, 64), (32, 2, 2, 64), patch=8, pos_grid=4, vocab=1000,
                           test=True, neck=16, context_length=16, description="tiny SigLIP 2 NaFlex for tests"))


# -- checkpoint conversion -------------------------------------------------------------------------
def convert_timm(state):
    """timm ``naflexvit_*_siglip`` tower -> native keys (``embeds.proj`` is the linear patch embedding)."""
    state = dict(state)
    pos = state.pop("embeds.pos_embed", None)
    if pos is not None:
        state["pos_embed"] = pos.reshape(1, -1, pos.shape[-1])
    state = {("patch_embed.proj." + k[len("embeds.proj."):] if k.startswith("embeds.proj.") else k): v
             for k, v in state.items()}
    return siglip.convert_timm(state)


def detect_format(state) -> str | None:
    if has_keys(state, "embeds.proj.", "blocks.0.attn.qkv.", "attn_pool."):
        return "timm"
    fmt = siglip.detect_format(state)
    return fmt if fmt == "transformers" else None


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    done = convert_detected(state_dict, source_format, detect_format(state_dict),
                            {"timm": convert_timm, "transformers": siglip.convert_transformers})
    return siglip.without_text(spec, done)
