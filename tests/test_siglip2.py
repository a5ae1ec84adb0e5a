"""SigLIP 2 NaFlex: parity with transformers' Siglip2Model and timm's NaFlexVit (scrambled weights),
native-aspect batches with padding masks, the image processor's resizing rule, text and logits."""

import numpy as np
import pytest
import torch

import backbone_sdk as bs
from backbone_sdk.adapters.zero_shot import similarity
from backbone_sdk.plugins.siglip2 import NaFlexBatch, naflex_size, patchify
from _frameworks import require
from conftest import scramble

TOL = 1e-4
NAME = "siglip2_naflex_test"
SIZES = [(32, 32), (48, 48), (32, 48), (64, 16)]


def _max(a, b):
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def hf_pair():
    from transformers import Siglip2Model

    torch.manual_seed(0)
    ref = scramble(Siglip2Model(bs.create_backbone(NAME).model.config)).eval()
    model = bs.create_backbone(NAME, weights=ref.state_dict()).eval()
    assert model.load_report.format == "transformers" and model.load_report.exact, model.load_report
    return ref, model


def _full_batch(x, patch=8):
    b, _, h, w = x.shape
    n = (h // patch) * (w // patch)
    return patchify(x, patch), torch.ones(b, n, dtype=torch.long), torch.tensor([[h // patch, w // patch]] * b)


@pytest.mark.parametrize("size", SIZES)
def test_fixed_size_batches_match_transformers(hf_pair, size):
    ref, model = hf_pair
    x = torch.randn(2, 3, *size)
    pixels, mask, shapes = _full_batch(x)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        assert _max(model.embed(x), out.pooler_output) <= TOL
        assert _max(model.tokens(x, norm=True).patches, out.last_hidden_state) <= TOL


def _images(seed=0):
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 90), (64, 20), (33, 33)]]


def test_naflex_batches_match_transformers(hf_pair):
    ref, model = hf_pair
    batch = model.naflex_inputs(_images(), max_num_patches=20)
    assert batch.pixel_values.shape == (3, 20, 8 * 8 * 3)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=batch.pixel_values, pixel_attention_mask=batch.mask.long(),
                               spatial_shapes=batch.spatial_shapes)
        tok = model.naflex_tokens(batch, norm=True)
        emb = model.naflex_embed(batch)
    assert _max(emb, out.pooler_output) <= TOL
    assert torch.equal(tok.mask, batch.mask) and tok.grid is None
    assert tok.grids == [tuple(s) for s in batch.spatial_shapes.tolist()]
    assert _max(tok.patches[tok.mask], out.last_hidden_state[batch.mask]) <= TOL


def test_padding_does_not_change_an_image(hf_pair):
    """An image's embedding and tokens are the same alone and padded in a batch with others."""
    _, model = hf_pair
    images = _images(1)
    with torch.no_grad():
        batch = model.naflex_inputs(images, max_num_patches=20)
        together = model.naflex_embed(batch)
        tok = model.naflex_tokens(batch)
        for i, img in enumerate(images):
            alone_batch = model.naflex_inputs([img], max_num_patches=20)
            n = int(alone_batch.mask.sum())
            tight = NaFlexBatch(alone_batch.pixel_values[:, :n], alone_batch.spatial_shapes, alone_batch.mask[:, :n])
            assert _max(model.naflex_embed(tight)[0], together[i]) <= 1e-5
            assert _max(model.naflex_tokens(tight).patches[0], tok.patches[i, :n]) <= 1e-5


def test_inputs_follow_the_image_processor():
    """Grid sizes, masks and pixels of transformers' Siglip2ImageProcessor (same budget and patch)."""
    from transformers import Siglip2ImageProcessor

    model = bs.create_backbone(NAME)
    images = _images(2)
    proc = Siglip2ImageProcessor(patch_size=8, max_num_patches=20)
    want = proc(images=images, return_tensors="pt")
    got = model.naflex_inputs(images, max_num_patches=20)
    assert torch.equal(got.spatial_shapes, want["spatial_shapes"])
    assert torch.equal(got.mask, want["pixel_attention_mask"].bool())
    # resampling implementations differ by rounding only (PIL/torchvision vs torch)
    assert _max(got.pixel_values[got.mask], want["pixel_values"][got.mask]) <= 2 * 2 / 255


@pytest.mark.parametrize("h, w, budget", [(40, 90, 20), (1000, 10, 16), (7, 7, 256), (300, 200, 256)])
def test_target_size_fits_the_budget(h, w, budget):
    th, tw = naflex_size(h, w, 16, budget)
    assert th % 16 == 0 and tw % 16 == 0 and (th // 16) * (tw // 16) <= budget
    # one patch more along the longer side would exceed the budget or the aspect ratio rule
    assert ((th + 16) // 16) * ((tw + 16) // 16) > budget


@pytest.fixture(scope="module")
def timm_pair():
    timm = require("timm")
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    assert timm.__version__
    torch.manual_seed(0)
    cfg = NaFlexVitCfg(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, act_layer="gelu_tanh",
                       global_pool="map", pos_embed_interp_mode="bilinear", pos_embed_grid_size=(4, 4))
    ref = scramble(NaFlexVit(cfg, num_classes=0, img_size=32)).eval()
    model = bs.create_backbone(NAME, weights=ref.state_dict(), parts=()).eval()
    assert model.load_report.format == "timm" and model.load_report.exact, model.load_report
    return ref, model


@pytest.mark.parametrize("size", SIZES)
def test_image_tower_matches_timm(timm_pair, size):
    ref, model = timm_pair
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        hidden = ref.forward_features(x)
        assert _max(model.tokens(x, norm=True).patches, hidden) <= TOL
        assert _max(model.embed(x), ref.forward_head(hidden, pre_logits=True)) <= TOL


def test_text_and_logits_match_transformers(hf_pair):
    ref, model = hf_pair
    ids = torch.randint(0, 1000, (3, 16))
    x = torch.randn(2, 3, 32, 48)
    pixels, mask, shapes = _full_batch(x)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        assert _max(model.embed_text(ids), ref.get_text_features(input_ids=ids).pooler_output) <= TOL
        assert _max(similarity(model, x, ids), out.logits_per_image) <= TOL


def test_parameter_counts_match_transformers():
    from transformers import Siglip2Model, Siglip2VisionModel

    with torch.device("meta"):
        ours = bs.create_backbone("siglip2_so400m16_naflex", parts=())
        vision = Siglip2VisionModel(ours.model.config.vision_config)
        full = bs.create_backbone("siglip2_so400m16_naflex", parts=("text",))
        ref = Siglip2Model(full.model.config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in vision.parameters())
    assert abs(count - 428.2e6) / 428.2e6 < 0.01, count
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in ref.parameters())


def test_bad_naflex_inputs_are_explained():
    model = bs.create_backbone(NAME)
    with pytest.raises(bs.InputShapeError, match=r"\[H, W, 3\]"):
        model.naflex_inputs([np.zeros((8, 8), dtype=np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        model.naflex_inputs([])
    with pytest.raises(TypeError, match="naflex_inputs"):
        model.naflex_tokens(torch.zeros(1, 3, 32, 32))


def test_docs_siglip_examples_run(capsys):
    """The examples of docs/vlm.md's SigLIP section are self-contained and print what they say."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "vlm.md").read_text()
    section = doc.split("\n## SigLIP and SigLIP 2", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/vlm.md", "exec"), {})
    assert "[(3, 5), (7, 2)] torch.Size([2, 32])" in capsys.readouterr().out
