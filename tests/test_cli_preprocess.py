"""The command line and image preprocessing."""

import json
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import backbone_sdk as bs
from backbone_sdk.cli import main, sample_dir
from backbone_sdk.extract import read_extraction


def test_extract_defaults_on_bundled_samples(tmp_path):
    out = tmp_path / "emb.safetensors"
    result = CliRunner().invoke(main, ["extract", "-o", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output
    tensors, paths, meta = read_extraction(out)
    samples = sorted(sample_dir().glob("*.png"))
    assert [p.split("/")[-1] for p in paths] == [p.name for p in samples] and len(samples) >= 4
    assert tensors["embeddings"].shape == (len(samples), bs.get_spec("resnet18").embed_dim)
    assert meta["backbone"] == "resnet18" and meta["weights"] == "random"
    assert torch.isfinite(tensors["embeddings"]).all()


def test_extract_folder_with_maps_and_weights(tmp_path):
    model = bs.create_backbone("resnet_test")
    weights = bs.save_weights(model, tmp_path / "w.safetensors")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40 + i, 50, 3), 60 * i, np.uint8)).save(folder / f"{i}.jpg")
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(main, ["extract", str(folder), "-b", "resnet_test", "-w", str(weights),
                                       "-o", str(out), "--maps", "pyramid", "--size", "64"])
    assert result.exit_code == 0, result.output
    tensors, paths, _ = read_extraction(out)
    assert len(paths) == 3 and tensors["pyramid.p5"].shape == (3, 128, 2, 2)
    batch = bs.preprocess([bs.load_image(p) for p in paths], model.spec, size=64)
    with torch.inference_mode():
        torch.testing.assert_close(tensors["embeddings"], model.eval().embed(batch))
        expected = model.features(batch)
    features_out = tmp_path / "f.safetensors"
    result = CliRunner().invoke(main, ["extract", str(folder), "-b", "resnet_test", "-w", str(weights),
                                       "-o", str(features_out), "--maps", "features", "--size", "64"])
    assert result.exit_code == 0, result.output
    tensors, _, _ = read_extraction(features_out)
    assert {k for k in tensors if k != "embeddings"} == {f"features.{n}" for n in model.spec.feature_names}
    for name, fmap in expected.items():
        torch.testing.assert_close(tensors[f"features.{name}"], fmap)


def test_cli_plugins_lists_broken_and_disabled_plugins(monkeypatch):
    broken = types.SimpleNamespace(register_backbones=bs.hookimpl(lambda register: 1 / 0))
    record = bs.register_plugin(broken, name="broken_cli_plugin")
    try:
        assert not record.ok
        text = CliRunner().invoke(main, ["plugins"]).output
        line = next(l for l in text.splitlines() if l.startswith("broken_cli_plugin"))
        assert "ERROR" in line and "ZeroDivisionError" in line
        resnet = next(l for l in text.splitlines() if l.startswith("resnet "))
        assert "backbone-sdk" in resnet and bs.__version__ in resnet and "resnet50" in resnet
    finally:
        bs.unregister_plugin("broken_cli_plugin")


def test_list_info_plugins_and_unknown_name():
    runner = CliRunner()
    listed = runner.invoke(main, ["list", "resnet*"])
    assert listed.exit_code == 0 and "resnet50" in listed.output and "resnet_test" not in listed.output
    info = runner.invoke(main, ["info", "resnet50"])
    assert info.exit_code == 0 and "stage4" in info.output and "2048" in info.output
    plugins = runner.invoke(main, ["plugins", "--json"])
    assert {"resnet", "vit"} <= {r["name"] for r in json.loads(plugins.stdout)}
    bad = runner.invoke(main, ["info", "resnet5"])
    assert bad.exit_code == 1 and "Did you mean" in bad.output and "Traceback" not in bad.output


def test_info_parameter_count_matches_real_model():
    model = bs.create_backbone("resnet18")
    count = sum(p.numel() for p in model.parameters())
    out = CliRunner().invoke(main, ["info", "resnet18"]).output
    assert f"{count / 1e6:.2f} M" in out


