"""Detectron2 integration on real detectron2: model-zoo configs, builders, trainers, checkpoints, LazyConfig."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _frameworks import load_example, require, single_thread
from conftest import scramble, tiny_names

require("detectron2")

import backbone_sdk as bs  # noqa: E402
from backbone_sdk.adapters.finetune import FinetunePolicy  # noqa: E402
from backbone_sdk.integrations import detectron2 as sdk  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.data import DatasetMapper, build_detection_train_loader  # noqa: E402
from detectron2.engine import SimpleTrainer  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.backbone.fpn import FPN  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    # pycocotools decoding polygon masks under numpy 2, once per instance
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "detectron2"
TINY = tiny_names()
DATASET = "backbone_sdk_d2_test"
H, W = 64, 96  # synthetic image size; the tiny configs keep it (MIN_SIZE 64, MAX_SIZE 96)


example = load_example("detectron2")


@pytest.fixture(scope="module", autouse=True)
def _dataset(tmp_path_factory):
    with single_thread():
        example.register_synthetic(DATASET, tmp_path_factory.mktemp("d2data"), count=8, size=(H, W))
        yield


def _cfg(name, mask=False, output_dir="unused", **options):
    """Model-zoo Faster/Mask R-CNN R-50-FPN config on backbone ``name``, shrunk for CPU tests."""
    return example.yacs_cfg(name, config_file=None, mask=mask, dataset=DATASET, iters=20, output_dir=output_dir,
                            tiny=True, size=W, **options)


def _batch(cfg, seed=0):
    np.random.seed(seed)  # detectron2's sampler seed and flip augmentation draw from numpy
    return next(iter(build_detection_train_loader(cfg)))


def _expected_divisibility(name):
    return math.lcm(32, bs.get_spec(name).input.patch_size or 1)


def _train(model, data, iters, lr=1e-3):
    """``iters`` steps of detectron2's SimpleTrainer; returns the total-loss history."""
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = SimpleTrainer(model, data, torch.optim.AdamW(params, lr=lr))
    trainer.train(0, iters)
    return [v for v, _ in trainer.storage.history("total_loss").values()]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module, prefix=""):
    return {k for k, v in module.state_dict().items() if k.startswith(prefix) and not torch.equal(v, before[k])}


def _image(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (3, H, W), generator=gen, dtype=torch.uint8), "height": H, "width": W}


# -- registration and config -----------------------------------------------------------------------
def test_builders_registered():
    assert BACKBONE_REGISTRY.get("build_backbone_sdk_backbone") is sdk.build_backbone_sdk_backbone
    assert BACKBONE_REGISTRY.get("build_backbone_sdk_fpn_backbone") is sdk.build_backbone_sdk_fpn_backbone


def test_add_config_defaults_and_idempotent():
    cfg = get_cfg()
    sdk.add_backbone_sdk_config(cfg)
    cfg.MODEL.BACKBONE_SDK.NAME = "resnet_test"
    sdk.add_backbone_sdk_config(cfg)  # must not reset
    node = cfg.MODEL.BACKBONE_SDK
    assert node.NAME == "resnet_test"
    assert (node.WEIGHTS, node.WEIGHTS_FORMAT, list(node.OUT_FEATURES), node.FINETUNE) == ("", "", [], "")
    flags = (node.NORM_EVAL, node.FROZEN_BN, node.USE_PYRAMID, node.GRAD_CHECKPOINT, node.ALLOW_PIXEL_MISMATCH)
    assert flags == (False, False, True, False, False)


