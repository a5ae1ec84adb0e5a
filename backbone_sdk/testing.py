"""Contract checks and pytest fixtures for backbone plugins: what a plugin author runs in their CI.

Every check takes a backbone (or a registered name) and raises ``AssertionError`` naming the
broken promise. :func:`check_backbone` runs them all. Use them with the fixtures of this module::

    # conftest.py
    pytest_plugins = ["backbone_sdk.testing"]

    # test_my_family.py
    import backbone_sdk.testing as bst
    import my_package.backbones as plugin

    def test_contract(register_plugin, tmp_path):
        register_plugin(plugin)                       # into a registry isolated for this test
        bst.check_backbone("my_net", tmp_path=tmp_path)

The project's own contract tests are built on these functions, over every registered backbone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
import torch

from .backbone import Backbone
from .errors import InputDtypeError, InputShapeError, InvalidOptionError, LayerIndexError, UnsupportedOperationError
from .factory import create_backbone
from .registry import Registry, active_registry, use_registry
from .specs import PYRAMID_LEVELS, BackboneSpec

__all__ = [
    "input_size", "check_spec", "check_features", "check_early_stop", "check_pyramid", "check_embed",
    "check_tokens", "check_dtypes", "check_bad_inputs", "check_grad_flow", "check_compile", "check_save_load",
    "check_overrides", "override_candidates", "check_backbone", "backbone_registry", "register_plugin",
]


def _model(model: Backbone | str, **overrides) -> Backbone:
    return create_backbone(model, **overrides).eval() if not isinstance(model, Backbone) else model


def input_size(spec: BackboneSpec, scale: int = 2) -> int:
    """A small side the backbone takes: a multiple of its size divisibility and of 32, times ``scale``."""
    unit = math.lcm(spec.input.size_divisibility, 32)
    return max(unit, spec.input.min_size) * scale


def _ceil(size: int, stride: int) -> int:
    return -(-size // stride)


def check_spec(spec: BackboneSpec) -> None:
    """Spec metadata is consistent: increasing strides, prefix tokens only on token models, plain
    models with a patch size that divides H and W, a pyramid of exactly p2..p5 at strides 4-32."""
    strides = [f.stride for f in spec.features]
    assert strides == sorted(strides), f"{spec.name}: strides {strides} must not decrease"
    assert spec.embed_dim >= 1 and all(f.channels >= 1 for f in spec.features), spec.name
    if spec.plain:
        patch = spec.input.patch_size
        assert patch and spec.input.size_divisibility % patch == 0, f"{spec.name}: plain models declare the patch"
        assert len(set(strides)) == 1, f"{spec.name}: a plain model's levels share one stride, got {strides}"
    if spec.pyramid is not None:
        assert [(f.name, f.stride) for f in spec.pyramid.levels] == list(PYRAMID_LEVELS), spec.name
        assert all(s in spec.feature_names for s in spec.pyramid.sources), spec.name
    if spec.config is not None:
        derived = spec.config.derive(spec.input)
        for key in ("features", "embed_dim", "prefix_tokens", "pyramid", "plain", "parts"):
            assert getattr(spec, key) == derived[key], f"{spec.name}: spec.{key} disagrees with its config"


def check_features(model: Backbone | str, sizes: tuple[int, int] | None = None, batch: int = 2) -> None:
    """``features()`` returns every level of ``feature_info`` with its channels and ``ceil(size / stride)``."""
    model = _model(model)
    spec = model.spec
    h, w = sizes or (input_size(spec, 2), input_size(spec, 3))
    with torch.no_grad():
        feats = model(torch.randn(batch, 3, h, w))
    assert list(feats) == list(spec.feature_names), f"{spec.name}: levels {list(feats)} != {spec.feature_names}"
    for info in model.feature_info:
        want = (batch, info.channels, _ceil(h, info.stride), _ceil(w, info.stride))
        assert tuple(feats[info.name].shape) == want, f"{spec.name}.{info.name}: {tuple(feats[info.name].shape)} != {want}"


def _group_calls(model: Backbone, fn: Callable[[], Any]) -> list[int]:
    calls: list[int] = []
    groups = model.stage_modules()
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, g in enumerate(groups) for m in g.modules()]
    try:
        fn()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def check_early_stop(model: Backbone | str) -> None:
    """A shallow level equals the full pass bit for bit, and computing it runs fewer stage modules."""
    model = _model(model)
    spec = model.spec
    x = torch.randn(1, 3, input_size(spec), input_size(spec))
    with torch.no_grad():
        full = model.features(x)
        for name in dict.fromkeys((spec.feature_names[0], spec.feature_names[len(spec.features) // 2])):
            part = model.features(x, [name])
            assert list(part) == [name], f"{spec.name}: features(levels=[{name!r}]) returned {list(part)}"
            assert torch.equal(part[name], full[name]), f"{spec.name}.{name}: early stop changed the values"
    if len(spec.features) > 1:
        try:
            calls = _group_calls(model, lambda: model.features(x, spec.feature_names[0]))
        except UnsupportedOperationError:
            return
        groups = len(model.stage_modules())
        assert 0 in calls and max(calls) < groups - 1, f"{spec.name}: the first level ran stage groups {sorted(set(calls))}"


def check_pyramid(model: Backbone | str, sizes: tuple[int, int] | None = None) -> None:
    """``pyramid()`` returns ``pyramid_info`` (p2..p5, strides 4-32, ``ceil(size / stride)``), or raises
    :class:`~backbone_sdk.UnsupportedOperationError` when the spec has no pyramid."""
    model = _model(model)
    spec = model.spec
    h, w = sizes or (input_size(spec, 2), input_size(spec, 3))
    x = torch.randn(1, 3, h, w)
    if spec.pyramid is None:
        with pytest.raises(UnsupportedOperationError):
            model.pyramid(x)
        return
    with torch.no_grad():
        pyr = model.pyramid(x)
    assert list(pyr) == [p for p, _ in PYRAMID_LEVELS], f"{spec.name}: pyramid levels {list(pyr)}"
    for info in model.pyramid_info:
        want = (1, info.channels, _ceil(h, info.stride), _ceil(w, info.stride))
        assert tuple(pyr[info.name].shape) == want, f"{spec.name}.{info.name}: {tuple(pyr[info.name].shape)} != {want}"


def check_embed(model: Backbone | str, batch: int = 2) -> None:
    """``embed()`` is ``[B, embed_dim]`` and finite."""
    model = _model(model)
    s = input_size(model.spec)
    with torch.no_grad():
        emb = model.embed(torch.randn(batch, 3, s, s))
    assert tuple(emb.shape) == (batch, model.spec.embed_dim), f"{model.spec.name}: embed {tuple(emb.shape)}"
    assert torch.isfinite(emb).all(), f"{model.spec.name}: embed is not finite"


def check_tokens(model: Backbone | str, batch: int = 2) -> None:
    """``tokens()`` and ``run_layers()`` follow ``spec.prefix_tokens`` and the level's width and grid;
    bad layer indices raise :class:`~backbone_sdk.LayerIndexError`."""
    model = _model(model)
    spec = model.spec
    h, w = input_size(spec, 1), input_size(spec, 2)
    x = torch.randn(batch, 3, h, w)
    prefix = spec.prefix_tokens
    with torch.no_grad():
        for layer in (0, -1):
            info = spec.features[layer]
            grid = (_ceil(h, info.stride), _ceil(w, info.stride))
            tok = model.tokens(x, layer=layer)
            assert tok.grid == grid, f"{spec.name}: tokens(layer={layer}).grid {tok.grid} != {grid}"
            assert tuple(tok.patches.shape) == (batch, grid[0] * grid[1], info.channels), \
                f"{spec.name}: tokens(layer={layer}).patches {tuple(tok.patches.shape)}"
            assert (tok.cls is not None) == prefix.cls, f"{spec.name}: cls token vs {prefix}"
            if prefix.cls:
                assert tuple(tok.cls.shape) == (batch, info.channels), spec.name
            extra = 0 if tok.registers is None else tok.registers.shape[1]
            assert extra == prefix.extra, f"{spec.name}: {extra} register tokens vs {prefix}"
            seq = model.run_layers(x, [layer])[model.layer_index(layer)]
            assert tuple(seq.shape) == (batch, prefix.count + grid[0] * grid[1], info.channels), \
                f"{spec.name}: run_layers sequence {tuple(seq.shape)}"
            assert torch.equal(seq[:, prefix.count:], tok.patches), f"{spec.name}: run_layers and tokens disagree"
    depth = len(spec.features)
    bad_layers: tuple[Any, ...] = (depth, -depth - 1, "1", 1.0)  # wrong on purpose, types included
    for bad in bad_layers:
        with pytest.raises(LayerIndexError):
            model.tokens(x, layer=bad)


def check_dtypes(model: Backbone | str) -> None:
    """bf16 autocast runs and stays finite; a dtype other than the weights' raises InputDtypeError."""
    model = _model(model)
    s = input_size(model.spec)
    x = torch.randn(1, 3, s, s)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model.embed(x).float()).all(), f"{model.spec.name}: bf16 autocast is not finite"
    with pytest.raises(InputDtypeError):
        model.features(x.double())
    with pytest.raises(InputDtypeError):
        model.features(torch.zeros(1, 3, s, s, dtype=torch.uint8))


