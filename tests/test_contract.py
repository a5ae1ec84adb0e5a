"""The interface contract, checked per registered backbone with the public kit (backbone_sdk.testing),
each test in a registry of its own."""


import pytest
import torch

import backbone_sdk as bs
import backbone_sdk.testing as bst
from backbone_sdk.adapters.finetune import apply_finetune, unit_of
from backbone_sdk.specs import FeatureInfo
from conftest import full_names, tiny_names

TINY = tiny_names()
CHECKS = ["check_features", "check_early_stop", "check_pyramid", "check_embed", "check_tokens", "check_dtypes",
          "check_bad_inputs", "check_grad_flow"]
OVERRIDES = [(name, o) for name in TINY for o in bst.override_candidates(name)]


@pytest.fixture(autouse=True)
def _isolated(backbone_registry):
    """Every contract test runs in a registry of its own (discovered anew from the entry points)."""


def _size(spec, scale=2):
    return bst.input_size(spec, scale)


def test_every_family_has_a_tiny_variant():
    families = {bs.get_spec(n).family for n in bs.list_backbones(include_test=True)}
    assert families == {bs.get_spec(n).family for n in TINY}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", TINY)
def test_contract(name, check):
    getattr(bst, check)(bs.create_backbone(name).eval())


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip(name, tmp_path):
    bst.check_save_load(bs.create_backbone(name).eval(), tmp_path)


@pytest.mark.parametrize("name", bs.list_backbones(include_test=True))
def test_spec_is_consistent(name):
    spec = bs.get_spec(name)
    bst.check_spec(spec)
    assert spec.plugin is not None and spec.name == name


@pytest.mark.parametrize(("name", "overrides"), OVERRIDES, ids=[f"{n}-{o}" for n, o in OVERRIDES])
def test_every_accepted_override_matches_its_spec(name, overrides):
    bst.check_overrides(name, **overrides)


def test_overrides_recompute_the_spec():
    model = bs.create_backbone("resnet_test", widths=(8, 8, 8, 8))
    assert [f.channels for f in model.feature_info] == [8, 8, 8, 8] and model.embed_dim == 8
    assert [f.channels for f in model.pyramid_info] == [8, 8, 8, 8]
    vit = bs.create_backbone("vit_test", patch_size=16, neck_channels=8)
    assert vit.spec.input.size_divisibility == 16 and vit.feature_info[0].stride == 16
    assert vit.pyramid_info[0].channels == 8


def test_unknown_override_suggests_close_names():
    with pytest.raises(bs.InvalidOptionError, match="unknown option 'with_pyramd'.*Did you mean") as info:
        bs.create_backbone("vit_test", with_pyramd=False)
    assert isinstance(info.value, ValueError)
    with pytest.raises(bs.InvalidOptionError, match="Did you mean 'depths'"):
        bs.create_backbone("resnet_test", depth=(1, 1, 1, 1))


@pytest.mark.parametrize(("name", "overrides", "words"), [
    ("vit_test", {"dim": 0}, "dim must be an integer >= 1"),
    ("swin_test", {"window": 0}, "window must be an integer >= 1"),
    ("vit_test", {"heads": 3}, "must divide dim"),
    ("resnet_test", {"widths": (8, 8)}, "4 entries"),
    ("resnet_test", {"block": "wide"}, "block"),
    ("resnet_test", {"neck_channels": 64}, "does not apply"),
    ("clip_test", {"parts": ("texts",)}, "no optional part"),
])
def test_invalid_override_values_are_rejected(name, overrides, words):
    with pytest.raises(bs.InvalidOptionError, match=words):
        bs.create_backbone(name, **overrides)


def test_legacy_part_flags_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="parts="):
        vit = bs.create_backbone("vit_test", with_pyramid=False)
    assert vit.neck is None and vit.spec.pyramid is None
    with pytest.raises(bs.UnsupportedOperationError, match="without its pyramid neck"):
        vit.pyramid(torch.randn(1, 3, 32, 32))
    with pytest.warns(DeprecationWarning):
        clip = bs.create_backbone("clip_test", with_text=False)
    assert clip.spec.parts == {"neck"} and not clip.spec.has("text")


@pytest.mark.parametrize(("features", "words"), [
    ([FeatureInfo("a", 4, 8), FeatureInfo("b", 4, 4)], "must not decrease"),
    ([FeatureInfo("a", 4, 4), FeatureInfo("a", 4, 8)], "duplicate"),
    ([], "at least one"),
])
def test_spec_validators(features, words):
    with pytest.raises(ValueError, match=words):
        bs.BackboneSpec(name="x", family="x", builder=bs.Backbone, features=features, embed_dim=4)


def test_spec_validators_reject_bad_metadata():
    with pytest.raises(ValueError, match="channels"):
        FeatureInfo("a", 0, 4)
    with pytest.raises(ValueError, match="name"):
        FeatureInfo("", 4, 4)
    with pytest.raises(ValueError, match="embed_dim"):
        bs.BackboneSpec(name="x", family="x", builder=bs.Backbone, features=[FeatureInfo("a", 4, 4)], embed_dim=0)
    with pytest.raises(ValueError, match="pyramid levels must be exactly"):
        bs.PyramidSpec([FeatureInfo(f"p{i}", 4, 2**i) for i in range(1, 5)], ["a"])


def test_stride_2_levels_do_not_become_p2():
    """A family at strides 2, 4, 8, 16 has no native pyramid (and no neck): pyramid() says so."""
    spec = bs.BackboneSpec(name="x", family="x", builder=bs.Backbone, embed_dim=4,
                           features=[FeatureInfo(f"s{i}", 4, 2**i) for i in range(1, 5)])
    assert spec.pyramid is None


def test_default_pyramid_tokens_and_embed_of_a_features_only_family(register_plugin):
    """A family implementing only ``_features`` gets pyramid/tokens/embed from the base class."""
    class OneLevel(bs.Backbone):
        def __init__(self, spec):
            super().__init__(spec)
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

        def _features(self, images, levels):
            return {"stage1": self.conv(images)}

        def stage_modules(self):
            return [self.conv]

    class Plugin:
        @bs.hookimpl
        def register_backbones(self, registry):
            registry.add(bs.BackboneSpec(name="one_level", family="one", builder=OneLevel,
                                         features=[FeatureInfo("stage1", 8, 4)], embed_dim=8))

    register_plugin(Plugin(), "one")
    model = bs.create_backbone("one_level")
    x = torch.randn(2, 3, 32, 48)
    assert model.embed(x).shape == (2, 8)
    tok = model.tokens(x)
    assert tok.grid == (8, 12) and tok.patches.shape == (2, 96, 8) and tok.cls is None
    with pytest.raises(bs.UnsupportedOperationError, match="strides \\[4\\], not 4, 8, 16 and 32"):
        model.pyramid(x)


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
    model = bs.create_backbone(name, parts=())
    apply_finetune(model, unit_of(model.spec) + ":0").train()
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


@pytest.mark.parametrize("name", TINY)
def test_state_dict_has_no_duplicate_tensors(name):
    """Each parameter appears once in the state dict (no module registered under two names)."""
    model = bs.create_backbone(name)
    state = model.state_dict(keep_vars=True)
    ids = [id(v) for v in state.values()]
    assert len(ids) == len(set(ids)), [k for k in state if ids.count(id(state[k])) > 1][:5]
