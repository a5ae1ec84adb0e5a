"""The benchmark scripts keep running (a smoke run on tiny variants; the figures come from full runs)."""

import importlib.util
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
