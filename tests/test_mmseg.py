"""mmsegmentation integration on real mmseg/mmengine: segmentors, fine-tune policies, checkpoints, Runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _frameworks import load_example, require, single_thread
from conftest import scramble, tiny_names

require("mmseg")
require("mmengine")

import backbone_sdk as bs  # noqa: E402
from backbone_sdk.adapters.finetune import apply_finetune  # noqa: E402
from backbone_sdk.integrations import mmseg as sdk  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import DATASETS, HOOKS, MODELS, TRANSFORMS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "mmseg"
NUM_CLASSES = 4


example = load_example("mmseg")


@pytest.fixture(scope="module", autouse=True)
def _mmseg_scope():
    register_all_modules(init_default_scope=True)
    with single_thread():
        yield


def _size(name):
    div = bs.get_spec(name).input.size_divisibility
    return 64 if 64 % div == 0 else 56


def _segmentor(name, head="UPerHead", **backbone_args):
    return MODELS.build(ConfigDict(example.tiny_model(name, head, **backbone_args)))


def _batch(model, name, n=2, training=True):
    """uint8 images and label maps through the segmentor's own SegDataPreProcessor, as mmseg feeds them."""
    size = _size(name)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, NUM_CLASSES, (1, size, size), generator=gen))
        samples.append(sample)
    images = [torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8) for _ in range(n)]
    return model.data_preprocessor(dict(inputs=images, data_samples=samples), training)


def _backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


# -- registration, helpers ------------------------------------------------------------------------------
def test_registered_in_mmseg_registries():
    assert MODELS.get("BackboneSDK") is sdk.BackboneSDK
    assert HOOKS.get("BackboneSDKHook") is sdk.BackboneSDKHook


def test_custom_imports_registers_backbone_in_a_fresh_process():
    code = (
        "from mmengine.config import Config\n"
        "from mmseg.registry import MODELS\n"
        "assert MODELS.get('BackboneSDK') is None\n"
        f"cfg = Config.fromfile({str(EXAMPLES / 'upernet_swin_sdk.py')!r})\n"
        "assert MODELS.get('BackboneSDK') is not None, 'custom_imports did not register BackboneSDK'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", tiny_names())
@pytest.mark.parametrize("pyramid", [False, True])
def test_channels_and_strides_helpers_match_outputs(name, pyramid):
    backbone = sdk.BackboneSDK(name, pyramid=pyramid).eval()
    size = _size(name)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, size, size))
    assert isinstance(maps, tuple)
    assert [m.shape[1] for m in maps] == sdk.backbone_channels(name, pyramid=pyramid) == backbone.channels
    if not pyramid or size % 16 == 0:  # the simple pyramid works on a stride-16 grid
        assert [size // m.shape[-1] for m in maps] == sdk.backbone_strides(name, pyramid=pyramid)


@pytest.mark.parametrize("name", tiny_names())
def test_out_indices_select_levels(name):
    spec = bs.get_spec(name)
    backbone = sdk.BackboneSDK(name, out_indices=(0, -1)).eval()
    assert backbone.out_names == (spec.feature_names[0], spec.feature_names[-1])
    size = _size(name)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, size, size))
        full = backbone.body.features(torch.randn(1, 3, size, size))
    assert len(maps) == 2 and maps[1].shape == full[spec.feature_names[-1]].shape
    with pytest.raises(ValueError, match="out_indices"):
        sdk.BackboneSDK(name, out_indices=(len(spec.features),))
    with pytest.raises(ValueError, match="each once"):
        sdk.BackboneSDK(name, out_indices=(0, 0))


def test_plain_vit_default_out_indices_are_evenly_spaced():
    spec = bs.get_spec("vit_base_patch16_224")
    assert sdk.backbone._default_indices(spec, False) == (2, 5, 8, 11)
    assert sdk.backbone_channels("vit_base_patch16_224") == [768] * 4
    assert sdk.backbone_channels("vit_base_patch16_224", pyramid=True) == [256] * 4


# -- segmentors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", tiny_names())
def test_uperhead_segmentor_loss_backward_and_predict(name):
    model = _segmentor(name)
    model.init_weights()
    data = _batch(model, name)
    losses = model.loss(data["inputs"], data["data_samples"])
    total = sum(v for k, v in losses.items() if k.startswith("decode.loss"))
    assert torch.isfinite(total)
    total.backward()
    head_grad = model.decode_head.conv_seg.weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())

    model.eval()
    data = _batch(model, name, training=False)
    with torch.no_grad():
        results = model.predict(data["inputs"], data["data_samples"])
    size = _size(name)
    assert len(results) == 2
    pred = results[0].pred_sem_seg.data
    assert pred.shape == (1, size, size) and 0 <= pred.min() and pred.max() < NUM_CLASSES
    assert results[0].seg_logits.data.shape == (NUM_CLASSES, size, size)


