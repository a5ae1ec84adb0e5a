"""Every hook is documented and exercised by a test."""

from pathlib import Path

import pytest

from backbone_sdk.hookspecs import BackboneSpecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in vars(BackboneSpecs) if not name.startswith("_")]


def test_hooks_found():
    assert set(HOOKS) == {"register_backbones", "convert_checkpoint"}


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    assert f"### `{hook}(" in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py"]
    assert any(f"def {hook}(" in p.read_text() or f"hook.{hook}(" in p.read_text() for p in tests), hook


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    test_cmd = [line.split("#")[0].strip() for line in block.strip().splitlines()][1]
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
