"""TinyTok: a small plain ViT (CLS + register tokens) written against backbone_sdk's public contract."""

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import backbone_sdk as bs
from backbone_sdk.specs import non_negative, positive


@attrs.frozen(kw_only=True)
class TinyTokConfig(bs.BackboneConfig):
    """Architecture: every field can be overridden, e.g. ``create_backbone("tinytok_s", depth=4)``."""

    dim: int = attrs.field(default=32, validator=positive)
    depth: int = attrs.field(default=2, validator=positive)
    heads: int = attrs.field(default=2, validator=positive)
    patch_size: int = attrs.field(default=8, validator=positive)
    registers: int = attrs.field(default=2, validator=non_negative)

    @property
    def plain(self):  # one stride for every level: blocks, not stages
        return True

    def feature_info(self, input):
        return [bs.FeatureInfo(f"block{i}", self.dim, self.patch_size) for i in range(self.depth)]

    def embedding_dim(self):
        return self.dim

    def prefix_tokens(self):
        return bs.PrefixTokens(cls=True, registers=self.registers)

    def input_spec(self, input):
        p = self.patch_size
        return attrs.evolve(input, patch_size=p, size_divisibility=p, min_size=p)


class Stem(nn.Module):
    """Patch embedding, a position table resampled to the grid, then CLS and register tokens."""

    def __init__(self, cfg: TinyTokConfig):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.dim, 4, 4) * 0.02)
        self.prefix = nn.Parameter(torch.randn(1, 1 + cfg.registers, cfg.dim) * 0.02)

    def forward(self, images):
        x = self.patch(images)
        x = x + F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = x.flatten(2).transpose(1, 2)
        return torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyTok(bs.Backbone):
    def __init__(self, spec):
        super().__init__(spec)  # builds the pyramid neck the spec asks for
        cfg = spec.config
        self.stem = Stem(cfg)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def stem_tokens(self, images):
        return self.stem(images)

    def run_layers(self, images, layers):
        wanted = {self.layer_index(i) for i in layers}
        out = {}
        with self.trunk_context():
            x = self.stem(images)
            for i, block in enumerate(self.blocks[: max(wanted) + 1]):
                x = block(x)
                if i in wanted:
                    out[i] = x
        return out

    def _features(self, images, levels):
        names, n = self.spec.feature_names, self.spec.prefix_tokens.count
        h, w = self.grid(images)
        seqs = self.run_layers(images, [names.index(name) for name in levels])
        return {names[i]: s[:, n:].transpose(1, 2).reshape(s.shape[0], -1, h, w) for i, s in seqs.items()}

    def embed(self, images):
        self.check_images(images)
        last = len(self.blocks) - 1
        return self.norm(self.run_layers(images, [last])[last][:, 0])

    def stage_modules(self):
        return [self.stem, *self.blocks]

    def no_weight_decay(self):
        return {"stem.pos", "stem.prefix"}


@bs.hookimpl
def register_backbones(registry):
    registry.add(bs.BackboneSpec.from_config(
        TinyTokConfig(neck_channels=16), name="tinytok_s", family="tinytok", builder=TinyTok,
        input=bs.InputSpec(image_size=64), description="TinyTok-S/8 (example plugin)"))
