"""The cost model (backbone_sdk.cost, `backbone-sdk info --size`, `backbone-sdk cost`) against torch's
FlopCounterMode on real forwards, for one tiny variant of every family at three sizes."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import backbone_sdk as bs
from backbone_sdk.cli import main
from _frameworks import single_thread
from backbone_sdk.cost import estimate
from conftest import tiny_names


def _one_per_family():
    seen, names = set(), []
    for name in tiny_names():
        family = bs.get_spec(name).family
        if family not in seen:
            seen.add(family)
            names.append(name)
    return names


FAMILIES = _one_per_family()


def _sizes(name):
    unit = max(math.lcm(bs.get_spec(name).input.size_divisibility, 32), 64)
    return [(unit, unit), (unit, 2 * unit), (2 * unit, unit + math.lcm(bs.get_spec(name).input.size_divisibility, 32))]


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("method", ["features", "embed"])
@pytest.mark.parametrize("name", FAMILIES)
def test_flops_match_flop_counter_on_a_real_forward(name, method):
    """The meta-device count equals FlopCounterMode's count of a real CPU forward (with the math
    attention backend, whose matrix products FlopCounterMode sees) within 5 %, at three sizes."""
    model = bs.create_backbone(name, parts=bs.get_spec(name).needed_parts()).eval()
    for h, w in _sizes(name):
        cost = estimate(name, size=(h, w), method=method)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            getattr(model, method)(torch.randn(1, 3, h, w))
        want = counter.get_total_flops()
        assert want > 0 and abs(cost.total_flops - want) <= 0.05 * want, (name, (h, w), cost.total_flops, want)
        assert cost.tokens == {f.name: -(-h // f.stride) * -(-w // f.stride) for f in model.spec.features}


def test_attention_grows_quadratically_for_vit_and_linearly_for_swin():
    vit = [estimate("vit_test", size=s) for s in (64, 128)]
    swin = [estimate("swin_test", size=s) for s in (64, 128)]
    # 4x the tokens: global attention costs 16x, windowed attention 4x; projections 4x in both
    assert vit[1].flops["attention"] == pytest.approx(16 * vit[0].flops["attention"], rel=0.15)
    assert swin[1].flops["attention"] == pytest.approx(4 * swin[0].flops["attention"], rel=0.05)
    assert vit[1].flops["linear"] == pytest.approx(4 * vit[0].flops["linear"], rel=0.15)
    assert estimate("resnet_test", size=64).flops == {"attention": 0, "linear": 0, "conv": pytest.approx(
        estimate("resnet_test", size=64).total_flops)}


def test_batch_scales_flops_and_memory_and_weights_are_untouched():
    model = bs.create_backbone("resnet_test")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one, four = estimate(model, size=64), estimate(model, size=64, batch=4)
    assert four.total_flops == 4 * one.total_flops
    assert 3 * one.activation_bytes <= four.activation_bytes <= 4 * one.activation_bytes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert one.params == sum(p.numel() for p in model.parameters())
    assert next(model.parameters()).device.type == "cpu"


def test_activation_memory_counts_what_the_forward_keeps():
    """ResNet features keep every stage's output: the peak is at least their sum."""
    cost = estimate("resnet_test", size=(64, 96), batch=2)
    levels = sum(2 * f.channels * -(-64 // f.stride) * -(-96 // f.stride) * 4 for f in bs.get_spec("resnet_test").features)
    assert cost.activation_bytes >= levels
    assert cost.activation_bytes < 50 * levels


def test_bad_sizes_and_methods_say_the_fix():
    with pytest.raises(bs.InputShapeError, match="divisible by"):
        estimate("vit_test", size=(65, 64))
    with pytest.raises(bs.InvalidOptionError, match="method must be one of"):
        estimate("vit_test", method="tokens")


def test_info_size_and_cost_commands():
    runner = CliRunner()
    out = runner.invoke(main, ["info", "vit_test", "--size", "64", "96", "--batch", "2"])
    assert out.exit_code == 0, out.output
    assert "GFLOPs" in out.output and "tokens per level" in out.output and "activation memory" in out.output
    data = json.loads(runner.invoke(main, ["info", "vit_test", "--size", "64", "96", "--json"]).output)
    assert data["cost"]["total_flops"] == estimate("vit_test", size=(64, 96)).total_flops
    out = runner.invoke(main, ["cost", "vit_test", "swin_test", "--sizes", "64,128x96", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [(r["name"], tuple(r["size"])) for r in rows] == [
        ("vit_test", (64, 64)), ("vit_test", (128, 96)), ("swin_test", (64, 64)), ("swin_test", (128, 96))]
    bad = runner.invoke(main, ["cost", "vit_test", "--sizes", "64,big"])
    assert bad.exit_code != 0 and "not a size" in bad.output
    bad = runner.invoke(main, ["info", "vit_test", "--size", "65", "64"])
    assert bad.exit_code != 0 and "divisible by" in bad.output


def test_cost_plot(tmp_path):
    from PIL import Image

    path = tmp_path / "cost.png"
    out = CliRunner().invoke(main, ["cost", "vit_test", "swin_test", "--sizes", "64,128,256", "--plot", str(path)])
    assert out.exit_code == 0, out.output
    with Image.open(path) as img:
        assert img.size == (800, 320)
        assert len(img.convert("L").getcolors(maxcolors=256 * 256) or []) > 10


def test_docs_example_runs(capsys):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cost.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/cost.md", "exec"), {})  # noqa: S102 (our own docs)
    out = capsys.readouterr().out
    growth = {m[0]: float(m[1]) for m in re.findall(r"(\w+): .*? attention x([\d.]+)", out)}
    assert growth["swin_test"] == 4.0 and 14 < growth["vit_test"] < 16.5, out  # N^2 with N = 1 + patches