def check_bad_inputs(model: Backbone | str) -> None:
    """Wrong rank, channel count, layout, size or level name raise SDK errors that say the fix."""
    model = _model(model)
    spec = model.spec
    s = input_size(spec)
    cases = [
        (InputShapeError, "channels", torch.randn(1, 4, s, s)),
        (InputShapeError, "permute", torch.randn(1, s, s, 3)),
        (InputShapeError, "unsqueeze", torch.randn(3, s, s)),
        (InputShapeError, "at least", torch.randn(1, 3, spec.input.min_size - 1, s)),
    ]
    div = spec.input.size_divisibility
    if div > 1:
        cases.append((InputShapeError, f"divisible by {div}", torch.randn(1, 3, s + 1, s)))
    for error, words, images in cases:
        with pytest.raises(error, match=words):
            model.features(images)
    with pytest.raises(InputShapeError, match="no feature level"):
        model.features(torch.randn(1, 3, s, s), ["no_such_level"])


def _loss(model: Backbone, x: torch.Tensor) -> torch.Tensor:
    loss = model.embed(x).pow(2).mean()
    if model.spec.pyramid is not None:
        loss = loss + sum(v.float().pow(2).mean() for v in model.pyramid(x).values())
    return loss


def check_grad_flow(model: Backbone | str, checkpointing: bool = True) -> None:
    """Gradients reach the stem and are finite; with gradient checkpointing (if supported) they are
    the same as without."""
    model = _model(model).train()
    s = input_size(model.spec)
    x = torch.randn(2, 3, s, s)
    torch.manual_seed(0)
    _loss(model, x).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values()), model.spec.name
    stem = model.stage_modules()[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters()), \
        f"{model.spec.name}: no gradient reaches the stem"
    model.zero_grad(set_to_none=True)
    if checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except UnsupportedOperationError:
            return
        torch.manual_seed(0)
        _loss(model, x).backward()
        model.set_grad_checkpointing(False)
        for n, p in model.named_parameters():
            if n in grads:
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=f"{model.spec.name}: {n}")
        model.zero_grad(set_to_none=True)
    model.eval()