@pytest.mark.parametrize("name", ["resnet_test", "vit_test"])
def test_fpnhead_on_pyramid(name):
    model = _segmentor(name, "FPNHead", pyramid=True)
    assert model.decode_head.feature_strides == [4, 8, 16, 32]
    data = _batch(model, name)
    losses = model.loss(data["inputs"], data["data_samples"])
    losses["decode.loss_ce"].backward()
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0
    if bs.get_spec(name).plain:  # the simple pyramid is trained as part of the backbone
        assert model.backbone.body.neck.outputs[0][0][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        pred = model.predict(torch.randn(1, 3, 64, 64))[0].pred_sem_seg.data
    assert pred.shape == (1, 64, 64)


def test_predict_needs_configdict_not_plain_dict():
    """Documented pitfall: a plain-dict test_cfg breaks mmseg's predict (attribute access)."""
    cfg = example.tiny_model("resnet_test")
    model = MODELS.build(cfg).eval()  # MODELS.build keeps nested dicts plain
    with pytest.raises(AttributeError):
        model.predict(torch.randn(1, 3, 64, 64))
    assert _segmentor("resnet_test").eval().predict(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", tiny_names())
def test_grad_checkpoint_gives_same_gradients(name):
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = _segmentor(name, grad_checkpoint=flag)
        model.decode_head.dropout = None
        data = _batch(model, name)
        model.loss(data["inputs"], data["data_samples"])["decode.loss_ce"].backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-4)


# -- fine-tune policies ---------------------------------------------------------------------------------
def _frozen(module, prefix=""):
    return {n[len(prefix):] for n, p in module.named_parameters() if not p.requires_grad and n.startswith(prefix)}


def _in_eval(module):
    return {n for n, m in module.named_modules() if not m.training}


def _reference(name, policy, norm_eval, frozen_norm=False):
    overrides = sdk.backbone._overrides(bs.get_spec(name), pyramid=False)  # same architecture, policy applied directly
    return apply_finetune(bs.create_backbone(name, **overrides), policy, norm_eval, frozen_norm).train()


@pytest.mark.parametrize("name", tiny_names())
@pytest.mark.parametrize("args,policy", [
    (dict(frozen_stages=-1), "none"),
    (dict(frozen_stages=0), "{unit}:0"),
    (dict(frozen_stages=1, norm_eval=True), "{unit}:1"),
    (dict(finetune="frozen"), "frozen"),
    (dict(frozen_stages=1, finetune="{unit}:1"), "{unit}:1"),
    (dict(frozen_stages=0, frozen_norm=True), "{unit}:0"),
])
def test_frozen_stages_match_apply_finetune(name, args, policy):
    """mmseg's frozen_stages counts stages of hierarchical nets and blocks of plain ViTs."""
    unit = "blocks" if bs.get_spec(name).plain else "stages"
    policy = policy.format(unit=unit)
    args = {k: v.format(unit=unit) if isinstance(v, str) else v for k, v in args.items()}
    norm_eval = args.get("norm_eval", False)
    reference = _reference(name, policy, norm_eval, args.get("frozen_norm", False))
    model = MODELS.build(ConfigDict(type="BackboneSDK", name=name, **args))
    segmentor = MODELS.build(ConfigDict(example.tiny_model(name, **args)))
    for wrapper in (model, segmentor.backbone):
        wrapper.train()
        assert _frozen(wrapper, "body.") == _frozen(reference)
        assert {n[5:] for n in _in_eval(wrapper) if n.startswith("body.")} == _in_eval(reference)
    segmentor.train()
    assert _frozen(segmentor.backbone, "body.") == _frozen(reference)
    assert {n[14:] for n in _in_eval(segmentor) if n.startswith("backbone.body.")} == _in_eval(reference)
    if policy != "none":
        assert _frozen(reference)
    if policy == "frozen":
        assert all(not p.requires_grad for p in model.parameters())


def test_norm_eval_keeps_batchnorm_statistics_during_training():
    model = _segmentor("resnet_test", norm_eval=True)
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [b.running_mean.clone() for b in bns]
    data = _batch(model, "resnet_test")
    model.loss(data["inputs"], data["data_samples"])["decode.loss_ce"].backward()
    assert bns and all(not b.training for b in bns)
    assert all(torch.equal(b.running_mean, s) for b, s in zip(bns, before))
    head_bns = [m for m in model.decode_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(b.training for b in head_bns)  # norm_eval is the backbone's, not the head's


def test_conflicting_frozen_stages_and_finetune():
    with pytest.raises(ValueError, match="conflicts with finetune='frozen'"):
        sdk.BackboneSDK("resnet_test", frozen_stages=1, finetune="frozen")
    with pytest.raises(ValueError, match="conflicts"):
        sdk.BackboneSDK("vit_test", frozen_stages=1, finetune="blocks:2")
    with pytest.raises(ValueError, match="frozen_stages must be"):
        sdk.BackboneSDK("resnet_test", frozen_stages=-2)
    with pytest.raises(ValueError, match="cannot freeze"):
        sdk.BackboneSDK("resnet_test", frozen_stages=5)


# -- checkpoints ------------------------------------------------------------------------------------------
def _mmengine_checkpoint(model, path, drop=(), extra=None):
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    state.update(extra or {})
    meta = {"iter": 3, "mmseg_version": "1.2.2", "dataset_meta": {"classes": ["a", "b"]}}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


@pytest.mark.parametrize("name", tiny_names())
def test_pretrained_init_cfg_with_prefix_loads_backbone(name, tmp_path):
    source = _segmentor(name)
    scramble(source.backbone)
    path = _mmengine_checkpoint(source, tmp_path / "seg.pth")
    init_cfg = dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")
    target = _segmentor(name, init_cfg=init_cfg)
    target.init_weights()
    expected = _backbone_state(source)
    got = target.backbone.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert target.backbone.load_report.exact
    assert not torch.equal(target.decode_head.conv_seg.weight, source.decode_head.conv_seg.weight)  # prefix only


def test_pretrained_init_cfg_takes_bare_backbone_checkpoints(tmp_path):
    reference = scramble(bs.create_backbone("resnet_test"))
    path = bs.save_weights(reference, tmp_path / "resnet.safetensors")
    model = _segmentor("resnet_test", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    model.init_weights()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[key], value)
    by_weights = sdk.BackboneSDK("resnet_test", weights=str(path))
    assert torch.equal(by_weights.body.model.embedder.embedder.convolution.weight,
                       reference.model.embedder.embedder.convolution.weight)
    legacy = MODELS.build(ConfigDict(example.tiny_model("resnet_test"), pretrained=str(path)))  # mmseg's old spelling
    legacy.init_weights()
    assert torch.equal(legacy.backbone.body.model.encoder.stages[3].layers[0].shortcut.convolution.weight,
                       reference.model.encoder.stages[3].layers[0].shortcut.convolution.weight)


def test_weights_hub_resolves_the_spec_hub_id():
    with pytest.raises(ValueError, match="no published hub id"):
        sdk.BackboneSDK("resnet_test", weights="hub")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        with pytest.raises(bs.CheckpointError, match="microsoft/resnet-18"):
            sdk.BackboneSDK("resnet18", weights="hub")


@pytest.mark.parametrize("name", [n for n in tiny_names() if bs.get_spec(n).plain])
def test_parts_left_out_do_not_break_loading_full_checkpoints(name, tmp_path):
    """Plain ViTs drop the unused simple pyramid (pyramid=False), CLIP its text tower; full checkpoints still load."""
    reference = scramble(bs.create_backbone(name))
    path = bs.save_weights(reference, tmp_path / "full.safetensors")
    model = sdk.BackboneSDK(name, weights=str(path))
    assert model.body.neck is None
    assert not any(".text_model." in k for k in model.state_dict())
    full = reference.state_dict()
    assert model.body.state_dict().keys() < full.keys()
    assert all(torch.equal(v, full[k]) for k, v in model.body.state_dict().items())
    with_pyramid = sdk.BackboneSDK(name, weights=str(path), pyramid=True)
    assert torch.equal(with_pyramid.body.neck.up2.weight, reference.neck.up2.weight)


def test_mismatched_checkpoint_raises_with_key_report(tmp_path):
    other = _segmentor("vit_test")
    path = _mmengine_checkpoint(other, tmp_path / "vit_seg.pth")
    model = _segmentor("resnet_test", init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone."))
    with pytest.raises(bs.CheckpointMismatchError) as info:
        model.init_weights()
    assert info.value.missing and info.value.unexpected
    assert "missing" in str(info.value) and "unexpected" in str(info.value)


def test_partial_checkpoint_is_not_loaded_silently(tmp_path):
    source = _segmentor("resnet_test")
    dropped = "backbone.body.model.encoder.stages.3.layers.0.shortcut.convolution.weight"
    extra = {"backbone.body.model.extra.weight": torch.zeros(1)}
    path = _mmengine_checkpoint(source, tmp_path / "partial.pth", drop=[dropped], extra=extra)
    model = _segmentor("resnet_test", init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone."))
    with pytest.raises(bs.CheckpointMismatchError) as info:
        model.init_weights()
    assert info.value.missing == [dropped[len("backbone.body."):]]
    assert info.value.unexpected == ["model.extra.weight"]
    lenient = _segmentor("resnet_test", init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone.",
                                                      strict=False))
    lenient.init_weights()
    assert lenient.backbone.load_report.missing == tuple(info.value.missing)


def test_wrong_prefix_and_pickled_code_are_rejected(tmp_path):
    path = _mmengine_checkpoint(_segmentor("resnet_test"), tmp_path / "seg.pth")
    model = _segmentor("resnet_test", init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="encoder."))
    with pytest.raises(bs.CheckpointError, match="prefix 'encoder.'"):
        model.init_weights()
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "meta": {"hook": print}}, unsafe)
    model = _segmentor("resnet_test", init_cfg=dict(type="Pretrained", checkpoint=str(unsafe), prefix="backbone."))
    with pytest.raises(bs.CheckpointError, match="weights_only"):
        model.init_weights()


