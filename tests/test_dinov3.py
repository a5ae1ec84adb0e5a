"""DINOv3 ViT and ConvNeXt: parity with transformers' DINOv3ViTModel / DINOv3ConvNextModel and timm
(scrambled weights, square and non-square sizes), the original-release and timm checkpoint layouts,
RoPE at any multiple of the patch without resampling, and full-size parameter counts."""

import re

import pytest
import torch
import torch.nn.functional as F

import backbone_sdk as bs
from _frameworks import require
from conftest import scramble

ATOL = 1e-4
VIT, CNX = "dinov3_test", "dinov3_convnext_test"
DIM, DEPTH, HEADS, REG = 32, 2, 2, 4
VIT_SIZES = [(64, 64), (32, 48), (48, 32), (80, 32)]
CNX_SIZES = [(64, 64), (64, 96), (96, 64), (32, 32)]


def _scramble(module):
    """``scramble`` plus layer scales away from their tiny init (else the blocks barely matter) and
    query/key weights large enough for sharp attention (else positions barely matter). Buffers that
    are in no checkpoint (RoPE frequencies, timm's zero key bias) keep their values."""
    saved = module.state_dict()
    fixed = {n: b.clone() for n, b in module.named_buffers() if n not in saved}
    scramble(module)
    for name, value in fixed.items():
        module.get_buffer(name).copy_(value)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "lambda1", "gamma_1", "gamma_2")):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.8 + 0.2)
            elif name.endswith(("cls_token", "register_tokens", "reg_token")):
                p.add_(torch.randn(p.shape, generator=gen))
            elif name.endswith(("q_proj.weight", "k_proj.weight", "qkv.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def _close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


# -- DINOv3 ViT: transformers --------------------------------------------------------------------------
def _vit(weights=None, **overrides):
    return bs.create_backbone(VIT, weights=weights, **overrides).eval()


def _hf_vit(model):
    from transformers import DINOv3ViTModel

    return _scramble(DINOv3ViTModel(model.model.config).eval())


def _assert_vit_matches(model, seq, block_seqs, x, embed=None):
    """``seq``: final-normed sequence; ``block_seqs``: raw block outputs; ``embed``: the reference's pooling."""
    n, grid = 1 + REG, (x.shape[-2] // 16, x.shape[-1] // 16)
    with torch.no_grad():
        tok, feats = model.tokens(x, norm=True), model.features(x)
        _close(model.last_hidden_state(x), seq, "sequence")
        _close(model.embed(x), seq[:, 0] if embed is None else embed, "embed")
    assert tok.grid == grid and tok.registers.shape[1] == REG
    _close(tok.cls, seq[:, 0], "cls")
    _close(tok.registers, seq[:, 1:n], "registers")
    _close(tok.patches, seq[:, n:], "patches")
    assert len(block_seqs) == DEPTH
    for i, ref in enumerate(block_seqs):
        want = ref[:, n:].transpose(1, 2).reshape(x.shape[0], DIM, *grid)
        _close(feats[f"block{i}"], want, f"block{i}")


@pytest.mark.parametrize("arch", [{}, {"swiglu": True}, {"qkv_bias": False, "swiglu": True, "mlp_ratio": 2.0}])
@pytest.mark.parametrize("size", VIT_SIZES)
def test_vit_matches_transformers(size, arch):
    """Every multiple of 16, square or not, equals transformers' (RoPE: nothing resampled)."""
    model = _vit(**arch)
    ref = _hf_vit(model)
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "transformers" and report.exact, report
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    _assert_vit_matches(model, out.last_hidden_state, out.hidden_states[1:], x, embed=out.pooler_output)


def test_vit_hub_layout_and_save_pretrained_directory(tmp_path):
    """The hub's checkpoints have transformers 4.x names (``layer.N`` at the top level)."""
    model = _vit()
    ref = _hf_vit(model)
    old = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in ref.state_dict().items()}
    assert "layer.0.attention.q_proj.weight" in old
    fresh = _vit(weights=old)
    assert fresh.load_report.format == "transformers" and fresh.load_report.exact
    ref.save_pretrained(tmp_path)
    loaded = _vit(weights=str(tmp_path))
    assert loaded.load_report.exact
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    _assert_vit_matches(fresh, out.last_hidden_state, out.hidden_states[1:], x)
    _assert_vit_matches(loaded, out.last_hidden_state, out.hidden_states[1:], x)


def test_positions_matter_in_the_parity_tests():
    """With these weights a wrong RoPE (other base period, or none) is far outside the tolerance."""
    model = _scramble(_vit())
    other = _vit(rope_theta=200.0)
    other.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        assert (model.last_hidden_state(x) - other.last_hidden_state(x)).abs().max() > 1e-2
        flat = model.block_inputs(x)
        flat = (torch.ones_like(flat[0]), torch.zeros_like(flat[1]))
        model.block_inputs = lambda images: flat
        assert (other.last_hidden_state(x) - model.last_hidden_state(x)).abs().max() > 1e-2


def test_rope_tables_are_computed_once_per_forward(monkeypatch):
    model = _vit()
    calls, tables = [], model.block_inputs
    monkeypatch.setattr(model, "block_inputs", lambda images: calls.append(1) or tables(images))
    with torch.no_grad():
        model.features(torch.randn(1, 3, 32, 48))
    assert calls == [1]


def test_rope_tables_stay_fp32_in_a_bf16_model():
    """The tables do not follow the weights' dtype (transformers' ``inv_freq`` buffer would)."""
    model = _vit()
    x = torch.randn(1, 3, 48, 32)
    cos, sin = model.block_inputs(x)
    model.to(torch.bfloat16)
    cos16, sin16 = model.block_inputs(x)
    assert cos16.dtype == torch.float32 and torch.equal(cos16, cos) and torch.equal(sin16, sin)


def test_training_mode_rescales_rope_only_when_asked():
    """Off by default (deterministic fine-tuning); with ``rope_rescale=2`` our training forward equals
    transformers' (same seed, same draw) and differs between draws."""
    model = _vit(rope_rescale=2.0).train()
    ref = _hf_vit(model).train()
    assert ref.config.pos_embed_rescale == 2.0
    model.load_state_dict({f"model.{k}": v for k, v in ref.state_dict().items()}, strict=False)
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        torch.manual_seed(3)
        ours = model.last_hidden_state(x)
        torch.manual_seed(3)
        _close(ours, ref(x).last_hidden_state, "train mode")
        torch.manual_seed(4)
        assert (model.last_hidden_state(x) - ours).abs().max() > 1e-3
        plain = _vit()
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain.train().last_hidden_state(x), plain.eval().last_hidden_state(x))


# -- DINOv3 ViT: timm ------------------------------------------------------------------------------
def _timm_vit(arch="vit_small_patch16_dinov3_qkvb", **kwargs):
    timm = require("timm")
    model = timm.create_model(arch, pretrained=False, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, img_size=64,
                              num_classes=0, global_pool="token", **kwargs)
    return _scramble(model.eval())


def _assert_vit_matches_timm(model, ref, x):
    with torch.no_grad():
        seq = ref.forward_features(x)
        blocks = ref.forward_intermediates(x, norm=False, intermediates_only=True, return_prefix_tokens=False)
        embed = ref.forward_head(seq, pre_logits=True)
    n = 1 + REG
    blocks = [torch.cat([seq[:, :n], b.flatten(2).transpose(1, 2)], dim=1) for b in blocks]  # prefix unused
    _assert_vit_matches(model, seq, blocks, x, embed=embed)


_TIMM_VARIANTS = [
    ("vit_small_patch16_dinov3_qkvb", {}, {}),
    ("vit_small_patch16_dinov3", {}, {}),  # no q/v bias in timm: zero biases in ours
    ("vit_small_patch16_dinov3", {"qkv_bias": False}, {}),
    ("vit_small_plus_patch16_dinov3_qkvb", {"swiglu": True}, {}),
    ("vit_7b_patch16_dinov3", {"swiglu": True, "qkv_bias": False, "mlp_ratio": 2.0}, {"swiglu_align_to": 8}),
]


@pytest.mark.parametrize(("arch", "ours", "theirs"), _TIMM_VARIANTS, ids=[f"{a}-{o}" for a, o, _ in _TIMM_VARIANTS])
def test_vit_matches_timm_after_conversion(arch, ours, theirs):
    ref = _timm_vit(arch, **theirs)
    state = ref.state_dict()
    assert "reg_token" in state and "blocks.0.gamma_1" in state and "mask_token" not in state
    model = _vit(weights=state, **ours)
    report = model.load_report
    assert report.format == "timm" and report.exact, report
    assert [k for k in report.initialized if k.startswith("model.")] == ["model.embeddings.mask_token"]
    if "q_bias" not in str(list(state)) and model.spec.config.qkv_bias:
        assert model.model.model.layer[0].attention.q_proj.bias.abs().max() == 0
    for size in [(64, 64), (32, 48), (48, 32)]:
        _assert_vit_matches_timm(model, ref, torch.randn(2, 3, *size))


def test_vit_embed_is_the_cls_token_not_timms_default_average():
    timm = require("timm")
    ref = _timm_vit()
    avg = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, embed_dim=DIM, depth=DEPTH,
                            num_heads=HEADS, img_size=64, num_classes=0)
    avg.load_state_dict(ref.state_dict())
    model = _vit(weights=ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (avg.eval()(x) - model.embed(x)).abs().max() > 1e-3
        _close(model.embed(x), ref(x), "token pooling")


# -- DINOv3 ViT: the original release --------------------------------------------------------------
def _to_release(state, swiglu=False):
    """The layout of Meta's dinov3_vit*_pretrain_*.pth files, from a timm state dict (timm's conversion,
    reversed): ``storage_tokens``, ``ls1.gamma``, fused ``qkv`` bias with a (masked, non-zero) key part and
    ``bias_mask``, ``w1/w2/w3``, a ``[1, D]`` mask token, the ``rope_embed.periods`` buffer and the
    training-only ``local_cls_norm``."""
    gen = torch.Generator().manual_seed(7)
    names = [(r"^reg_token$", "storage_tokens"), (r"\.gamma_(1|2)$", r".ls\1.gamma")]
    if swiglu:
        names += [(r"\.mlp\.fc1_g\.", ".mlp.w1."), (r"\.mlp\.fc1_x\.", ".mlp.w2."), (r"\.mlp\.fc2\.", ".mlp.w3.")]
    out = {}
    for key, value in state.items():
        for pattern, repl in names:
            key = re.sub(pattern, repl, key)
        out[key] = value
    for key in [k for k in out if k.endswith(".attn.q_bias")]:
        prefix = key[: -len("q_bias")]
        k_bias = torch.randn(DIM, generator=gen)  # what the mask hides
        out[prefix + "qkv.bias"] = torch.cat([out.pop(key), k_bias, out.pop(prefix + "v_bias")])
        out[prefix + "qkv.bias_mask"] = torch.cat([torch.ones(DIM), torch.zeros(DIM), torch.ones(DIM)])
    out["mask_token"] = torch.randn(1, DIM, generator=gen)
    out["rope_embed.periods"] = torch.ones(DIM // HEADS // 4, dtype=torch.bfloat16)
    out["local_cls_norm.weight"], out["local_cls_norm.bias"] = torch.ones(DIM), torch.zeros(DIM)
    return out


@pytest.mark.parametrize(("arch", "ours"), [("vit_small_patch16_dinov3_qkvb", {}),
                                            ("vit_small_plus_patch16_dinov3_qkvb", {"swiglu": True})])
def test_vit_original_release_layout(arch, ours):
    ref = _timm_vit(arch)
    state = _to_release(ref.state_dict(), swiglu=ours.get("swiglu", False))
    assert "blocks.0.attn.qkv.bias_mask" in state and "storage_tokens" in state
    model = _vit(weights=state, **ours)
    report = model.load_report
    assert report.format == "dinov3" and report.exact, report
    assert not [k for k in report.initialized if k.startswith("model.")]
    torch.testing.assert_close(model.model.embeddings.mask_token, state["mask_token"][None], rtol=0, atol=0)
    for size in [(64, 64), (48, 32)]:
        _assert_vit_matches_timm(model, ref, torch.randn(1, 3, *size))


def test_vit_release_without_bias_mask_keeps_a_real_key_bias_and_fails_loudly():
    state = _to_release(_timm_vit().state_dict())
    for key in [k for k in state if k.endswith("bias_mask")]:
        del state[key]
    with pytest.raises(bs.CheckpointMismatchError) as err:
        _vit(weights=state)
    assert "model.model.layer.0.attention.k_proj.bias" in err.value.unexpected


def test_vit_mismatched_checkpoints_raise():
    with pytest.raises(bs.CheckpointMismatchError) as err:
        _vit(weights=_timm_vit().state_dict(), qkv_bias=False)  # q/v biases for a bias-free model
    assert "model.model.layer.0.attention.q_proj.bias" in err.value.unexpected
    with pytest.raises(bs.CheckpointMismatchError, match="shape mismatch"):
        _vit(weights=_timm_vit().state_dict(), mlp_ratio=2.0)
    with pytest.raises(bs.CheckpointError, match="no plugin converts 'transformers'"):
        _vit(weights=_timm_vit().state_dict(), weights_format="transformers")


def test_vit_rejects_heads_that_leave_no_room_for_2d_rope():
    with pytest.raises(bs.InvalidOptionError, match="multiple of 4"):
        bs.create_backbone(VIT, dim=24, heads=4)


# -- DINOv3 ConvNeXt: transformers -------------------------------------------------------------------
def _cnx(weights=None, **overrides):
    return bs.create_backbone(CNX, weights=weights, **overrides).eval()


def _hf_cnx(model):
    from transformers import DINOv3ConvNextModel

    return _scramble(DINOv3ConvNextModel(model.model.config).eval())


def _assert_cnx_matches(model, stages, last_norm, embed, x):
    """``stages``: raw stage outputs (4 maps); ``last_norm``: the final-normed last stage map."""
    with torch.no_grad():
        feats, emb = model.features(x), model.embed(x)
        part = model.features(x, ["stage1", "stage2"])
    for i in range(3):
        _close(feats[f"stage{i + 1}"], stages[i], f"stage{i + 1}")
    _close(feats["stage4"], last_norm, "stage4")
    _close(emb, embed, "embed")
    assert list(part) == ["stage1", "stage2"] and torch.equal(part["stage2"], feats["stage2"])


@pytest.mark.parametrize("size", CNX_SIZES)
def test_convnext_matches_transformers(size):
    model = _cnx()
    ref = _hf_cnx(model)
    report = bs.load_weights(model, ref.state_dict())
    assert report.format == "transformers" and report.exact, report
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    raw = out.hidden_states[1:]
    last = out.last_hidden_state[:, 1:].transpose(1, 2).reshape(raw[3].shape)
    _assert_cnx_matches(model, raw, last, out.pooler_output, x)


def test_convnext_hub_layout_and_save_pretrained_directory(tmp_path):
    model = _cnx()
    ref = _hf_cnx(model)
    old = {re.sub(r"^model\.stages\.", "stages.", k): v for k, v in ref.state_dict().items()}
    fresh = _cnx(weights=old)
    assert fresh.load_report.format == "transformers" and fresh.load_report.exact
    ref.save_pretrained(tmp_path)
    loaded = _cnx(weights=str(tmp_path))
    assert loaded.load_report.exact
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = ref(x).pooler_output
        _close(fresh.embed(x), want, "4.x names")
        _close(loaded.embed(x), want, "save_pretrained")


def test_convnext_early_stop_runs_only_the_needed_stages():
    model = _cnx()
    ran = []
    hooks = [m.register_forward_hook(lambda *_, i=i: ran.append(i))
             for i, group in enumerate(model.stage_modules()) for m in group.modules()]
    try:
        with torch.no_grad():
            model.features(torch.randn(1, 3, 64, 64), "stage2")
    finally:
        for h in hooks:
            h.remove()
    assert sorted(set(ran)) == [0, 1, 2]  # stem, stage1 blocks, stage2


def test_convnext_sizes_that_are_not_multiples_of_32_are_refused():
    with pytest.raises(bs.InputShapeError, match="divisible by 32"):
        _cnx().features(torch.randn(1, 3, 48, 64))


# -- DINOv3 ConvNeXt: timm and the original release ----------------------------------------------------
def _timm_cnx():
    convnext = require("timm.models.convnext")
    return _scramble(convnext.ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 16, 32), num_classes=0).eval())


