"""SigLIP (Zhai et al. 2023, https://arxiv.org/abs/2303.15343) and SigLIP 2 at fixed resolution
(Tschannen et al. 2025, https://arxiv.org/abs/2502.14786) on transformers' ``SiglipModel``.

SigLIP 2's fixed-resolution ("FixRes") checkpoints have SigLIP's architecture (transformers loads
them into ``SiglipModel`` too); they differ in the text vocabulary (Gemma's 256k tokens) and the
weights. The native-aspect-ratio NaFlex variants are the ``siglip2_naflex`` family
(:mod:`backbone_sdk.plugins.siglip2`).

The image tower is the backbone. It has **no CLS token**: ``tokens()`` returns every patch token
(``Tokens.cls is None``) and a VLM tower built on it never drops a token. Features ``block{i}``
(every block, stride = patch size); a simple feature pyramid; ``embed(images)`` is the output of
the attention-pooling (MAP) head over the final-normed tokens (transformers' ``pooler_output``,
timm's ``forward_head(pre_logits=True)``), ``spec.embed_dim`` = the tower width. Position
embeddings are a learned table for the native grid, resampled bicubically for other sizes: without
antialiasing as transformers does by default, with it (``pos_embed_antialias=True``) as timm does.

The text tower comes along (optional part ``"text"``, as for CLIP): :meth:`SigLIP.embed_text`
pools the **last** position of the sequence (SigLIP was trained on texts padded to
``context_length`` = 64, so token ids must be padded to that length, as :meth:`SigLIP.tokenize`
does), then a linear head to the image embedding width. Image-text logits are *sigmoid* scores
``exp(logit_scale) * cos + logit_bias``; :class:`~backbone_sdk.adapters.zero_shot.ZeroShotClassifier`
uses them when the backbone has a ``logit_bias``.

Tokenizer: no installed wheel ships SigLIP's SentencePiece vocabulary (nor SigLIP 2's Gemma
vocabulary), so :meth:`SigLIP.tokenize` loads a transformers tokenizer: from a directory given to
:meth:`SigLIP.load_tokenizer`, else from the weights directory the model was loaded from, else from
the spec's hub id (the Hugging Face cache, or the network).

so400m/14 "@384": 384 is no multiple of 14. The release's image processor resizes to 384 and its
patch convolution ignores the last 6 pixel rows and columns; the spec says 378 (the 27x27 grid the
position table was trained for). To reproduce that pipeline exactly, resize to 384 and crop
``images[..., :378, :378]``.

Activation: GELU with the tanh approximation in both towers, as the original big_vision models
and transformers. (timm's definitions of the first B/16, L/16 and so400m/14 towers use the exact
GELU; give timm ``act_layer="gelu_tanh"`` to reproduce the released models there.)

Weights: transformers checkpoints (``google/siglip-*`` / ``google/siglip2-*`` hub ids, ``SiglipModel``
and ``SiglipVisionModel`` state dicts, also inside PaliGemma/LLaVA checkpoints as ``vision_tower.``)
and timm's image towers (``vit_*_siglip_*``: fused ``attn.qkv``, ``attn_pool`` = the MAP head),
format ``"timm"``, which hold no text tower: load them without the ``"text"`` part.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingDependencyError, UnsupportedOperationError
from ..hookspecs import hookimpl
from ..specs import BackboneSpec, InputSpec, PrefixTokens, divides, positive
from ._common import (TextCheckpointing, has_keys, hf_model, read_hf_pretrained, rename, split_qkv, strip_prefixes,
                      token_ids)
from ..layers.convert import convert_detected
from ._plainvit import PlainViT, PlainViTConfig

FAMILY = "siglip"
TEXT = "text"
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CONTEXT_LENGTH = 64
VOCAB_V1 = 32_000
VOCAB_I18N = 250_000
VOCAB_V2 = 256_000
# SigLIP's initial temperature and bias (log 10 and -10), as in the paper
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0

__all__ = ["SigLIP", "SigLIPConfig", "build"]


@attrs.frozen(kw_only=True)
class SigLIPConfig(PlainViTConfig):
    """Architecture of a SigLIP / SigLIP 2 (FixRes) variant.

    ``dim``/``depth``/``heads``/``mlp_dim``: image tower; ``text_*``: text tower (its head projects
    ``text_dim`` to ``dim``); ``pos_embed_size``: the image side the position table was trained for (its grid: ``pos_embed_size // patch_size``);
    ``pos_embed_antialias``: antialias when resampling it (transformers: off, timm: on).
    """

    OPTIONAL_PARTS = frozenset({TEXT})

    mlp_dim: int = attrs.field(validator=positive)
    text_dim: int = attrs.field(validator=positive)
    text_depth: int = attrs.field(validator=positive)
    text_heads: int = attrs.field(validator=divides("text_dim"))
    text_mlp_dim: int = attrs.field(validator=positive)
    vocab_size: int = attrs.field(default=VOCAB_V1, validator=positive)
    context_length: int = attrs.field(default=CONTEXT_LENGTH, validator=positive)
    pos_embed_size: int = attrs.field(default=224, validator=positive)
    pos_embed_antialias: bool = False
    layer_norm_eps: float = 1e-6

    def prefix_tokens(self):
        return PrefixTokens()


class SigLIP(TextCheckpointing, PlainViT):
    """transformers ``SiglipModel`` (weights under ``model.``) behind the backbone_sdk interface."""

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        cfg: SigLIPConfig = spec.config
        self.with_text = TEXT in spec.parts
        common = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=cfg.layer_norm_eps)
        vision = dict(hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
                      num_attention_heads=cfg.heads, image_size=cfg.pos_embed_size, patch_size=cfg.patch_size,
                      vision_use_head=True, **common)
        text = dict(hidden_size=cfg.text_dim, intermediate_size=cfg.text_mlp_dim, num_hidden_layers=cfg.text_depth,
                    num_attention_heads=cfg.text_heads, vocab_size=cfg.vocab_size, projection_size=cfg.dim,
                    max_position_embeddings=cfg.context_length, pad_token_id=1, eos_token_id=1, bos_token_id=None,
                    **common)
        self.model = self._build_model(cfg, vision, text)
        with torch.no_grad():
            self.model.logit_scale.fill_(LOGIT_SCALE_INIT)
            self.model.logit_bias.fill_(LOGIT_BIAS_INIT)
        if not self.with_text:
            self.model.text_model = None
            self.model.logit_scale = None
            self.model.logit_bias = None
        self.pos_embed_antialias = cfg.pos_embed_antialias
        self._tokenizer = None
        self._tokenizer_source: str | None = None

    def _build_model(self, cfg, vision: dict, text: dict):
        from transformers import SiglipConfig as HFConfig, SiglipModel

        return hf_model(SiglipModel, HFConfig(vision_config=vision, text_config=text))

    # -- image tower (PlainViT hooks) -----------------------------------------------------------
    @property
    def vision(self) -> nn.Module:
        return self.model.vision_model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vision.encoder.layers

    def pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings ``[1, N, D]`` for ``height x width`` pixel images (bicubic resampling
        of the native table in fp32 when the grid differs; antialias per the config)."""
        table = self.vision.embeddings.position_embedding.weight
        side = math.isqrt(table.shape[0])
        grid = (height // self.patch_size, width // self.patch_size)
        if grid == (side, side):
            return table[None]
        patch = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False, antialias=self.pos_embed_antialias)
        return patch.to(table.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def embed_tokens(self, images):
        proj = self.vision.embeddings.patch_embedding
        x = proj(images.to(proj.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.pos_embed(images.shape[-2], images.shape[-1])

    def call_block(self, x, block):
        return block(x, None)

    def final_norm(self, x):
        return self.vision.post_layernorm(x)

    def stem(self):
        return self.vision.embeddings

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The MAP head's pooled embedding ``[B, dim]`` (not normalized)."""
        return self.vision.head(self.last_hidden_state(images))

    # -- text tower ---------------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter | None:
        """Learned log temperature (``None`` without the text tower)."""
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """Learned bias of the sigmoid logits ``exp(logit_scale) * cos + logit_bias`` (``None`` without text)."""
        return self.model.logit_bias

    @property
    def context_length(self) -> int:
        return self.spec.config.context_length

    def load_tokenizer(self, source) -> None:
        """Use the transformers tokenizer in ``source`` (a directory with tokenizer files, a hub id, or a
        tokenizer object) for :meth:`tokenize`."""
        if isinstance(source, str):
            self._tokenizer, self._tokenizer_source = None, source
        else:
            self._tokenizer = source

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self._tokenizer_source or self.spec.hub_id
            if source is None:
                raise UnsupportedOperationError(
                    f"{self.spec.name} has no tokenizer: give one with model.load_tokenizer(directory), or pass token ids")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as err:
                raise MissingDependencyError(
                    f"could not load the tokenizer of {self.spec.name} from {source!r} ({err}). No installed package "
                    "ships SigLIP's vocabulary: download it once (e.g. `huggingface-cli download "
                    f"{self.spec.hub_id or '<hub id>'}`) or pass a directory with its tokenizer files to "
                    "model.load_tokenizer(directory); token ids work without a tokenizer."
                ) from err
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, context_length]``: truncated and padded to ``context_length`` as SigLIP was trained."""
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return out["input_ids"]

    def embed_text(self, texts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Text embeddings ``[B, dim]`` (not normalized): the last position through the text head.

        ``texts``: strings (tokenized with :meth:`tokenize`) or token ids ``[B, L]``, ``L <= context_length``
        (padded to ``context_length`` as SigLIP was trained: the last position is pooled).
        """
        if not self.with_text:
            raise UnsupportedOperationError(f"{self.spec.name} was created without its text tower (parts="
                                            f"{sorted(self.spec.parts)}); create it with parts including 'text'")
        tokens = token_ids(self.spec.name, texts, self.context_length, self.tokenize)
        text = self.model.text_model
        return text(input_ids=tokens.to(text.head.weight.device)).pooler_output

    # -- weights and training support -------------------------------------------------------------
    def read_pretrained(self, directory):
        state = read_hf_pretrained(self.model, directory)
        if (state is not None and self._tokenizer is None and self._tokenizer_source is None
                and any((Path(directory) / name).is_file() for name in _TOKENIZER_FILES)):
            self._tokenizer_source = str(directory)  # a saved model directory often holds its tokenizer too
        return state

    def no_weight_decay(self) -> set[str]:
        """The position tables, the MAP head's probe, ``logit_scale`` and ``logit_bias``."""
        extra = {"model.vision_model.head.probe"}
        if self.with_text:
            extra |= {"model.text_model.embeddings.position_embedding.weight", "model.logit_scale", "model.logit_bias"}
        return super().no_weight_decay() | extra


def build(spec: BackboneSpec) -> SigLIP:
    return SigLIP(spec)


# tower: (dim, depth, heads, mlp_dim); the text towers of B/L/so400m equal their image towers
#: files whose presence marks a directory as holding a transformers tokenizer
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")
_B = (768, 12, 12, 3072)
_L = (1024, 24, 16, 4096)
_SO400M = (1152, 27, 16, 4304)
_GIANT_OPT = (1536, 40, 16, 6144)
_SIZE_NAMES = {_B: "base", _L: "large", _SO400M: "so400m", _GIANT_OPT: "giant-opt"}
_SHORT = {_B: "vitb", _L: "vitl", _SO400M: "so400m", _GIANT_OPT: "giantopt"}

# (version, image tower, text tower, patch, resolution, vocabulary, hub suffix)
_VARIANTS = [
    *[(1, _B, _B, 16, r, VOCAB_V1, "") for r in (224, 256, 384, 512)],
    (1, _B, _B, 16, 256, VOCAB_I18N, "-multilingual"),
    *[(1, _L, _L, 16, r, VOCAB_V1, "") for r in (256, 384)],
    *[(1, _SO400M, _SO400M, 14, r, VOCAB_V1, "") for r in (224, 384)],
    (1, _SO400M, _SO400M, 16, 256, VOCAB_I18N, "-i18n"),
    *[(2, _B, _B, 16, r, VOCAB_V2, "") for r in (224, 256, 384, 512)],
    (2, _B, _B, 32, 256, VOCAB_V2, ""),
    *[(2, _L, _L, 16, r, VOCAB_V2, "") for r in (256, 384, 512)],
    *[(2, _SO400M, _SO400M, 14, r, VOCAB_V2, "") for r in (224, 384)],
    *[(2, _SO400M, _SO400M, 16, r, VOCAB_V2, "") for r in (256, 384, 512)],
    *[(2, _GIANT_OPT, _SO400M, 16, r, VOCAB_V2, "") for r in (256, 384)],
]


def make_spec(name, vision, text, patch, res, vocab, *, hub_id=None, description="", test=False, neck=256,
              context_length=CONTEXT_LENGTH) -> BackboneSpec:
    dim, depth, heads, mlp = vision
    tdim, tdepth, theads, tmlp = text
    res = res // patch * patch  # so400m/14 "@384": the 27x27 grid of 378 pixels (see the module notes)
    config = SigLIPConfig(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, patch_size=patch, text_dim=tdim,
                          text_depth=tdepth, text_heads=theads, text_mlp_dim=tmlp, vocab_size=vocab,
                          context_length=context_length, pos_embed_size=res, neck_channels=neck)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=SIGLIP_MEAN, std=SIGLIP_STD, image_size=res, crop_pct=1.0),
        hub_id=hub_id, is_test=test, capabilities={TEXT}, description=description,
    )


def _name(version, vision, patch, res, suffix):
    tag = {"-multilingual": "_i18n", "-i18n": "_i18n"}.get(suffix, "")
    return f"siglip{'2' if version == 2 else ''}_{_SHORT[vision]}{patch}_{res}{tag}"


@hookimpl
def register_backbones(registry):
    for version, vision, text, patch, res, vocab, suffix in _VARIANTS:
        prefix = "siglip2" if version == 2 else "siglip"
        hub = f"google/{prefix}-{_SIZE_NAMES[vision]}-patch{patch}-{res}{suffix}"
        label = "SigLIP 2" if version == 2 else "SigLIP"
        registry.add(make_spec(
            _name(version, vision, patch, res, suffix), vision, text, patch, res, vocab, hub_id=hub,
            description=f"{label} {_SIZE_NAMES[vision]}/{patch} @{res}" + (" multilingual" if suffix else ""),
        ))
    registry.add(make_spec("siglip_test", (32, 2, 2, 64), (32, 2, 2, 64), 8, 32, 1000, test=True, neck=16,
                           context_length=16, description="tiny SigLIP for tests"))


# -- checkpoint conversion -------------------------------------------------------------------------
_TIMM_RULES = [
    (r"^patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^blocks\.(\d+)\.norm(1|2)\.", r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"model.vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^norm\.", "model.vision_model.post_layernorm."),
    (r"^attn_pool\.latent$", "model.vision_model.head.probe"),
    (r"^attn_pool\.proj\.", "model.vision_model.head.attention.out_proj."),
    (r"^attn_pool\.norm\.", "model.vision_model.head.layernorm."),
    (r"^attn_pool\.mlp\.", "model.vision_model.head.mlp."),
]
_TEXT_KEYS = ("model.text_model.", "model.logit_scale", "model.logit_bias")


def convert_timm(state):
    """timm ``vit_*_siglip_*`` image tower -> native keys (``attn_pool.q`` + ``kv`` = the head's ``in_proj``)."""
    state = {k: v[0] if k == "pos_embed" else v for k, v in state.items()}
    for kind in ("weight", "bias"):
        q, kv = state.pop(f"attn_pool.q.{kind}", None), state.pop(f"attn_pool.kv.{kind}", None)
        if q is not None and kv is not None:
            state[f"model.vision_model.head.attention.in_proj_{kind}"] = torch.cat([q, kv], dim=0)
    state = rename(state, _TIMM_RULES, drop=[r"^head\.", r"^fc_norm\."])
    return split_qkv(state, "qkv")


def convert_transformers(state):
    """``SiglipModel`` / ``SiglipVisionModel`` state dicts (bare, or inside a PaliGemma/LLaVA checkpoint)."""
    state = strip_prefixes(state, ["model.vision_tower.", "vision_tower.", "siglip."])
    if has_keys(state, "embeddings.patch_embedding."):  # a bare vision model
        state = {f"vision_model.{k}": v for k, v in state.items()}
    return {f"model.{k}": v for k, v in state.items()
            if k.startswith(("vision_model.", "text_model.", "logit_")) and not k.endswith(".position_ids")}


def detect_format(state) -> str | None:
    if has_keys(state, "patch_embed.proj.", "blocks.0.attn.qkv.", "attn_pool."):
        return "timm"
    keys = strip_prefixes(state, ["model.vision_tower.", "vision_tower.", "siglip."])
    if has_keys(keys, "vision_model.embeddings.patch_embedding.") or has_keys(keys, "embeddings.patch_embedding.",
                                                                              "head.probe"):
        return "transformers"
    return None


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    done = convert_detected(state_dict, source_format, detect_format(state_dict),
                            {"timm": convert_timm, "transformers": convert_transformers})
    return without_text(spec, done)


def without_text(spec, done):
    """Drop the text tower's keys from a conversion result when the spec was built without ``"text"``."""
    if done is None or TEXT in spec.parts:
        return done
    converted, fmt = done
    return {k: v for k, v in converted.items() if not k.startswith(_TEXT_KEYS)}, fmt
