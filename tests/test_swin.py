"""Swin: parity with transformers' SwinModel and timm (scrambled weights), any input size, checkpoints."""

import re

import pytest
import torch

import backbone_sdk as bs
from _frameworks import require
from conftest import scramble

DEPTHS = (2, 2, 2, 2)  # two blocks per stage: every stage has a shifted block, stage 4 (map == window) unshifted


def _ours(**overrides):
    return bs.create_backbone("swin_test", depths=DEPTHS, **overrides).eval()


def _reference(config, state=None):
    """A fresh SwinModel: its forward rewrites the layers' shift sizes, so never reuse one across sizes."""
    from transformers import SwinModel

    ref = SwinModel(config).eval()
    if state is None:
        scramble(ref)
    else:
        ref.load_state_dict(state, strict=False)  # strict=False: only the non-persistent pooler differs
    return ref


def _reference_outputs(ref, x):
    with torch.no_grad():
        out = ref(x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    stage4 = out.last_hidden_state.transpose(1, 2).reshape(x.shape[0], -1, *out.reshaped_hidden_states[4].shape[-2:])
    return [*out.reshaped_hidden_states[1:4], stage4], out.pooler_output


def _assert_matches(model, ref, x):
    maps, pooled = _reference_outputs(ref, x)
    with torch.no_grad():
        feats, emb = model.features(x), model.embed(x)
    for i, expected in enumerate(maps):
        torch.testing.assert_close(feats[f"stage{i + 1}"], expected, rtol=0, atol=1e-4, msg=f"stage{i + 1}")
    torch.testing.assert_close(emb, pooled, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (70, 90), (96, 64)])
def test_matches_transformers_swinmodel(size):
    model = _ours()
    ref = _reference(model.model.config)
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "transformers" and report.exact
    _assert_matches(model, ref, torch.randn(2, 3, *size))


