"""transformers AutoBackbone bridge: the backbone contract of transformers' BackboneTesterMixin
(re-stated here), save/load round trips, and SDK backbones inside UperNet, DPT and DETR."""

import copy
import inspect

import pytest
import torch
from _frameworks import single_thread
from transformers import AutoBackbone, AutoConfig
from transformers.backbone_utils import BackboneType, load_backbone

import backbone_sdk
from backbone_sdk.errors import InvalidOptionError
from backbone_sdk.integrations.hf_backbone import (
    BackboneSDKBackbone,
    BackboneSDKConfig,
    image_processor_for,
)


def _one_per_family() -> list[str]:
    seen, names = set(), []
    for name in backbone_sdk.list_backbones(include_test=True):
        spec = backbone_sdk.get_spec(name)
        if spec.is_test and spec.family not in seen:
            seen.add(spec.family)
            names.append(name)
    return names


def _single_scale(name: str) -> bool:
    feats = backbone_sdk.get_spec(name).features
    return len({f.channels for f in feats}) == 1 and len({f.stride for f in feats}) == 1


FAMILIES = _one_per_family()
CASES = [(n, "maps") for n in FAMILIES] + [(n, "tokens") for n in FAMILIES if _single_scale(n)]


def _pixels(name: str, batch: int = 2) -> torch.Tensor:
    h, w = backbone_sdk.get_spec(name).input.image_size
    return torch.randn(batch, 3, h, w)


def _shape_ok(tensor, output, batch, channels):
    if output == "tokens":
        return tensor.dim() == 3 and tensor.shape[0] == batch and tensor.shape[2] == channels
    return tensor.dim() == 4 and tuple(tensor.shape[:2]) == (batch, channels)


def test_families_covered():
    assert {"resnet", "swin", "dinov2", "vit", "clip"} <= {backbone_sdk.get_spec(n).family for n in FAMILIES}
    assert len([c for c in CASES if c[1] == "tokens"]) >= 5


