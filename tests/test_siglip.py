"""SigLIP / SigLIP 2 (FixRes): parity with transformers' SiglipModel and timm's SigLIP towers
(scrambled weights, square and non-square sizes), text tower, tokenizer, sigmoid zero-shot, weights."""

import copy

import pytest
import torch

import backbone_sdk as bs
from backbone_sdk.adapters.zero_shot import ZeroShotClassifier, is_sigmoid, similarity
from _frameworks import require
from conftest import scramble

TOL = 1e-4
SIZES = [(32, 32), (48, 48), (32, 48), (56, 24)]


def _ours(**overrides):
    return bs.create_backbone("siglip_test", **overrides).eval()


def _max(a, b):
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def hf_pair():
    """A scrambled transformers SiglipModel and our siglip_test loaded from its state dict."""
    from transformers import SiglipModel

    torch.manual_seed(0)
    ref = scramble(SiglipModel(_ours().model.config)).eval()
    model = bs.create_backbone("siglip_test", weights=ref.state_dict()).eval()
    assert model.load_report.format == "transformers" and model.load_report.exact, model.load_report
    return ref, model


@pytest.fixture(scope="module")
def timm_pair():
    """A scrambled timm SigLIP tower (MAP head, no CLS) of siglip_test's architecture, and ours from it."""
    timm = require("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            class_token=False, global_pool="map", num_classes=0, act_layer="gelu_tanh",
                            dynamic_img_size=True)
    assert timm.__version__
    scramble(ref).eval()
    model = bs.create_backbone("siglip_test", weights=ref.state_dict(), parts=(), pos_embed_antialias=True).eval()
    assert model.load_report.format == "timm" and model.load_report.exact, model.load_report
    return ref, model


# -- registration ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, hub, dim, patch, res, vocab", [
    ("siglip_vitb16_224", "google/siglip-base-patch16-224", 768, 16, 224, 32000),
    ("siglip_vitb16_256_i18n", "google/siglip-base-patch16-256-multilingual", 768, 16, 256, 250000),
    ("siglip_so400m14_384", "google/siglip-so400m-patch14-384", 1152, 14, 384, 32000),
    ("siglip2_vitb16_512", "google/siglip2-base-patch16-512", 768, 16, 512, 256000),
    ("siglip2_so400m16_256", "google/siglip2-so400m-patch16-256", 1152, 16, 256, 256000),
    ("siglip2_giantopt16_384", "google/siglip2-giant-opt-patch16-384", 1536, 16, 384, 256000),
])
def test_variants(name, hub, dim, patch, res, vocab):
    spec = bs.get_spec(name)
    assert (spec.family, spec.hub_id, spec.embed_dim, spec.input.patch_size) == ("siglip", hub, dim, patch)
    side = res // patch * patch  # so400m/14 @384 takes the 27x27 grid of 378 pixels
    assert spec.input.image_size == (side, side) and spec.input.mean == (0.5, 0.5, 0.5) and spec.input.crop_pct == 1.0
    assert spec.prefix_tokens.count == 0 and spec.capabilities == {"text"}
    assert spec.config.vocab_size == vocab and spec.config.context_length == 64


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, published", [
    ("siglip_so400m14_384", 428.2e6), ("siglip_vitb16_224", 92.9e6), ("siglip2_giantopt16_256", None),
])
def test_image_tower_parameter_counts_match_transformers(name, published):
    """Our image tower (text dropped) has exactly the parameters of transformers' SiglipVisionModel,
    both built on the meta device; and about the published count."""
    from transformers import SiglipVisionModel

    with torch.device("meta"):
        ours = bs.create_backbone(name, parts=())
        ref = SiglipVisionModel(ours.model.config.vision_config)
    assert _count(ours) == _count(ref)
    if published:
        assert abs(_count(ours) - published) / published < 0.01, _count(ours)


def test_text_tower_parameter_counts_match_transformers():
    from transformers import SiglipModel

    with torch.device("meta"):
        ours = bs.create_backbone("siglip2_so400m14_384", parts=("text",))
        ref = SiglipModel(ours.model.config)
    assert _count(ours) == _count(ref)


