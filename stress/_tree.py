"""Frozen dataclasses registered as JAX pytrees, and the JAX settings every module shares.

Fields whose metadata has ``static=True`` are pytree metadata (hashed, never traced); all
other fields are leaves. This is the pattern of ``jax_md.dataclasses`` and equinox modules,
without the dependency.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

# float64 is the default for every engine module (exact reports); float32 is opt-in per run.
jax.config.update("jax_enable_x64", True)


CACHE_MAX_BYTES = 4 << 30  # the compilation cache's size limit, least recently used out first


def _compilation_cache() -> None:
    """Keep compiled kernels on disk so a second run of the same shapes skips compilation.

    ``STRESS_COMPILATION_CACHE`` names the folder (default: the user cache folder), ``0``
    turns it off. Kernels compile in about a second each on CPU, under JAX's default threshold
    for caching, hence the threshold of 0.
    """
    where = os.environ.get("STRESS_COMPILATION_CACHE")
    if where == "0" or jax.config.jax_compilation_cache_dir:
        return
    if where is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        where = str(Path(base) / "stress" / "jax")
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # Several processes share the folder (cluster workers on one machine, runs side by side).
    # JAX writes entries in place and locks the folder (filelock) only when the cache has a
    # size limit; without the lock a process can read a half-written kernel and crash.
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


_compilation_cache()


def pytree_dataclass(cls: type) -> type:
    """Make ``cls`` a frozen dataclass and register it as a pytree."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static", False)]
    meta = [f.name for f in fields if f.metadata.get("static", False)]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
