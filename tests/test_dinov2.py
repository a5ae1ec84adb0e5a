"""DINOv2: parity with transformers' Dinov2(WithRegisters)Model and timm (scrambled weights), position
embedding resampling (antialias switch), checkpoint layouts, round trips and strict-load errors."""

import re

import pytest
import torch

import backbone_sdk as bs
from _frameworks import require
from conftest import scramble

NAMES = ["dinov2_test", "dinov2_reg_test"]
DIM, DEPTH, HEADS, NATIVE = 32, 2, 2, 56  # the tiny specs: 4x4 position grid of 14-pixel patches
ATOL = 1e-4


def _scramble(module):
    """``scramble`` plus layer scales away from 1e-5 and position embeddings large enough to matter."""
    scramble(module)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "lambda1")):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.8 + 0.2)
            elif name.endswith(("pos_embed", "position_embeddings")):
                p.add_(torch.randn(p.shape, generator=gen))
    return module


#: transformers' and timm's resampling: to the exact grid (the original release stretches it by 0.1 patch)
EXACT = {"pos_embed_offset": 0.0}


def _ours(name="dinov2_test", weights=None, **overrides):
    return bs.create_backbone(name, weights=weights, **{**EXACT, **overrides}).eval()


def _release(name="dinov2_test", weights=None, **overrides):
    """The backbone as registered: resampling as the original release."""
    return bs.create_backbone(name, weights=weights, **overrides).eval()


def _hf_classes(model):
    if model.num_registers:
        from transformers import Dinov2WithRegistersForImageClassification as Clf, Dinov2WithRegistersModel as Model
    else:
        from transformers import Dinov2ForImageClassification as Clf, Dinov2Model as Model
    return Model, Clf


def _hf_reference(model):
    Model, _ = _hf_classes(model)
    return _scramble(Model(model.model.config).eval())


