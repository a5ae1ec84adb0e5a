"""AIMv2: parity with transformers' Aimv2VisionModel / Aimv2Model and timm's aimv2_* (scrambled weights),
position-table resampling at other sizes (timm's), the attention-pooling head, checkpoint layouts,
no CLS token, and the full-size architectures on the meta device."""

import re

import pytest
import torch
from _frameworks import require
from conftest import scramble

import backbone_sdk as bs
from backbone_sdk.plugins import aimv2

NAMES = ["aimv2_test", "aimv2_native_test"]
DIM, DEPTH, HEADS, MLP, NATIVE = 32, 2, 2, 88, 56  # the tiny specs: 4x4 position grid of 14-pixel patches
SIZES = [(56, 56), (84, 70), (28, 112), (112, 112)]
ATOL = 1e-4


def _scramble(module):
    """``scramble`` plus position tables large enough that a resampling mistake shows."""
    scramble(module)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("pos_embed", "position_embedding.weight")):
                p.add_(torch.randn(p.shape, generator=gen))
    return module


def _ours(name="aimv2_test", weights=None, **overrides):
    return bs.create_backbone(name, weights=weights, **overrides).eval()


def _grid(x):
    return x.shape[-2] // 14, x.shape[-1] // 14


def _as_maps(sequences, x):
    return [h.transpose(1, 2).reshape(x.shape[0], DIM, *_grid(x)) for h in sequences]


def _assert_matches(model, x, normed, block_maps, embedding):
    """``normed``: the final-normed token sequence; ``block_maps``: every block's output as NCHW maps."""
    with torch.no_grad():
        seq, emb, tok, feats = model.last_hidden_state(x), model.embed(x), model.tokens(x, norm=True), model.features(x)
    torch.testing.assert_close(seq, normed, rtol=0, atol=ATOL)
    torch.testing.assert_close(emb, embedding, rtol=0, atol=ATOL)
    torch.testing.assert_close(tok.patches, normed, rtol=0, atol=ATOL)  # no CLS: every token is a patch
    assert tok.cls is None and tok.registers is None and tok.grid == _grid(x)
    assert len(block_maps) == DEPTH
    for i, expected in enumerate(block_maps):
        torch.testing.assert_close(feats[f"block{i}"], expected, rtol=0, atol=ATOL, msg=f"block{i}")


# -- transformers ------------------------------------------------------------------------------------
def _hf_reference(model):
    from transformers import Aimv2VisionModel

    return _scramble(Aimv2VisionModel(model.model.config).eval())


def _assert_matches_transformers(model, ref, x):
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    assert len(out.hidden_states) == DEPTH + 1  # the embeddings, then every block
    embedding = out.pooler_output if model.use_head else out.last_hidden_state.mean(dim=1)
    _assert_matches(model, x, out.last_hidden_state, _as_maps(out.hidden_states[1:], x), embedding)


@pytest.mark.parametrize("name,size", [("aimv2_test", (56, 56))] + [("aimv2_native_test", s) for s in SIZES])
def test_matches_transformers(name, size):
    """The learned-table models at their size (transformers runs no other); native ones at any size."""
    model = _ours(name)
    ref = _hf_reference(model)
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "transformers" and report.exact, report
    assert ("model.embeddings.position_embedding.weight" in model.state_dict()) == (name == "aimv2_test")
    _assert_matches_transformers(model, ref, torch.randn(2, 3, *size))


def test_transformers_runs_the_learned_table_at_its_own_size_only():
    """Why timm is the reference for other sizes: transformers' table cannot be added to another grid."""
    ref = _hf_reference(_ours())
    with pytest.raises(RuntimeError, match="size of tensor"):
        ref(torch.randn(1, 3, 84, 70))


@pytest.mark.parametrize("name", NAMES)
def test_pooling_head_matches_transformers_pooler_output(name):
    model = _ours(name, use_head=True)
    ref = _hf_reference(model)
    assert bs.load_weights(model, ref.state_dict()).exact
    assert "model.head.cls_token" in model.no_weight_decay()
    _assert_matches_transformers(model, ref, torch.randn(2, 3, NATIVE, NATIVE))
    with torch.no_grad():
        x = torch.randn(2, 3, NATIVE, NATIVE)
        assert (model.embed(x) - model.last_hidden_state(x).mean(dim=1)).abs().max() > 1e-3


def _full_model(vision_config):
    from transformers import Aimv2Config, Aimv2Model

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "eos_token_id": 63}
    config = Aimv2Config(vision_config={**vision_config.to_dict(), "use_head": True}, text_config=text,
                         projection_dim=16)
    return _scramble(Aimv2Model(config).eval())


