"""CLIP: parity with transformers' CLIPModel and open_clip (scrambled weights), tokenizer, zero-shot, weights."""

import json
import math
import subprocess
import sys
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import backbone_sdk as bs
from backbone_sdk.adapters.zero_shot import ZeroShotClassifier, similarity
from backbone_sdk.plugins import clip as clip_plugin
from _frameworks import require
from conftest import scramble

TEXTS = ["a photo of a cat.", "A DOG, running!!", "naïve café — “quoted” &amp; <b>bold</b>",
         "x " * 100, "日本語 🐶 emoji", ""]
OPEN_CLIP_NAME = "backbone-sdk-clip-test"


def _ours(**overrides):
    return bs.create_backbone("clip_test", **overrides).eval()


@pytest.fixture(scope="module")
def open_clip(tmp_path_factory):
    """open_clip with a tiny custom config equal to clip_test's architecture."""
    open_clip = require("open_clip")
    folder = tmp_path_factory.mktemp("open_clip_config")
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (folder / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return open_clip


@pytest.fixture(scope="module")
def open_clip_model(open_clip):
    torch.manual_seed(0)
    model = open_clip.create_model(OPEN_CLIP_NAME).eval()
    causal_mask = model.attn_mask.clone()  # a float buffer, but not a weight: scrambling it breaks causality
    scramble(model)
    model.attn_mask.copy_(causal_mask)
    return model


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import CLIPModel

    torch.manual_seed(0)
    return scramble(CLIPModel(_ours().model.config)).eval()


# -- registration ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, patch, res, proj, hub", [
    ("clip_vitb32", 32, 224, 512, "openai/clip-vit-base-patch32"),
    ("clip_vitb16", 16, 224, 512, "openai/clip-vit-base-patch16"),
    ("clip_vitl14", 14, 224, 768, "openai/clip-vit-large-patch14"),
    ("clip_vitl14_336", 14, 336, 768, "openai/clip-vit-large-patch14-336"),
])
def test_variants(name, patch, res, proj, hub):
    spec = bs.get_spec(name)
    assert (spec.family, spec.hub_id, spec.embed_dim, spec.input.patch_size) == ("clip", hub, proj, patch)
    assert spec.input.image_size == (res, res) and spec.input.mean == bs.specs.CLIP_MEAN
    assert spec.capabilities == {"text"} and spec.features[-1].stride == patch
    assert not bs.list_backbones("clip_rn*")


def test_transformers_config_is_clip():
    model = _ours()
    for tower in (model.model.config.vision_config, model.model.config.text_config):
        assert tower.hidden_act == "quick_gelu" and tower.layer_norm_eps == 1e-5
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.model.vision_model.config._attn_implementation == "sdpa"


