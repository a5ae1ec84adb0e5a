"""ResNet and ViT/DeiT parity with transformers, torchvision and timm (scrambled weights, eval, fp32),
plus save/load round trips, wrong-variant reports and sha256 checks through ``create_backbone``."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import backbone_sdk as bs
from conftest import scramble

ATOL = 1e-4


def close(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL, msg=msg or None)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- ResNet ----------------------------------------------------------------------------------------
def tv_trunk(tv, x):
    """torchvision ResNet up to ``layer4`` and its ``avgpool`` output, flattened."""
    body = torch.nn.Sequential(*list(tv.children())[:-2])
    fmap = body(x)
    return fmap, torch.flatten(tv.avgpool(fmap), 1)


def test_resnet_matches_transformers_resnetmodel():
    from transformers import ResNetModel

    model = bs.create_backbone("resnet_test").eval()
    ref = scramble(ResNetModel(model.model.config).eval())
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "transformers" and report.exact
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        feats, emb = model.features(x), model.embed(x)
    for i, expected in enumerate(out.hidden_states[1:]):
        close(feats[f"stage{i + 1}"], expected, f"stage{i + 1}")
    close(emb, out.pooler_output.flatten(1))


def test_resnet_early_stop_returns_only_requested_stage():
    model = bs.create_backbone("resnet_test").eval()
    calls = []
    model.model.encoder.stages[2].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.features(x, ["stage2"])
        assert list(feats) == ["stage2"] and not calls
        close(feats["stage2"], model.features(x)["stage2"])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_loads_torchvision_file(name, tmp_path):
    import torchvision

    tv = scramble(getattr(torchvision.models, name)().eval())
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = bs.create_backbone(name, weights=tmp_path / "tv.pth").eval()
    assert model.load_report.format == "torchvision" and model.load_report.exact
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap, pooled = tv_trunk(tv, x)
        close(model.features(x, "stage4")["stage4"], fmap)
        close(model.embed(x), pooled)


def test_resnet_loads_torchvision_checkpoint_without_batch_counters(tmp_path):
    """Checkpoints saved before PyTorch 0.4.1 (torchvision's original ImageNet files) have no
    ``num_batches_tracked``; strict loading must still accept them."""
    import torchvision

    tv = scramble(torchvision.models.resnet18().eval())
    old = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    model = bs.create_backbone("resnet18", weights=tmp_path / "old.pth").eval()
    assert model.load_report.exact
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        close(model.embed(x), tv_trunk(tv, x)[1])


def test_resnet50_loads_timm_state_dict():
    import timm

    ref = scramble(timm.create_model("resnet50", num_classes=1000).eval())
    model = bs.create_backbone("resnet50", weights=ref.state_dict(), weights_format="timm").eval()
    assert model.load_report.format == "timm" and model.load_report.exact  # fc.* dropped
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        close(model.features(x, "stage4")["stage4"], ref.forward_features(x))
        close(model.embed(x), ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_resnet_loads_transformers_classification_safetensors(tmp_path):
    from transformers import ResNetForImageClassification

    model = bs.create_backbone("resnet_test")
    clf = scramble(ResNetForImageClassification(model.model.config).eval())
    state = clf.state_dict()
    assert all(k.startswith(("resnet.", "classifier.")) for k in state) and "classifier.1.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    loaded = bs.create_backbone("resnet_test", weights=tmp_path / "model.safetensors").eval()
    assert loaded.load_report.format == "transformers" and loaded.load_report.exact
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        close(loaded.embed(x), clf.resnet(x).pooler_output.flatten(1))


# -- ViT / DeiT ------------------------------------------------------------------------------------
def timm_vit(**kwargs):
    """A scrambled timm ViT shaped like ``vit_test`` (32 px, patch 8, dim 32, 3 blocks, 2 heads)."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0) | kwargs
    return scramble(VisionTransformer(**args).eval())


def hidden_maps(hidden_states, prefix, grid):
    """transformers ``hidden_states[1:]`` (block outputs) as NCHW maps without the prefix tokens."""
    return [h[:, prefix:].transpose(1, 2).reshape(h.shape[0], h.shape[-1], *grid) for h in hidden_states[1:]]


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (40, 24)])
def test_vit_matches_transformers_vitmodel(size):
    """At the native size and at non-square sizes, where the position table is resampled bicubically
    exactly as ``ViTModel(..., interpolate_pos_encoding=True)`` does."""
    from transformers import ViTModel

    model = bs.create_backbone("vit_test").eval()
    ref = scramble(ViTModel(model.model.config).eval())  # with its pooler: dropped on conversion
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "transformers" and report.exact
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True, interpolate_pos_encoding=True)
        feats, last, emb = model.features(x), model.last_hidden_state(x), model.embed(x)
    for i, expected in enumerate(hidden_maps(out.hidden_states, 1, (size[0] // 8, size[1] // 8))):
        close(feats[f"block{i}"], expected, f"block{i}")
    close(last, out.last_hidden_state)
    close(emb, out.last_hidden_state[:, 0])


def test_vit_loads_transformers_classification_layout():
    from transformers import ViTForImageClassification

    model = bs.create_backbone("vit_test").eval()
    clf = scramble(ViTForImageClassification(model.model.config).eval())
    assert bs.load_weights(model, clf.state_dict()).exact
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(model.last_hidden_state(x), clf.vit(x).last_hidden_state)


def test_vit_matches_timm_after_conversion():
    ref = timm_vit()
    model = bs.create_backbone("vit_test", weights=ref.state_dict(), layer_norm_eps=1e-6).eval()
    assert model.load_report.format == "timm" and model.load_report.exact
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(model.last_hidden_state(x), ref.forward_features(x))
        blocks = ref.get_intermediate_layers(x, n=3, reshape=True)  # raw block outputs, no final norm
        feats = model.features(x)
        for i, expected in enumerate(blocks):
            close(feats[f"block{i}"], expected, f"block{i}")
        close(model.embed(x), ref(x))
        close(model.tokens(x, layer=1).patches, ref.get_intermediate_layers(x, n=[1])[0])


def test_vit_layer_norm_eps_override_reaches_the_model():
    """timm uses eps 1e-6; transformers' default 1e-12 (the google/* variants) gives a visible diff."""
    ref = timm_vit()
    x = torch.randn(2, 3, 32, 32)
    diffs = {}
    for eps in (1e-6, 1e-12):
        model = bs.create_backbone("vit_test", weights=ref.state_dict(), layer_norm_eps=eps).eval()
        assert model.model.config.layer_norm_eps == eps
        with torch.no_grad():
            diffs[eps] = (model.last_hidden_state(x) - ref.forward_features(x)).abs().max().item()
    assert diffs[1e-6] <= ATOL < diffs[1e-12]


def test_scrambled_weights_expose_a_wrong_key_mapping():
    """Guard for the tests above: swapping two LayerNorms in the checkpoint must show up."""
    ref = timm_vit()
    state = ref.state_dict()
    for kind in ("weight", "bias"):
        a, b = f"blocks.1.norm1.{kind}", f"blocks.1.norm2.{kind}"
        state[a], state[b] = state[b], state[a]
    model = bs.create_backbone("vit_test", weights=state).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.last_hidden_state(x) - ref.forward_features(x)).abs().max() > 1e-2


def test_deit_distilled_matches_timm():
    from timm.models.deit import VisionTransformerDistilled

    ref = scramble(VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                              num_classes=10).eval())
    model = bs.create_backbone("deit_distilled_test", weights=ref.state_dict()).eval()
    assert model.load_report.format == "timm" and model.load_report.exact  # head, head_dist dropped
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        close(model.last_hidden_state(x), tokens)
        emb = model.embed(x)
        close(emb, ref.forward_head(tokens, pre_logits=True))
        close(emb, (tokens[:, 0] + tokens[:, 1]) / 2)
        assert (emb - tokens[:, 0]).abs().max() > 1e-2  # the distillation token really counts
        close(model.features(x)["block1"], ref.get_intermediate_layers(x, n=1, reshape=True)[0])


def test_deit_distilled_matches_transformers_at_non_square_size():
    from transformers import DeiTModel

    model = bs.create_backbone("deit_distilled_test").eval()
    ref = scramble(DeiTModel(model.model.config).eval())
    assert bs.load_weights(model, ref.state_dict()).exact
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True, interpolate_pos_encoding=True)
        feats = model.features(x)
        close(model.last_hidden_state(x), out.last_hidden_state)
        close(model.embed(x), (out.last_hidden_state[:, 0] + out.last_hidden_state[:, 1]) / 2)
    for i, expected in enumerate(hidden_maps(out.hidden_states, 2, (6, 8))):
        close(feats[f"block{i}"], expected, f"block{i}")


