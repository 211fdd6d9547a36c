"""Kernels kept on disk traced and lowered (``jax.export``), so a new process need not trace.

JAX's persistent compilation cache (``_tree``) keeps compiled executables, but it finds one by
its lowered module, so every new process still traces and lowers each kernel before the
lookup: on CPU about 0.25 s per holdings shape, six shapes in a plain run; on a GPU more
(the Pallas kernel's Triton lowering). ``Kept(fn, tag)`` wraps a jitted function: the first
call of each argument signature exports ``fn`` (trace and lower, as ``jax.jit`` would) and
writes the serialized module next to the compilation cache; a later process deserializes it
instead, and the executable itself still comes from the compilation cache. A plain run on
20,000 accounts (CPU, cache filled) spent 0.78 s tracing and 1.02 s lowering its first call,
and 0.06 s and 0.31 s with the modules kept; a new ``stress run`` process at 100,000
accounts took 15–16 s instead of 19–20 s. On an H200 the new process measured the same
either way (15–17 s at 1,000,000 accounts; ``docs/benchmarks.md``).

A kept module is only valid for what tracing read, so its key holds all of it: the ``tag``
(the wrapped function's name and static arguments), each argument's tree structure (with the
pytrees' static fields), shapes, dtypes and shardings, the source of every module of the
package, the current value of every upper-case setting of the modules that tracing runs
(``engine.FUSION``, ``fused.BLOCKS``, ...; tests and benchmarks change them at run time), the ``STRESS_``, ``JAX_``
and ``XLA_`` environment, the JAX version and the devices. A change to any of them is a new
key. Anything that goes wrong (an unreadable file, a module JAX cannot serialize) falls back
to the plain jitted call.

``Kept.prefetch`` prepares a call ahead, in a background thread: the sweep starts every holdings
shape's kernel loading before it runs the first, so a new process reads them side by side.

``STRESS_EXPORT_CACHE`` names another folder, or ``0`` turns it off; without it, it is off
whenever the compilation cache is. Files are flatbuffers written by ``jax.export`` (no pickle); the folder keeps the newest
``MAX_FILES``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from . import _memory

MAX_FILES = 2048  # about 50 KB each; a package edit or a new shape adds files, the oldest go
# A call whose executable took longer than this compiled (loading one from the compilation
# cache takes 0.01-0.2 s): its thread's heap then holds what the compiler freed, which
# ``_memory.trim_heap`` hands back
TRIM_AFTER_S = 0.5

# Pallas kernels on a GPU lower to Triton IR, which JAX does not promise to read back in
# another version; the key holds the JAX version, so within one it is safe.
_UNSTABLE_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call")


def folder() -> Path | None:
    """Where kept modules go, or None when off: ``STRESS_EXPORT_CACHE`` (``0``: off), else
    ``exported/`` in the compilation cache folder, and off when that cache is."""
    where = os.environ.get("STRESS_EXPORT_CACHE")
    if where == "0":
        return None
    if where:
        return Path(where)
    base = jax.config.jax_compilation_cache_dir
    return Path(base) / "exported" if base else None


@functools.cache
def _source_digest() -> str:
    """Digest of every module of the package (tracing runs their code)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# Modules whose code never runs while a kept function traces (the engine's tables and sweep,
# the Greeks, the Monte Carlo paths): loading, reports, the command line, and drivers that
# call the engine or run jits of their own. Their settings stay out of the key: which of them
# a process imported differs between `stress run`, `stress bench` and a script on the Python
# API, and counting them made each of those miss the others' kept modules. A module left off
# this list only costs misses, never a wrong hit.
NOT_TRACED = frozenset({"backtest", "benchmark", "calibrate", "cascade", "cli", "cluster", "io", "replay",
                        "report", "reverse", "sample", "sensitivities", "_memory"})