def test_use_backbone_sets_builder_pixels_and_options():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    assert cfg.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/")
    sdk.use_backbone(cfg, "clip_test", finetune="blocks:1", norm_eval=True)
    assert cfg.MODEL.BACKBONE.NAME == "build_backbone_sdk_fpn_backbone"
    assert (cfg.MODEL.BACKBONE_SDK.FINETUNE, cfg.MODEL.BACKBONE_SDK.NORM_EVAL) == ("blocks:1", True)
    assert cfg.MODEL.WEIGHTS == ""
    spec = bs.get_spec("clip_test")
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([m * 255 for m in spec.input.mean])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([s * 255 for s in spec.input.std])
    with pytest.raises(sdk.ConfigError, match="MODEL.BACKBONE_SDK.FINETUNNE"):
        sdk.use_backbone(cfg, "clip_test", finetunne="frozen")
    sdk.use_backbone(cfg, "resnet_test", fpn=False)
    assert cfg.MODEL.BACKBONE.NAME == "build_backbone_sdk_backbone"


# -- every family under the model-zoo Faster R-CNN ---------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_faster_rcnn_from_model_zoo(name):
    cfg = _cfg(name, finetune="none")
    model = build_model(cfg)
    fpn, bottom_up = model.backbone, model.backbone.bottom_up
    assert isinstance(fpn, sdk.SDKFPN) and isinstance(fpn, FPN)
    assert isinstance(bottom_up, sdk.SDKBackbone) and bottom_up.body.spec.name == name
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    div = _expected_divisibility(name)
    assert bottom_up.size_divisibility == fpn.size_divisibility == div
    assert bottom_up.padding_constraints == {"size_divisibility": div, "square_size": 0}
    assert fpn.padding_constraints["size_divisibility"] == div

    batch = _batch(cfg)
    images = model.preprocess_image(batch)
    assert images.tensor.shape[-2] % div == 0 and images.tensor.shape[-1] % div == 0
    maps = bottom_up(images.tensor)
    for level, shape in bottom_up.output_shape().items():  # declared shapes are the real ones
        assert maps[level].shape[1:] == (shape.channels, images.tensor.shape[-2] // shape.stride,
                                         images.tensor.shape[-1] // shape.stride)

    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    first_block = bottom_up.body.stage_modules()[1]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block.parameters())

    model.eval()
    with torch.no_grad():
        out = model([_image()])
    assert isinstance(out[0]["instances"], Instances)
    assert out[0]["instances"].image_size == (H, W)
    assert {"pred_boxes", "scores", "pred_classes"} <= set(out[0]["instances"].get_fields())


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip(name, tmp_path):
    cfg = _cfg(name)
    model = build_model(cfg).eval()
    scramble(model.backbone)  # not the whole detector: anchors are non-persistent float buffers
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("detector")
    torch.manual_seed(1)
    other = build_model(cfg).eval()
    assert _changed(_snapshot(model), other), "a fresh model should differ before loading"
    DetectionCheckpointer(other).load(str(tmp_path / "detector.pth"))
    assert not _changed(_snapshot(model), other)
    assert set(other.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        a, b = model([_image()])[0]["instances"], other([_image()])[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_overfits_fixed_batch(name):
    cfg = _cfg(name, finetune="none")
    model = build_model(cfg)
    # measured over 4 seeds x 7 families: last/first between 0.17 and 0.51
    losses = _train(model, itertools.repeat(_batch(cfg)), iters=60, lr=2e-3)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.75 * first, f"{name}: loss {first:.3f} -> {last:.3f} on a fixed batch"


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_training_loop_on_registered_dataset(name):
    cfg = _cfg(name)
    model = build_model(cfg)
    losses = _train(model, build_detection_train_loader(cfg), iters=20)
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)


# -- fine-tune policies ----------------------------------------------------------------------------
def _groups(name):
    return "blocks" if bs.get_spec(name).plain else "stages"


@pytest.mark.parametrize("name", TINY)
def test_stages_policy_freezes_exactly_stem_and_first_n(name):
    cfg = _cfg(name, finetune=f"{_groups(name)}:1")
    model = build_model(cfg)
    body = model.backbone.bottom_up.body
    groups = body.stage_modules()
    frozen = {id(p) for g in groups[:2] for p in g.parameters()}
    assert frozen
    for pname, p in model.named_parameters():
        assert p.requires_grad == (id(p) not in frozen), pname
    before = _snapshot(model)
    _train(model, itertools.repeat(_batch(cfg)), iters=3)
    frozen_names = {n for n, p in model.named_parameters() if id(p) in frozen}
    assert not (_changed(before, model) & frozen_names)
    for g in groups[:2]:  # frozen groups stay in eval mode: BatchNorm statistics fixed too
        assert not g.training
    named = {id(p): n for n, p in model.named_parameters()}
    for i, g in enumerate(groups[2:], start=2):
        assert _changed(before, model) & {named[id(p)] for p in g.parameters()}, f"group {i} did not train"
    assert _changed(before, model, "roi_heads.") and _changed(before, model, "backbone.fpn_")


@pytest.mark.parametrize("name", TINY)
def test_frozen_policy_keeps_trunk_bit_identical(name):
    cfg = _cfg(name, finetune="frozen")
    model = build_model(cfg)
    before = _snapshot(model)
    _train(model, itertools.repeat(_batch(cfg)), iters=5, lr=1e-2)
    changed = _changed(before, model)
    trunk = "backbone.bottom_up.body."
    neck = trunk + "neck."
    assert not {k for k in changed if k.startswith(trunk) and not k.startswith(neck)}
    assert any(k.startswith("roi_heads.") for k in changed)
    assert any(k.startswith("proposal_generator.") for k in changed)
    if bs.get_spec(name).plain:  # the simple feature pyramid is a neck and keeps training
        assert any(k.startswith(neck) for k in changed)


@pytest.mark.parametrize("freeze_at, name, expected", [
    (2, "resnet_test", FinetunePolicy("stages", 1)),
    (0, "resnet_test", FinetunePolicy("none", 0)),
    (3, "vit_test", FinetunePolicy("blocks", 2)),
])
def test_empty_finetune_follows_freeze_at(freeze_at, name, expected):
    cfg = _cfg(name)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    assert build_model(cfg).backbone.bottom_up.body.finetune_policy == expected


def test_norm_eval_fixes_batchnorm_statistics():
    cfg = _cfg("resnet_test", finetune="none", norm_eval=True)
    model = build_model(cfg)
    model.train()
    bns = [m for m in model.backbone.bottom_up.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = _snapshot(model)
    _train(model, itertools.repeat(_batch(cfg)), iters=2)
    changed = _changed(before, model)
    assert not {k for k in changed if "running_" in k}
    assert any(k.endswith("normalization.weight") for k in changed)  # affine parameters still train


def test_frozen_bn_keeps_every_batchnorm_fixed():
    cfg = _cfg("resnet_test", finetune="none", frozen_bn=True)
    model = build_model(cfg)
    model.train()
    body = model.backbone.bottom_up.body
    assert body.finetune_policy.frozen_norm
    before = _snapshot(model)
    _train(model, itertools.repeat(_batch(cfg)), iters=2)
    changed = _changed(before, model)
    bn_keys = {f"backbone.bottom_up.body.{n}" for n, m in body.named_modules()
               if isinstance(m, torch.nn.BatchNorm2d)}
    assert not {k for k in changed if k.rsplit(".", 1)[0] in bn_keys}  # statistics and affine fixed
    assert any(k.endswith("convolution.weight") for k in changed)


@pytest.mark.parametrize("name", ["resnet_test", "vit_test", "swin_test"])
def test_grad_checkpoint_same_gradients(name):
    cfg = _cfg(name, finetune="none", grad_checkpoint=True)
    model = build_model(cfg)
    assert model.backbone.bottom_up.body.grad_checkpointing
    batch = _batch(cfg)

    def grads():
        model.zero_grad()
        torch.manual_seed(0)
        with EventStorage(0):
            sum(model(batch).values()).backward()
        return {n: p.grad.clone() for n, p in model.backbone.bottom_up.named_parameters() if p.grad is not None}

    with_ckpt = grads()
    model.backbone.bottom_up.body.set_grad_checkpointing(False)
    without = grads()
    assert with_ckpt.keys() == without.keys() and with_ckpt
    for n in without:
        torch.testing.assert_close(with_ckpt[n], without[n], rtol=1e-4, atol=1e-5, msg=n)


# -- weights ---------------------------------------------------------------------------------------
def test_weights_key_loads_backbone_checkpoint(tmp_path):
    source = scramble(bs.create_backbone("resnet_test"))
    path = bs.save_weights(source, tmp_path / "resnet_test.safetensors")
    model = build_model(_cfg("resnet_test", weights=str(path)))
    body = model.backbone.bottom_up.body
    assert body.load_report.exact
    for key, value in source.state_dict().items():
        assert torch.equal(body.state_dict()[key], value), key


# -- pixel pipeline --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet_test", "clip_test"])
def test_pixels_reach_backbone_normalized_like_backbone_sdk(name, tmp_path):
    """A PNG read by detectron2's DatasetMapper and normalized by the detector equals (rgb/255 - mean)/std."""
    from PIL import Image

    cfg = _cfg(name)
    model = build_model(cfg)
    rgb = torch.randint(0, 256, (H, W, 3), dtype=torch.uint8)
    Image.fromarray(rgb.numpy()).save(tmp_path / "x.png")
    mapped = DatasetMapper(cfg, is_train=False)({"file_name": str(tmp_path / "x.png"), "height": H, "width": W})
    normalized = model.preprocess_image([mapped]).tensor[0, :, :H, :W]
    spec = bs.get_spec(name).input
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    expected = (rgb.permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(normalized, expected, rtol=1e-5, atol=1e-5)


def test_pixel_mismatch_fails_at_build_naming_keys():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    sdk.add_backbone_sdk_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_backbone_sdk_fpn_backbone"
    cfg.MODEL.BACKBONE_SDK.NAME = "resnet_test"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(sdk.PixelMismatchError) as err:  # detectron2's BGR / caffe statistics
        build_model(cfg)
    assert all(k in str(err.value) for k in ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"))
    assert isinstance(err.value, ValueError)
    sdk.configure_pixels(cfg, "resnet_test")
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
    with pytest.raises(sdk.PixelMismatchError, match="MODEL.PIXEL_STD") as err:
        build_model(cfg)
    assert "INPUT.FORMAT" not in str(err.value) and "MODEL.PIXEL_MEAN" not in str(err.value)
    cfg.MODEL.BACKBONE_SDK.ALLOW_PIXEL_MISMATCH = True
    assert isinstance(build_model(cfg).backbone.bottom_up, sdk.SDKBackbone)


def test_check_pixels_on_built_model():
    model = build_model(_cfg("resnet_test"))
    sdk.check_pixels(model)
    with torch.no_grad():
        model.pixel_mean.fill_(0.0)
    with pytest.raises(sdk.PixelMismatchError, match="model.pixel_mean"):
        sdk.check_pixels(model)
    with pytest.raises(sdk.PixelMismatchError, match="model.pixel_std"):
        sdk.check_pixels(build_model(_cfg("resnet_test")), spec="clip_test")  # CLIP statistics differ


# -- bad configs fail at build time, naming the key ---------------------------------------------------
def _set(**keys):
    def apply(cfg):
        for dotted, value in keys.items():
            node, *path = dotted.split("__")
            target = cfg
            for part in [node, *path[:-1]]:
                target = target[part]
            target[path[-1]] = value
    return apply


@pytest.mark.parametrize("name, mutate, key, fragment", [
    ("resnet_test", _set(MODEL__BACKBONE_SDK__NAME="resnet_tset"), "MODEL.BACKBONE_SDK.NAME", "resnet_test"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__NAME=""), "MODEL.BACKBONE_SDK.NAME", "empty"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__OUT_FEATURES=["res2", "res6"]), "MODEL.BACKBONE_SDK.OUT_FEATURES",
     "res6"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__WEIGHTS="/no/such/dir/w.safetensors"), "MODEL.BACKBONE_SDK.WEIGHTS",
     "not found"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__WEIGHTS="missing.pth"), "MODEL.BACKBONE_SDK.WEIGHTS", "not found"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__FINETUNE="stages:x"), "MODEL.BACKBONE_SDK.FINETUNE", "stages:N"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__FINETUNE="stages:9"), "MODEL.BACKBONE_SDK.FINETUNE", "cannot freeze 9"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__FINETUNE="", MODEL__BACKBONE__FREEZE_AT=9), "MODEL.BACKBONE.FREEZE_AT",
     "FREEZE_AT"),
    ("resnet_test", _set(MODEL__FPN__IN_FEATURES=["res3", "res5"]), "MODEL.FPN.IN_FEATURES", "twice the stride"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__USE_PYRAMID=False), "MODEL.FPN.IN_FEATURES", "stage1"),
    ("resnet_test", _set(MODEL__BACKBONE_SDK__OUT_FEATURES=["res4", "res5"]), "MODEL.FPN.IN_FEATURES", "res2"),
    ("vit_test", _set(MODEL__BACKBONE_SDK__USE_PYRAMID=False), "MODEL.BACKBONE_SDK.USE_PYRAMID", "plain ViT"),
])
def test_bad_config_fails_at_build_naming_key(name, mutate, key, fragment):
    cfg = _cfg(name)
    mutate(cfg)
    with pytest.raises(sdk.ConfigError) as err:
        build_model(cfg)
    message = str(err.value)
    assert message.startswith(key + ":") or message.startswith(key + "="), message
    assert fragment in message, message