@pytest.mark.parametrize("name,output", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_config_alignment(name, output):
    spec = backbone_sdk.get_spec(name)
    stages = list(spec.feature_names)
    config = BackboneSDKConfig(backbone=name, output=output)
    assert config.stage_names == stages
    # neither given: the last stage
    assert config.out_features == [stages[-1]] and config.out_indices == [len(stages) - 1]
    # both given and consistent
    config = BackboneSDKConfig(backbone=name, output=output, out_features=stages[:2], out_indices=[0, 1])
    assert (config.out_features, config.out_indices) == (stages[:2], [0, 1])
    # only features / only indices
    assert BackboneSDKConfig(backbone=name, output=output, out_features=[stages[-1]]).out_indices == [len(stages) - 1]
    assert BackboneSDKConfig(backbone=name, output=output, out_indices=[0]).out_features == [stages[0]]
    # negative indices name the same stages counted from the end
    neg = BackboneSDKConfig(backbone=name, output=output, out_indices=[-2, -1])
    assert neg.out_features == stages[-2:]
    # inconsistent pairs, unknown names, wrong order
    with pytest.raises(ValueError):
        BackboneSDKConfig(backbone=name, output=output, out_features=[stages[1]], out_indices=[0])
    with pytest.raises(ValueError):
        BackboneSDKConfig(backbone=name, output=output, out_features=["nope"])
    with pytest.raises(ValueError):
        BackboneSDKConfig(backbone=name, output=output, out_indices=[1, 0])
    # setters re-align
    config.out_indices = [-1]
    assert config.out_features == [stages[-1]]
    if output == "tokens":
        assert config.hidden_size == spec.features[0].channels and config.patch_size == spec.features[0].stride
    else:
        assert config.hidden_size is None and config.patch_size is None


@pytest.mark.parametrize("name,output", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_backbone_contract(name, output, tmp_path):
    spec = backbone_sdk.get_spec(name)
    stages = list(spec.feature_names)
    config = BackboneSDKConfig(backbone=name, output=output, out_indices=list(range(len(stages))))
    x = _pixels(name)
    with single_thread():
        model = AutoBackbone.from_config(config).eval()
        assert isinstance(model, BackboneSDKBackbone)
        assert list(inspect.signature(model.forward).parameters)[:1] == ["pixel_values"]
        # common attributes
        assert model.backbone_type == BackboneType.TRANSFORMERS
        assert model.has_attentions is False
        assert model.stage_names == stages
        assert model.num_features == [f.channels for f in spec.features]
        assert model.out_feature_channels == {f.name: f.channels for f in spec.features}
        assert model.channels == [model.num_features[config.stage_names.index(f)] for f in config.out_features]
        assert len(model.channels) == len(model.out_indices) == len(stages)

        out = model(x)
        assert isinstance(out.feature_maps, tuple) and len(out.feature_maps) == len(model.channels)
        for fmap, ch in zip(out.feature_maps, model.channels):
            assert _shape_ok(fmap, output, 2, ch)
        assert out.hidden_states is None and out.attentions is None
        if output == "tokens":  # [B, 1 + N, C]: one CLS (or mean) token, then the patch grid
            n = (x.shape[-2] // spec.features[0].stride) * (x.shape[-1] // spec.features[0].stride)
            assert out.feature_maps[-1].shape[1] == 1 + n
            tokens = model.body.tokens(x, -1)
            torch.testing.assert_close(out.feature_maps[-1][:, 1:], tokens.patches)
            head = tokens.cls if tokens.cls is not None else tokens.patches.mean(1)
            torch.testing.assert_close(out.feature_maps[-1][:, 0], head)
        else:
            ref = model.body.features(x)
            for fmap, stage in zip(out.feature_maps, stages):
                torch.testing.assert_close(fmap, ref[stage])

        hidden = model(x, output_hidden_states=True)
        assert len(hidden.hidden_states) == len(stages)
        for h, ch in zip(hidden.hidden_states, model.num_features):
            assert _shape_ok(h, output, 2, ch)
        as_tuple = model(x, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and len(as_tuple[0]) == len(stages)
        # what task models call: output_attentions is dropped for a backbone without attentions
        filtered = model.forward_with_filtered_kwargs(x, output_attentions=True)
        assert filtered.attentions is None and len(filtered.feature_maps) == len(stages)

        # stage selection with negative indices: two maps, channels in stage order
        selected = copy.deepcopy(config)
        selected.out_indices = [-2, -1]
        model2 = AutoBackbone.from_config(selected).eval()
        out2 = model2(x)
        assert len(out2.feature_maps) == 2 and model2.out_features == stages[-2:]
        assert model2.channels == [model2.out_feature_channels[s] for s in stages if s in model2.out_features]

        # defaults: out_features / out_indices None -> the last stage only
        for field in ("out_features", "out_indices"):
            modified = copy.deepcopy(config)
            setattr(modified, field, None)
            model3 = load_backbone(modified).eval()
            assert model3.channels == [model.num_features[-1]] and len(model3(x).feature_maps) == 1

    # config save / load
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, BackboneSDKConfig)
    assert {**again.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}


def test_pyramid_output():
    config = BackboneSDKConfig(backbone="dinov2_test", output="pyramid", out_indices=[0, 1, 2, 3])
    model = AutoBackbone.from_config(config).eval()
    assert model.stage_names == ["p2", "p3", "p4", "p5"] and model.channels == [16] * 4
    assert any(n.startswith("body.neck.") for n in model.state_dict())
    x = _pixels("dinov2_test")
    out = model(x)
    assert [tuple(f.shape[-2:]) for f in out.feature_maps] == [(14, 14), (7, 7), (4, 4), (2, 2)]
    # maps mode leaves the (unused) neck out
    assert not any(".neck." in n for n in BackboneSDKBackbone(BackboneSDKConfig(backbone="dinov2_test")).state_dict())


def test_save_load_roundtrip_and_finetune(tmp_path, monkeypatch):
    config = BackboneSDKConfig(backbone="swin_test", out_indices=[0, 1, 2, 3], finetune="stages:1")
    model = BackboneSDKBackbone(config).eval()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("body.") for n, _ in model.named_parameters())
    x = _pixels("swin_test")
    ref = model(x).feature_maps
    model.save_pretrained(tmp_path)
    loaded = BackboneSDKBackbone.from_pretrained(tmp_path, disable_mmap=True)
    for a, b in zip(ref, loaded(x).feature_maps):
        assert torch.equal(a, b)
    assert {n for n, p in loaded.named_parameters() if not p.requires_grad} == frozen
    assert loaded.config.finetune == "stages:1" and loaded.config.out_features == config.out_features
    # AutoBackbone.from_pretrained dispatches to the class registered for model_type "backbone_sdk"
    # (transformers asks the hub whether a path is a repo even for local folders: answer for it offline)
    from transformers.models.auto import auto_factory

    class _LocalOnly:
        def repo_exists(self, repo_id, **kwargs):
            return True

    monkeypatch.setattr(auto_factory, "hf_api", lambda: _LocalOnly())
    auto = AutoBackbone.from_pretrained(tmp_path, disable_mmap=True)
    assert isinstance(auto, BackboneSDKBackbone) and torch.equal(auto(x).feature_maps[-1], ref[-1])


def test_bad_configs_name_the_fix():
    with pytest.raises(InvalidOptionError, match="output must be one of"):
        BackboneSDKConfig(backbone="resnet_test", output="logits")
    with pytest.raises(InvalidOptionError, match="single-scale"):
        BackboneSDKConfig(backbone="swin_test", output="tokens")
    with pytest.raises(backbone_sdk.UnknownBackboneError):
        BackboneSDKConfig(backbone="resnet_tset")
    with pytest.raises(InvalidOptionError):
        BackboneSDKConfig(backbone="resnet_test", finetune="half")
    with pytest.raises(InvalidOptionError):
        BackboneSDKConfig(backbone="resnet_test", backbone_overrides={"dpeth": 3})


def test_image_processor_matches_spec():
    import numpy as np

    spec = backbone_sdk.get_spec("dinov2_test")
    processor = image_processor_for("dinov2_test")
    assert list(processor.image_mean) == list(spec.input.mean) and list(processor.image_std) == list(spec.input.std)
    image = (np.random.default_rng(0).random((80, 100, 3)) * 255).astype("uint8")
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, *spec.input.image_size)
    ours = backbone_sdk.preprocess(image, spec)
    assert (pixels - ours).abs().mean() < 0.1  # same normalization and crop (resize kernels differ slightly)


def _train_two_steps(model, batch):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


@pytest.mark.parametrize("name,output", [("swin_test", "maps"), ("dinov2_test", "pyramid")])
def test_upernet_trains_and_round_trips(name, output, tmp_path):
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(0)
    backbone = BackboneSDKConfig(backbone=name, output=output, out_indices=[0, 1, 2, 3])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=3, use_auxiliary_head=True,
                           auxiliary_channels=8,
                           pool_scales=[1, 2])
    with single_thread():
        model = UperNetForSemanticSegmentation(config)
        assert isinstance(model.backbone, BackboneSDKBackbone)
        h, w = backbone_sdk.get_spec(name).input.image_size
        batch = {"pixel_values": torch.randn(2, 3, h, w), "labels": torch.randint(0, 3, (2, h, w))}
        losses = _train_two_steps(model, batch)
        assert losses[2] < losses[0], losses
        model.eval()
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        assert tuple(logits.shape) == (2, 3, h, w)
        model.save_pretrained(tmp_path)
        # disable_mmap: CPU kernels on memory-mapped (unaligned) weights differ in the last bits (~4e-9)
        loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path, disable_mmap=True).eval()
        assert isinstance(loaded.config.backbone_config, BackboneSDKConfig)
        assert isinstance(loaded.backbone, BackboneSDKBackbone)
        saved, read = model.state_dict(), loaded.state_dict()
        assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)
        assert any(k.startswith("backbone.body.") for k in read)
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=batch["pixel_values"]).logits, logits)


