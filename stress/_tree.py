"""Frozen dataclasses registered as JAX pytrees.

Fields whose metadata has ``static=True`` are pytree metadata (hashed, never traced); all
other fields are leaves. This is the pattern of ``jax_md.dataclasses`` and equinox modules,
without the dependency.
"""

from __future__ import annotations

import dataclasses

import jax

# float64 is the default for every engine module (exact reports); float32 is opt-in per run.
jax.config.update("jax_enable_x64", True)


def pytree_dataclass(cls: type) -> type:
    """Make ``cls`` a frozen dataclass and register it as a pytree."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static", False)]
    meta = [f.name for f in fields if f.metadata.get("static", False)]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