# -- data preprocessor ------------------------------------------------------------------------------------
def test_data_preprocessor_for_matches_spec():
    cfg = sdk.data_preprocessor_for("vit_test", (64, 64))
    spec = bs.get_spec("vit_test")
    assert cfg["mean"] == pytest.approx([m * 255 for m in spec.input.mean])
    assert cfg["std"] == pytest.approx([s * 255 for s in spec.input.std])
    assert cfg["bgr_to_rgb"] is True and cfg["size"] == (64, 64)
    assert cfg["test_cfg"] == dict(size_divisor=8)
    assert sdk.data_preprocessor_for("resnet_test")["size_divisor"] == 1


@pytest.mark.parametrize("name", tiny_names())
def test_data_preprocessor_for_passes_the_check(name):
    model_cfg = example.tiny_model(name)
    assert model_cfg["data_preprocessor"] == sdk.data_preprocessor_for(name)
    sdk.check_data_preprocessor(Config(dict(model=model_cfg)))


def test_check_data_preprocessor_accepts_matching_and_rejects_wrong():
    good = Config(dict(model=example.tiny_model("resnet_test")))
    sdk.check_data_preprocessor(good)
    sdk.check_data_preprocessor(good.model)
    sdk.check_data_preprocessor(MODELS.build(good.model))

    clip_mean = Config(dict(model=example.tiny_model("resnet_test")))
    clip_mean.model.data_preprocessor.mean = [122.77, 116.75, 104.09]
    with pytest.raises(ValueError, match=r"(?s)mean=\[122.77.*data_preprocessor_for\('resnet_test'"):
        sdk.check_data_preprocessor(clip_mean)
    with pytest.raises(ValueError, match="mean"):
        sdk.check_data_preprocessor(MODELS.build(clip_mean.model))

    bgr = Config(dict(model=example.tiny_model("resnet_test")))
    bgr.model.data_preprocessor.bgr_to_rgb = False
    with pytest.raises(ValueError, match="bgr_to_rgb"):
        sdk.check_data_preprocessor(bgr)
    sdk.check_data_preprocessor(bgr, bgr_input=False)
    with pytest.raises(ValueError, match="flipped"):
        sdk.check_data_preprocessor(good, bgr_input=False)

    unnormalized = Config(dict(model=example.tiny_model("resnet_test")))
    unnormalized.model.data_preprocessor = dict(type="SegDataPreProcessor", bgr_to_rgb=True, size_divisor=1)
    with pytest.raises(ValueError, match="unnormalized"):
        sdk.check_data_preprocessor(MODELS.build(unnormalized.model))


