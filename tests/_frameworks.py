"""Optional frameworks for integration tests: skipped locally when absent, a failure in CI."""

import importlib
import os

import pytest


def require(module: str):
    """Import ``module``; when it is missing, skip, or fail if BACKBONE_SDK_REQUIRE_INTEGRATIONS=1 (CI)."""
    if os.environ.get("BACKBONE_SDK_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
