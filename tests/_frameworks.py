"""Helpers of the integration tests: optional frameworks, example scripts, thread settings."""

import contextlib
import importlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def require(module: str):
    """Import ``module``; when it is missing, skip, or fail if BACKBONE_SDK_REQUIRE_INTEGRATIONS=1 (CI)."""
    if os.environ.get("BACKBONE_SDK_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def load_example(folder: str, script: str = "train.py"):
    """Import ``examples/<folder>/<script>`` as a module, so tests run the code users copy."""
    spec = importlib.util.spec_from_file_location(f"{folder}_example_{Path(script).stem}", EXAMPLES / folder / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def single_thread():
    """One torch thread: tiny convolutions on 2 shared cores spend more on thread hand-offs than compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