def test_info_splits_parameters_into_backbone_and_optional_parts():
    """The trunk alone (what published counts state, e.g. SigLIP so400m's ~428 M image tower) and each
    optional part of the default build, with the total; small models are not rounded to 0.00 M."""
    def count(**kw):
        return sum(p.numel() for p in bs.create_backbone("siglip_test", **kw).parameters())

    out = CliRunner().invoke(main, ["info", "siglip_test"]).output
    trunk, neck, text = count(parts=()), count(parts=("neck",)), count(parts=("text",))
    total = count(parts=("neck", "text"))
    assert f"{trunk / 1e3:.2f} K backbone + neck {(neck - trunk) / 1e3:.2f} K + text {(text - trunk) / 1e3:.2f} K" in out
    assert f"= {total / 1e3:.2f} K total" in out


@pytest.mark.parametrize("mode", ["crop", "resize", "pad"])
def test_preprocess_inputs(mode):
    spec = bs.get_spec("resnet50")
    img = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    batch = bs.preprocess([img, Image.fromarray(img), torch.from_numpy(img).permute(2, 0, 1)], spec, size=32, mode=mode)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0], batch[1])
    torch.testing.assert_close(batch[0], batch[2])


def test_preprocess_normalizes_with_spec():
    spec = bs.get_spec("resnet50")
    white = np.full((8, 8, 3), 255, np.uint8)
    out = bs.preprocess(white, spec, size=8, mode="resize")
    expected = (1 - torch.tensor(spec.input.mean)) / torch.tensor(spec.input.std)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    pad = bs.preprocess(np.zeros((4, 8, 3), np.uint8), spec, size=8, mode="pad")
    torch.testing.assert_close(pad[0, :, 0, 0], torch.zeros(3), atol=1e-6, rtol=0)  # padded with the mean colour


def test_cli_list_pattern_matching_nothing_and_bad_options():
    runner = CliRunner()
    none = runner.invoke(main, ["list", "nothing_like_this*"])
    assert none.exit_code == 1 and "no backbone matches" in none.output
    bad = runner.invoke(main, ["extract", "--batch-size", "0"])
    assert bad.exit_code == 2 and "batch-size" in bad.output and "Traceback" not in bad.output


def test_cli_list_notes_failed_plugins(register_plugin):
    class Misspelled:
        @bs.hookimpl
        def register_backbone(self, registry):  # not a hook of the spec
            pass

    record = bs.register_plugin(Misspelled(), name="misspelled")
    assert record.error and "unknown hook" in record.error
    listed = CliRunner().invoke(main, ["list", "resnet*"])
    assert listed.exit_code == 0 and "1 plugin(s) failed to load (misspelled)" in listed.stderr


def test_cli_version_list_header_and_json():
    runner = CliRunner()
    from importlib.metadata import version as installed

    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"backbone-sdk, version {installed('backbone-sdk')}"
    listed = runner.invoke(main, ["list", "siglip_vitb16_2*"])
    lines = listed.output.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "input", "embed"]
    assert lines[1].split()[:4] == ["siglip_vitb16_224", "siglip", "224x224", "768"]
    rows = json.loads(runner.invoke(main, ["list", "--json", "siglip_vitb16_2*"]).stdout)
    assert [r["name"] for r in rows] == ["siglip_vitb16_224", "siglip_vitb16_256", "siglip_vitb16_256_i18n"]
    assert rows[0]["image_size"] == [224, 224] and rows[0]["hub_id"] == "google/siglip-base-patch16-224"
    assert rows[0]["levels"][-1] == ["block11", 16, 768]


def test_cli_info_json():
    out = CliRunner().invoke(main, ["info", "--json", "dinov2_reg_test"])
    data = json.loads(out.stdout)
    spec = bs.get_spec("dinov2_reg_test")
    assert data["levels"][-1] == {"name": spec.features[-1].name, "stride": 14, "channels": 32}
    assert data["prefix_tokens"] == {"cls": True, "distillation": False, "registers": 4}
    assert data["parameters"]["backbone"] == sum(
        p.numel() for p in bs.create_backbone("dinov2_reg_test", parts=()).parameters())
    assert data["input"]["image_size"] == list(spec.input.image_size) and data["parts"] == sorted(spec.parts)


def test_cli_verbose_after_the_subcommand(caplog):
    import logging

    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)
        out = CliRunner().invoke(main, ["info", "resnet_test", "-v"])
        assert out.exit_code == 0, out.output
        assert root.level == logging.INFO
    finally:
        root.setLevel(level)
