"""Checkpoint resolution, reading, strict loading with key reports, and saving."""

import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

import backbone_sdk as bs
from backbone_sdk.weights import read_state_dict, resolve_checkpoint


@pytest.fixture()
def model():
    return bs.create_backbone("resnet_test").eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_is_exact(model, tmp_path):
    path = bs.save_weights(model, tmp_path / "w.safetensors")
    loaded = bs.create_backbone("resnet_test", weights=path)
    assert _same(model, loaded)
    assert loaded.load_report.format == "native" and loaded.load_report.exact
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval().embed(x), loaded.eval().embed(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_pt_files_and_containers(model, tmp_path, wrap):
    state = model.state_dict()
    obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
           "model": {"model": state}, "module_prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pth")
    assert _same(model, bs.create_backbone("resnet_test", weights=tmp_path / "w.pth"))


def test_hub_layout_directory_prefers_safetensors(model, tmp_path):
    bs.save_weights(model, tmp_path / "model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    assert resolve_checkpoint(tmp_path) == [tmp_path / "model.safetensors"]
    assert _same(model, bs.create_backbone("resnet_test", weights=str(tmp_path)))


def test_sharded_directory_is_merged(model, tmp_path):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert read_state_dict(tmp_path).keys() == state.keys()


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(bs.CheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pt")


def test_sha256_verification(model, tmp_path):
    path = bs.save_weights(model, tmp_path / "w.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_state_dict(path, sha256=digest).keys() == model.state_dict().keys()
    with pytest.raises(bs.CheckpointError, match="sha256 mismatch"):
        read_state_dict(path, sha256="0" * 64)


def test_mismatch_report_names_missing_unexpected_and_shapes(model, tmp_path):
    state = dict(model.state_dict())
    state.pop("model.embedder.embedder.convolution.weight")
    state["extra.weight"] = torch.zeros(1)
    key = "model.encoder.stages.0.layers.0.layer.0.convolution.weight"
    state[key] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(bs.CheckpointMismatchError) as info:
        bs.load_weights(model, state)
    err = info.value
    assert err.missing == ["model.embedder.embedder.convolution.weight"]
    assert err.unexpected == ["extra.weight"]
    assert err.mismatched[0].startswith(key) and "strict=False" in str(err)
    before = model.state_dict()[key].clone()
    report = bs.load_weights(model, state, strict=False)
    assert not report.exact and torch.equal(model.state_dict()[key], before)


def test_missing_file_and_offline_hub_errors(tmp_path):
    with pytest.raises(bs.CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(bs.CheckpointError, match="offline|HF_HUB_OFFLINE|could not fetch"):
        resolve_checkpoint("someorg/definitely-not-cached-model")
    with pytest.raises(bs.CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)


def test_unknown_explicit_format_is_rejected(model):
    with pytest.raises(bs.CheckpointError, match="no plugin converts 'caffe'"):
        bs.load_weights(model, {"a": torch.zeros(1)}, weights_format="caffe")


def test_random_init_is_logged_once(caplog):
    from backbone_sdk import factory

    factory._warned_random.discard("resnet_test")
    with caplog.at_level("WARNING"):
        bs.create_backbone("resnet_test")
        bs.create_backbone("resnet_test")
    assert sum("randomly initialized" in r.message for r in caplog.records) == 1


def test_transformers_save_pretrained_directory(tmp_path):
    """A transformers checkpoint directory (as on the hub) loads through from_pretrained."""
    from transformers import ResNetConfig, ResNetForImageClassification

    model = bs.create_backbone("resnet_test")
    hf = ResNetForImageClassification(ResNetConfig(**model.model.config.to_dict()))
    hf.save_pretrained(tmp_path / "hub")
    loaded = bs.create_backbone("resnet_test", weights=str(tmp_path / "hub"))
    for key, value in hf.resnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[f"model.{key}"], value), key
    with pytest.raises(bs.CheckpointError, match="does not fit resnet18"):
        bs.create_backbone("resnet18", weights=str(tmp_path / "hub"))


def test_transformers_directory_with_missing_key_is_not_a_silent_partial_load(tmp_path):
    from safetensors.torch import load_file
    from transformers import ResNetConfig, ResNetModel

    model = bs.create_backbone("resnet_test")
    ResNetModel(ResNetConfig(**model.model.config.to_dict())).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("embedder.embedder.convolution.weight")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(bs.CheckpointMismatchError, match="embedder.embedder.convolution.weight"):
        bs.create_backbone("resnet_test", weights=str(tmp_path))