def _settings() -> str:
    """Everything outside the arguments that tracing may read, as text."""
    mods = sorted((name, m) for name, m in list(sys.modules.items())
                  if name == "stress" or (name.startswith("stress.") and name[7:] not in NOT_TRACED))
    consts = [(name, k, _canonical(v)) for name, m in mods for k, v in list(vars(m).items())
              if k.isupper() and not k.startswith("_")]
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("STRESS_", "JAX_", "XLA_")))
    devs = jax.local_devices()
    device = (jax.__version__, devs[0].platform, getattr(devs[0].client, "platform_version", ""),
              tuple(d.device_kind for d in devs), jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    return repr((consts, env, device))


def _canonical(v: Any) -> str:
    """``repr(v)`` that is the same in every process: sets in sorted order, no object addresses
    (a function's repr holds one: the report's column tables hold functions)."""
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(sorted(_canonical(x) for x in v)) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_canonical(k)}: {_canonical(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__}(" + ", ".join(_canonical(x) for x in v) + ")"
    if callable(v) and hasattr(v, "__qualname__"):
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v))


def spec(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype, sharding=sharding)


# (kernel tag, seconds) of every call prepared from a kept module in this process, read,
# lowered and loaded, in whichever thread: `stress bench` reports what a warm start spent.
# Lower case: the upper-case names of traced modules are settings, part of every module's key.
prepared: list[tuple[str, float]] = []