def test_weights_with_wrong_keys_name_the_key(tmp_path):
    path = bs.save_weights(bs.create_backbone("swin_test"), tmp_path / "swin.safetensors")
    with pytest.raises(sdk.ConfigError, match=r"(?s)^MODEL\.BACKBONE_SDK\.WEIGHTS: .*missing.*unexpected"):
        build_model(_cfg("resnet_test", weights=str(path)))


def test_missing_config_node_is_named():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_backbone_sdk_backbone"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(sdk.ConfigError, match=r"^MODEL\.BACKBONE_SDK: missing; call .*add_backbone_sdk_config"):
        build_model(cfg)


def test_sdkbackbone_argument_errors_name_the_argument():
    with pytest.raises(sdk.ConfigError, match=r"^Detectron2Backbone\(name=\.\.\.\): .*resnet_test"):
        sdk.SDKBackbone(name="resnet_tset")
    with pytest.raises(sdk.ConfigError, match=r"^Detectron2Backbone\(out_features=\.\.\.\): .*stage4"):
        sdk.SDKBackbone(name="resnet_test", use_pyramid=False, out_features=["res5"])


# -- the backbone alone (no FPN) ---------------------------------------------------------------------
@pytest.mark.parametrize("name, options, levels, divisibility", [
    ("resnet_test", dict(use_pyramid=False, out_features=["stage3"]), ["stage3"], 16),
    ("vit_test", dict(use_pyramid=False), ["block2"], 8),
    ("dinov2_test", dict(), list(sdk.PYRAMID_NAMES), 224),  # ViTDet style: the simple pyramid straight to heads
])
def test_standalone_builder(name, options, levels, divisibility):
    cfg = _cfg(name, finetune="none", **options)
    sdk.use_backbone(cfg, name, fpn=False)
    cfg.MODEL.RPN.IN_FEATURES = cfg.MODEL.ROI_HEADS.IN_FEATURES = levels
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16, 32, 64]] if len(levels) == 1 else [[16], [32], [64], [128]]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = levels
    model = build_model(cfg)
    assert type(model.backbone) is sdk.SDKBackbone
    assert list(model.backbone.output_shape()) == levels
    assert model.backbone.size_divisibility == divisibility
    model.train()
    with EventStorage(0):
        losses = model(_batch(cfg))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert isinstance(model([_image()])[0]["instances"], Instances)


