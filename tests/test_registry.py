"""Plugin discovery, failure isolation and the plugin report."""

import importlib.metadata
import json
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import backbone_sdk as bs
from backbone_sdk.registry import Registry
from backbone_sdk.specs import BackboneSpec, FeatureInfo


class _Toy(bs.Backbone):
    def __init__(self, spec):
        super().__init__(spec)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def _features(self, images, levels):
        return {"out": self.conv(images)}

    def embed(self, images):
        return self.features(images)["out"].mean((2, 3))


def toy_spec(name="toy_net"):
    return BackboneSpec(name=name, family="toy", builder=_Toy, features=[FeatureInfo("out", 4, 2)], embed_dim=4)


def plugin(*names):
    mod = types.SimpleNamespace()

    @bs.hookimpl
    def register_backbones(register):
        for n in names:
            register(toy_spec(n))

    mod.register_backbones = register_backbones
    return mod


class FakeEntryPoint:
    def __init__(self, name, target):
        self.name, self.value, self.dist, self._target = name, f"fake.{name}", None, target

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def registry_with(*eps):
    return Registry(entry_points=lambda: list(eps))


def test_in_process_plugin_registers_and_unregisters():
    bs.register_plugin(plugin("toy_inline"), name="inline")
    try:
        assert "toy_inline" in bs.list_backbones("toy_*")
        model = bs.create_backbone("toy_inline")
        assert model.embed(torch.randn(1, 3, 32, 32)).shape == (1, 4)
        assert bs.get_spec("toy_inline").plugin == "inline"
    finally:
        bs.unregister_plugin("inline")
    assert "toy_inline" not in bs.list_backbones()


def test_plugin_failing_at_import_is_reported_and_skipped():
    reg = registry_with(FakeEntryPoint("broken", ImportError("no module named nonexistent")),
                        FakeEntryPoint("good", plugin("toy_a")))
    assert reg.names() == ["toy_a"]
    rec = {r.name: r for r in reg.records()}
    assert "no module named nonexistent" in rec["broken"].error and rec["good"].ok


def test_plugin_raising_in_register_is_reported_and_skipped():
    bad = types.SimpleNamespace()

    @bs.hookimpl
    def register_backbones(register):
        register(toy_spec("toy_half"))
        raise RuntimeError("boom")

    bad.register_backbones = register_backbones
    reg = registry_with(FakeEntryPoint("bad", bad), FakeEntryPoint("good", plugin("toy_b")))
    assert reg.names() == ["toy_b"]  # nothing of the failing plugin leaks in
    assert "RuntimeError: boom" in {r.name: r for r in reg.records()}["bad"].error


def test_plugin_registering_a_taken_name_keeps_its_other_variants(caplog):
    reg = registry_with(FakeEntryPoint("a_first", plugin("toy_same")), FakeEntryPoint("b_second", plugin("toy_same", "toy_c")))
    assert reg.names() == ["toy_c", "toy_same"]
    rec = {r.name: r for r in reg.records()}
    assert rec["b_second"].ok and rec["b_second"].shadowed == ["toy_same"] and rec["b_second"].backbones == ["toy_c"]
    assert reg.get("toy_same").plugin == "a_first"
    assert reg.get("b_second:toy_same").plugin == "b_second"  # still reachable on purpose
    assert "'b_second' registers 'toy_same', which plugin 'a_first' holds" in caplog.text


def _builtin_ep(name, target):
    ep = FakeEntryPoint(name, target)
    ep.value = f"backbone_sdk.plugins.{name}"
    return ep


def test_plugin_precedence_builtin_names_survive_a_third_party_loaded_first():
    """A third party sorting before the built-ins (``aaa_*``) cannot take their names."""
    reg = registry_with(FakeEntryPoint("aaa_thief", plugin("toy_net", "toy_extra")), _builtin_ep("toy", plugin("toy_net")))
    assert reg.get("toy_net").plugin == "toy"
    assert reg.get("aaa_thief:toy_net").plugin == "aaa_thief"
    assert reg.names() == ["toy_extra", "toy_net"]