# -- parity: transformers CLIPModel ---------------------------------------------------------------
def test_matches_transformers_clipmodel(hf_reference):
    model = _ours()
    report = bs.load_weights(model, hf_reference.state_dict())
    assert report.format == "transformers" and report.exact
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        for size in [(32, 32), (48, 64)]:
            x = torch.randn(2, 3, *size)
            expected = hf_reference.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output
            torch.testing.assert_close(model.embed(x), expected, rtol=0, atol=1e-4)
        expected = hf_reference.get_text_features(input_ids=tokens).pooler_output
        torch.testing.assert_close(model.embed_text(TEXTS), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(model.embed_text(tokens), expected, rtol=0, atol=1e-4)
    assert torch.equal(model.logit_scale, hf_reference.logit_scale)


def test_transformers_directory_and_vision_only_layouts(hf_reference, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    hf_reference.save_pretrained(tmp_path)
    model = bs.create_backbone("clip_test", weights=str(tmp_path)).eval()
    assert model.load_report.exact
    vision = _ours(parts=("neck",))
    ref_vision = CLIPVisionModelWithProjection(hf_reference.config.vision_config)
    ref_vision.load_state_dict({k: v for k, v in hf_reference.state_dict().items()
                                if k.startswith(("vision_model.", "visual_projection."))})
    assert bs.load_weights(vision, ref_vision.state_dict()).format == "transformers"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = hf_reference.get_image_features(pixel_values=x).pooler_output
        torch.testing.assert_close(model.embed(x), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(vision.embed(x), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(model.embed_text("a cat"), hf_reference.get_text_features(
            input_ids=model.tokenize("a cat")).pooler_output, rtol=0, atol=1e-4)


def test_block_tokens_match_transformers_hidden_states(hf_reference):
    model = _ours()
    bs.load_weights(model, hf_reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = hf_reference.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        feats = model.features(x)
        for i in range(len(model.blocks)):
            tok = model.tokens(x, layer=i)
            torch.testing.assert_close(tok.cls, hidden[i + 1][:, 0], rtol=0, atol=1e-4)
            torch.testing.assert_close(tok.patches, hidden[i + 1][:, 1:], rtol=0, atol=1e-4)
            grid = hidden[i + 1][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
            torch.testing.assert_close(feats[f"block{i}"], grid, rtol=0, atol=1e-4)
        pooled = hf_reference.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(model.tokens(x, norm=True).cls, pooled, rtol=0, atol=1e-4)
    assert model.tokens(x, layer=-2).grid == (4, 4)


# -- parity: open_clip ----------------------------------------------------------------------------
def test_matches_open_clip(open_clip, open_clip_model):
    model = _ours()
    report = bs.load_weights(model, open_clip_model.state_dict())
    assert report.format == "open_clip" and report.exact
    x = torch.randn(2, 3, 32, 32)
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), open_clip_model.encode_image(x), rtol=0, atol=1e-4)
        torch.testing.assert_close(model.embed_text(TEXTS), open_clip_model.encode_text(tokens), rtol=0, atol=1e-4)
        theirs = open_clip_model(x, tokens)
    torch.testing.assert_close(model.logit_scale.exp(), theirs[2], rtol=0, atol=0)


def test_openai_release_layout(open_clip_model):
    """The OpenAI release holds the same keys plus metadata tensors; it is also accepted by name."""
    state = dict(open_clip_model.state_dict())
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    model = _ours()
    assert bs.load_weights(model, state).format == "openai"
    assert bs.load_weights(model, open_clip_model.state_dict(), weights_format="openai").exact
    ref = _ours()
    bs.load_weights(ref, open_clip_model.state_dict())
    a, b = model.state_dict(), ref.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))  # the pyramid is not in checkpoints


def test_projection_is_transposed_and_qkv_split(open_clip_model):
    """Key facts of the conversion, checked directly on the tensors."""
    model = _ours()
    bs.load_weights(model, open_clip_model.state_dict())
    assert torch.equal(model.model.visual_projection.weight, open_clip_model.visual.proj.T)
    assert torch.equal(model.model.text_projection.weight, open_clip_model.text_projection.T)
    fused = open_clip_model.visual.transformer.resblocks[1].attn.in_proj_weight
    attn = model.blocks[1].self_attn
    assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), fused)


def test_image_tower_only(open_clip, open_clip_model):
    model = _ours(parts=("neck",))
    assert model.model.text_model is None and model.logit_scale is None and not model.spec.has("text")
    assert not any(k.startswith("model.text_") for k in model.state_dict())
    report = bs.load_weights(model, open_clip_model.state_dict())
    assert report.exact
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), open_clip_model.encode_image(x), rtol=0, atol=1e-4)
    with pytest.raises(bs.UnsupportedOperationError, match="without its text tower"):
        model.embed_text(["a cat"])
    with pytest.raises(TypeError, match="no text tower"):
        ZeroShotClassifier(model, ["cat"])