# -- Mask R-CNN and detectron2's DefaultTrainer ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_test", "vit_test"])
def test_mask_rcnn_trains_and_predicts_masks(name):
    cfg = _cfg(name, mask=True, finetune="none")
    model = build_model(cfg)
    model.train()
    batch = _batch(cfg)
    with EventStorage(0):
        step = model(batch)
    assert "loss_mask" in step and torch.isfinite(step["loss_mask"])
    losses = _train(model, itertools.repeat(batch), iters=30)
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < sum(losses[:3])
    model.eval()
    with torch.no_grad():
        instances = model([_image()])[0]["instances"]
    assert instances.has("pred_masks") and tuple(instances.pred_masks.shape[-2:]) == (H, W)


@pytest.mark.slow
def test_default_trainer_trains_checkpoints_and_resumes(tmp_path):
    cfg = _cfg("resnet_test", output_dir=tmp_path)
    cfg.SOLVER.MAX_ITER = 6
    trainer = example.make_trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "metrics.json").is_file()
    assert all(math.isfinite(v) for v, _ in trainer.storage.history("total_loss").values())
    resumed = example.make_trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6
    assert not _changed(_snapshot(trainer.model), resumed.model)


# -- LazyConfig ----------------------------------------------------------------------------------------
def _lazy_model(name, fpn_class=sdk.SDKFPN):
    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.backbone.bottom_up = L(sdk.SDKBackbone)(name=name, out_features=list(sdk.PYRAMID_NAMES), finetune="none")
    model.backbone._target_ = fpn_class
    model.backbone.out_channels = model.proposal_generator.head.in_channels = 32
    heads = model.roi_heads
    heads.num_classes, heads.batch_size_per_image = 2, 32
    heads.box_head.input_shape.channels, heads.box_head.fc_dims = 32, [64, 64]
    heads.box_predictor.input_shape.channels = 64
    heads.mask_head.input_shape.channels, heads.mask_head.conv_dims = 32, [16, 16]
    sdk.configure_pixels(model, name)
    return model


