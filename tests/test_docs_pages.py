"""Every code block of every documentation page runs, each on its own, offline.

- ``python`` blocks are executed, each in a fresh namespace and working directory (so none leans on
  another); ``bash`` lines that start with ``backbone-sdk`` are run through the console script. Other
  bash lines (``pip install``, ``torchrun``, ``python examples/...``, the test commands) are not run
  here; the example scripts are run by the framework tests (test_detectron2.py, test_mmseg.py, test_vlm.py).
- ``weights="hub"`` (and ``-w hub``) resolves through the Hugging Face cache, so the test fills a
  private cache (``HF_HUB_CACHE``) with a random-init snapshot under the hub id of every backbone the
  page names, and runs with ``HF_HUB_OFFLINE=1``: the page's lines run verbatim, the weights are not
  the published ones. A language model a page loads (``LANGUAGE_MODELS``) is stood in for by a tiny
  random model of the same class with a tokenizer trained here.
- Blocks fenced ``python`` must be runnable; an output shown to the reader is fenced ``text``; a block
  with a ``title="path"`` shows a file verbatim and is checked and run where that file lives; a
  ``{.bash .cluster}`` block needs a cluster or GPUs (torchrun, SLURM, Ray) and is only shown.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import backbone_sdk as bs

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
QUOTED = re.compile(r"""["']([A-Za-z0-9_./-]+)["']|(?:-b|--backbone|^backbone-sdk \w+)\s+([A-Za-z0-9_./-]+)""", re.M)


def blocks(page: str) -> list[dict]:
    text = (ROOT / page).read_text()
    out = []
    for match in FENCE.finditer(text):
        info, code = match.groups()
        line = text.count("\n", 0, match.start()) + 1
        classes = re.findall(r"\.([\w-]+)", info) if info.startswith("{") else info.split()[:1]
        lang = classes[0] if classes else ""
        if "title=" in info:  # a file shown verbatim (tests/test_docs.py checks it and runs its tests)
            continue
        if "cluster" in classes:  # needs a cluster or GPUs (torchrun, SLURM, Ray): shown, not run
            continue
        if lang == "python":
            out.append({"page": page, "line": line, "kind": "python", "code": code})
        elif lang == "bash":
            commands = [raw.split("  #")[0].strip() for raw in code.replace("\\\n", " ").splitlines()]
            commands = [c for c in commands if c.startswith("backbone-sdk ")]
            if commands:
                out.append({"page": page, "line": line, "kind": "shell", "code": "\n".join(commands)})
    return out


RUNNABLE = [page for page in PAGES if blocks(page)]


def hub_names(page_blocks: list[dict]) -> set[str]:
    """Registered backbones with a hub id that the page's code names."""
    with bs.use_registry(bs.Registry()):
        known = set(bs.list_backbones(include_test=True))
        found = {m.group(1) or m.group(2) for b in page_blocks for m in QUOTED.finditer(b["code"])}
        return {name for name in found & known if bs.get_spec(name).hub_id}


#: language models the pages load from the hub: a tiny random one of the same class stands in
LANGUAGE_MODELS = {"Qwen/Qwen2-0.5B": "qwen2"}


def _cache_entry(cache: Path, hub_id: str, write) -> None:
    """A hub-cache entry (``models--org--name/{refs/main,snapshots/<rev>/}``) whose snapshot folder
    ``write(folder)`` fills; kept for the session."""
    repo, _, revision = hub_id.partition("@")
    entry = cache / ("models--" + repo.replace("/", "--"))
    if (entry / "refs").exists():
        return
    commit = "0" * 40
    write(entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / (revision or "main")).write_text(commit)


def _write_backbone(name: str):
    def write(folder: Path) -> None:
        import torch
        from transformers import PreTrainedModel

        torch.manual_seed(0)
        model = bs.create_backbone(name)
        if isinstance(getattr(model, "model", None), PreTrainedModel):  # the layout the published repo has
            model.model.save_pretrained(folder)
        else:
            bs.save_weights(model, folder / "model.safetensors")
    return write


def _write_language_model(style: str):
    def write(folder: Path) -> None:
        import torch
        from _vlm_kit import tiny_lm, train_tokenizer

        torch.manual_seed(0)
        tokenizer = train_tokenizer()
        tokenizer.save_pretrained(folder)
        tiny_lm(len(tokenizer), style=style).save_pretrained(folder)
    return write


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_hub_cache")


def test_pages_found():
    assert "README.md" in PAGES and "docs/index.md" in RUNNABLE
    assert len(RUNNABLE) >= 10, RUNNABLE


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE)
def test_page_code_runs(page, hub_cache, tmp_path):
    page_blocks = blocks(page)
    for name in sorted(hub_names(page_blocks)):
        _cache_entry(hub_cache, bs.get_spec(name).hub_id, _write_backbone(name))
    code = "\n".join(b["code"] for b in page_blocks)
    for hub_id, style in LANGUAGE_MODELS.items():
        if hub_id in code:
            _cache_entry(hub_cache, hub_id, _write_language_model(style))
    spec_file = tmp_path / "blocks.json"
    spec_file.write_text(json.dumps(page_blocks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "_docs_runner.py"), str(spec_file), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, f"{page}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
