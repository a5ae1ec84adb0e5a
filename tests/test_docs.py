"""The docs against the code: every hook documented and exercised, the plugin example verbatim, the
model table current, the README test command in CI, and the docs site builds with `--strict`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import backbone_sdk as bs
from backbone_sdk.hookspecs import BackboneHookSpec, hookimpl

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in vars(BackboneHookSpec) if not name.startswith("_")]
PLUGIN_EXAMPLE = ROOT / "examples" / "plugin"


def test_hooks_found():
    assert set(HOOKS) == {"register_backbones", "convert_checkpoint", "resolve_backbone"}


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

    @hookimpl
    def resolve_backbone(self, name):
        self.calls.append("resolve_backbone")


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_called_by_the_sdk(hook):
    """Each hook is reached through the public API: registering a plugin, loading a foreign checkpoint,
    looking up a name nobody registered."""
    assert hasattr(_Recorder, hook), f"add {hook} to _Recorder and to the calls below"
    recorder = _Recorder()
    bs.register_plugin(recorder, name="hook_recorder")
    try:
        model = bs.create_backbone("resnet_test")
        foreign = {f"foreign.{k}": v for k, v in model.state_dict().items()}  # a layout no plugin knows
        with pytest.raises(bs.CheckpointMismatchError):
            bs.load_weights(model, foreign)
        with pytest.raises(bs.UnknownBackboneError):
            bs.get_spec("no_plugin_registers_this")
    finally:
        bs.unregister_plugin("hook_recorder")
    assert hook in recorder.calls


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    """Some test other than this file implements the hook (decorated, so pluggy calls it)."""
    impl = re.compile(rf"@(\w+\.)?hookimpl\s*\n\s*def {hook}\(")
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py"]
    assert any(impl.search(p.read_text()) for p in tests), hook


@pytest.mark.parametrize("path", ["pyproject.toml", "tinytok.py", "tests/conftest.py", "tests/test_tinytok.py"])
def test_plugin_docs_show_the_example_files_verbatim(path):
    doc = (ROOT / "docs" / "plugins.md").read_text()
    assert (PLUGIN_EXAMPLE / path).read_text().rstrip() + "\n```" in doc, f"docs/plugins.md is out of date for {path}"


def test_plugin_example_tests_pass():
    """The documented third-party plugin's own test file, run the way its author would."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=PLUGIN_EXAMPLE, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    test_cmd = [line.split("#")[0].strip() for line in block.strip().splitlines()][1]
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_model_catalogue_is_current():
    """docs/models.md is what `python -m backbone_sdk.catalog` generates from the registry, and lists
    every registered (non-test) backbone."""
    from backbone_sdk import catalog

    page = (ROOT / "docs" / "models.md").read_text()
    assert page == catalog.markdown(), "regenerate it: python -m backbone_sdk.catalog > docs/models.md"
    with bs.use_registry(bs.Registry()):
        for name in bs.list_backbones(include_test=False):
            assert f"| `{name}` |" in page


@pytest.mark.slow
def test_docs_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: every page in the nav, every link and anchor resolves, the API
    reference (mkdocstrings) renders from the docstrings without a warning."""
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    api = (tmp_path / "site" / "api" / "core" / "index.html").read_text()
    assert "create_backbone" in api and "load_weights" in api
    table = (tmp_path / "site" / "models" / "index.html").read_text()
    with bs.use_registry(bs.Registry()):
        missing = [n for n in bs.list_backbones() if f"<code>{n}</code>" not in table]
    assert not missing, missing


def test_examples_named_in_the_docs_exist():
    """The docs name example files as `examples/...` (the site cannot link outside docs/)."""
    named = {m for page in (ROOT / "docs").rglob("*.md") for m in re.findall(r"`((?:examples|contrib)/[\w./-]+)`",
                                                                              page.read_text())}
    assert named and not [p for p in named if not (ROOT / p).exists()], sorted(named)