# -- saving, wrong variants, partial loads, hashes ------------------------------------------------
@pytest.mark.parametrize("name", ["vit_test", "deit_distilled_test", "resnet_test"])
def test_save_load_round_trip_is_exact(name, tmp_path):
    model = scramble(bs.create_backbone(name)).eval()
    path = bs.save_weights(model, tmp_path / f"{name}.safetensors")
    loaded = bs.create_backbone(name, weights=path).eval()
    assert same_weights(model, loaded)
    assert loaded.load_report.format == "native" and loaded.load_report.exact
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for level, fmap in model.features(x).items():
            torch.testing.assert_close(loaded.features(x)[level], fmap, rtol=0, atol=0)
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)


@pytest.fixture()
def vit_file(tmp_path):
    model = scramble(bs.create_backbone("vit_test"))
    return model, bs.save_weights(model, tmp_path / "vit_test.safetensors")


def test_wrong_variant_lists_missing_unexpected_and_mismatched_keys(vit_file):
    _, path = vit_file
    with pytest.raises(bs.CheckpointMismatchError) as info:
        bs.create_backbone("deit_distilled_test", weights=path)  # 2 blocks + distillation token
    err, message = info.value, str(info.value)
    assert err.missing == ["model.embeddings.distillation_token"]
    assert err.unexpected and all(k.startswith("model.layers.2.") for k in err.unexpected)
    assert len(err.mismatched) == 1 and err.mismatched[0].startswith("model.embeddings.position_embeddings")
    assert "(1, 17, 32)" in err.mismatched[0] and "(1, 18, 32)" in err.mismatched[0]
    for label in ("missing (1)", f"unexpected ({len(err.unexpected)})", "shape mismatch (1)",
                  "model.embeddings.distillation_token", "model.layers.2.", "strict=False"):
        assert label in message, label