def test_hook_rejects_mismatched_preprocessor_before_training(tmp_path):
    from mmengine.runner import Runner

    root = example.write_synthetic_dataset(tmp_path / "data", count=2)
    model = example.tiny_model("resnet_test")
    model["data_preprocessor"]["std"] = [1.0, 1.0, 1.0]
    runner = Runner.from_cfg(Config(example.runner_cfg(model, root, tmp_path / "work", iters=1, validate=False)))
    with pytest.raises(ValueError, match="std"):
        runner.train()
    assert runner.iter == 0


# -- example configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,tiny", [("upernet_swin_sdk.py", "swin_test"), ("fpn_dinov2_sdk.py", "dinov2_test")])
def test_example_configs_are_consistent_and_build(config, tiny):
    cfg = Config.fromfile(EXAMPLES / config)
    backbone = cfg.model.backbone
    pyramid = backbone.get("pyramid", False)
    assert bs.get_spec(backbone.name)
    assert cfg.model.decode_head.in_channels == sdk.backbone_channels(backbone.name, backbone.get("out_indices"),
                                                                      pyramid)
    if "feature_strides" in cfg.model.decode_head:
        assert cfg.model.decode_head.feature_strides == sdk.backbone_strides(backbone.name, None, pyramid)
    if "auxiliary_head" in cfg.model:
        aux = cfg.model.auxiliary_head
        assert aux.in_channels == sdk.backbone_channels(backbone.name)[aux.in_index]
    sdk.check_data_preprocessor(cfg)
    for part in ("mean", "std", "bgr_to_rgb"):
        assert cfg.model.data_preprocessor[part] == sdk.data_preprocessor_for(backbone.name)[part]
    assert DATASETS.get(cfg.train_dataloader.dataset.type)
    assert all(TRANSFORMS.get(t["type"]) for t in cfg.train_pipeline + cfg.test_pipeline)
    assert {"type": "BackboneSDKHook"} in cfg.custom_hooks
    model = MODELS.build(ConfigDict(example.config_with_backbone(str(EXAMPLES / config), tiny)))
    data = _batch(model, tiny)
    assert torch.isfinite(model.loss(data["inputs"], data["data_samples"])["decode.loss_ce"])


