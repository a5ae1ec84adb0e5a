"""Bad inputs and faults, each named after the case: a clear SDK error (problem and fix), never a raw
traceback or a silent wrong answer."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

import backbone_sdk as bs
from conftest import tiny_names

TINY = tiny_names()


# -- images and arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["features", "pyramid", "embed", "tokens"])
@pytest.mark.parametrize("name", TINY)
def test_batch_of_zero_images(name, method):
    model = bs.create_backbone(name)
    with pytest.raises(bs.InputShapeError, match="empty batch"):
        getattr(model, method)(torch.zeros(0, 3, 64, 64) if model.spec.input.size_divisibility != 14
                               else torch.zeros(0, 3, 56, 56))


def test_meta_device_images_on_real_weights():
    model = bs.create_backbone("vit_test")
    with pytest.raises(bs.InputDtypeError, match="meta device"):
        model.embed(torch.empty(1, 3, 32, 32, device="meta"))


def test_meta_device_model_and_images_infer_shapes():
    with torch.device("meta"):
        model = bs.create_backbone("swin_test")
        pyr = model.pyramid(torch.empty(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in pyr.items()} == {
        "p2": (2, 16, 16, 24), "p3": (2, 32, 8, 12), "p4": (2, 64, 4, 6), "p5": (2, 128, 2, 3)}


def test_levels_as_an_int():
    with pytest.raises(bs.InvalidOptionError, match="levels must be a level name"):
        bs.create_backbone("resnet_test").features(torch.randn(1, 3, 64, 64), levels=3)


@pytest.mark.parametrize("layer", ["1", 1.0, None, True])
def test_tokens_layer_not_an_int(layer):
    with pytest.raises(bs.LayerIndexError, match="layer must be an int"):
        bs.create_backbone("resnet_test").tokens(torch.randn(1, 3, 64, 64), layer=layer)


def test_tokens_layer_out_of_range():
    with pytest.raises(bs.LayerIndexError, match=r"has 4 stages \(stage1..stage4\); layer must be in \[-4, 3\]"):
        bs.create_backbone("resnet_test").tokens(torch.randn(1, 3, 64, 64), layer=99)


@pytest.mark.parametrize("name", [None, "", 3])
def test_create_backbone_without_a_name(name):
    with pytest.raises(bs.InvalidOptionError, match="non-empty string"):
        bs.create_backbone(name)


@pytest.mark.parametrize("weights", [123, 1.5, ["a.pt"], ""])
def test_weights_of_the_wrong_type(weights):
    with pytest.raises(bs.InvalidOptionError, match="weights must be 'hub'"):
        bs.create_backbone("resnet_test", weights=weights)


@pytest.mark.parametrize(("overrides", "words"), [({"dim": 0}, "dim must be"), ({"window": 0}, "window must be")])
def test_nonsense_config_values(overrides, words):
    name = "vit_test" if "dim" in overrides else "swin_test"
    with pytest.raises(bs.InvalidOptionError, match=words):
        bs.create_backbone(name, **overrides)


def test_finetune_policy_of_the_wrong_type():
    from backbone_sdk.adapters.finetune import apply_finetune

    with pytest.raises(bs.InvalidOptionError, match="fine-tune policy must be a string"):
        apply_finetune(bs.create_backbone("resnet_test"), 2)


# -- checkpoint files ------------------------------------------------------------------------------------
@pytest.fixture
def state():
    return bs.create_backbone("resnet_test").state_dict()


def test_empty_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"")
    with pytest.raises(bs.CheckpointError, match=r"w.safetensors is empty \(0 bytes\)"):
        bs.create_backbone("resnet_test", weights=str(path))


def test_truncated_safetensors_file(tmp_path, state):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(bs.CheckpointError, match="w.safetensors is truncated"):
        bs.create_backbone("resnet_test", weights=str(path))


def test_not_a_safetensors_file(tmp_path, state):
    path = tmp_path / "w.safetensors"
    torch.save(state, path)
    with pytest.raises(bs.CheckpointError, match="w.safetensors is not a safetensors file"):
        bs.create_backbone("resnet_test", weights=str(path))


def test_empty_pth_file(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    with pytest.raises(bs.CheckpointError, match=r"w.pth is empty \(0 bytes\)"):
        bs.create_backbone("resnet_test", weights=str(path))


def test_truncated_pth_file(tmp_path, state):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(bs.CheckpointError, match="damaged or truncated torch zip checkpoint"):
        bs.create_backbone("resnet_test", weights=str(path))


def test_random_bytes_pth_file(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes().replace(b"PK", b"pk"))
    with pytest.raises(bs.CheckpointError, match="is not a torch checkpoint"):
        bs.create_backbone("resnet_test", weights=str(path))


class _Payload:
    pass


def test_pickle_with_objects_other_than_tensors(tmp_path, state):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state, "extra": _Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(bs.CheckpointError, match="holds pickled objects other than tensors"):
        bs.create_backbone("resnet_test", weights=str(path))


def test_int64_tensors_into_float_parameters(state):
    bad = {k: (v.long() if k.endswith("convolution.weight") else v) for k, v in state.items()}
    with pytest.raises(bs.CheckpointMismatchError, match="dtype mismatch") as info:
        bs.create_backbone("resnet_test", weights=bad)
    assert any("torch.int64 vs model torch.float32" in m for m in info.value.mismatched)
    report = bs.create_backbone("resnet_test", weights=bad, strict=False).load_report
    assert report.dtype_mismatched and not report.exact


def test_nonfinite_weights(state):
    bad = dict(state)
    key = next(k for k in bad if k.endswith("convolution.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0, 0, 0] = float("nan")
    with pytest.raises(bs.CheckpointError, match="NaN/Inf values in 1 tensor"):
        bs.create_backbone("resnet_test", weights=bad)
    model = bs.create_backbone("resnet_test")
    report = bs.load_weights(model, bad, allow_nonfinite=True)
    assert report.nonfinite == (key,) and torch.isnan(model.state_dict()[key]).any()


def test_transformers_directory_prints_nothing(tmp_path, capfd):
    from transformers import ViTModel

    model = bs.create_backbone("vit_test")
    ViTModel(model.model.config, add_pooling_layer=True).save_pretrained(tmp_path)
    capfd.readouterr()
    loaded = bs.create_backbone("vit_test", weights=str(tmp_path))
    out, err = capfd.readouterr()
    assert loaded.load_report.exact and out == "", out[:500]


def test_half_precision_state_dict_still_loads(state):
    model = bs.create_backbone("resnet_test", weights={k: v.half() if v.is_floating_point() or
                                                       k.endswith("num_batches_tracked") else v for k, v in state.items()})
    assert model.load_report.exact


def test_legacy_flags_with_empty_parts():
    assert bs.get_spec("vit_test").with_config(with_pyramid=False).parts == frozenset()
    clip = bs.get_spec("clip_test")
    with pytest.warns(DeprecationWarning):
        assert clip.with_config(parts=(), with_text=True).parts == {"text"}


def test_conversion_uses_the_active_registry(register_plugin):
    import types

    conv = types.SimpleNamespace()

    @bs.hookimpl
    def register_backbones(registry):
        registry.add(bs.BackboneSpec(name="toy_iso", family="toy", builder=_Toy,
                                     features=[bs.FeatureInfo("out", 4, 2)], embed_dim=4))

    @bs.hookimpl
    def convert_checkpoint(spec, state_dict, source_format):
        return ({"conv.weight": state_dict["legacy.w"], "conv.bias": state_dict["legacy.b"]}, "legacy") \
            if "legacy.w" in state_dict else None

    conv.register_backbones, conv.convert_checkpoint = register_backbones, convert_checkpoint
    register_plugin(conv, "iso")
    ref = bs.create_backbone("toy_iso")
    model = bs.create_backbone("toy_iso", weights={"legacy.w": ref.conv.weight.detach(), "legacy.b": ref.conv.bias.detach()})
    assert model.load_report.format == "legacy"


class _Toy(bs.Backbone):
    def __init__(self, spec):
        super().__init__(spec)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def _features(self, images, levels):
        return {"out": self.conv(images)}


def test_max_pixels_above_pil_default(tmp_path):
    from PIL import Image

    from backbone_sdk.imageio import decode_image

    Image.new("1", (10000, 9000)).save(tmp_path / "big.png")
    assert decode_image(str(tmp_path / "big.png"), max_pixels=200_000_000).array.shape == (9000, 10000, 3)


def test_claims_live_owner_kept_empty_lock_retaken_release_only_own(tmp_path):
    import json
    import os
    import socket

    from backbone_sdk.extraction.store import Layout, claim, release

    layout = Layout(tmp_path)
    layout.make_dirs()
    lock = layout.lock(0)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "time": 0}))
    assert not claim(layout, 0, stale_after=1)  # alive on this host: never stale
    release(layout, 0)
    assert lock.exists()  # not ours: left alone
    lock.write_text("")
    os.utime(lock, (0, 0))
    assert claim(layout, 0, stale_after=1)  # an empty claim falls back to the file's age
    release(layout, 0)
    assert not lock.exists()