def test_stage4_is_final_normed_and_stages_1_3_are_raw():
    model = _ours()
    ref = _reference(model.model.config)
    bs.load_weights(model, ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = ref(x, output_hidden_states=True, output_hidden_states_before_downsampling=True).reshaped_hidden_states
        feats = model.features(x)
    assert (feats["stage4"] - raw[4]).abs().max() > 0.1  # the final LayerNorm is really applied
    torch.testing.assert_close(feats["stage3"], raw[3], rtol=0, atol=0)


def test_classification_and_legacy_transformers_layouts():
    from transformers import SwinForImageClassification

    model = _ours()
    clf = scramble(SwinForImageClassification(model.model.config).eval())
    state = clf.state_dict()
    assert any(k.startswith("swin.") for k in state) and "classifier.weight" in state
    assert bs.load_weights(model, state).exact
    # transformers 4.x names, as many hub checkpoints still store them
    names = {"q": "query", "k": "key", "v": "value"}
    legacy = [(r"attention\.(q|k|v)_proj", lambda m: "attention.self." + names[m.group(1)]),
              (r"attention\.relative_position_bias\.", "attention.self."),
              (r"attention\.o_proj", "attention.output.dense"),
              (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense")]
    old = {}
    for key, value in clf.swin.state_dict().items():
        for pattern, repl in legacy:
            key = re.sub(pattern, repl, key)
        old[key] = value
    assert "encoder.layers.0.blocks.0.attention.self.query.weight" in old
    fresh = _ours()
    report = bs.load_weights(fresh, old)
    assert report.format == "transformers" and report.exact
    _assert_matches(fresh, _reference(model.model.config, clf.swin.state_dict()), torch.randn(1, 3, 64, 64))


def test_transformers_save_pretrained_directory(tmp_path):
    model = _ours()
    ref = _reference(model.model.config)
    ref.save_pretrained(tmp_path)
    loaded = bs.create_backbone("swin_test", weights=str(tmp_path), depths=DEPTHS).eval()
    assert loaded.load_report.exact
    _assert_matches(loaded, ref, torch.randn(1, 3, 64, 64))


def test_results_do_not_depend_on_earlier_calls():
    """SwinModel keeps the shift it picked for a small input; we choose it per call."""
    model = _ours()
    ref = _reference(model.model.config)
    bs.load_weights(model, ref.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        model.features(torch.randn(1, 3, 32, 32))  # every map <= window from stage 3 on: no shift there
        model.features(torch.randn(1, 3, 64, 64))
    _assert_matches(model, _reference(model.model.config, ref.state_dict()), x)


def _timm_swin(img_size=64, window=2):
    timm = require("timm")
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=DEPTHS,
                            num_heads=(1, 1, 2, 2), window_size=window, img_size=img_size, num_classes=10)
    # attn_mask buffers are constants derived from the geometry (not weights): keep them unscrambled
    masks = {k: b.clone() for k, b in ref.named_buffers() if k.endswith("attn_mask")}
    scramble(ref.eval())
    for key, mask in masks.items():
        ref.get_buffer(key).copy_(mask)
    return ref


def _assert_matches_timm(model, ref, x):
    with torch.no_grad():
        maps = ref.forward_intermediates(x, norm=True, intermediates_only=True)
        pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        feats, emb = model.features(x), model.embed(x)
    for i, expected in enumerate(maps):
        torch.testing.assert_close(feats[f"stage{i + 1}"], expected, rtol=0, atol=1e-4, msg=f"stage{i + 1}")
    torch.testing.assert_close(emb, pooled, rtol=0, atol=1e-4)


def test_matches_timm_after_conversion():
    ref = _timm_swin()
    state = ref.state_dict()
    assert "layers.1.downsample.reduction.weight" in state and "layers.0.blocks.0.attn.qkv.weight" in state
    model = bs.create_backbone("swin_test", weights=state, depths=DEPTHS).eval()
    assert model.load_report.format == "timm" and model.load_report.exact
    _assert_matches_timm(model, ref, torch.randn(2, 3, 64, 64))


def test_original_release_layout():
    """Microsoft's release (and timm < 0.9): downsample at the end of stages 0-2, index/mask buffers saved."""
    ref = _timm_swin()
    state = {re.sub(r"^layers\.(\d)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
             for k, v in ref.state_dict().items()}
    state.update({k: v for k, v in ref.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))})
    assert "layers.0.downsample.norm.weight" in state and any(k.endswith("attn_mask") for k in state)
    model = bs.create_backbone("swin_test", weights=state, depths=DEPTHS).eval()
    assert model.load_report.format == "original" and model.load_report.exact
    _assert_matches_timm(model, ref, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (100, 36), (65, 130)])
def test_any_input_size(size):
    model = bs.create_backbone("swin_test").eval()
    h, w = size
    with torch.no_grad():
        feats, emb = model.features(torch.randn(1, 3, h, w)), model.embed(torch.randn(1, 3, h, w))
    for info in model.feature_info:
        assert feats[info.name].shape == (1, info.channels, -(-h // info.stride), -(-w // info.stride)), info
        assert torch.isfinite(feats[info.name]).all()
    assert emb.shape == (1, model.embed_dim)


def test_maps_smaller_than_the_window():
    """transformers' SwinModel raises here (it shrinks the window below its bias table); we pad to one window."""
    model = bs.create_backbone("swin_test", window=4).eval()
    table = model.model.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert table.shape[0] == 49
    with torch.no_grad():
        feats = model.features(torch.randn(1, 3, 32, 40))
    assert feats["stage2"].shape[-2:] == (4, 5) and feats["stage4"].shape[-2:] == (1, 2)


def test_early_stop_skips_later_blocks_and_merges():
    model = bs.create_backbone("swin_test").eval()
    called = set()
    for i, stage in enumerate(model.model.encoder.layers):
        stage.blocks[0].attention.register_forward_hook(lambda *_, i=i: called.add(("attn", i)))
        if stage.downsample is not None:
            stage.downsample.register_forward_hook(lambda *_, i=i: called.add(("merge", i)))
    model.model.layernorm.register_forward_hook(lambda *_: called.add("final_norm"))
    with torch.no_grad():
        out = model.features(torch.randn(1, 3, 64, 64), "stage2")
    assert list(out) == ["stage2"]
    assert called == {("attn", 0), ("attn", 1), ("merge", 0)}


def test_tokens_index_stages():
    model = bs.create_backbone("swin_test").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.features(x)
        for layer, name in [(0, "stage1"), (-3, "stage2"), (-1, "stage4")]:
            tok = model.tokens(x, layer)
            fmap = feats[name]
            assert tok.grid == tuple(fmap.shape[-2:]) and tok.cls is None
            torch.testing.assert_close(tok.patches, fmap.flatten(2).transpose(1, 2), rtol=0, atol=0)
    with pytest.raises(IndexError, match="4 stages"):
        model.tokens(x, 4)


def test_save_load_round_trip_is_exact(tmp_path):
    model = scramble(bs.create_backbone("swin_test")).eval()
    path = bs.save_weights(model, tmp_path / "swin.safetensors")
    loaded = bs.create_backbone("swin_test", weights=str(path)).eval()
    assert loaded.load_report.format == "native" and loaded.load_report.exact
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.embed(x), loaded.embed(x))


def test_wrong_checkpoints_raise():
    with pytest.raises(bs.CheckpointMismatchError) as info:
        bs.create_backbone("swin_test", weights=bs.create_backbone("resnet_test").state_dict())
    assert info.value.missing and info.value.unexpected
    other_window = _timm_swin(img_size=64, window=4).state_dict()  # relative-position tables of another size
    with pytest.raises(bs.CheckpointMismatchError, match="relative_position_bias_table") as info:
        bs.create_backbone("swin_test", weights=other_window, depths=DEPTHS)
    assert info.value.mismatched and not info.value.missing


def test_swin_tiny_on_meta_matches_transformers_parameter_count():
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                        window_size=7)
    with torch.device("meta"):
        ours = bs.create_backbone("swin_tiny_patch4_window7_224")
        ref = SwinModel(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert 27_000_000 < count < 29_000_000  # Swin-T: 28.3M with the classifier, 27.5M without
    assert ours.spec.embed_dim == 768 and [f.channels for f in ours.feature_info] == [96, 192, 384, 768]