def test_aimv2model_checkpoint_vision_tower():
    """``Aimv2Model`` (LiT) state dicts: ``vision_model.`` keys, the text tower and projections ignored; its
    pooling head needs ``use_head=True`` (else strict loading names the head keys)."""
    full = _full_model(_ours().model.config)
    state = full.state_dict()
    assert "text_model.rms_norm.weight" in state and "visual_projection.weight" in state
    model = _ours(weights=state, use_head=True)
    assert model.load_report.format == "transformers" and model.load_report.exact, model.load_report
    _assert_matches_transformers(model, full.vision_model, torch.randn(2, 3, NATIVE, NATIVE))
    with pytest.raises(bs.CheckpointMismatchError, match="model.head.k_proj.weight") as err:
        _ours(weights=state)
    assert not err.value.missing
    relaxed = _ours(weights=state, strict=False)
    assert all(k.startswith("model.head.") for k in relaxed.load_report.unexpected)


@pytest.mark.parametrize("name", NAMES)
def test_transformers_save_pretrained_directories(name, tmp_path):
    model = _ours(name)
    ref = _hf_reference(model)
    ref.save_pretrained(tmp_path / "vision")
    loaded = _ours(name, weights=str(tmp_path / "vision"))
    assert loaded.load_report.exact and loaded.load_report.format == "transformers"
    _assert_matches_transformers(loaded, ref, torch.randn(1, 3, NATIVE, NATIVE))
    full = _full_model(model.model.config)
    full.save_pretrained(tmp_path / "full")  # an Aimv2Model directory: read as a state dict and converted
    loaded = _ours(name, weights=str(tmp_path / "full"), use_head=True)
    assert loaded.load_report.exact and loaded.load_report.format == "transformers", loaded.load_report
    _assert_matches_transformers(loaded, full.vision_model, torch.randn(1, 3, NATIVE, NATIVE))


# -- timm --------------------------------------------------------------------------------------------
def _timm():
    """timm's own aimv2_large_patch14_224 definition (RmsNorm, SwiGLU ratio 2.75, no biases) at tiny width."""
    timm = require("timm")
    ref = timm.create_model("aimv2_large_patch14_224", pretrained=False, embed_dim=DIM, depth=DEPTH,
                            num_heads=HEADS, img_size=NATIVE, num_classes=0, dynamic_img_size=True)
    assert ref.blocks[0].mlp.fc1_g.out_features == MLP and ref.num_prefix_tokens == 0
    return _scramble(ref.eval())


def _assert_matches_timm(model, ref, x):
    with torch.no_grad():
        normed = ref.forward_features(x)
        embedding = ref.forward_head(normed, pre_logits=True)
        maps = ref.forward_intermediates(x, norm=False, intermediates_only=True)
    _assert_matches(model, x, normed, maps, embedding)


def test_timm_state_dict_layout():
    state = _timm().state_dict()
    assert {"pos_embed", "patch_embed.norm.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1_g.weight",
            "blocks.0.mlp.fc1_x.weight", "norm.weight"} <= set(state)
    assert "blocks.0.attn.qkv.bias" not in state and "cls_token" not in state


@pytest.mark.parametrize("size", SIZES)
def test_matches_timm_after_conversion(size):
    """At the table's size and, resampling it as timm's ``dynamic_img_size`` does, at others."""
    ref = _timm()
    model = _ours(weights=ref.state_dict())
    assert model.load_report.format == "timm" and model.load_report.exact, model.load_report
    _assert_matches_timm(model, ref, torch.randn(2, 3, *size))