def test_dpt_depth_with_dinov2_tokens():
    from transformers import DPTConfig, DPTForDepthEstimation

    backbone = BackboneSDKConfig(backbone="dinov2_test", output="tokens", backbone_overrides={"depth": 4},
                                 out_indices=[0, 1, 2, 3])
    config = DPTConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 16, 32], fusion_hidden_size=16,
                       head_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    with single_thread():
        model = DPTForDepthEstimation(config)
        assert isinstance(model.backbone, BackboneSDKBackbone)
        x = _pixels("dinov2_test")
        depth = model(pixel_values=x).predicted_depth
        assert depth.dim() == 3 and depth.shape[0] == 2 and torch.isfinite(depth).all()
        depth.mean().backward()
        assert model.backbone.body.model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_detr_trains_with_resnet():
    from transformers import DetrConfig, DetrForObjectDetection

    backbone = BackboneSDKConfig(backbone="resnet_test", out_indices=[-1])
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_labels=3)
    with single_thread():
        model = DetrForObjectDetection(config)
        x = torch.randn(2, 3, 64, 64)
        labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}
                  for _ in range(2)]
        model.train()
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_mask2former_trains_with_swin():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    backbone = BackboneSDKConfig(backbone="swin_test", out_indices=[0, 1, 2, 3])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=4, num_labels=3, train_num_points=64,
                               use_auxiliary_loss=True)
    with single_thread():
        model = Mask2FormerForUniversalSegmentation(config).train()
        assert isinstance(model.model.pixel_level_module.encoder, BackboneSDKBackbone)
        x = _pixels("swin_test")
        h, w = x.shape[-2:]
        masks = [(torch.rand(2, h, w) > 0.5).float() for _ in range(2)]
        classes = [torch.tensor([0, 2]), torch.tensor([1, 1])]
        out = model(pixel_values=x, mask_labels=masks, class_labels=classes)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        body = model.model.pixel_level_module.encoder.body
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body.stage_modules()[0].parameters())


