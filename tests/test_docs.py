"""Every hook is documented and exercised by a test."""

from pathlib import Path

import pytest

import backbone_sdk as bs
from backbone_sdk.hookspecs import BackboneSpecs, hookimpl

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in vars(BackboneSpecs) if not name.startswith("_")]


def test_hooks_found():
    assert set(HOOKS) == {"register_backbones", "convert_checkpoint"}


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    assert f"### `{hook}(" in (ROOT / "docs" / "plugins.md").read_text()


class _Recorder:
    """A plugin implementing every hook that only records the calls it receives."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def register_backbones(self, register):
        self.calls.append("register_backbones")

    @hookimpl
    def convert_checkpoint(self, spec, state_dict, source_format):
        self.calls.append("convert_checkpoint")


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_called_by_the_sdk(hook):
    """Each hook is reached through the public API: registering a plugin, loading a foreign checkpoint."""
    assert hasattr(_Recorder, hook), f"add {hook} to _Recorder and to the calls below"
    recorder = _Recorder()
    bs.register_plugin(recorder, name="hook_recorder")
    try:
        model = bs.create_backbone("resnet_test")
        foreign = {f"foreign.{k}": v for k, v in model.state_dict().items()}  # a layout no plugin knows
        with pytest.raises(bs.CheckpointMismatchError):
            bs.load_weights(model, foreign)
    finally:
        bs.unregister_plugin("hook_recorder")
    assert hook in recorder.calls


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py"]
    assert any(f"def {hook}(" in p.read_text() for p in tests), hook


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    test_cmd = [line.split("#")[0].strip() for line in block.strip().splitlines()][1]
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