def test_plugin_precedence_entry_point_named_like_a_builtin_is_reported():
    imposter = FakeEntryPoint("toy", plugin("toy_imposter"))
    reg = registry_with(imposter, _builtin_ep("toy", plugin("toy_net")))
    assert reg.names() == ["toy_net"] and reg.get("toy_net").plugin == "toy"
    bad = [r for r in reg.records() if r.error]
    assert len(bad) == 1 and "entry-point name 'toy' is taken by plugin 'backbone_sdk.plugins.toy' (built-in)" \
        in bad[0].error and bad[0].module == "fake.toy"


def test_plugin_registering_a_name_twice_is_skipped():
    reg = registry_with(FakeEntryPoint("twice", plugin("toy_dup", "toy_d", "toy_dup")), FakeEntryPoint("ok", plugin("toy_e")))
    assert reg.names() == ["toy_e"]
    error = {r.name: r for r in reg.records()}["twice"].error
    assert "registers names twice: 'toy_dup'" in error


def test_plugin_calling_sys_exit_does_not_end_the_process():
    bad = types.SimpleNamespace(register_backbones=bs.hookimpl(lambda register: sys.exit(3)))
    reg = registry_with(FakeEntryPoint("exits_at_import", SystemExit(2)), FakeEntryPoint("exits", bad),
                        FakeEntryPoint("fine", plugin("toy_f")))
    assert reg.names() == ["toy_f"]
    errors = {r.name: r.error for r in reg.records()}
    assert "SystemExit" in errors["exits_at_import"] and "SystemExit" in errors["exits"]


