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


def trim() -> None:
    """Return the free pages of Arrow's memory pool and of the C heap to the system."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
