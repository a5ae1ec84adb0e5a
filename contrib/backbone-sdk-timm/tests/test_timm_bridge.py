"""The timm bridge against backbone_sdk's public contract kit and against timm itself.

Runs on the installed distribution (``pip install contrib/backbone-sdk-timm``): names resolve through
the ``timm`` entry point, as they do for users.
"""

import json
import subprocess
import sys

import pytest
import timm
import torch

import backbone_sdk as bs
import backbone_sdk.testing as bst
from backbone_sdk.adapters.finetune import apply_finetune
from backbone_sdk.testing import backbone_registry  # noqa: F401 (the fixture; no conftest, see the README)

NAMES = ["timm/convnext_atto", "timm/efficientnet_b0", "timm/regnetx_002", "timm/vgg11", "timm/vit_tiny_patch16_224"]
CHECKS = ["check_features", "check_early_stop", "check_pyramid", "check_embed", "check_tokens", "check_dtypes",
          "check_bad_inputs", "check_grad_flow"]


#: a registry of its own per test, discovered from the installed entry points
pytestmark = pytest.mark.usefixtures("backbone_registry")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timm_state(model):
    return {k[len("model."):]: v for k, v in model.state_dict().items() if k.startswith("model.")}


def _scrambled(name, **overrides):
    """A bridge model whose every weight and BatchNorm statistic is random (not init values)."""
    model = bs.create_backbone(name, **overrides)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.02)
                if key.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model.eval()


def _reference(name, model, **kwargs):
    """timm's own model with the bridge model's weights (loaded key by key, strictly)."""
    arch = name[len("timm/"):]
    ref = timm.create_model(arch, pretrained=False, **kwargs)
    ours = _timm_state(model)
    keys = {}
    for key in ref.state_dict():
        for candidate in (key, key.replace("_", ".", 1), key.partition(".")[2]):
            if candidate in ours:
                keys[key] = ours[candidate]
                break
        else:
            raise AssertionError(f"{name}: timm key {key!r} has no counterpart in the bridge model")
    ref.load_state_dict(keys, strict=True)
    return ref.eval()


def _dynamic(name):
    return {"dynamic_img_size": True} if bs.get_spec(name).config.layout.dynamic_size else {}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, check):
    getattr(bst, check)(bs.create_backbone(name).eval())


@pytest.mark.parametrize("name", NAMES)
def test_spec_and_save_load(name, tmp_path):
    spec = bs.get_spec(name)
    bst.check_spec(spec)
    assert spec.plugin == "timm" and spec.family == "timm" and name in bs.list_backbones()
    bst.check_save_load(bs.create_backbone(name).eval(), tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_features_equal_timm_features_only_bitwise(name):
    model = _scrambled(name)
    spec = model.spec
    ref = _reference(name, model, features_only=True, out_indices=tuple(range(len(spec.features))), **_dynamic(name))
    assert [i["num_chs"] for i in ref.feature_info.get_dicts()] == [f.channels for f in spec.features]
    assert list(ref.feature_info.reduction()) == [f.stride for f in spec.features]
    s = bst.input_size(spec)
    x = torch.randn(2, 3, s, s + 32)
    with torch.no_grad():
        ours, theirs = model.features(x), ref(x)
    assert len(theirs) == len(ours)
    for (level, got), want in zip(ours.items(), theirs):
        assert torch.equal(got, want), f"{name}.{level}: differs from timm features_only"


@pytest.mark.parametrize("name", NAMES)
def test_embed_is_timm_pre_logits(name):
    model = _scrambled(name)
    ref = _reference(name, model, num_classes=0, **_dynamic(name))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.embed(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
        assert torch.equal(model.embed(x), ref(x))  # num_classes=0: timm's forward is the pre-logits


def test_vit_tokens_follow_timm_prefix_tokens():
    name = "timm/vit_tiny_patch16_224"
    model = _scrambled(name, model_kwargs={"reg_tokens": 2, "depth": 3})
    assert model.spec.prefix_tokens == bs.PrefixTokens(cls=True, registers=2)
    assert [f.name for f in model.spec.features] == ["block0", "block1", "block2"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tok = model.tokens(x, layer=-1)
        ref = _reference(name, model, num_classes=0, reg_tokens=2, depth=3, **_dynamic(name))
        seq = ref.blocks(ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x)))))
    assert tok.grid == (4, 6)
    assert torch.equal(tok.cls, seq[:, 0]) and torch.equal(tok.registers, seq[:, 1:3])
    assert torch.equal(tok.patches, seq[:, 3:])
    assert torch.equal(model.stem_tokens(x), ref._pos_embed(ref.patch_embed(x)))