def _assert_matches_sequence(model, expected, block_maps, x):
    """``expected``: the final-normed token sequence; ``block_maps``: raw block outputs as NCHW maps."""
    n = model.num_prefix_tokens
    with torch.no_grad():
        seq, emb, tok = model.last_hidden_state(x), model.embed(x), model.tokens(x, norm=True)
        feats = model.features(x)
    torch.testing.assert_close(seq, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(emb, expected[:, 0], rtol=0, atol=ATOL)
    torch.testing.assert_close(tok.patches, expected[:, n:], rtol=0, atol=ATOL)
    assert tok.grid == (x.shape[-2] // 14, x.shape[-1] // 14)
    if n > 1:
        torch.testing.assert_close(tok.registers, expected[:, 1:n], rtol=0, atol=ATOL)
    else:
        assert tok.registers is None
    assert len(block_maps) == DEPTH
    for i, expected_map in enumerate(block_maps):
        torch.testing.assert_close(feats[f"block{i}"], expected_map, rtol=0, atol=ATOL, msg=f"block{i}")


def _maps(model, hidden_states, x):
    """transformers ``hidden_states[1:]`` (block outputs) as NCHW patch maps."""
    grid = (x.shape[-2] // 14, x.shape[-1] // 14)
    n = model.num_prefix_tokens
    return [h[:, n:].transpose(1, 2).reshape(x.shape[0], DIM, *grid) for h in hidden_states[1:]]


# -- transformers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("size", [(56, 56), (84, 70), (28, 112)])
@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers(name, size, swiglu):
    model = _ours(name, swiglu=swiglu)
    ref = _hf_reference(model)
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "transformers" and report.exact
    assert "model.embeddings.mask_token" not in report.initialized  # the checkpoint has it
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    _assert_matches_sequence(model, out.last_hidden_state, _maps(model, out.hidden_states, x), x)


@pytest.mark.parametrize("name", NAMES)
def test_pos_embed_resampling_matches_transformers(name):
    """Our resampling equals the wrapped model's own at every size; the other antialias setting differs."""
    model = _scramble(_ours(name))
    emb = model.model.embeddings
    for h, w in [(56, 56), (84, 70), (28, 42), (224, 224)]:
        tokens = torch.zeros(1, 1 + (h // 14) * (w // 14), DIM)
        with torch.no_grad():
            expected = emb.interpolate_pos_encoding(tokens, h, w)
            ours = model.pos_embed(h, w, antialias=model.native_antialias, offset=0.0)
            other = model.pos_embed(h, w, antialias=not model.native_antialias, offset=0.0)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        if (h, w) == (NATIVE, NATIVE):
            assert other is emb.position_embeddings
        else:
            assert (other - expected).abs().max() > 1e-3, (h, w)


@pytest.mark.parametrize("name", NAMES)
def test_antialias_switch_changes_only_patch_positions(name):
    """The non-default path builds the same sequence (CLS, registers, patches) with other patch positions."""
    default = _scramble(_ours(name))
    flipped = _ours(name, pos_embed_antialias=not default.native_antialias)
    flipped.load_state_dict(default.state_dict())
    assert flipped.pos_embed_antialias != default.pos_embed_antialias
    n = default.num_prefix_tokens
    with torch.no_grad():
        x = torch.randn(1, 3, NATIVE, NATIVE)
        torch.testing.assert_close(flipped.embed_tokens(x), default.embed_tokens(x), rtol=0, atol=0)
        x = torch.randn(1, 3, 84, 70)
        a, b = default.embed_tokens(x), flipped.embed_tokens(x)
        shift = flipped.pos_embed(84, 70) - default.pos_embed(84, 70)
    torch.testing.assert_close(b[:, :n], a[:, :n], rtol=0, atol=0)
    torch.testing.assert_close(b[:, n:] - a[:, n:], shift[:, 1:].expand_as(a[:, n:]), rtol=0, atol=1e-5)
    assert shift.abs().max() > 1e-3


def test_classification_and_legacy_transformers_layouts():
    for name in NAMES:
        model = _ours(name, swiglu=True)
        _, Clf = _hf_classes(model)
        clf = _scramble(Clf(model.model.config).eval())
        prefix = "dinov2_with_registers." if model.num_registers else "dinov2."
        state = clf.state_dict()
        assert any(k.startswith(prefix) for k in state) and "classifier.weight" in state
        assert bs.load_weights(model, state).exact
        inner = getattr(clf, prefix[:-1])
        legacy = _legacy_transformers(inner.state_dict())
        assert "encoder.layer.0.attention.attention.query.weight" in legacy
        assert "encoder.layer.0.mlp.weights_in.weight" in legacy
        fresh = _ours(name, swiglu=True)
        report = bs.load_weights(fresh, legacy)
        assert report.format == "transformers" and report.exact, report
        x = torch.randn(1, 3, 70, 56)
        with torch.no_grad():
            out = inner(x, output_hidden_states=True)
        _assert_matches_sequence(fresh, out.last_hidden_state, _maps(fresh, out.hidden_states, x), x)


def _legacy_transformers(state):
    """transformers 4.x key names, as the facebook/dinov2-* hub checkpoints store them."""
    names = {"q": "query", "k": "key", "v": "value"}
    old = {}
    for key, value in state.items():
        key = re.sub(r"attention\.(q|k|v)_proj", lambda m: "attention.attention." + names[m.group(1)], key)
        key = key.replace("attention.o_proj", "attention.output.dense").replace("mlp.down_proj", "mlp.weights_out")
        old[key] = value
    for key in [k for k in old if ".mlp.gate_proj." in k]:
        up = old.pop(key.replace("gate_proj", "up_proj"))
        old[key.replace("gate_proj", "weights_in")] = torch.cat([old.pop(key), up])
    return old


@pytest.mark.parametrize("name", NAMES)
def test_transformers_save_pretrained_directory(name, tmp_path):
    ref = _hf_reference(_ours(name))
    ref.save_pretrained(tmp_path)
    loaded = _ours(name, weights=str(tmp_path))
    assert loaded.load_report.exact
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    _assert_matches_sequence(loaded, out.last_hidden_state, _maps(loaded, out.hidden_states, x), x)


# -- timm ------------------------------------------------------------------------------------------
def _timm(registers=False, swiglu=False, dynamic=False):
    timm = require("timm")
    kwargs = dict(pretrained=False, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, img_size=NATIVE, num_classes=0,
                  dynamic_img_size=dynamic)
    if swiglu:
        from timm.layers import SwiGLUPacked

        hidden = (int(DIM * 4 * 2 / 3) + 7) // 8 * 8  # DINOv2's SwiGLU width; timm's 2.66667 * 2 ratio only fits ViT-g
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2 * hidden / DIM)
    arch = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    return _scramble(timm.create_model(arch, **kwargs).eval())


def _assert_matches_timm(model, ref, x):
    with torch.no_grad():
        expected = ref.forward_features(x)
        maps = ref.forward_intermediates(x, norm=False, intermediates_only=True)
    _assert_matches_sequence(model, expected, maps, x)


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_matches_timm_after_conversion(name, swiglu):
    registers = name == "dinov2_reg_test"
    ref = _timm(registers, swiglu)
    state = ref.state_dict()
    assert "blocks.0.ls1.gamma" in state and "mask_token" not in state
    assert ("reg_token" in state) == registers
    model = _ours(name, weights=state, swiglu=swiglu)
    report = model.load_report
    assert report.format == "timm" and report.exact, report
    assert "model.embeddings.mask_token" in report.initialized  # timm has none: reported, not missing
    _assert_matches_timm(model, ref, torch.randn(2, 3, NATIVE, NATIVE))


@pytest.mark.parametrize("size", [(84, 70), (28, 28), (112, 112)])
def test_antialias_flag_matches_timm_at_other_sizes(size):
    ref = _timm(dynamic=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = ref.forward_features(x)
        default = _ours(weights=ref.state_dict()).last_hidden_state(x)
    assert (default - expected).abs().max() > 1e-3  # transformers' Dinov2Model resamples without antialias
    model = _ours(weights=ref.state_dict(), pos_embed_antialias=True)
    _assert_matches_timm(model, ref, x)


def test_register_variant_matches_timm_at_other_sizes_by_default():
    ref = _timm(registers=True, dynamic=True)
    model = _ours("dinov2_reg_test", weights=ref.state_dict())
    assert model.pos_embed_antialias
    _assert_matches_timm(model, ref, torch.randn(1, 3, 84, 70))


# -- the original release --------------------------------------------------------------------------
def _to_original(state, registers=False, swiglu=False, chunked=False):
    """The layout of Meta's dinov2_*_pretrain.pth files, from a timm state dict (timm's conversion, reversed)."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for key, value in state.items():
        key = "register_tokens" if key == "reg_token" else key
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        if chunked:  # training checkpoints: one BlockChunk keeps the global block index
            key = re.sub(r"^blocks\.", "blocks.0.", key)
        out[key] = value
    if registers:  # the release has a CLS position, which timm folds into cls_token
        cls_pos = torch.randn(1, 1, DIM, generator=gen)
        out["cls_token"] = state["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    out["mask_token"] = torch.randn(1, DIM, generator=gen)
    return out


@pytest.mark.parametrize("name,swiglu,chunked", [("dinov2_test", False, False), ("dinov2_reg_test", False, True),
                                                 ("dinov2_test", True, True), ("dinov2_reg_test", True, False)])
def test_original_release_layout(name, swiglu, chunked):
    registers = name == "dinov2_reg_test"
    ref = _timm(registers, swiglu)
    state = _to_original(ref.state_dict(), registers, swiglu, chunked)
    assert ("register_tokens" in state) == registers and state["pos_embed"].shape[1] == 17
    model = _ours(name, weights=state, swiglu=swiglu)
    report = model.load_report
    assert report.format == "dinov2" and report.exact, report
    assert not any(k.startswith("model.") for k in report.initialized)
    torch.testing.assert_close(model.model.embeddings.mask_token, state["mask_token"], rtol=0, atol=0)
    _assert_matches_timm(model, ref, torch.randn(2, 3, NATIVE, NATIVE))


def test_explicit_format_names():
    ref = _timm()
    model = _ours(weights=_to_original(ref.state_dict()), weights_format="dinov2")
    assert model.load_report.format == "dinov2"
    with pytest.raises(bs.CheckpointError, match="no plugin converts 'transformers'"):
        _ours(weights=ref.state_dict(), weights_format="transformers")


# -- own checkpoints and strict loading ------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_round_trip(name, tmp_path):
    model = _scramble(_ours(name))
    path = bs.save_weights(model, tmp_path / "weights.safetensors")
    loaded = _ours(name, weights=str(path))
    assert loaded.load_report.format == "native" and loaded.load_report.exact
    theirs = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(theirs[key], value), key
    x = torch.randn(1, 3, 70, 84)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.pyramid(x)["p3"], model.pyramid(x)["p3"], rtol=0, atol=0)


def test_mis_keyed_checkpoints_raise():
    state = _timm().state_dict()
    state["blocks.1.ls3.gamma"] = state.pop("blocks.1.ls2.gamma")
    with pytest.raises(bs.CheckpointMismatchError) as err:
        _ours(weights=state)
    assert "model.encoder.layer.1.layer_scale2.lambda1" in err.value.missing
    assert any("ls3" in k for k in err.value.unexpected)
    with pytest.raises(bs.CheckpointMismatchError, match="register_tokens"):
        _ours(weights=_timm(registers=True).state_dict())  # a register checkpoint for the plain model
    with pytest.raises(bs.CheckpointMismatchError, match="shape mismatch"):
        _ours(weights=_timm().state_dict(), swiglu=True)  # GELU MLP weights for a SwiGLU model
    relaxed = _ours(weights=state, strict=False)
    assert relaxed.load_report.missing == ("model.encoder.layer.1.layer_scale2.lambda1",)


# -- full-size specs --------------------------------------------------------------------------------
# the config.json of each published hub checkpoint (architecture fields)
_PUBLISHED = {
    "dinov2_vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2_vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2_vits14_reg": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_register_tokens=4),
    "dinov2_vitb14_reg": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_register_tokens=4),
    "dinov2_vitg14_reg": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, num_register_tokens=4,
                              use_swiglu_ffn=True),
}


@pytest.mark.parametrize("name", list(_PUBLISHED))
def test_full_size_architecture_matches_published_config(name):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    fields = dict(_PUBLISHED[name], image_size=518, patch_size=14, mlp_ratio=4, layer_norm_eps=1e-6)
    registers = "num_register_tokens" in fields
    Config, Model = (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)
    spec = bs.get_spec(name)
    with torch.device("meta"):
        model = bs.create_backbone(name)
        ref = Model(Config(**fields))
    ours = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in model.model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert model.num_prefix_tokens == 1 + fields.get("num_register_tokens", 0)
    assert spec.hub_id == "facebook/dinov2-" + ("with-registers-" if registers else "") + \
        {384: "small", 768: "base", 1536: "giant"}[fields["hidden_size"]]
    assert spec.input.size_divisibility == 14 and spec.input.mean == bs.specs.IMAGENET_MEAN


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_non_default_resampling_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    model = _ours(name, pos_embed_antialias=name == "dinov2_test")
    assert not model.native_resampling
    x = torch.randn(1, 3, 84, 70)
    compiled = torch.compile(model.embed, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.embed(x), rtol=0, atol=1e-5)