def _assert_cnx_matches_timm(model, ref, x):
    with torch.no_grad():
        raw = ref.forward_intermediates(x, intermediates_only=True)
        embed = ref.forward_head(ref.forward_features(x), pre_logits=True)
        last = ref.head.norm(raw[3])
    assert raw[3].shape[1] == 32 and len(raw) == 4
    _assert_cnx_matches(model, raw, last, embed, x)


@pytest.mark.parametrize("size", CNX_SIZES)
def test_convnext_matches_timm_after_conversion(size):
    ref = _timm_cnx()
    state = ref.state_dict()
    assert "stem.0.weight" in state and "stages.1.downsample.1.weight" in state and "head.norm.weight" in state
    model = _cnx(weights=state)
    assert model.load_report.format == "timm" and model.load_report.exact, model.load_report
    _assert_cnx_matches_timm(model, ref, torch.randn(2, 3, *size))


def _to_release_cnx(state):
    """The layout of Meta's dinov3_convnext_*_pretrain_*.pth files (facebookresearch ConvNeXt names)."""
    rules = [(r"^stem\.(\d)\.", r"downsample_layers.0.\1."), (r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1."),
             (r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2."), (r"\.conv_dw\.", ".dwconv."),
             (r"\.mlp\.fc1\.", ".pwconv1."), (r"\.mlp\.fc2\.", ".pwconv2."), (r"^head\.norm\.", "norm.")]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    out["norms.3.weight"], out["norms.3.bias"] = out["norm.weight"], out["norm.bias"]  # the same module twice
    return out


def test_convnext_original_release_layout():
    ref = _timm_cnx()
    state = _to_release_cnx(ref.state_dict())
    assert "downsample_layers.1.0.weight" in state and "stages.2.1.pwconv2.weight" in state
    model = _cnx(weights=state)
    report = model.load_report
    assert report.format == "dinov3" and report.exact and not report.initialized, report
    for size in [(64, 96), (32, 32)]:
        _assert_cnx_matches_timm(model, ref, torch.randn(1, 3, *size))


def test_convnext_final_norm_is_a_plain_layer_norm_of_the_raw_stage():
    model = _scramble(_cnx())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = model._raw(x, 3, {3})[3]
        norm = model.model.layer_norm
        want = F.layer_norm(raw.permute(0, 2, 3, 1), (32,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
        _close(model.features(x, "stage4")["stage4"], want, "stage4")
        assert (raw - want).abs().max() > 1e-2


# -- full-size specs: parameter counts against transformers (meta device) ------------------------------
_PUBLISHED_VIT = {  # config.json of each hub checkpoint (architecture fields)
    "dinov3_vits16": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    "dinov3_vits16plus": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                              use_gated_mlp=True, hidden_act="silu"),
    "dinov3_vitb16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "dinov3_vitl16": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "dinov3_vith16plus": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              use_gated_mlp=True, hidden_act="silu"),
    "dinov3_vit7b16": dict(hidden_size=4096, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
                           use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False),
}
_PUBLISHED_VIT["dinov3_vitl16_sat493m"] = _PUBLISHED_VIT["dinov3_vitl16"]
_PUBLISHED_VIT["dinov3_vit7b16_sat493m"] = _PUBLISHED_VIT["dinov3_vit7b16"]
#: parameters of the transformers models built from those configs
VIT_PARAMS = {"dinov3_vitl16": 303_129_600, "dinov3_vits16": 21_596_544, "dinov3_vit7b16": 6_716_035_072}
CNX_PARAMS = {"dinov3_convnext_tiny": 27_820_128}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _shapes(module):
    return {k: v.shape for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(_PUBLISHED_VIT))
def test_vit_full_size_parameters_match_transformers(name):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    spec = bs.get_spec(name)
    with torch.device("meta"):
        model = bs.create_backbone(name, parts=())
        ref = DINOv3ViTModel(DINOv3ViTConfig(**_PUBLISHED_VIT[name], patch_size=16, num_register_tokens=4))
    assert _shapes(model.model) == _shapes(ref)
    assert _count(model) == _count(ref)
    if name in VIT_PARAMS:
        assert _count(model) == VIT_PARAMS[name]
    assert spec.hub_id == "facebook/dinov3-" + name[len("dinov3_"):].split("_")[0] + "-pretrain-" + \
        ("sat493m" if "sat" in name else "lvd1689m")
    assert spec.input.size_divisibility == 16 and spec.prefix_tokens == bs.PrefixTokens(cls=True, registers=4)
    assert spec.input.mean == ((0.430, 0.411, 0.296) if "sat" in name else bs.specs.IMAGENET_MEAN)


_PUBLISHED_CNX = {
    "tiny": ([3, 3, 9, 3], [96, 192, 384, 768]), "small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "base": ([3, 3, 27, 3], [128, 256, 512, 1024]), "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
}


@pytest.mark.parametrize("size", list(_PUBLISHED_CNX))
def test_convnext_full_size_parameters_match_transformers(size):
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    name = f"dinov3_convnext_{size}"
    depths, dims = _PUBLISHED_CNX[size]
    with torch.device("meta"):
        model = bs.create_backbone(name)
        ref = DINOv3ConvNextModel(DINOv3ConvNextConfig(depths=depths, hidden_sizes=dims))
    assert _shapes(model.model) == _shapes(ref)
    assert _count(model) == _count(ref)
    if name in CNX_PARAMS:
        assert _count(model) == CNX_PARAMS[name]
    spec = bs.get_spec(name)
    assert spec.hub_id == f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m"
    assert [(f.name, f.channels, f.stride) for f in spec.pyramid.levels] == \
        [(p, c, s) for (p, s), c in zip(bs.specs.PYRAMID_LEVELS, dims)]
    assert spec.pyramid.native and spec.pyramid.sources == ("stage1", "stage2", "stage3", "stage4")