@pytest.mark.parametrize("name", ["resnet_test", "dinov2_test"])
def test_lazy_config_bottom_up_in_model_zoo_mask_rcnn(name):
    cfg = _lazy_model(name)
    sdk.check_pixels(cfg)
    model = instantiate(cfg)
    sdk.check_pixels(model)
    assert isinstance(model.backbone.bottom_up, sdk.SDKBackbone)
    assert model.backbone.in_features == sdk.PYRAMID_NAMES  # resolved from ${.bottom_up.out_features}
    assert model.backbone.padding_constraints["size_divisibility"] == _expected_divisibility(name)
    yacs = _cfg(name, mask=True)
    model.train()
    with EventStorage(0):
        losses = model(_batch(yacs))
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert model([_image()])[0]["instances"].has("pred_masks")


def test_lazy_stock_fpn_pads_too_little_for_patch14():
    """Why SDKFPN exists: detectron2's FPN pads to 32, which a patch-14 model cannot take."""
    model = instantiate(_lazy_model("dinov2_test", fpn_class=FPN)).eval()
    assert model.backbone.size_divisibility == 32 and model.backbone.bottom_up.size_divisibility == 224
    with pytest.raises(bs.InputShapeError, match="divisible by 14"), torch.no_grad():
        model([_image()])


