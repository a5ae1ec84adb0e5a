"""The timm bridge (contrib/backbone-sdk-timm, installed by .ci/install) inside the real frameworks:
a Detectron2 Faster R-CNN, an mmseg UPerHead segmentor and a multimodal LLM each train a step on a
timm backbone, through the same entry points as the built-in families. The bridge's own contract and
parity tests are in contrib/backbone-sdk-timm/tests."""

import numpy as np
import pytest
import torch

from _frameworks import load_example, require, single_thread
from _vlm_kit import image, make_mm

require("backbone_sdk_timm")

import backbone_sdk as bs  # noqa: E402

pytestmark = pytest.mark.integration
CNN, VIT = "timm/convnext_atto", "timm/vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _threads():
    with single_thread():
        yield


def _first_trainable_group_has_grad(backbone):
    groups = backbone.stage_modules()
    trainable = [g for g in groups if any(p.requires_grad for p in g.parameters())]
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable[0].parameters())


def test_detectron2_faster_rcnn_trains_a_step(tmp_path):
    require("detectron2")
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from backbone_sdk.integrations import detectron2 as sdk

    example = load_example("detectron2")
    example.register_synthetic("timm_bridge_d2", tmp_path, count=4, size=(64, 96))
    cfg = example.yacs_cfg(CNN, config_file=None, dataset="timm_bridge_d2", iters=1, output_dir=str(tmp_path),
                           tiny=True, size=96, finetune="stages:1")
    model = build_model(cfg).train()
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, sdk.SDKBackbone) and bottom_up.body.spec.name == CNN
    assert {k: v.stride for k, v in model.backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32,
                                                                                "p6": 64}
    np.random.seed(0)
    batch = next(iter(build_detection_train_loader(cfg)))
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    frozen = bottom_up.body.stage_modules()[:2]
    assert all(p.grad is None and not p.requires_grad for g in frozen for p in g.parameters())
    assert _first_trainable_group_has_grad(bottom_up.body)


def test_mmseg_uperhead_trains_a_step():
    require("mmseg")
    from mmengine.config import ConfigDict
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    example = load_example("mmseg")
    model = MODELS.build(ConfigDict(example.tiny_model(CNN, "UPerHead", out_indices=(0, 1, 2, 3))))
    model.init_weights()
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 4, (1, 64, 64), generator=gen))
        samples.append(sample)
    images = [torch.randint(0, 256, (3, 64, 64), generator=gen, dtype=torch.uint8) for _ in range(2)]
    data = model.data_preprocessor(dict(inputs=images, data_samples=samples), True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = model.loss(data["inputs"], data["data_samples"])
    total = sum(v for k, v in losses.items() if k.startswith("decode.loss"))
    assert torch.isfinite(total)
    total.backward()
    assert _first_trainable_group_has_grad(model.backbone.body)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.backbone.named_parameters())


def test_vlm_tower_trains_a_step(tokenizer):
    from backbone_sdk.adapters.vlm import VisionTower

    tower = VisionTower(VIT, finetune="blocks:6")
    assert tower.backbone.spec.prefix_tokens.cls
    mm = make_mm(tokenizer, tower).train()
    out = mm(prompt="<image> describe the image", images=[image(64, 96)], answer="a red square")
    assert torch.isfinite(out.loss)
    out.loss.backward()
    groups = mm.tower.backbone.stage_modules()
    assert all(p.grad is None for g in groups[:7] for p in g.parameters())  # stem and blocks 0-5 frozen
    used = groups[len(groups) + mm.tower.select_layer]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in used.parameters())
    assert all(p.grad is not None for p in mm.projector.parameters())


def test_bridge_names_are_resolved_not_registered():
    registry = bs.Registry()
    with bs.use_registry(registry):
        assert not [n for n in bs.list_backbones() if n.startswith("timm/")]
        record = next(r for r in bs.plugin_report() if r.name == "timm")
        assert record.on_demand and record.distribution == "backbone-sdk-timm" and not record.error
        bs.get_spec(CNN)
        assert CNN in bs.list_backbones() and record.backbones == [CNN]


def test_docs_example_runs(capsys):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "timm_bridge.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) == 1
    with bs.use_registry(bs.Registry()):
        exec(compile(blocks[0], "docs/timm_bridge.md", "exec"), {})  # noqa: S102 (our own docs)
    out = capsys.readouterr().out
    assert "format: timm" in out and "embed equals timm's pre-logits: True" in out and "'p5': (2, 320, 4, 4)" in out
