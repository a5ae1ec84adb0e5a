"""Numerics faithful to the original releases: DINOv2 against the original code (dinov2 0.0.1, the
April 2023 release on PyPI) and ViT/DeiT against timm (the original JAX/DeiT LayerNorm eps 1e-6),
with scrambled weights at full size."""

import pytest
import torch

import backbone_sdk as bs
from _frameworks import require
from conftest import scramble

RTOL = 1e-5


def _relative(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", [n for n in bs.list_backbones(include_test=False) if bs.get_spec(n).family == "vit"])
def test_published_vit_deit_dino_specs_use_the_original_layer_norm_eps(name):
    assert bs.get_spec(name).config.layer_norm_eps == 1e-6


@pytest.mark.slow
@pytest.mark.parametrize(("ours", "theirs"), [("vit_base_patch16_224", "vit_base_patch16_224"),
                                               ("deit_small_distilled_patch16_224", "deit_small_distilled_patch16_224")])
def test_vit_and_deit_match_timm_at_full_size(ours, theirs):
    timm = require("timm")
    ref = scramble(timm.create_model(theirs, pretrained=False, num_classes=0).eval())
    model = bs.create_backbone(ours, weights=ref.state_dict()).eval()
    assert model.load_report.exact, model.load_report
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        got = model.embed(x)
    assert _relative(got, expected) <= RTOL, _relative(got, expected)


@pytest.fixture(scope="module")
def original_vits14():
    """The original release's ViT-S/14 (as its hub entry builds it), with scrambled weights
    including a non-smooth position table."""
    vt = require("dinov2.models.vision_transformer")
    ref = vt.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()
    scramble(ref)
    with torch.no_grad():
        ref.pos_embed.add_(torch.randn(ref.pos_embed.shape, generator=torch.Generator().manual_seed(5)) * 0.5)
    model = bs.create_backbone("dinov2_vits14", weights=ref.state_dict()).eval()
    assert model.load_report.format == "dinov2" and model.load_report.exact, model.load_report
    return ref, model


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (518, 518), (224, 336)])
def test_dinov2_matches_the_original_release(original_vits14, size):
    ref, model = original_vits14
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = ref.forward_features(x)
        emb, tok = model.embed(x), model.tokens(x, norm=True)
    assert (emb - out["x_norm_clstoken"]).abs().max() <= 1e-4
    assert (tok.patches - out["x_norm_patchtokens"]).abs().max() <= 1e-4


@pytest.mark.slow
def test_dinov2_exact_grid_resampling_is_an_explicit_option(original_vits14):
    """transformers/timm's exact-grid resampling differs from the release at 224 and is opt-in."""
    ref, model = original_vits14
    exact = bs.create_backbone("dinov2_vits14", weights=ref.state_dict(), pos_embed_offset=0.0).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = ref.forward_features(x)
        assert (exact.embed(x) - out["x_norm_clstoken"]).abs().max() > 1e-3
        assert (model.embed(x) - out["x_norm_clstoken"]).abs().max() <= 1e-4