# -- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_image_tower_matches_transformers(hf_pair, size):
    ref, model = hf_pair
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref.vision_model(x, interpolate_pos_encoding=True, output_hidden_states=True)
        emb, tok, feats = model.embed(x), model.tokens(x, norm=True), model.features(x)
    assert _max(emb, out.pooler_output) <= TOL
    assert tok.cls is None and tok.patches.shape[1] == (size[0] // 8) * (size[1] // 8)
    assert _max(tok.patches, out.last_hidden_state) <= TOL
    for i in range(2):
        want = out.hidden_states[i + 1].transpose(1, 2).reshape(2, 32, size[0] // 8, size[1] // 8)
        assert _max(feats[f"block{i}"], want) <= TOL


@pytest.mark.parametrize("size", SIZES)
def test_image_tower_matches_timm(timm_pair, size):
    ref, model = timm_pair
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        hidden = ref.forward_features(x)
        expected = ref.forward_head(hidden, pre_logits=True)
        emb, tok = model.embed(x), model.tokens(x, norm=True)
    assert _max(emb, expected) <= TOL
    assert _max(tok.patches, hidden) <= TOL


def test_resampling_follows_transformers_by_default_and_timm_on_request(timm_pair):
    """At a non-native size the two references differ (antialias); each matches its own setting."""
    ref, _ = timm_pair
    ref = copy.deepcopy(ref)
    with torch.no_grad():  # a rough table, so that the resampling method shows
        ref.pos_embed.add_(torch.randn(ref.pos_embed.shape, generator=torch.Generator().manual_seed(3)))
    timm_like = bs.create_backbone("siglip_test", weights=ref.state_dict(), parts=(), pos_embed_antialias=True).eval()
    plain = bs.create_backbone("siglip_test", weights=ref.state_dict(), parts=()).eval()
    x = torch.randn(1, 3, 24, 24)  # downsampling the 4x4 table: antialias matters
    with torch.no_grad():
        expected = ref.forward_features(x)
        assert _max(timm_like.tokens(x, norm=True).patches, expected) <= TOL
        assert _max(plain.tokens(x, norm=True).patches, expected) > 1e-2


def test_text_tower_and_logits_match_transformers(hf_pair):
    ref, model = hf_pair
    ids = torch.randint(0, 1000, (3, 16))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids).pooler_output
        assert _max(model.embed_text(ids), want) <= TOL
        out = ref(input_ids=ids, pixel_values=x, interpolate_pos_encoding=True)
        got = similarity(model, x, ids)
    assert _max(got, out.logits_per_image) <= TOL


def test_zero_shot_uses_sigmoid_scores(hf_pair, tmp_path):
    ref, model = hf_pair
    model.load_tokenizer(_tiny_tokenizer(tmp_path))
    classes = ["cat", "dog", "car"]
    clf = ZeroShotClassifier(model, classes, templates=["{}"])
    x = torch.randn(2, 3, 32, 32)
    ids = model.tokenize(classes)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=x).logits_per_image
        logits = clf(x)
        probs, names = clf.predict(x, top_k=3)
    assert is_sigmoid(model) and _max(logits, want) <= TOL
    assert torch.allclose(probs, want.sigmoid().sort(dim=-1, descending=True).values, atol=TOL)
    assert probs.sum(dim=-1).ne(1).all()  # independent sigmoids, not a softmax
    assert all(sorted(n) == sorted(classes) for n in names)


def _tiny_tokenizer(folder):
    """A word-level transformers tokenizer saved to ``folder`` (SigLIP's vocabulary ships with no wheel)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "car"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return str(folder)


def test_tokenizer_from_a_directory_pads_to_the_context(tmp_path):
    model = _ours()
    model.load_tokenizer(_tiny_tokenizer(tmp_path))
    ids = model.tokenize(["a photo of a cat", "dog"])
    assert ids.shape == (2, 16) and ids[0, :5].tolist() == [3, 4, 5, 3, 6] and ids[1, 1:].eq(0).all()
    with torch.no_grad():
        assert torch.equal(model.embed_text(["a photo of a cat", "dog"]), model.embed_text(ids))


def test_tokenizer_comes_from_the_weights_directory(hf_pair, tmp_path):
    ref, _ = hf_pair
    ref.save_pretrained(tmp_path)
    _tiny_tokenizer(tmp_path)
    model = bs.create_backbone("siglip_test", weights=str(tmp_path)).eval()
    assert model.load_report.exact
    assert model.tokenize("a cat").shape == (1, 16)
    with torch.no_grad():
        assert _max(model.embed_text("a cat"), ref.get_text_features(input_ids=model.tokenize("a cat")).pooler_output) <= TOL


def test_weights_directory_without_a_tokenizer_is_not_taken_for_one(hf_pair, tmp_path):
    """A checkpoint-only folder (e.g. a hub snapshot fetched without tokenizer files) is not the tokenizer
    source: tokenize() then says how to get one instead of failing inside AutoTokenizer on that folder."""
    ref, _ = hf_pair
    ref.save_pretrained(tmp_path)
    model = bs.create_backbone("siglip_test", weights=str(tmp_path))
    with pytest.raises(bs.UnsupportedOperationError, match="load_tokenizer"):
        model.tokenize("a cat")


def test_missing_tokenizer_says_how_to_get_one():
    with pytest.raises(bs.UnsupportedOperationError, match="load_tokenizer"):
        _ours().tokenize("a cat")


def test_bad_token_ids_are_rejected():
    model = _ours()
    with pytest.raises(ValueError, match=r"L <= 16"):
        model.embed_text(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.embed_text(torch.zeros(1, 16))


def test_without_text_the_tower_is_gone_and_full_checkpoints_still_load(hf_pair):
    ref, _ = hf_pair
    vision = bs.create_backbone("siglip_test", weights=ref.state_dict(), parts=()).eval()
    assert vision.load_report.exact and vision.logit_bias is None and not vision.spec.has("text")
    assert not any(k.startswith("model.text_model.") for k in vision.state_dict())
    with pytest.raises(bs.UnsupportedOperationError, match="without its text tower"):
        vision.embed_text(torch.zeros(1, 16, dtype=torch.long))


@pytest.mark.parametrize("prefix", ["", "vision_tower.", "model.vision_tower."])
def test_vision_model_checkpoints_load_with_vlm_prefixes(hf_pair, prefix):
    """A bare SiglipVisionModel and the SigLIP towers inside PaliGemma/LLaVA-OneVision checkpoints."""
    from transformers import SiglipVisionModel

    ref, model = hf_pair
    vision = SiglipVisionModel(ref.config.vision_config)
    vision.load_state_dict(ref.vision_model.state_dict())
    state = {f"{prefix}{'vision_model.' if prefix else ''}{k}": v for k, v in vision.state_dict().items()}
    loaded = bs.create_backbone("siglip_test", weights=state, parts=()).eval()
    assert loaded.load_report.format == "transformers" and loaded.load_report.exact, loaded.load_report
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), model.embed(x))


def test_no_weight_decay_names_exist():
    model = _ours()
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert {"model.vision_model.head.probe", "model.logit_bias", "model.logit_scale",
            "model.vision_model.embeddings.position_embedding.weight"} <= nwd
    assert nwd <= set(names)