def test_import_loads_no_plugin():
    code = ("import sys, backbone_sdk as bs; "
            "assert not [m for m in sys.modules if m.startswith('backbone_sdk.plugins')], 'plugins imported'; "
            "assert bs.default_registry.pm.get_plugins() == set(); bs.list_backbones(); "
            "assert 'backbone_sdk.plugins.resnet' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_with_misspelled_hook_is_reported():
    bad = types.SimpleNamespace()

    @bs.hookimpl
    def register_backbone(register):  # missing "s"
        pass

    bad.register_backbone = register_backbone
    reg = registry_with(FakeEntryPoint("typo", bad))
    assert "register_backbone" in reg.records()[0].error


def test_register_rejects_non_specs():
    reg = registry_with(FakeEntryPoint("junk", plugin()))
    junk = types.SimpleNamespace(register_backbones=bs.hookimpl(lambda register: register({"name": "x"})))
    reg.register_plugin(junk, "junk2")
    assert "BackboneSpec" in {r.name: r for r in reg.records()}["junk2"].error


def test_disable_env_blocks_named_plugins(monkeypatch):
    monkeypatch.setenv("BACKBONE_SDK_DISABLE_PLUGINS", "off, other")
    reg = registry_with(FakeEntryPoint("off", plugin("toy_off")), FakeEntryPoint("on", plugin("toy_on")))
    assert reg.names() == ["toy_on"]
    assert {r.name: r.disabled for r in reg.records()} == {"off": True, "on": False}


def test_entry_points_load_lazily_once():
    calls = []

    def eps():
        calls.append(1)
        return [FakeEntryPoint("good", plugin("toy_lazy"))]

    reg = Registry(entry_points=eps)
    assert calls == []
    reg.names(), reg.names(), reg.get("toy_lazy")
    assert calls == [1]


def test_unknown_name_lists_close_matches():
    with pytest.raises(bs.UnknownBackboneError, match="Did you mean: resnet50") as info:
        bs.create_backbone("resnet_50")
    assert isinstance(info.value, KeyError) and "resnet50" in info.value.close


def test_builtin_plugins_come_through_entry_points():
    report = {r.name: r for r in bs.plugin_report()}
    eps = {ep.name for ep in importlib.metadata.entry_points(group="backbone_sdk")}
    assert {"resnet", "vit", "swin", "dinov2", "clip"} <= eps
    for name in ("resnet", "vit", "swin", "dinov2", "clip"):
        assert report[name].ok, report[name].error
        assert report[name].distribution == "backbone-sdk" and report[name].backbones


PLUGIN_SRC = '''
import torch
import backbone_sdk as bs
from backbone_sdk.specs import BackboneSpec, FeatureInfo

class Pooled(bs.Backbone):
    def __init__(self, spec):
        super().__init__(spec)
        self.proj = torch.nn.Conv2d(3, 8, 4, stride=4)
    def _features(self, images, levels):
        return {"stage1": self.proj(images)}
    def embed(self, images):
        return self.features(images)["stage1"].mean((2, 3))

def build(spec):
    return Pooled(spec)

@bs.hookimpl
def register_backbones(register):
    register(BackboneSpec(name="thirdparty_net", family="thirdparty", builder="thirdparty_plugin:build",
                          features=[FeatureInfo("stage1", 8, 4)], embed_dim=8))
'''


@pytest.mark.slow
def test_real_distribution_with_entry_point(tmp_path):
    """pip-install a throw-away plugin distribution and use it from a fresh interpreter."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "thirdparty_plugin.py").write_text(PLUGIN_SRC)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "thirdparty-backbones"
        version = "1.2.3"
        [tool.setuptools]
        py-modules = ["thirdparty_plugin"]
        [project.entry-points.backbone_sdk]
        thirdparty = "thirdparty_plugin"
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True)
    code = textwrap.dedent("""
        import json, torch, backbone_sdk as bs
        m = bs.create_backbone("thirdparty_net")
        rec = [r for r in bs.plugin_report() if r.name == "thirdparty"][0]
        print(json.dumps({"names": bs.list_backbones("thirdparty*"), "emb": list(m.embed(torch.randn(2, 3, 32, 32)).shape),
                          "dist": rec.distribution, "version": rec.version, "resnet": "resnet50" in bs.list_backbones()}))
    """)
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"names": ["thirdparty_net"], "emb": [2, 8], "dist": "thirdparty-backbones",
                      "version": "1.2.3", "resnet": True}


def test_convert_checkpoint_hook_of_a_third_party_plugin():
    """A plugin's converter turns its foreign layout into native keys; other families are left alone."""
    conv = types.SimpleNamespace()

    @bs.hookimpl
    def register_backbones(register):
        register(toy_spec("toy_conv"))

    @bs.hookimpl
    def convert_checkpoint(spec, state_dict, source_format):
        if spec.family != "toy" or "legacy.w" not in state_dict:
            return None
        return {"conv.weight": state_dict["legacy.w"], "conv.bias": state_dict["legacy.b"]}, "legacy"

    conv.register_backbones, conv.convert_checkpoint = register_backbones, convert_checkpoint
    bs.register_plugin(conv, name="conv")
    try:
        ref = bs.create_backbone("toy_conv")
        foreign = {"legacy.w": ref.conv.weight.detach().clone(), "legacy.b": ref.conv.bias.detach().clone()}
        model = bs.create_backbone("toy_conv", weights=foreign)
        assert model.load_report.format == "legacy"
        assert torch.equal(model.conv.weight, ref.conv.weight)
        with pytest.raises(bs.CheckpointMismatchError):
            bs.create_backbone("resnet_test", weights=foreign)
    finally:
        bs.unregister_plugin("conv")


def test_a_raising_converter_does_not_break_other_families():
    broken = types.SimpleNamespace()

    @bs.hookimpl
    def convert_checkpoint(spec, state_dict, source_format):
        raise RuntimeError("converter bug")

    broken.convert_checkpoint = convert_checkpoint
    bs.register_plugin(broken, name="broken_converter")
    try:
        ref = bs.create_backbone("resnet_test")
        torchvision_layout = {k.replace("model.embedder.embedder.convolution.", "conv1."): v
                              for k, v in ref.state_dict().items()}
        assert any(k.startswith("conv1.") for k in torchvision_layout)
        native = bs.create_backbone("resnet_test", weights=ref.state_dict())  # no conversion needed
        assert native.load_report.exact
        with pytest.raises(bs.CheckpointError, match="'broken_converter' raised RuntimeError: converter bug"):
            bs.load_weights(bs.create_backbone("toy_net") if "toy_net" in bs.list_backbones()
                            else bs.create_backbone("vit_test"), {"foreign.w": torch.zeros(1)}, weights_format="timm")
    finally:
        bs.unregister_plugin("broken_converter")


# -- names resolved on demand (resolve_backbone) ---------------------------------------------------
def resolver(prefix, calls=None, fail=None):
    """A plugin that registers nothing and resolves ``<prefix>anything`` (raising ``fail`` if given)."""
    mod = types.SimpleNamespace()

    @bs.hookimpl
    def register_backbones(registry):
        pass

    @bs.hookimpl
    def resolve_backbone(name):
        if calls is not None:
            calls.append(name)
        if not name.startswith(prefix):
            return None
        if fail is not None:
            raise fail
        return toy_spec(name)

    mod.register_backbones, mod.resolve_backbone = register_backbones, resolve_backbone
    return mod


def test_resolved_names_are_built_once_and_listed_afterwards():
    calls = []
    reg = registry_with(FakeEntryPoint("zoo", resolver("zoo/", calls)), FakeEntryPoint("fixed", plugin("toy_a")))
    assert reg.names() == ["toy_a"]
    spec = reg.get("zoo/net1")
    assert spec.name == "zoo/net1" and spec.plugin == "zoo"
    assert reg.get("zoo/net1") is spec and calls == ["zoo/net1"]
    assert reg.names() == ["toy_a", "zoo/net1"] and reg.get("zoo:zoo/net1") is spec
    assert reg.get("toy_a").plugin == "fixed" and calls == ["zoo/net1"]  # registered names never ask
    record = next(r for r in reg.records() if r.name == "zoo")
    assert record.on_demand and record.backbones == ["zoo/net1"]
    with bs.use_registry(reg):
        model = bs.create_backbone("zoo/net2")
    assert model.embed(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_a_failing_resolver_is_reported_and_others_still_resolve():
    reg = registry_with(FakeEntryPoint("broken", resolver("", fail=RuntimeError("hub down"))),
                        FakeEntryPoint("zoo", resolver("zoo/")))
    with pytest.raises(bs.UnknownBackboneError, match="plugin 'broken' raised RuntimeError: hub down"):
        reg.get("toy_b")
    assert reg.get("zoo/x").plugin == "zoo"


def test_a_resolver_owning_the_namespace_gives_its_own_suggestions():
    missing = bs.UnknownBackboneError("zoo/nte", ["zoo/net"], "Names come from zoo.list().")
    reg = registry_with(FakeEntryPoint("zoo", resolver("zoo/", fail=missing)), FakeEntryPoint("other", resolver("")))
    with pytest.raises(bs.UnknownBackboneError, match=r"Did you mean: zoo/net\? Names come from zoo.list\(\)"):
        reg.get("zoo/nte")


def test_qualified_name_asks_only_that_resolver():
    first, second = [], []
    reg = registry_with(FakeEntryPoint("a", resolver("", first)), FakeEntryPoint("b", resolver("", second)))
    assert reg.get("b:net").plugin == "b" and first == [] and second == ["net"]
    assert reg.get("net").plugin == "b"  # the first resolution also took the plain name
    with pytest.raises(bs.UnknownBackboneError):
        reg.get("c:net")


def test_resolver_returning_a_wrong_spec_is_reported():
    mod = types.SimpleNamespace(resolve_backbone=bs.hookimpl(lambda name: toy_spec("other_name")))
    reg = registry_with(FakeEntryPoint("liar", mod))
    with pytest.raises(bs.UnknownBackboneError, match="not a BackboneSpec named 'asked'"):
        reg.get("asked")
    assert reg.names() == []