def test_timm_checkpoint_directory_and_file_load(tmp_path):
    """A ``timm/...`` hub snapshot (model.safetensors in timm's layout, with timm's config.json) and a
    plain ``.pth`` of ``timm.create_model(...).state_dict()`` load exactly, the classifier left out."""
    from safetensors.torch import save_file

    name = "timm/convnext_atto"
    src = timm.create_model("convnext_atto", pretrained=False, num_classes=7).eval()
    state = src.state_dict()
    (tmp_path / "hub").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": "convnext_atto", "num_classes": 7}))
    torch.save(state, tmp_path / "convnext_atto.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = src.forward_head(src.forward_features(x), pre_logits=True)
    for source in (tmp_path / "hub", tmp_path / "convnext_atto.pth"):
        model = bs.create_backbone(name, weights=source).eval()
        assert model.load_report.exact and model.load_report.format == "timm", str(model.load_report)
        with torch.no_grad():
            assert torch.equal(model.embed(x), want)


def test_hub_weights_name_the_timm_repo_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = bs.get_spec("timm/convnext_atto.d2_in1k")
    assert spec.hub_id == "timm/convnext_atto.d2_in1k"
    cfg = timm.models.get_pretrained_cfg("convnext_atto.d2_in1k").to_dict()
    assert spec.input.image_size == tuple(cfg["input_size"][1:]) and spec.input.crop_pct == pytest.approx(cfg["crop_pct"])
    assert spec.input.mean == pytest.approx(cfg["mean"]) and spec.input.interpolation == cfg["interpolation"]
    with pytest.raises(bs.CheckpointError, match="timm/convnext_atto.d2_in1k"):
        bs.create_backbone("timm/convnext_atto.d2_in1k", weights="hub")


def test_pretrained_tag_sets_the_input_spec():
    clip = bs.get_spec("timm/vit_base_patch16_clip_224.openai")
    assert clip.input.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.hub_id == "timm/vit_base_patch16_clip_224.openai"
    assert bs.get_spec("timm/vit_tiny_patch16_224").input.mean == pytest.approx((0.5, 0.5, 0.5))


def test_unknown_names_get_timm_suggestions():
    with pytest.raises(bs.UnknownBackboneError, match="timm/convnext_atto") as err:
        bs.get_spec("timm/convnext_attto")
    assert "timm.list_models()" in str(err.value)
    with pytest.raises(bs.UnknownBackboneError, match="d2_in1k"):
        bs.get_spec("timm/convnext_atto.no_such_tag")


def test_timm_arguments_are_overrides():
    model = bs.create_backbone("timm/convnext_atto", drop_path_rate=0.1, model_kwargs={"depths": (1, 1, 1, 1)})
    assert len(model.model.stages[0].blocks) == 1
    assert model.model.stages[3].blocks[0].drop_path.drop_prob > 0
    with pytest.raises(bs.InvalidOptionError, match="does not take"):
        bs.create_backbone("timm/vgg11", model_kwargs={"no_such_argument": 1})


def test_stages_policy_freezes_stem_and_first_stages():
    model = apply_finetune(bs.create_backbone("timm/efficientnet_b0"), "stages:2")
    groups = model.stage_modules()
    frozen = {id(p) for g in groups[:3] for p in g.parameters()}
    assert frozen and all(not p.requires_grad for g in groups[:3] for p in g.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if id(p) not in frozen)
    assert [n for n, _ in model.model.blocks.named_children()] == [str(i) for i in range(7)]
    owned = {id(p) for g in groups for p in g.parameters()}
    trunk = {id(p) for n, p in model.named_parameters() if n.startswith(("model.conv_stem", "model.bn1", "model.blocks"))}
    assert trunk <= owned, "every trunk parameter belongs to a stage group"


def test_plugins_command_lists_the_distribution():
    out = subprocess.run([sys.executable, "-m", "backbone_sdk", "plugins"], capture_output=True, text=True, check=True)
    line = next(row for row in out.stdout.splitlines() if row.split() and row.split()[0] == "timm")
    assert "backbone-sdk-timm" in line and "0.1.0" in line, out.stdout