def test_lazy_config_pixel_check_names_lazy_keys():
    cfg = _lazy_model("resnet_test")
    cfg.input_format = "BGR"
    with pytest.raises(sdk.PixelMismatchError, match="model.input_format"):
        sdk.check_pixels(cfg)


def test_example_lazy_config_loads():
    cfg = LazyConfig.load(str(EXAMPLES / "mask_rcnn_sdk_lazy.py"))
    bottom_up = cfg.model.backbone.bottom_up
    assert bottom_up._target_ is sdk.SDKBackbone and cfg.model.backbone._target_ is sdk.SDKFPN
    sdk.check_pixels(cfg)  # model pixel statistics and dataloader image format agree with the backbone
    assert cfg.dataloader.test.mapper.image_format == "RGB"


@pytest.mark.slow
def test_example_lazy_config_trains_with_simple_trainer():
    cfg = example.lazy_cfg("swin_test", dataset=DATASET, tiny=True, size=W)
    trainer = example.train_lazy(cfg, iters=3)
    assert all(math.isfinite(v) for v, _ in trainer.storage.history("total_loss").values())
    assert trainer.model.backbone.bottom_up.body.spec.name == "swin_test"


# -- examples and packaging -----------------------------------------------------------------------------
@pytest.mark.slow
def test_example_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), "--backbone", "resnet_test", "--tiny", "--iters", "5",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total_loss: first" in result.stdout and (tmp_path / "model_final.pth").is_file()
    # quiet by default: no model repr, no per-iteration log, no third-party warnings (--verbose has them)
    output = result.stdout + result.stderr
    assert "GeneralizedRCNN(" not in output and "Warning" not in output, output[-3000:]
    assert len(output.splitlines()) <= 5, output[-3000:]


