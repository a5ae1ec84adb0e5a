"""tune_cpu_allocator(): freed CPU memory stays in the process, so a repeated loop stops faulting.

The tuning is process-wide and cannot be undone, so its effect is measured in child processes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import backbone_sdk as bs
from backbone_sdk import allocator

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc only")
# with transparent huge pages always on, a fresh 40 MB mapping faults in 2 MiB pieces: too few to count
small_pages = pytest.mark.skipif(THP.is_file() and "[always]" in THP.read_text(), reason="THP always on")
#: what would tune (or replace) malloc in the children before the test does
ALLOCATOR_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}

# two 40 MB tensors per round, freed at its end: glibc maps a block above 32 MiB (its largest
# dynamic mmap threshold) fresh every time by default, so every round faults its 80 MB in again
CHILD = """
import json, resource, sys, torch
import backbone_sdk as bs
tuning = bs.tune_cpu_allocator() if sys.argv[1] == "tune" else None
again = bs.tune_cpu_allocator() if tuning is not None else None
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(10_000_000) for _ in range(2)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "applied": tuning.applied if tuning else None,
                  "detail": str(tuning) if tuning else None, "same": again is tuning}))
"""


def _child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env=clean_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
@small_pages
def test_a_tuned_process_reuses_freed_memory_instead_of_faulting():
    plain, tuned = _child("plain"), _child("tune")
    assert tuned["applied"] and "M_MMAP_MAX=0" in tuned["detail"] and tuned["same"]
    pages = 80e6 / resource.getpagesize()
    # untuned, every round faults its 80 MB in again; tuned, the heap settles within a few rounds
    # (measured: from round 2-4 on) and later rounds reuse it
    assert min(plain["faults"][6:]) > 0.5 * pages, plain
    assert max(tuned["faults"][6:]) < 0.01 * pages, tuned


def test_a_preloaded_caching_allocator_is_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    result = bs.tune_cpu_allocator()  # the real one (conftest replaces only the module attribute)
    assert not result.applied and "jemalloc is preloaded" in result.detail
    assert allocator._applied is None  # nothing was set, so a later call looks again


def test_extraction_tunes_the_allocator_on_cpu_when_optimizing_unless_told_not_to(monkeypatch):
    from backbone_sdk.extraction.job import ExtractionSettings, _load_model

    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(1) or allocator.AllocatorTuning(False, "x"))
    _load_model(ExtractionSettings(backbone="resnet_test", device="cpu"), 0)
    assert calls == [1]
    _load_model(ExtractionSettings(backbone="resnet_test", device="cpu", optimize=False), 0)
    _load_model(ExtractionSettings(backbone="resnet_test", device="cpu", tune_allocator=False), 0)
    assert calls == [1]