class Kept:
    """``fn`` (a jitted function of pytrees of arrays) with its traced modules kept on disk.

    Calls take the same arguments as ``fn``; each new argument signature costs one export (or
    one read) and one ``jax.jit`` of the exported call, after which calls go straight to it.
    """

    def __init__(self, fn: Callable, tag: tuple):
        self.fn, self.tag = fn, tag
        self._calls: dict = {}  # signature -> callable on the flat leaves

    def __call__(self, *args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside another trace: inline it
            return self.fn(*args)
        sig = _signature(treedef, leaves)
        call = self._calls.get(sig)
        if call is None:
            call = self._calls[sig] = self._prepare(treedef, tuple(spec(x) for x in leaves))
            if folder() is None:  # kept modules off: this first call of the plain jit compiles, here
                started = time.perf_counter()
                out = call(*leaves)
                _hand_back(time.perf_counter() - started)
                return out
        elif isinstance(call, Future):  # being prepared by ``prefetch``
            call = self._calls[sig] = call.result()
        return call(*leaves)

    def prefetch(self, *args: Any) -> None:
        """Start preparing the call on ``args`` (arrays, or anything with their shape, dtype
        and sharding) in a background thread, so that a later call with the same signature
        finds it compiled. Does nothing where kept modules are off.

        A new process spends most of its warm start reading each holdings shape's module and
        loading its executable (0.1-0.3 s a shape at 1M accounts on CPU); XLA loads
        executables without holding Python's lock, so several shapes load at once, and while
        the devices run the shapes before."""
        if folder() is None:
            return
        leaves, treedef = jax.tree_util.tree_flatten(args)
        sig = _signature(treedef, leaves)
        if sig not in self._calls:
            specs = tuple(spec(x) for x in leaves)
            self._calls[sig] = _pool().submit(self._prepare, treedef, specs)

    def cancel(self) -> None:
        """Drop the prefetched calls not started yet."""
        for sig, call in list(self._calls.items()):
            if isinstance(call, Future) and call.cancel():
                self._calls.pop(sig, None)

    def cache_size(self) -> int:
        """Compiled signatures held in this process (``jax.jit``'s ``_cache_size``, summed)."""
        size = lambda c: c._cache_size() if hasattr(c, "_cache_size") else 0  # noqa: E731
        calls = [c.result() if isinstance(c, Future) else c for c in list(self._calls.values())]
        return sum(size(c) for c in calls) + size(self.fn)

    def _prepare(self, treedef: Any, specs: tuple) -> Callable:
        plain = lambda *leaves: self.fn(*jax.tree_util.tree_unflatten(treedef, leaves))  # noqa: E731
        where = folder()
        if where is None:
            return plain
        started = time.perf_counter()
        key = repr((self.tag, str(treedef), [(s.shape, str(s.dtype), str(s.sharding)) for s in specs],
                    _source_digest(), _settings()))
        path = where / (hashlib.sha256(key.encode()).hexdigest() + ".jaxexport")
        try:
            exp, traced = None, False
            if path.exists():
                try:
                    exp = jax.export.deserialize(bytearray(path.read_bytes()))
                except Exception:  # written by a crashed process, or unreadable: make it anew
                    exp = None
            if exp is None:
                exp, traced = export(self.fn, treedef, specs), True
                _write(path, exp.serialize())
            call = jax.jit(exp.call)
            # target names are plain bytes in the module
            with _lowering(skip_lapack=b"lapack" not in exp.mlir_module_serialized):
                lowered = call.lower(*specs)
            compiling = time.perf_counter()
            lowered.compile()  # now (``prefetch``: in its thread); calls find it in JAX's caches
            done = time.perf_counter()
            prepared.append((str(self.tag[0]), done - started))
            _hand_back(done - compiling, traced)  # timed alone: not a wait for ``_lowering``'s lock
            return call
        except Exception:  # no flatbuffers, or a module JAX cannot export: the plain call
            return plain


def _hand_back(compile_s: float, traced: bool = False) -> None:
    """After a call that traced, or whose compile step took over ``TRIM_AFTER_S`` (so
    compiled rather than loaded), hand this thread's heap back (``_memory.trim_heap``, 0.01-0.2
    s): the compiler's and the tracer's garbage stays in it otherwise. A cold deep run's peak
    2.3 -> 1.9 GB; the first process after an upgrade, which traces but finds its executables
    compiled, 2.18 -> 1.73 GB; a run without caches 2.10 -> 1.74 GB (1M accounts, 3M positions;
    docs/benchmarks.md)."""
    if traced or compile_s > TRIM_AFTER_S:
        _memory.trim_heap()


def _signature(treedef: Any, leaves: list) -> tuple:
    """A call's signature from plain attributes: building a ShapeDtypeStruct per leaf and
    call cost about 0.2 s of the 500 calls of a 1M-account run on CPU."""
    attrs = lambda x: (np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None))  # noqa: E731
    return treedef, tuple(attrs(x) for x in leaves)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """The threads ``Kept.prefetch`` prepares calls in: one per two cores, at most 4.

    The devices' own work keeps every core busy meanwhile: on two cores a second thread
    shortened neither a cold process's compilation nor a warm one's loading, and its compiler
    memory raised a cold run's peak by 80-150 MiB (docs/benchmarks.md)."""
    return ThreadPoolExecutor(min(4, max(1, (os.cpu_count() or 1) // 2)), thread_name_prefix="stress-kept")


_PATCHING = threading.Lock()


@contextlib.contextmanager
def _lowering(skip_lapack: bool):
    """Held while a kept module is lowered: one lowering at a time (``prefetch`` threads lower
    side by side), without JAX's LAPACK set-up where ``skip_lapack``. Calling an exported
    module on CPU first registers the LAPACK kernels it might call, which imports
    ``scipy.linalg``: 0.2–0.4 s of a new process's warm start here, for kernels that call no
    LAPACK routine. This swaps a private JAX function for a no-op while held (so a module that
    needs LAPACK must not be lowered meanwhile: the lock); where JAX has moved it, nothing is
    skipped."""
    try:
        from jax._src.export import _export as ex
    except ImportError:
        ex = None
    original = getattr(ex, "_ensure_backends_initialized", None)
    if original is None:
        yield
        return
    with _PATCHING:
        if skip_lapack:
            ex._ensure_backends_initialized = lambda platforms: None
        try:
            yield
        finally:
            ex._ensure_backends_initialized = original


def export(fn: Callable, treedef: Any, specs: Sequence[jax.ShapeDtypeStruct],
           platforms: Sequence[str] | None = None) -> Any:
    """``fn``, called on arguments of tree ``treedef`` whose leaves are ``specs``, traced and
    lowered as a function of the leaves (``jax.export.Exported``; its argument tree then holds
    no package types, which it could not serialize). ``platforms``: lower for these instead of
    the default backend."""
    flat = lambda *leaves: fn(*jax.tree_util.tree_unflatten(treedef, leaves))  # noqa: E731
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _UNSTABLE_TARGETS]
    return jax.export.export(jax.jit(flat), platforms=platforms, disabled_checks=checks)(*specs)


def _write(path: Path, blob: bytes) -> None:
    """Write ``blob`` whole or not at all (processes share the folder), then keep the newest."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        files = sorted(path.parent.glob("*.jaxexport"), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - MAX_FILES)]:
            old.unlink(missing_ok=True)
    except OSError:  # a read-only or full cache folder costs only the saving
        pass
