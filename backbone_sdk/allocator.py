"""Process-wide CPU allocator tuning for inference loops: :func:`tune_cpu_allocator`.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves large blocks with a
fresh ``mmap`` and hands freed memory back to the kernel, so a forward pass that runs again with the
same shapes touches new pages every time and pays one page fault (and the kernel's zeroing) per
4 KiB. Measured on a 2-core VM (fp32, 224x224): ResNet-50 at batch 32 faulted 4.7 GiB per call and
ran 2.0x faster once freed memory stayed in the process; at batch 8 the faults vary from run to run
(25-600 MiB per call across families; ``benchmarks/bench_embed.py --tune-allocator`` reports them).

It works for allocations of the main thread. glibc's other threads allocate from their own
arenas, which still ``mmap`` blocks of 64 MiB or more afresh: a server that runs the model in a
thread pool keeps those faults (run it on the main thread, or preload jemalloc/tcmalloc).

This is process-wide state, so nothing in backbone_sdk changes it behind the caller's back: the
extraction job calls it in the process that runs the model (unless ``--no-optimize`` or
``ExtractionSettings(tune_allocator=False)``); a server or script
calls it once. It is the in-process form of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``;
preloading jemalloc or tcmalloc does the same job and is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

import attrs

__all__ = ["AllocatorTuning", "tune_cpu_allocator"]

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_CACHING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_applied: AllocatorTuning | None = None


@attrs.frozen
class AllocatorTuning:
    """What :func:`tune_cpu_allocator` did: ``applied`` and, either way, why in ``detail``."""

    applied: bool
    detail: str

    def __str__(self) -> str:
        return self.detail


def tune_cpu_allocator() -> AllocatorTuning:
    """Keep freed CPU memory in this process, so repeated forwards reuse their pages.

    With glibc's ``malloc`` this sets ``M_MMAP_MAX=0`` (large tensors come from the heap instead
    of a fresh ``mmap`` each) and ``M_TRIM_THRESHOLD`` to its maximum (freed memory is not handed
    back to the kernel). The process then keeps its peak CPU memory for reuse, which is what a
    steady inference loop wants and what a process with short memory spikes may not. It is
    process-wide and cannot be undone; calling it again does nothing. Blocks of 64 MiB or more
    allocated by threads other than the main one are still mapped afresh (glibc's thread arenas).
    It is not applied (and says why) on a C library other than glibc, or when another allocator
    (jemalloc, tcmalloc, mimalloc) serves ``malloc``.

    >>> import backbone_sdk
    >>> print(backbone_sdk.tune_cpu_allocator())   # doctest: +SKIP
    glibc 2.36 malloc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2147483647 (freed memory stays in the process)
    """
    global _applied
    if _applied is not None:
        return _applied
    preloaded = [a for a in _CACHING_ALLOCATORS if a in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        return AllocatorTuning(False, f"left alone: {preloaded[0]} is preloaded (LD_PRELOAD) and caches already")
    if not sys.platform.startswith("linux"):
        return AllocatorTuning(False, f"left alone: only glibc's malloc is tuned, and this is {sys.platform}")
    process = ctypes.CDLL(None)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    version = getattr(libc, "gnu_get_libc_version", None)
    if libc is None or version is None or not hasattr(libc, "mallopt"):
        return AllocatorTuning(False, "left alone: the C library is not glibc (no gnu_get_libc_version)")
    if _address(process.malloc) != _address(libc.malloc):  # jemalloc & co. linked in or preloaded elsewhere
        return AllocatorTuning(False, "left alone: malloc is not glibc's here (another allocator is interposed)")
    version.restype = ctypes.c_char_p
    glibc = version().decode()
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = [name for name, param, value in (("M_MMAP_MAX=0", _M_MMAP_MAX, 0),
                                             (f"M_TRIM_THRESHOLD={_INT_MAX}", _M_TRIM_THRESHOLD, _INT_MAX))
            if libc.mallopt(param, value)]
    if len(done) < 2:
        _applied = AllocatorTuning(False, f"glibc {glibc} refused mallopt; set: {', '.join(done) or 'nothing'}")
    else:
        _applied = AllocatorTuning(True, f"glibc {glibc} malloc: {', '.join(done)} (freed memory stays in the process)")
    return _applied


def _address(function) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value
