"""Fuzzing the public calls of every tiny variant: each call returns outputs that match
``feature_info``/``pyramid_info``/``embed_dim``, or raises a ``BackboneSDKError`` - never anything else."""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backbone_sdk as bs
from conftest import tiny_names

TINY = tiny_names()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.uint8, torch.int64]


@functools.lru_cache(maxsize=None)
def _model(name):
    return bs.create_backbone(name).eval()


def _ceil(n, s):
    return -(-n // s)


def _check(model, method, out, images, arg):
    spec, (b, h, w) = model.spec, (images.shape[0], images.shape[-2], images.shape[-1])
    if method == "features":
        levels = [arg] if isinstance(arg, str) else list(spec.feature_names) if arg is None else list(arg)
        levels = list(dict.fromkeys(levels))  # a level asked for twice is returned once
        infos = [spec.feature(n) for n in levels]
    elif method == "pyramid":
        infos = list(model.pyramid_info)
    elif method == "embed":
        assert tuple(out.shape) == (b, spec.embed_dim)
        return
    else:
        info = spec.features[arg]
        grid = (_ceil(h, info.stride), _ceil(w, info.stride))
        assert out.grid == grid and tuple(out.patches.shape) == (b, grid[0] * grid[1], info.channels)
        return
    assert list(out) == [i.name for i in infos]
    for info in infos:
        assert tuple(out[info.name].shape) == (b, info.channels, _ceil(h, info.stride), _ceil(w, info.stride))


@st.composite
def calls(draw):
    name = draw(st.sampled_from(TINY))
    method = draw(st.sampled_from(["features", "pyramid", "embed", "tokens"]))
    spec = bs.get_spec(name)
    rank = draw(st.sampled_from([4, 4, 4, 3, 5]))
    shape = [draw(st.integers(0, 3)), draw(st.sampled_from([3, 3, 3, 1, 4]))]
    div = spec.input.size_divisibility
    for _ in range(2):  # mostly sizes the backbone takes, sometimes any
        shape.append(draw(st.one_of(st.integers(1, 5).map(lambda k: k * max(div, 16)), st.integers(1, 90))))
    shape = shape[:rank] if rank < 4 else shape + [2] * (rank - 4)
    dtype = draw(st.sampled_from(DTYPES[:1] * 4 + DTYPES[1:]))
    device = draw(st.sampled_from(["cpu"] * 5 + ["meta"]))
    depth = len(spec.features)
    if method == "features":
        arg = draw(st.one_of(st.none(), st.sampled_from(spec.feature_names), st.just("nope"), st.just(3),
                             st.lists(st.sampled_from(spec.feature_names), min_size=1, max_size=3)))
    elif method == "tokens":
        arg = draw(st.one_of(st.integers(-depth - 2, depth + 1), st.just("1"), st.just(1.0), st.none()))
    else:
        arg = None
    return name, method, tuple(shape), dtype, device, arg


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(calls())
def test_fuzz_public_calls(call):
    name, method, shape, dtype, device, arg = call
    model = _model(name)
    images = torch.zeros(shape, dtype=dtype, device=device) if dtype != torch.float32 else \
        torch.randn(shape, device=device)
    fn = getattr(model, method)
    try:
        with torch.no_grad():
            out = fn(images, arg) if method == "features" else fn(images, layer=arg) if method == "tokens" else fn(images)
    except bs.BackboneSDKError:
        return
    _check(model, method, out, images, arg)