def check_compile(model: Backbone | str) -> None:
    """``torch.compile(fullgraph=True)`` traces ``features``, ``pyramid`` and ``embed`` with no graph break."""
    model = _model(model)
    torch._dynamo.reset()
    s = max(math.lcm(model.spec.input.size_divisibility, 32), 64)
    x = torch.randn(1, 3, s, s)
    methods = ["features", "embed"] + (["pyramid"] if model.spec.pyramid is not None else [])
    for method in methods:
        fn = getattr(model, method)
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        with torch.no_grad():
            expected, got = fn(x), compiled(x)
        if isinstance(expected, dict):
            assert expected.keys() == got.keys(), f"{model.spec.name}.{method}"
            for key in expected:
                torch.testing.assert_close(got[key], expected[key])
        else:
            torch.testing.assert_close(got, expected)


def check_save_load(model: Backbone | str, tmp_path: str | Path) -> None:
    """``save_weights`` then ``create_backbone(name, weights=file)`` loads exactly and gives the same embedding."""
    from .weights import save_weights

    model = _model(model)
    path = save_weights(model, Path(tmp_path) / f"{model.spec.name.replace(':', '_')}.safetensors")
    name = f"{model.spec.plugin}:{model.spec.name}" if model.spec.plugin else model.spec.name
    overrides: dict[str, Any] = {"parts": model.spec.parts} if model.spec.config is not None else {}
    loaded = create_backbone(name, weights=path, **overrides).eval()
    assert loaded.load_report.exact, str(loaded.load_report)
    s = input_size(model.spec)
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        assert torch.equal(model.embed(x), loaded.embed(x)), f"{model.spec.name}: reloaded weights differ"


