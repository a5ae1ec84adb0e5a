"""Backbone.optimize(): every optimized path matches the unoptimized model, and undo() restores it.

Parity on every registered tiny variant with scrambled weights (BatchNorm statistics included, so
folding has real scales and shifts to fold): fp32 within 1e-4, bf16 embeddings at cosine >= 0.999,
torch.compile (inductor, weight freezing) within 1e-4.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import backbone_sdk as bs
from backbone_sdk.extraction.job import ExtractionSettings, _load_model
from conftest import scramble, tiny_names

TOL = 1e-4


def _model(name):
    return scramble(bs.create_backbone(name)).eval()


def _input(model, batch=2):
    size = max(math.lcm(model.spec.input.size_divisibility, 32), 64)
    return torch.randn(batch, 3, size, size)


def _outputs(model, x):
    with torch.inference_mode():
        out = {"embed": model.embed(x), **{f"features.{k}": v for k, v in model.features(x).items()}}
        if model.spec.pyramid is not None:
            out.update({f"pyramid.{k}": v for k, v in model.pyramid(x).items()})
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", tiny_names())
def test_optimized_outputs_match_and_undo_restores(name):
    model = _model(name)
    x = _input(model)
    expected = _outputs(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = model.optimize()
    assert model.optimization is report and not report.undone
    assert _max_diff(_outputs(model, x), expected) <= TOL
    report.undo()
    assert model.optimization is None and report.undone
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())
    assert _max_diff(_outputs(model, x), expected) == 0.0


@pytest.mark.parametrize("name", tiny_names())
def test_bf16_optimized_embeddings_agree(name):
    model = _model(name)
    x = _input(model)
    with torch.inference_mode():
        expected = model.embed(x)
    report = model.optimize(dtype="bf16")
    assert report.dtype is torch.bfloat16 and next(model.parameters()).dtype is torch.bfloat16
    with torch.inference_mode():
        got = model.embed(x.bfloat16()).float()
    assert F.cosine_similarity(got, expected).min().item() >= 0.999
    with pytest.raises(bs.InputDtypeError, match="bfloat16"):
        model.embed(x)  # fp32 images into bf16 weights: the existing dtype check names the fix
    report.undo()  # the original fp32 tensors come back, not a re-cast of the bf16 ones
    with torch.inference_mode():
        assert torch.equal(model.embed(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", tiny_names())
def test_compiled_embed_matches(name):
    torch._dynamo.reset()
    model = _model(name)
    x = _input(model, batch=1)
    with torch.inference_mode():
        expected = model.embed(x)
    report = model.optimize(compile=True, example=x)
    assert report.compiled == ("embed", "features", "pyramid") and report.compile_seconds > 0
    with torch.inference_mode():
        got = model.embed(x)
    assert (got - expected).abs().max().item() <= TOL
    report.undo()
    assert "embed" not in vars(model)


def test_resnet_folds_batchnorm_and_refuses_training_until_undone(tmp_path):
    model = _model("resnet_test")
    report = model.optimize()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert report.folded_norms == convs > 0 and report.channels_last
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any("BatchNorm" in line for line in report.changes)
    with pytest.raises(bs.UnsupportedOperationError, match=r"optimization\.undo\(\)"):
        model.train()
    with pytest.raises(bs.UnsupportedOperationError, match=r"undo\(\)"):
        bs.save_weights(model, tmp_path / "w.safetensors")
    report.undo()
    model.train()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == convs
    bs.save_weights(model, tmp_path / "w.safetensors")


def test_batchnorm_in_training_mode_is_not_folded():
    model = _model("resnet_test").train()
    report = model.optimize()
    assert report.folded_norms == 0
    model.train()  # nothing folded: training stays allowed
    x = _input(model)
    model.embed(x).sum().backward()  # real BatchNorm, gradients reach the norms
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_optimize_twice_undoes_the_first():
    model = _model("resnet_test")
    first = model.optimize()
    second = model.optimize(fold_norms=False, channels_last=False)
    assert first.undone and second.folded_norms == 0 and not second.channels_last
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_dtype_is_rejected():
    with pytest.raises(bs.InvalidOptionError, match="bf16"):
        _model("vit_test").optimize(dtype="int8")


def test_optimized_backbone_still_compiles_fullgraph():
    model = _model("resnet_test")
    model.optimize()
    x = _input(model, batch=1)
    compiled = torch.compile(model.embed, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.embed(x))


def test_extraction_optimizes_by_default():
    model, _ = _load_model(ExtractionSettings(backbone="resnet_test", device="cpu"), 0)
    assert model.optimization is not None and model.optimization.folded_norms > 0
    plain, _ = _load_model(ExtractionSettings(backbone="resnet_test", device="cpu", optimize=False), 0)
    assert plain.optimization is None