def test_pos_embed_resampling_equals_timms():
    timm_pos = require("timm.layers")
    model = _scramble(_ours())
    table = model.model.embeddings.position_embedding.weight[None]
    for h, w in [(56, 56), (84, 70), (28, 42), (224, 224)]:
        grid = (h // 14, w // 14)
        expected = timm_pos.resample_abs_pos_embed(table, new_size=grid, old_size=(4, 4), num_prefix_tokens=0)
        with torch.no_grad():
            torch.testing.assert_close(model.pos_embed(h, w), expected, rtol=0, atol=0)


def test_timm_classifier_head_is_dropped():
    ref = _timm()
    state = {**ref.state_dict(), "head.weight": torch.zeros(10, DIM), "head.bias": torch.zeros(10)}
    assert _ours(weights=state).load_report.exact


# -- the original release ------------------------------------------------------------------------------
def _to_release(state, prefix=""):
    """The original AIMv2 layout (ml-aim / the hub's custom-code checkpoints), from a timm state dict."""
    out = {}
    for key, value in state.items():
        key = key.replace(".norm1.", ".norm_1.").replace(".norm2.", ".norm_2.")
        key = key.replace(".mlp.fc1_g.", ".mlp.fc1.").replace(".mlp.fc1_x.", ".mlp.fc3.")
        key = re.sub(r"^blocks\.", "trunk.blocks.", key)
        key = re.sub(r"^norm\.", "trunk.post_trunk_norm.", key)
        key = re.sub(r"^patch_embed\.", "preprocessor.patchifier.", key)
        key = "preprocessor.pos_embed" if key == "pos_embed" else key
        out[prefix + key] = value
    return out


def test_original_release_layout():
    ref = _timm()
    state = _to_release(ref.state_dict())
    assert "trunk.blocks.0.mlp.fc3.weight" in state and "preprocessor.patchifier.norm.weight" in state
    model = _ours(weights=state)
    assert model.load_report.format == "aimv2" and model.load_report.exact, model.load_report
    _assert_matches_timm(model, ref, torch.randn(1, 3, 84, 70))


def test_original_lit_layout_with_pooling_head():
    """The LiT release: ``image_encoder.`` prefix, head ``k``/``v``/``linear``/``cls_token``, text keys ignored."""
    full = _full_model(_ours().model.config)
    vision = full.vision_model.state_dict()
    state = {}
    for key, value in vision.items():
        key = re.sub(r"^head\.(k|v)_proj\.", r"head.\1.", key).replace("head.output_proj.", "head.linear.")
        state[key] = value
    timm_like = {k: v for k, v in state.items() if not k.startswith("head.")}
    timm_like = _transformers_to_timm(timm_like)
    state = {**_to_release(timm_like, "image_encoder."),
             **{f"image_encoder.{k}": v for k, v in state.items() if k.startswith("head.")},
             "text_encoder.trunk.post_trunk_norm.weight": torch.ones(32), "log_logit_scale": torch.zeros(())}
    model = _ours(weights=state, use_head=True)
    assert model.load_report.format == "aimv2" and model.load_report.exact, model.load_report
    _assert_matches_transformers(model, full.vision_model, torch.randn(2, 3, NATIVE, NATIVE))


def _transformers_to_timm(state):
    out = {}
    for key, value in state.items():
        m = re.match(r"encoder\.layers\.(\d+)\.attention\.q_proj\.weight", key)
        if m:
            p = f"encoder.layers.{m.group(1)}.attention."
            out[f"blocks.{m.group(1)}.attn.qkv.weight"] = torch.cat(
                [state[p + f"{c}_proj.weight"] for c in "qkv"])
            continue
        if re.search(r"attention\.(k|v)_proj", key):
            continue
        key = key.replace("embeddings.patch_embed.", "patch_embed.proj.").replace("embeddings.rms_norm.",
                                                                                   "patch_embed.norm.")
        if key == "embeddings.position_embedding.weight":
            key, value = "pos_embed", value[None]
        key = re.sub(r"^encoder\.layers\.(\d+)\.", r"blocks.\1.", key)
        key = key.replace(".rms_norm1.", ".norm1.").replace(".rms_norm2.", ".norm2.")
        key = key.replace(".attention.out_proj.", ".attn.proj.").replace(".ffn.gate_proj.", ".mlp.fc1_g.")
        key = key.replace(".ffn.up_proj.", ".mlp.fc1_x.").replace(".ffn.down_proj.", ".mlp.fc2.")
        out[re.sub(r"^rms_norm\.", "norm.", key)] = value
    return out


# -- own checkpoints, strict loading, inputs ------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_round_trip(name, tmp_path):
    model = _scramble(_ours(name))
    loaded = _ours(name, weights=str(bs.save_weights(model, tmp_path / "w.safetensors")))
    assert loaded.load_report.format == "native" and loaded.load_report.exact
    x = torch.randn(1, 3, 70, 84)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)


def test_mis_keyed_and_mis_shaped_checkpoints_raise():
    state = _timm().state_dict()
    state["blocks.1.mlp.fc3.weight"] = state.pop("blocks.1.mlp.fc1_x.weight")
    with pytest.raises(bs.CheckpointMismatchError) as err:
        _ours(weights=state)
    assert "model.encoder.layers.1.ffn.up_proj.weight" in err.value.missing
    with pytest.raises(bs.CheckpointMismatchError, match="position_embedding"):
        _ours("aimv2_native_test", weights=_timm().state_dict())  # a learned table for the sin-cos model
    with pytest.raises(bs.CheckpointMismatchError, match="shape mismatch"):
        _ours(weights=_timm().state_dict(), mlp_dim=64)