def override_candidates(spec: BackboneSpec | str) -> list[dict[str, Any]]:
    """Single-field overrides the spec's config accepts, generated from its fields: each int +1 and
    x2, each bool flipped, each float doubled, each int tuple +1 per entry, ``parts`` empty and each
    optional part alone; values its validators reject are left out."""
    from .registry import get_spec

    spec = get_spec(spec)
    cfg = spec.config
    if cfg is None:
        return []
    found = []
    for field in attrs.fields(type(cfg)):
        if not field.init:
            continue
        value = getattr(cfg, field.name)
        candidates: list[Any]
        if field.name == "parts":
            optional = sorted(cfg.optional_parts(spec.features))
            candidates = [()] + [(p,) for p in optional] if optional else []
        elif isinstance(value, bool):
            candidates = [not value]
        elif isinstance(value, int):
            candidates = [value + 1, value * 2]
        elif isinstance(value, float):
            candidates = [value * 2 if value else 0.1]
        elif isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            candidates = [tuple(v + 1 for v in value), tuple(v * 2 for v in value)]
        else:
            candidates = []
        for candidate in candidates:
            try:
                spec.with_config(**{field.name: candidate})
            except InvalidOptionError:
                continue
            if {field.name: candidate} not in found:
                found.append({field.name: candidate})
    return found


def check_overrides(name: str, **overrides) -> None:
    """A model built with ``overrides`` returns what its (re-derived) spec states."""
    model = _model(name, **overrides)
    check_spec(model.spec)
    check_features(model)
    check_pyramid(model)
    check_embed(model)


def check_backbone(model: Backbone | str, tmp_path: str | Path | None = None, compile: bool = False) -> None:
    """Every contract check on one backbone (``compile`` adds the slower fullgraph check)."""
    model = _model(model)
    check_spec(model.spec)
    for check in (check_features, check_early_stop, check_pyramid, check_embed, check_tokens, check_dtypes,
                  check_bad_inputs, check_grad_flow):
        check(model)
    if tmp_path is not None:
        check_save_load(model, tmp_path)
    if compile:
        check_compile(model)


# -- pytest fixtures (``pytest_plugins = ["backbone_sdk.testing"]``) -----------------------------------
@pytest.fixture
def backbone_registry():
    """A fresh registry (installed plugins discovered anew) active for the duration of one test."""
    with use_registry(Registry()) as registry:
        yield registry


@pytest.fixture
def register_plugin(backbone_registry):
    """``register_plugin(plugin, name=None) -> PluginRecord``: add an in-process plugin to the test's
    isolated registry; it raises if the plugin failed (the record's error), and is gone after the test."""
    def register(plugin, name: str | None = None):
        record = active_registry().register_plugin(plugin, name)
        if record.error:
            raise AssertionError(f"plugin {record.name!r} failed: {record.error}")
        return record

    return register