# -- Runner ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", tiny_names())
def test_runner_trains_saves_and_resumes(name, tmp_path):
    uninterrupted = example.main(["--backbone", name, "--iters", "12", "--work-dir", str(tmp_path / "a")])
    losses = uninterrupted.message_hub.get_scalar("train/loss").data[0]
    assert len(losses) == 12 and losses[-3:].mean() < losses[:3].mean()
    first = example.main(["--backbone", name, "--iters", "6", "--work-dir", str(tmp_path / "b")])
    assert first.iter == 6 and (tmp_path / "b" / "iter_6.pth").is_file()
    saved = torch.load(tmp_path / "b" / "iter_6.pth", weights_only=True)  # safe loading works (BackboneSDKHook)
    assert saved["meta"]["iter"] == 6 and any(k.startswith("backbone.body.") for k in saved["state_dict"])

    resumed = example.main(["--backbone", name, "--iters", "12", "--work-dir", str(tmp_path / "b"), "--resume"])
    assert resumed.iter == 12
    assert len(resumed.message_hub.get_scalar("train/loss").data[0]) == 12  # history restored as well
    expected, got = uninterrupted.model.state_dict(), resumed.model.state_dict()
    for key in expected:  # resuming reproduces the uninterrupted run
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)

    # the Runner's own checkpoint initializes a fresh backbone through init_cfg with prefix
    init_cfg = dict(type="Pretrained", checkpoint=str(tmp_path / "b" / "iter_12.pth"), prefix="backbone.")
    fresh = sdk.BackboneSDK(name, init_cfg=init_cfg)
    fresh.init_weights()
    assert fresh.load_report.exact
    trained = resumed.model.backbone.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


@pytest.mark.slow
def test_example_script_runs_with_a_config(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), "--config", str(EXAMPLES / "upernet_swin_sdk.py"),
         "--backbone", "swin_test", "--iters", "4", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iterations 4" in result.stdout and (tmp_path / "iter_4.pth").is_file()
    output = result.stdout + result.stderr  # quiet by default: no config dump, no deprecation warnings
    assert "decode_head" not in output and "WARNING" not in output and "Warning" not in output, output[-3000:]
    assert len(output.splitlines()) <= 4, output[-3000:]


# -- missing framework -------------------------------------------------------------------------------------
def test_missing_mmseg_raises_install_hint():
    code = (
        "import sys; sys.modules['mmseg'] = None\n"
        "import backbone_sdk\n"
        "try:\n"
        "    import backbone_sdk.integrations.mmseg\n"
        "except backbone_sdk.MissingDependencyError as e:\n"
        "    print('OK', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("OK") and "backbone-sdk[mmseg]" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("out_indices", [(1.0,), "0", (True,), 1.5])
def test_out_indices_not_ints(out_indices):
    with pytest.raises(bs.InvalidOptionError, match="out_indices must be an int or a list"):
        sdk.MMSegBackbone("resnet_test", out_indices=out_indices)
    assert sdk.BackboneSDK is sdk.MMSegBackbone and MODELS.get("BackboneSDK") is sdk.MMSegBackbone