def test_wrong_resnet_depth_is_reported_as_missing_blocks(tmp_path):
    path = bs.save_weights(bs.create_backbone("resnet_test"), tmp_path / "r.safetensors")
    with pytest.raises(bs.CheckpointMismatchError) as info:
        bs.create_backbone("resnet_test", weights=path, depths=(1, 2, 1, 1))
    assert info.value.missing and all(k.startswith("model.encoder.stages.1.layers.1.") for k in info.value.missing)
    assert not info.value.unexpected and not info.value.mismatched


def test_non_strict_load_keeps_matching_keys_and_returns_report(vit_file):
    source, path = vit_file
    torch.manual_seed(7)
    pos_before = bs.create_backbone("deit_distilled_test").model.embeddings.position_embeddings.detach().clone()
    torch.manual_seed(7)
    loaded = bs.create_backbone("deit_distilled_test", weights=path, strict=False)
    report = loaded.load_report
    assert isinstance(report, bs.LoadReport) and not report.exact
    assert report.missing == ("model.embeddings.distillation_token",)
    assert len(report.mismatched) == 1 and report.unexpected
    src, got = source.state_dict(), loaded.state_dict()
    for key in ("model.layers.1.attention.q_proj.weight", "model.embeddings.cls_token", "model.layernorm.bias"):
        assert torch.equal(got[key], src[key]), key
    # the mismatched table is left as initialized (same seed, same random init)
    assert torch.equal(loaded.model.embeddings.position_embeddings, pos_before)


def test_sha256_verification_through_create_backbone(vit_file):
    source, path = vit_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert same_weights(source, bs.create_backbone("vit_test", weights=path, sha256=digest))
    assert same_weights(source, bs.create_backbone("vit_test", weights=path, sha256=digest.upper()))
    wrong = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    with pytest.raises(bs.CheckpointError, match="sha256 mismatch") as info:
        bs.create_backbone("vit_test", weights=path, sha256=wrong)
    assert not isinstance(info.value, bs.CheckpointMismatchError)
