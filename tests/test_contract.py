"""The interface contract, checked on every registered backbone (driven by what each spec declares)."""

import math

import pytest
import torch

import backbone_sdk as bs
from backbone_sdk.adapters.finetune import apply_finetune
from conftest import full_names, tiny_names

TINY = tiny_names()


def _size(spec, scale=2):
    """A small input the backbone can take: a multiple of the patch size and of the largest stride (32)."""
    unit = math.lcm(spec.input.size_divisibility, 32)
    return max(unit, spec.input.min_size) * scale


@pytest.fixture(scope="module", params=TINY)
def model(request):
    return bs.create_backbone(request.param).eval()


def test_every_family_has_a_tiny_variant():
    families = {bs.get_spec(n).family for n in bs.list_backbones()}
    assert families == {bs.get_spec(n).family for n in TINY}


def test_features_match_feature_info(model):
    spec = model.spec
    h, w = _size(spec, 2), _size(spec, 3)
    feats = model(torch.randn(2, 3, h, w))
    assert list(feats) == list(spec.feature_names)
    for info in model.feature_info:
        fmap = feats[info.name]
        assert fmap.shape[:2] == (2, info.channels), info
        assert fmap.shape[-2:] == (-(-h // info.stride), -(-w // info.stride)), info


def test_pyramid_strides_4_to_32(model):
    h, w = _size(model.spec, 2), _size(model.spec, 3)
    pyr = model.pyramid(torch.randn(1, 3, h, w))
    assert list(pyr) == ["p2", "p3", "p4", "p5"]
    for info in model.pyramid_info:
        assert pyr[info.name].shape == (1, info.channels, h // info.stride, w // info.stride), info


def test_maps_at_sizes_not_multiple_of_32(model):
    """Every map is ``ceil(size / stride)`` (the strided-convolution convention), also where the
    size is no multiple of 16 or 32 and a plain ViT's simple pyramid has to resample."""
    div = model.spec.input.size_divisibility
    sizes = [n for n in range(max(model.spec.input.min_size, 40), 200) if n % div == 0 and n % 16]
    h, w = sizes[0], sizes[3]
    x = torch.randn(1, 3, h, w)
    for info, fmap in zip(model.pyramid_info, model.pyramid(x).values()):
        assert fmap.shape[-2:] == (-(-h // info.stride), -(-w // info.stride)), (info, h, w)
    for info, fmap in zip(model.feature_info, model.features(x).values()):
        assert fmap.shape[-2:] == (-(-h // info.stride), -(-w // info.stride)), (info, h, w)


def test_embed_and_tokens(model):
    x = torch.randn(2, 3, _size(model.spec), _size(model.spec))
    emb = model.embed(x)
    assert emb.shape == (2, model.spec.embed_dim)
    tok = model.tokens(x)
    assert tok.patches.shape[0] == 2 and tok.patches.shape[1] == tok.grid[0] * tok.grid[1]
    if model.spec.plain:
        assert tok.cls.shape == (2, model.spec.features[-1].channels)


def test_early_stop_equals_full_pass(model):
    x = torch.randn(1, 3, _size(model.spec), _size(model.spec))
    full = model.features(x)
    names = model.spec.feature_names
    for name in (names[0], names[len(names) // 2]):
        part = model.features(x, [name])
        assert list(part) == [name]
        torch.testing.assert_close(part[name], full[name], rtol=0, atol=0)


def test_early_stop_runs_fewer_modules(model):
    calls = []
    groups = model.stage_modules()
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.append(i))
             for i, g in enumerate(groups) for m in g.modules()]
    try:
        model.features(torch.randn(1, 3, _size(model.spec), _size(model.spec)), model.spec.feature_names[0])
    finally:
        for h in hooks:
            h.remove()
    assert 0 in calls and max(calls) < len(groups) - 1


def test_gradients_flow_and_checkpointing_matches():
    for name in TINY:
        model = bs.create_backbone(name).train()
        x = torch.randn(2, 3, _size(model.spec), _size(model.spec))
        torch.manual_seed(0)
        loss = sum(v.float().pow(2).mean() for v in model.pyramid(x).values()) + model.embed(x).pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(torch.isfinite(g).all() for g in grads.values()), name
        first = model.stage_modules()[0]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters()), name
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(True)
        torch.manual_seed(0)
        loss2 = sum(v.float().pow(2).mean() for v in model.pyramid(x).values()) + model.embed(x).pow(2).mean()
        loss2.backward()
        for n, p in model.named_parameters():
            if n in grads:
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=f"{name}: {n}")


def _count_calls(module: torch.nn.Module) -> tuple[list[int], list]:
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return calls, hooks


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_grad_checkpointing_recomputes_exactly_the_trainable_groups(name, checkpointing):
    """With the stem frozen, backward re-runs the first trainable group (whose input needs no grad)
    only under checkpointing, and never re-runs the frozen stem."""
    model = bs.create_backbone(name, with_pyramid=False) if bs.get_spec(name).plain else bs.create_backbone(name)
    apply_finetune(model, ("blocks" if model.spec.plain else "stages") + ":0").train()
    model.set_grad_checkpointing(checkpointing)
    stem, first = model.stage_modules()[:2]
    (stem_calls, h1), (first_calls, h2) = _count_calls(stem), _count_calls(first)
    try:
        out = model.embed(torch.randn(1, 3, _size(model.spec), _size(model.spec)))
        after_forward = (stem_calls[0], first_calls[0])
        out.pow(2).sum().backward()
    finally:
        for h in h1 + h2:
            h.remove()
    assert after_forward[0] > 0 and after_forward[1] > 0
    assert stem_calls[0] == after_forward[0]
    assert (first_calls[0] > after_forward[1]) == checkpointing
    assert all(p.grad is None for p in stem.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())


def test_non_square_input(model):
    h, w = _size(model.spec, 1), _size(model.spec, 3)
    feats = model.features(torch.randn(1, 3, h, w))
    last = model.feature_info[-1]
    assert feats[last.name].shape[-2:] == (-(-h // last.stride), -(-w // last.stride))


def test_bad_inputs_raise_sdk_errors(model):
    s = _size(model.spec)
    with pytest.raises(bs.InputShapeError, match="channels"):
        model.features(torch.randn(1, 4, s, s))
    with pytest.raises(bs.InputShapeError, match="permute"):
        model.features(torch.randn(1, s, s, 3))
    with pytest.raises(bs.InputShapeError, match="unsqueeze"):
        model.features(torch.randn(3, s, s))
    with pytest.raises(bs.InputDtypeError, match="preprocess"):
        model.features(torch.zeros(1, 3, s, s, dtype=torch.uint8))
    with pytest.raises(bs.InputDtypeError, match="weights"):
        model.features(torch.randn(1, 3, s, s, dtype=torch.float64))
    with pytest.raises(bs.InputShapeError, match="at least"):
        model.features(torch.randn(1, 3, model.spec.input.min_size - 1, s))
    with pytest.raises(bs.InputShapeError, match="no feature level"):
        model.features(torch.randn(1, 3, s, s), ["nope"])
    div = model.spec.input.size_divisibility
    if div > 1:
        with pytest.raises(bs.InputShapeError, match=f"divisible by {div}"):
            model.features(torch.randn(1, 3, s + 1, s))


def test_bf16_autocast(model):
    x = torch.randn(1, 3, _size(model.spec), _size(model.spec))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.embed(x)
    assert torch.isfinite(emb.float()).all()


@pytest.mark.parametrize("name", full_names())
def test_full_size_variants_on_meta(name):
    """Every published variant builds and runs shape inference without allocating weights."""
    spec = bs.get_spec(name)
    with torch.device("meta"):
        model = bs.create_backbone(name)
        h, w = spec.input.image_size
        feats = model.features(torch.empty(1, 3, h, w))
        emb = model.embed(torch.empty(1, 3, h, w))
    for info in spec.features:
        assert feats[info.name].shape == (1, info.channels, -(-h // info.stride), -(-w // info.stride))
    assert emb.shape == (1, spec.embed_dim)


def test_spec_metadata_is_consistent():
    for name in bs.list_backbones():
        spec = bs.get_spec(name)
        strides = [f.stride for f in spec.features]
        assert strides == sorted(strides), name
        assert spec.plugin is not None and spec.name == name
        if spec.plain:
            assert spec.input.patch_size and spec.input.size_divisibility == spec.input.patch_size


@pytest.mark.parametrize("name", TINY)
def test_state_dict_has_no_duplicate_tensors(name):
    """Each parameter appears once in the state dict (no module registered under two names)."""
    model = bs.create_backbone(name)
    state = model.state_dict(keep_vars=True)
    ids = [id(v) for v in state.values()]
    assert len(ids) == len(set(ids)), [k for k in state if ids.count(id(state[k])) > 1][:5]