@pytest.mark.parametrize("name", ["swin_test", "vit_test"])
def test_gradient_checkpointing_through_transformers(name):
    """transformers' ``activation_checkpointing_enable()`` on the backbone of a task model switches the
    SDK family's checkpointing; gradients stay the same."""
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(0)
    output = "pyramid" if backbone_sdk.get_spec(name).plain else "maps"
    config = UperNetConfig(backbone_config=BackboneSDKConfig(backbone=name, output=output, out_indices=[0, 1, 2, 3]),
                           hidden_size=8, num_labels=2, use_auxiliary_head=False, pool_scales=[1])
    with single_thread():
        model = UperNetForSemanticSegmentation(config).train()
        h, w = backbone_sdk.get_spec(name).input.image_size
        batch = {"pixel_values": torch.randn(2, 3, h, w), "labels": torch.randint(0, 2, (2, h, w))}

        def grads():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            return {n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None}

        plain = grads()
        model.backbone.activation_checkpointing_enable()
        assert model.backbone.gradient_checkpointing and model.backbone.is_activation_checkpointing
        checkpointed = grads()
        model.backbone.activation_checkpointing_disable()
        assert not model.backbone.gradient_checkpointing
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


def test_weights_field_loads_when_built_and_saved_weights_win(tmp_path):
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    source = backbone_sdk.create_backbone("resnet_test")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1)
    path = backbone_sdk.save_weights(source, tmp_path / "trained.safetensors")
    backbone = BackboneSDKConfig(backbone="resnet_test", weights=str(path), out_indices=[0, 1, 2, 3])
    config = UperNetConfig(backbone_config=backbone, hidden_size=8, num_labels=2, use_auxiliary_head=False,
                           pool_scales=[1])
    model = UperNetForSemanticSegmentation(config)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.backbone.body.state_dict().items())
    with torch.no_grad():
        model.backbone.body.model.embedder.embedder.convolution.weight.add_(1.0)  # "fine-tuned" after loading
    model.save_pretrained(tmp_path / "head")
    path.unlink()  # the saved task model does not need the original file
    loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "head", disable_mmap=True)
    assert loaded.config.backbone_config.weights == str(path)
    saved, read = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(saved[k], read[k]) for k in saved)
    with pytest.raises(backbone_sdk.CheckpointError, match="not found"):
        UperNetForSemanticSegmentation(config)  # built fresh, the config's weights are read (and now missing)


def test_sdk_initialization_is_kept():
    """transformers' generic init (post_init) must not overwrite the weights the SDK initialized."""
    torch.manual_seed(0)
    ref = backbone_sdk.create_backbone("dinov2_test", parts=("neck",))  # the neck is SDK code, not transformers'
    torch.manual_seed(0)
    model = BackboneSDKBackbone(BackboneSDKConfig(backbone="dinov2_test", output="pyramid"))
    ours = model.body.state_dict()
    assert ours.keys() == ref.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in ref.state_dict().items())


def test_docs_examples_run():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "hf_backbone.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) == 2
    with single_thread():
        for block in blocks:
            exec(compile(block, "docs/hf_backbone.md", "exec"), {})  # noqa: S102 (our own docs)
