"""Handing freed host memory back to the operating system between the stages of a run.

Both allocators behind a run keep what was freed for reuse: Arrow's (mimalloc) the pages of
the tables it read, glibc's malloc the heap below its mmap threshold (which it raises as a
process frees large blocks). Neither is reused by the other, so a stage that frees a few
hundred MiB in one (the holdings layout, in NumPy) and allocates in the other (the report's
Parquet files, in Arrow) adds to the process's peak instead of reusing it. ``trim`` returns
both; it is cheap (milliseconds) and a no-op where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def peak_mib() -> float:
    """This process's peak resident memory, MiB: ``VmHWM`` where ``/proc`` has it, else
    ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: a process started with ``vfork`` + ``exec`` (as Python's
    ``subprocess`` starts workers) inherits its parent's peak in it. A parent that had just
    generated the 1M-account sample made every worker it started report at least the
    generator's 1.5-1.7 GiB. ``VmHWM`` belongs to the process's own address space, which
    ``exec`` makes new, and ``forget_peak`` resets it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def forget_peak() -> None:
    """Start this process's peak resident memory afresh from now (Linux: ``clear_refs`` 5;
    elsewhere nothing, and the peak keeps what came before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def trim() -> None:
    """Return the free pages of Arrow's memory pool and of the C heap to the system."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim_heap()


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    XLA compiles in the thread that asks, and glibc gives each thread its own heap (arena), which
    keeps what a compilation freed: on the deep 1M-account exchange a process that compiled its
    kernels held up to about 380 MiB more after each, and a cold ``stress run`` peaked at 2.2-2.4 GB
    where one with filled caches peaked at 1.7-1.9 GB (docs/benchmarks.md)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