def test_no_cls_token_and_vision_tower_keeps_every_token():
    from backbone_sdk.adapters.vlm import VisionTower

    spec = bs.get_spec("aimv2_test")
    assert spec.prefix_tokens == bs.PrefixTokens(cls=False) and spec.prefix_tokens.count == 0
    model = _ours()
    tower = VisionTower(model, select_layer=-1, select_feature="patch", finetune=None)
    x = torch.randn(2, 3, 84, 70)
    with torch.no_grad():
        out = tower(x)
        seq = model.run_layers(x, [-1])[DEPTH - 1]
    assert out.shape == (2, 6 * 5, DIM) == seq.shape and tower.num_tokens((84, 70)) == 30
    torch.testing.assert_close(out, seq, rtol=0, atol=0)
    with pytest.raises(bs.InvalidOptionError, match="needs a CLS token"):
        VisionTower(model, select_feature="cls_patch", finetune=None)


def test_inputs_and_options_are_checked():
    with pytest.raises(bs.InputShapeError, match="divisible by 14"):
        _ours().features(torch.randn(1, 3, 60, 56))
    with pytest.raises(bs.InvalidOptionError, match="divisible by 4"):
        bs.create_backbone("aimv2_native_test", dim=30, heads=2)
    assert _ours(dim=30, heads=2).embed_dim == 30  # learned tables take any width


def test_clip_mean_std_as_timm_and_transformers_processors_use():
    timm = require("timm")
    for name in bs.list_backbones("aimv2_*", include_test=False):
        spec = bs.get_spec(name)
        assert spec.input.mean == bs.specs.CLIP_MEAN and spec.input.std == bs.specs.CLIP_STD, name
        assert spec.input.crop_pct == 1.0 and spec.input.size_divisibility == 14
    cfg = timm.models.get_pretrained_cfg("aimv2_large_patch14_224.apple_pt")
    assert tuple(cfg.mean) == pytest.approx(bs.specs.CLIP_MEAN) and tuple(cfg.std) == pytest.approx(bs.specs.CLIP_STD)


# -- full-size specs ------------------------------------------------------------------------------------
#: the architecture fields of the published config.json files (and timm's aimv2_* definitions)
_PUBLISHED = {"large": (1024, 2816, 8), "huge": (1536, 4096, 12), "1b": (2048, 5632, 16), "3b": (3072, 8192, 24)}
_HUB = {"large": "large", "huge": "huge", "1b": "1B", "3b": "3B"}
#: parameter counts of the image towers (224 px learned tables; each larger table adds (N - 256) * dim)
_COUNTS = {"aimv2_large_patch14_224": 309_197_824, "aimv2_huge_patch14_224": 680_851_968,
           "aimv2_1b_patch14_224": 1_234_958_336, "aimv2_3b_patch14_224": 2_720_658_432}


def _published(name):
    size, res = re.match(r"aimv2_(\w+?)_patch14_(\d+|native)(_distilled)?$", name).groups()[:2]
    dim, mlp, heads = _PUBLISHED[size]
    native = res == "native"
    fields = {"hidden_size": dim, "intermediate_size": mlp, "num_attention_heads": heads, "num_hidden_layers": 24,
              "patch_size": 14, "rms_norm_eps": 1e-5, "qkv_bias": False, "mlp_bias": False, "use_head": False,
              "image_size": 224 if native else int(res), "is_native": native}
    return size, res, fields


@pytest.mark.parametrize("name", bs.list_backbones("aimv2_*", include_test=False))
def test_full_size_architecture_matches_transformers(name):
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    size, res, fields = _published(name)
    spec = bs.get_spec(name)
    with torch.device("meta"):
        model = bs.create_backbone(name)
        ref = Aimv2VisionModel(Aimv2VisionConfig(**fields))
    assert {k: tuple(v.shape) for k, v in model.model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    count = sum(p.numel() for p in model.model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    if name in _COUNTS:
        assert count == _COUNTS[name]
    assert spec.hub_id == f"apple/aimv2-{_HUB[size]}-patch14-{res}" + ("-distilled" if "distilled" in name else "")
    assert spec.input.image_size == ((224, 224) if res == "native" else (int(res),) * 2)
    assert spec.embed_dim == fields["hidden_size"] and len(spec.features) == 24


@pytest.mark.parametrize("name", [n for n in bs.list_backbones("aimv2_*", include_test=False) if "native" not in n])
def test_full_size_architecture_matches_timm(name):
    timm = require("timm")
    arch = name.replace("_distilled", "")
    with torch.device("meta"):
        model = bs.create_backbone(name)
        ref = timm.create_model(arch, pretrained=False, num_classes=0)
    converted = aimv2.convert_timm(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in model.model.state_dict(prefix="model.").items()}
    assert sum(p.numel() for p in model.model.parameters()) == sum(p.numel() for p in ref.parameters())
