"""The benchmark scripts keep running (a smoke run on tiny variants; the figures come from full runs)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import backbone_sdk as bs

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_embed_covers_every_family():
    bench = _script("bench_embed")
    families = {bs.get_spec(n).family for n in bs.list_backbones(include_test=True)} - {"tinytok"}
    assert families <= set(bench.RAW) and families <= set(bench.PEER), families - set(bench.RAW)
    for full, tiny in bench.VARIANTS.values():
        assert bs.get_spec(full).family == bs.get_spec(tiny).family


@pytest.mark.slow
def test_bench_embed_quick_run_agrees_with_transformers(capsys):
    bench = _script("bench_embed")
    tiny = ",".join(t for _, t in bench.VARIANTS.values())
    assert bench.main(["--quick", "--only", tiny]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in tiny.split(","))


@pytest.mark.slow
def test_bench_embed_optimized_bf16_quick_run(capsys):
    """--optimize --dtype bf16: optimize() on ours, channels_last on the CNN peer, the GEMM ceilings and the
    bf16 cosine check all run."""
    bench = _script("bench_embed")
    assert bench.main(["--quick", "--only", "resnet_test,vit_test", "--optimize", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "GEMM ceilings" in out and "bf16, optimize()" in out and "cos " in out
    assert "resnet_test: folded" in out and "weights cast to torch.bfloat16" in out


@pytest.mark.slow
def test_bench_embed_compiled_quick_run(capsys):
    bench = _script("bench_embed")
    assert bench.main(["--quick", "--only", "resnet_test", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "optimize()+compile" in out and "ours/peer eager" in out and "compiled embed" in out


def test_gpu_embed_says_it_needs_cuda(capsys, monkeypatch):
    """On a machine without CUDA (CI) the GPU benchmark stops at once with a pointer to the CPU one."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _script("gpu_embed").main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_profile_embed_splits_the_time_into_operator_classes(capsys):
    prof = _script("profile_embed")
    assert prof.main(["--only", "vit_test,resnet_test", "--size", "32", "--batch", "2", "--iters", "1",
                      "--warmup", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    for row in ("GEMM", "convolution", "attention", "normalization", "element-wise", "data movement", "total"):
        assert out.count(f"\n{row} ") == 2, row
    assert "ours: GEMMs" in out and "% of the ceiling" in out  # vit_test's matmuls against the measured ceiling
    assert "aten::addmm" in out
    conv = [line for line in out.splitlines() if line.startswith("convolution ")][-1]  # resnet_test's table
    ours, peer = (float(v) for v in re.findall(r"([\d.]+) \(", conv))
    assert ours > 0 and peer > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc only")
def test_bench_embed_tune_allocator_reports_it():
    # a child process: the tuning is process-wide and permanent
    from test_allocator import clean_env

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_embed.py"), "--quick", "--only", "resnet_test", "--tune-allocator"],
                         capture_output=True, text=True, check=True, env=clean_env()).stdout
    assert "CPU allocator: glibc" in out and "M_MMAP_MAX=0" in out and "faulted MiB/call" in out
