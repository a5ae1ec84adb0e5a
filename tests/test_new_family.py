"""A brand-new family added through an inline plugin, with no change anywhere else in the SDK: the
documented example plugin (examples/plugin, a plain ViT with CLS + 2 registers written only against
the public contract) passes the contract checks and trains in Detectron2, mmseg and as a VLM tower."""

import sys
from pathlib import Path

import pytest
import torch

import backbone_sdk as bs
import backbone_sdk.testing as bst
from _frameworks import load_example, require, single_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "plugin"))
import tinytok  # noqa: E402

NAME = "tinytok_s"


@pytest.fixture(autouse=True)
def _plugin(register_plugin):
    register_plugin(tinytok, name="tinytok")


def test_contract(tmp_path):
    bst.check_backbone(NAME, tmp_path=tmp_path, compile=True)
    spec = bs.get_spec(NAME)
    assert spec.prefix_tokens == bs.PrefixTokens(cls=True, registers=2) and spec.pyramid.sources == ("block1",)


@pytest.mark.parametrize("overrides", [
    {"depth": 3}, {"registers": 0}, {"patch_size": 16}, {"parts": ()}, {"neck_channels": 8}])
def test_overrides(overrides):
    bst.check_overrides(NAME, **overrides)


def test_vision_tower_token_count_and_cls():
    from backbone_sdk.adapters.vlm import VisionTower

    tower = VisionTower(NAME, select_layer=-1, select_feature="cls_patch", drop_registers=False, finetune="none")
    out = tower(torch.randn(2, 3, 32, 32))
    assert tower.num_tokens((32, 32)) == out.shape[1] == 16 + 1 + 2
    assert tower.hidden_size == out.shape[-1] == 32
    out.pow(2).mean().backward()
    assert tower.backbone.stem.patch.weight.grad.abs().sum() > 0


def test_llava_cls_patch():
    from transformers import LlamaConfig, LlamaForCausalLM

    from backbone_sdk.integrations.llava import llava_with_backbone

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    llava = llava_with_backbone(bs.create_backbone(NAME, parts=()), lm, image_token_id=63,
                                select_feature="cls_patch", select_layer=-1)
    assert llava.config.vision_feature_select_strategy == "full"  # keep CLS, which the shim puts first
    states = llava.model.vision_tower(torch.randn(1, 3, 32, 32), output_hidden_states=-1).hidden_states
    assert states[-1].shape == (1, 1 + 16, 32)  # CLS + patches, the 2 registers dropped


@pytest.mark.integration
def test_detectron2_trains_a_step(tmp_path):
    require("detectron2")
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model

    example = load_example("detectron2")
    with single_thread():
        example.register_synthetic("tinytok_d2", tmp_path, count=4, size=(64, 96))
        cfg = example.yacs_cfg(NAME, dataset="tinytok_d2", iters=2, output_dir=str(tmp_path), tiny=True, size=96)
        model = build_model(cfg).train()
        params = [p for p in model.parameters() if p.requires_grad]
        trainer = SimpleTrainer(model, build_detection_train_loader(cfg), torch.optim.AdamW(params, lr=1e-3))
        trainer.train(0, 2)
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    bottom_up = model.backbone.bottom_up
    assert bottom_up.body.spec.name == NAME and list(bottom_up.output_shape()) == ["res2", "res3", "res4", "res5"]
    assert not any(p.requires_grad for p in bottom_up.body.stem.parameters())  # FREEZE_AT 2: stem + block0


@pytest.mark.integration
def test_mmseg_trains_a_step():
    require("mmseg")
    from mmengine.config import ConfigDict
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    example = load_example("mmseg")
    model = MODELS.build(ConfigDict(example.tiny_model(NAME, "UPerHead", pyramid=True)))
    model.init_weights()
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 4, (1, 64, 64)))
        samples.append(sample)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in samples]
    data = model.data_preprocessor(dict(inputs=images, data_samples=samples), True)
    losses = model.loss(data["inputs"], data["data_samples"])
    losses["decode.loss_ce"].backward()
    assert model.backbone.body.neck.outputs[0][0][0].weight.grad.abs().sum() > 0
    assert model.backbone.body.blocks[0].qkv.weight.grad.abs().sum() > 0