def test_example_yaml_merges_on_model_zoo_base():
    cfg = example.yacs_cfg(None, config_file=EXAMPLES / "faster_rcnn_sdk.yaml", dataset=DATASET)
    node = cfg.MODEL.BACKBONE_SDK
    assert (node.NAME, node.FINETUNE, cfg.MODEL.BACKBONE.FREEZE_AT, node.FROZEN_BN) == ("resnet50", "", 2, True)
    sdk.check_pixels(cfg)
    assert cfg.MODEL.BACKBONE.NAME == "build_backbone_sdk_fpn_backbone"


@pytest.mark.parametrize(("name", "policy"), [("resnet_test", FinetunePolicy("stages", 1, frozen_norm=True)),
                                              ("vit_test", FinetunePolicy("blocks", 1, frozen_norm=True))])
def test_example_yaml_works_for_every_family(name, policy):
    """The documented ``train.py --backbone vit_test`` path: the yaml's FREEZE_AT fits stages and blocks."""
    cfg = example.yacs_cfg(name, config_file=EXAMPLES / "faster_rcnn_sdk.yaml", dataset=DATASET, tiny=True)
    backbone = sdk.Detectron2Backbone.from_config(cfg, out_features=list(cfg.MODEL.FPN.IN_FEATURES))
    assert backbone.body.finetune_policy == policy


def test_missing_detectron2_raises_install_hint():
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "try:\n"
        "    import backbone_sdk.integrations.detectron2\n"
        "except ImportError as e:\n"
        "    from backbone_sdk import MissingDependencyError\n"
        "    assert isinstance(e, MissingDependencyError), type(e)\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('imported without detectron2')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backbone-sdk[detectron2]" in result.stdout


def test_out_features_written_as_a_string():
    """``OUT_FEATURES: res2`` (a string, not a list) means that one level, not the letters of it."""
    cfg = _cfg("resnet_test")
    cfg.MODEL.BACKBONE.NAME = "build_backbone_sdk_backbone"
    cfg.MODEL.BACKBONE_SDK.OUT_FEATURES = "res2"
    backbone = BACKBONE_REGISTRY.get("build_backbone_sdk_backbone")(cfg, None)
    assert backbone.out_features == ["res2"]
    with pytest.raises(sdk.ConfigError, match=r"Detectron2Backbone\(out_features=...\): expected a list of level names"):
        sdk.Detectron2Backbone("resnet_test", out_features=[2])


def test_freeze_at_translates_to_the_backbone_unit():
    vit = sdk.Detectron2Backbone("vit_test", freeze_at=2)
    assert vit.body.finetune_policy == FinetunePolicy("blocks", 1)
    resnet = sdk.Detectron2Backbone("resnet_test", freeze_at=2)
    assert resnet.body.finetune_policy == FinetunePolicy("stages", 1)
    with pytest.raises(sdk.ConfigError, match="either freeze_at"):
        sdk.Detectron2Backbone("resnet_test", freeze_at=2, finetune="frozen")
    assert sdk.SDKBackbone is sdk.Detectron2Backbone  # deprecated name kept for one release
