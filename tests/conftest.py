pytest_plugins = ["backbone_sdk.testing", "_vlm_kit"]

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import backbone_sdk  # noqa: E402


def tiny_names() -> list[str]:
    """Every registered tiny test variant: contract tests run on all of them."""
    return [n for n in backbone_sdk.list_backbones(include_test=True) if backbone_sdk.get_spec(n).is_test]


def full_names() -> list[str]:
    return [n for n in backbone_sdk.list_backbones() if not backbone_sdk.get_spec(n).is_test]


@pytest.fixture(autouse=True)
def _keep_the_test_process_allocator(monkeypatch):
    """The extraction job tunes the CPU allocator of its process (process-wide, permanent): not
    the pytest process's. tests/test_allocator.py measures the real thing in child processes."""
    from backbone_sdk import allocator

    monkeypatch.setattr(allocator, "tune_cpu_allocator",
                        lambda: allocator.AllocatorTuning(False, "left alone in the test process"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def scramble(module: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Perturb every parameter and float buffer so that a wrong key mapping cannot hide behind init values."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype)
            if "running_var" in _name_of(module, tensor):
                tensor.copy_(tensor.abs() + 0.5 + noise.abs() * 0.1)
            else:
                tensor.add_(noise * scale)
    return module


def _name_of(module, tensor):
    for name, buf in module.named_buffers():
        if buf is tensor:
            return name
    return ""