def test_matches_timm_clip_image_tower():
    """timm's vit_*_clip_* layout (pre-norm ViT, fused qkv, projection as a zero-bias head)."""
    timm = require("timm")
    from timm.models.vision_transformer import VisionTransformer

    ref = scramble(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pre_norm=True,
                                     num_classes=16, act_layer="quick_gelu", norm_layer=partial(torch.nn.LayerNorm,
                                                                                                eps=1e-5))).eval()
    with torch.no_grad():
        ref.head.bias.zero_()
    assert timm.__version__
    model = _ours(parts=("neck",))
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "timm" and report.exact
    x = torch.randn(2, 3, 32, 32)  # native size: timm resamples position embeddings with antialiasing
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), ref(x), rtol=0, atol=1e-4)
        feats = model.features(x)
        expected = ref.get_intermediate_layers(x, n=2, reshape=True, norm=False)
    for got, want in zip((feats["block0"], feats["block1"]), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    with torch.no_grad():
        ref.head.bias.fill_(0.1)
    with pytest.raises(bs.CheckpointError, match="classifier head"):
        bs.load_weights(model, ref.state_dict())


def test_wrong_checkpoints_raise_mismatch(open_clip_model):
    model = _ours()
    with pytest.raises(bs.CheckpointMismatchError) as info:
        bs.load_weights(model, {k: v for k, v in open_clip_model.state_dict().items() if k.startswith("visual.")})
    assert any(k.startswith("model.text_model.") for k in info.value.missing)
    wider = dict(open_clip_model.state_dict())
    wider["visual.positional_embedding"] = torch.zeros(26, 32)  # trained at 40x40
    with pytest.raises(bs.CheckpointMismatchError) as info:
        bs.load_weights(model, wider)
    assert info.value.mismatched
    with pytest.raises(bs.CheckpointMismatchError):
        bs.load_weights(model, bs.create_backbone("vit_test").state_dict())


# -- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_equals_open_clip(open_clip):
    reference = open_clip.get_tokenizer("ViT-B-16")
    texts = TEXTS + ["Hello, WORLD!! It's 3.14", "don't WE'LL i'M", "Straße ΟΔΟΣ İstanbul ﬁne ＦＵＬＬ",
                     "  tabs\tand\nnew lines\u00a0", "Ã©tÃ© mojibake", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                     "a <end_of_text> b", "it'ſ ͅ", "supercalifragilisticexpialidocious " * 20]
    ours = clip_plugin.tokenize(texts)
    assert ours.shape == (len(texts), 77) and ours.dtype == torch.long
    assert torch.equal(ours, reference(texts))
    assert torch.equal(clip_plugin.tokenize(texts, context_length=12), open_clip.tokenize(texts, context_length=12))
    long = ours[-1]
    assert long[0] == 49406 and long[-1] == 49407 and (long != 0).all()  # truncated, EOT kept last


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs", "Co", "Cn")), max_size=40))
def test_tokenizer_equals_open_clip_on_any_text(open_clip, text):
    assert torch.equal(clip_plugin.tokenize(text), open_clip.tokenize(text))


def test_tokenizer_is_lazy_and_needs_no_open_clip_import():
    code = ("import sys, backbone_sdk as bs; from backbone_sdk.plugins import clip, _clip_tokenizer as t; "
            "bs.list_backbones(); assert t.default_tokenizer.cache_info().currsize == 0; "
            "assert 'tokenizers' not in sys.modules and 'transformers' not in sys.modules; "
            "ids = clip.tokenize('a cat'); assert ids[0, :4].tolist() == [49406, 320, 2368, 49407], ids; "
            "assert 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_embed_text_inputs():
    model = _ours()
    with torch.no_grad():
        one = model.embed_text("a photo of a cat")
        torch.testing.assert_close(one, model.embed_text(model.tokenize(["a photo of a cat"])[0]), rtol=0, atol=0)
    assert one.shape == (1, 16)
    with pytest.raises(ValueError, match="token ids"):
        model.embed_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model.embed_text(torch.zeros(1, 5))


# -- zero-shot, training, weights -----------------------------------------------------------------
def test_zero_shot_logits_equal_open_clip_prompt_ensemble(open_clip, open_clip_model):
    """Class weights and logits computed independently with open_clip: normalized mean of the
    normalized prompt embeddings per class, scaled cosine with the normalized image embedding."""
    model = _ours()
    bs.load_weights(model, open_clip_model.state_dict())
    classes, templates = ["cat", "dog", "car"], ("a photo of a {}.", "a drawing of the {}!")
    x = torch.randn(2, 3, 32, 32)
    norm = torch.nn.functional.normalize
    with torch.no_grad():
        classifier = ZeroShotClassifier(model, classes, templates=templates)
        logits = classifier(x)
        prompts = open_clip.tokenize([t.format(c) for c in classes for t in templates])
        per_prompt = norm(open_clip_model.encode_text(prompts), dim=-1).view(3, 2, -1)
        weights = norm(per_prompt.mean(dim=1), dim=-1)
        image = norm(open_clip_model.encode_image(x), dim=-1)
        expected = open_clip_model.logit_scale.exp() * image @ weights.T
        texts = ["a cat", "two dogs", "a red car", "?"]
        pairwise = open_clip_model.logit_scale.exp() * image @ norm(open_clip_model.encode_text(
            open_clip.tokenize(texts)), dim=-1).T
    torch.testing.assert_close(classifier.class_weights, weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(similarity(model, x, texts), pairwise, rtol=0, atol=1e-4)
    calls = []
    model.embed_text = lambda texts: calls.append(texts)  # cached: classifying must not embed prompts again
    classifier(x)
    assert calls == []
    del model.embed_text
    probs, names = classifier.predict(x, top_k=2)
    assert names == [[classes[i] for i in row] for row in expected.topk(2).indices.tolist()]
    torch.testing.assert_close(probs, expected.softmax(-1).topk(2).values, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="no text tower"):
        ZeroShotClassifier(bs.create_backbone("vit_test"), classes)


def test_text_tower_gradient_checkpointing_matches():
    model = _ours().train()
    tokens = model.tokenize(["a photo of a cat", "a dog"])

    def grads():
        model.zero_grad(set_to_none=True)
        model.embed_text(tokens).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.model.text_model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_stem_holds_embeddings_and_pre_norm():
    model = _ours()
    stem = model.stage_modules()[0]
    params = {id(p) for p in stem.parameters()}
    vision = model.model.vision_model
    assert params == {id(p) for m in (vision.embeddings, vision.pre_layrnorm) for p in m.parameters()}
    assert not any(k.startswith("_stem") for k in model.state_dict())


def test_save_load_round_trip_is_exact(open_clip_model, tmp_path):
    model = _ours()
    bs.load_weights(model, open_clip_model.state_dict())
    path = bs.save_weights(model, tmp_path / "clip.safetensors")
    loaded = bs.create_backbone("clip_test", weights=path).eval()
    assert loaded.load_report.format == "native" and loaded.load_report.exact
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.embed(x), loaded.embed(x))
        assert torch.equal(model.embed_text(TEXTS), loaded.embed_text(TEXTS))


@pytest.mark.parametrize("name", ["clip_test", "siglip_test"])
def test_full_checkpoint_loads_into_a_tower_built_without_text(name, tmp_path):
    """save_weights of the full model (text tower included) loads strictly into parts=(): the text keys
    of the unbuilt part are ignored, the image tower is exact."""
    full = bs.create_backbone(name).eval()
    path = bs.save_weights(full, tmp_path / "full.safetensors")
    tower = bs.create_backbone(name, weights=str(path), parts=()).eval()
    assert tower.load_report.exact
    x = torch.randn(1, 3, *full.spec.input.image_size)
    with torch.no_grad():
        assert torch.equal(tower.embed(x), full.embed(x))
