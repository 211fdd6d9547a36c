"""Kernels kept traced on disk (``stress._exported``): a later process loads them instead of
tracing, with results identical to the traced kernel's, and a stale or broken file is never used."""

from __future__ import annotations

import pandas as pd
import pytest

import stress
from stress import _exported, engine, greeks, montecarlo


@pytest.fixture
def snap(sample_dir):
    return stress.load_snapshot(sample_dir)


@pytest.fixture
def scen(snap, small_default_path):
    return stress.load_scenarios(small_default_path, snap)


@pytest.fixture
def traces(monkeypatch):
    """Counts the chunk kernel's traces; kernels are dropped from memory before and after."""
    count = []
    real = engine.chunk_kernel
    monkeypatch.setattr(engine, "chunk_kernel", lambda *a, **k: count.append(1) or real(*a, **k))
    engine.sharded_kernel.cache_clear()
    yield count
    engine.sharded_kernel.cache_clear()


def run_fresh(snap, scen, **kw):
    """``stress.run`` as a new process would start it: no kernel in memory."""
    engine.sharded_kernel.cache_clear()
    return stress.run(snap, scen, **kw)


def assert_identical(a, b):
    pd.testing.assert_frame_equal(a.accounts, b.accounts, check_exact=True)
    pd.testing.assert_frame_equal(a.scenarios, b.scenarios, check_exact=True)


def test_a_kept_kernel_is_loaded_not_traced_and_gives_identical_results(snap, scen, tmp_path, monkeypatch, traces):
    monkeypatch.setenv("STRESS_EXPORT_CACHE", "0")
    traced = run_fresh(snap, scen)
    assert traces and not list(tmp_path.iterdir())

    monkeypatch.setenv("STRESS_EXPORT_CACHE", str(tmp_path))
    traces.clear()
    first = run_fresh(snap, scen)  # exports: traces once per holdings shape, and keeps each
    shapes = len(traces)
    kept = sorted(tmp_path.glob("*.jaxexport"))
    assert shapes > 1 and len(kept) == shapes

    traces.clear()
    again = run_fresh(snap, scen)
    assert traces == []  # every shape came from disk
    assert sorted(tmp_path.glob("*.jaxexport")) == kept
    assert_identical(first, traced)
    assert_identical(again, traced)


def test_a_changed_setting_is_a_new_kept_kernel(snap, scen, tmp_path, monkeypatch, traces):
    # engine.FUSION is read while tracing: a kernel kept under one value must not serve another
    monkeypatch.setenv("STRESS_EXPORT_CACHE", str(tmp_path))
    run_fresh(snap, scen)
    before = set(tmp_path.glob("*.jaxexport"))
    monkeypatch.setitem(engine.FUSION, "cpu", {**engine.FUSION["cpu"], "keep": not engine.FUSION["cpu"].get("keep")})
    traces.clear()
    changed = run_fresh(snap, scen)
    assert traces and set(tmp_path.glob("*.jaxexport")) > before
    monkeypatch.setenv("STRESS_EXPORT_CACHE", "0")
    assert_identical(changed, run_fresh(snap, scen))


def test_an_unreadable_kept_kernel_is_made_anew(snap, scen, tmp_path, monkeypatch, traces):
    monkeypatch.setenv("STRESS_EXPORT_CACHE", str(tmp_path))
    good = run_fresh(snap, scen)
    for f in tmp_path.glob("*.jaxexport"):
        f.write_bytes(b"half-written by a process that died")
    traces.clear()
    assert_identical(run_fresh(snap, scen), good)
    assert traces  # traced again, and written again whole
    traces.clear()
    run_fresh(snap, scen)
    assert traces == []


def test_kept_kernels_are_bounded_oldest_first(tmp_path, monkeypatch):
    monkeypatch.setattr(_exported, "MAX_FILES", 3)
    for i in range(5):
        _exported._write(tmp_path / f"{i}.jaxexport", b"x")
        __import__("os").utime(tmp_path / f"{i}.jaxexport", (i, i))
    _exported._write(tmp_path / "5.jaxexport", b"x")
    assert sorted(p.name for p in tmp_path.glob("*.jaxexport")) == ["3.jaxexport", "4.jaxexport", "5.jaxexport"]


def test_kept_paths_and_greeks_equal_the_traced_ones(snap, tmp_path, monkeypatch):
    # the Monte Carlo paths and the instruments' Greeks are kept too; a kept one, loaded as a new
    # process would, draws the same paths and gives the same Greeks, bit for bit
    import numpy as np

    model = montecarlo.model(np.array([0.6, 0.8]), np.array([[1.0, 0.7], [0.7, 1.0]]), jump_intensity=5.0,
                             jump_mean=-0.03, jump_std=0.05)
    draw = lambda: montecarlo.simulate(20261125, model, paths=64, steps=3, dt=1 / 365, df=4)  # noqa: E731
    results = {}
    for where in ("0", str(tmp_path), str(tmp_path)):  # traced; exported; read back
        monkeypatch.setenv("STRESS_EXPORT_CACHE", where)
        montecarlo._kept_simulate.cache_clear()
        greeks._kept_greeks._calls.clear()
        results.setdefault("paths", []).append([np.asarray(x) for x in draw()])
        g = greeks.instrument_greeks(snap.instruments, snap.market)
        results.setdefault("greeks", []).append({k: np.asarray(v) for k, v in g.items()})
    assert len(list(tmp_path.glob("*.jaxexport"))) == 2
    for paths in results["paths"][1:]:
        for a, b in zip(paths, results["paths"][0]):
            np.testing.assert_array_equal(a, b)
    for g in results["greeks"][1:]:
        for k, v in results["greeks"][0].items():
            np.testing.assert_array_equal(g[k], v)


def test_the_key_is_the_same_in_every_process():
    # whatever the package holds in its settings (a set of names prints in a per-process
    # order), and whichever host-side modules a process imported (`stress run` imports the
    # command line and the report, a script on the Python API neither), processes must agree
    # on the key
    import subprocess
    import sys

    traced = "import stress.engine, stress.greeks, stress.montecarlo; "
    host = "import stress.cli, stress.report, stress.cluster, stress.benchmark, stress.sample, stress.calibrate; "
    key = "from stress import _exported; print(_exported._settings())"
    keys = {subprocess.run([sys.executable, "-c", imports + key], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed, imports in ((1, host + traced), (2, host + traced), (3, traced))}
    assert len(keys) == 1 and "at 0x" not in keys.pop()


def test_the_key_does_not_change_as_a_process_runs(sample_dir):
    # settings are the package's upper-case names: one that a run updates (a log of calls)
    # would give every later call a new key, and every new process a miss
    import jax.numpy as jnp

    from stress import benchmark, engine

    before = _exported._settings()
    snap = stress.load_snapshot(sample_dir)
    engine.tables(snap, benchmark.random_shocks(snap, 8), jnp.float64)  # a kept kernel, prepared
    assert _exported.prepared and _exported._settings() == before


def test_a_new_process_loads_kept_kernels_without_lapack_unless_they_call_it(sample_dir, tmp_path):
    # calling an exported module sets up JAX's LAPACK kernels first, which imports scipy.linalg
    # (0.2-0.4 s); the engine's kernels call no LAPACK routine, so a new process reading them
    # skips that. A kept function that does solve a linear system must still work (JAX sets
    # LAPACK up elsewhere too, so this half guards the skip, not the set-up)
    import os
    import subprocess
    import sys

    code = f"""
import sys, numpy as np, jax, jax.numpy as jnp, stress
from stress import _exported, benchmark, engine
snap = stress.load_snapshot({str(sample_dir)!r})
t, _ = engine.tables(snap, benchmark.random_shocks(snap, 8), jnp.float64)  # a kept kernel
print("tables", float(np.asarray(t.value).sum()), "scipy.linalg" in sys.modules)
jax.config.update("jax_enable_x64", True)
solve = _exported.Kept(jax.jit(jnp.linalg.solve), ("test_solve",))
x = solve(jnp.array([[2.0, 1.0], [1.0, 3.0]]), jnp.array([3.0, 5.0]))
print("solve", *np.asarray(x).round(12))
"""
    env = {**os.environ, "STRESS_EXPORT_CACHE": str(tmp_path)}
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                 env=env, check=True).stdout.split("\n")
    first = run()  # traces and keeps
    assert len(list(tmp_path.glob("*.jaxexport"))) == 2  # the tables and the solve
    second = run()  # loads what the first kept
    assert second[0].split()[:2] == first[0].split()[:2] and second[0].split()[2] == "False"
    assert second[1] == first[1] == "solve 0.8 1.4"  # 2x + y = 3, x + 3y = 5


def test_a_prefetched_call_is_prepared_once_in_the_background(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np

    prepared = []
    real = _exported.Kept._prepare
    monkeypatch.setattr(_exported.Kept, "_prepare", lambda self, *a: prepared.append(1) or real(self, *a))
    f = jax.jit(lambda x, y: jnp.sin(x) * y + 1.0)
    x, y = np.linspace(0.0, 3.0, 7), np.arange(7.0)

    monkeypatch.setenv("STRESS_EXPORT_CACHE", "0")  # off: nothing to prefetch into
    off = _exported.Kept(f, ("test_prefetch",))
    off.prefetch(x, y)
    assert prepared == [] and off._calls == {}

    monkeypatch.setenv("STRESS_EXPORT_CACHE", str(tmp_path))
    kept = _exported.Kept(f, ("test_prefetch",))
    kept.prefetch(x, y)
    kept.prefetch(x, y)  # the same signature again: already under way
    assert np.allclose(kept(x, y), np.sin(x) * y + 1.0, rtol=1e-15, atol=0)
    assert prepared == [1] and len(list(tmp_path.glob("*.jaxexport"))) == 1
    kept(x[:3], y[:3])  # a signature never prefetched is prepared at its call
    assert prepared == [1, 1] and kept.cache_size() == 2


def test_prefetched_calls_not_started_are_dropped_on_cancel(tmp_path, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import jax
    import numpy as np

    monkeypatch.setenv("STRESS_EXPORT_CACHE", str(tmp_path))
    pool, gate = ThreadPoolExecutor(1), threading.Event()
    monkeypatch.setattr(_exported, "_pool", lambda: pool)
    pool.submit(gate.wait)  # the one thread is busy: what is prefetched next waits its turn
    kept = _exported.Kept(jax.jit(lambda x: 2.0 * x), ("test_cancel",))
    x = np.arange(3.0)
    try:
        kept.prefetch(x)
        kept.cancel()
        assert kept._calls == {}  # dropped, not prepared
    finally:
        gate.set()
        pool.shutdown()
    assert np.array_equal(kept(x), 2.0 * x) and kept.cache_size() == 1  # prepared at its call
    assert len(list(tmp_path.glob("*.jaxexport"))) == 1


def test_a_sweep_that_stops_early_leaves_no_prefetch_waiting(snap, scen, tmp_path, monkeypatch):
    from concurrent.futures import Future, ThreadPoolExecutor

    monkeypatch.setenv("STRESS_EXPORT_CACHE", str(tmp_path))
    pool = ThreadPoolExecutor(1)  # one shape at a time: the last ones still queued at the stop
    monkeypatch.setattr(_exported, "_pool", lambda: pool)
    engine.sharded_kernel.cache_clear()
    dt = engine.DTYPES["float64"]
    t, _ = engine.tables(snap, scen, dt)

    real = engine._groups

    def stopping(*args, **kwargs):  # Ctrl-C once the first group is on its way
        groups = real(*args, **kwargs)
        yield next(groups)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_groups", stopping)
    with pytest.raises(KeyboardInterrupt):
        engine.LocalAccounts(snap, 16, dt).sweep(t, 0, False)
    calls = engine.sharded_kernel(0, False, len(engine.devices()), engine.VAR_LEVEL)._calls.values()
    assert len(calls) > 1  # every holdings shape was prefetched; the first one called
    assert not [c for c in calls if isinstance(c, Future) and not (c.running() or c.done())]
    pool.shutdown()
    engine.sharded_kernel.cache_clear()


def test_a_call_that_traced_or_compiled_hands_its_threads_heap_back(tmp_path, monkeypatch):
    import jax
    import numpy as np

    from stress import _memory

    monkeypatch.setenv("STRESS_EXPORT_CACHE", str(tmp_path))
    trimmed = []
    monkeypatch.setattr(_memory, "trim_heap", lambda: trimmed.append(1))
    x = np.arange(4.0)
    kept = lambda: _exported.Kept(jax.jit(lambda x: x + 1.0), ("test_trim",))  # noqa: E731
    monkeypatch.setattr(_exported, "TRIM_AFTER_S", 3600.0)  # no compilation takes that long
    assert np.array_equal(kept()(x), x + 1.0)  # traced: trims
    assert trimmed == [1]
    assert np.array_equal(kept()(x), x + 1.0)  # as a new process: reads the module, loads
    assert trimmed == [1]
    monkeypatch.setattr(_exported, "TRIM_AFTER_S", 0.0)  # everything counts as a compilation
    assert np.array_equal(kept()(x), x + 1.0)
    assert trimmed == [1, 1]
    monkeypatch.undo()
    _memory.trim_heap()  # the real one runs wherever the tests do (a no-op off glibc)


def test_a_plain_call_that_compiled_hands_the_heap_back_too(monkeypatch):
    """With kept modules off the first call of each signature compiles in the calling thread:
    it trims as a prepared call would (a cold deep run's peak 2.10 -> 1.74 GB with the
    compilation caches off), and later calls, which compile nothing, do not."""
    import jax
    import numpy as np

    from stress import _memory

    monkeypatch.setenv("STRESS_EXPORT_CACHE", "0")
    trimmed = []
    monkeypatch.setattr(_memory, "trim_heap", lambda: trimmed.append(1))
    x = np.arange(4.0)
    kept = _exported.Kept(jax.jit(lambda x: x + 3.0), ("test_trim_plain",))
    monkeypatch.setattr(_exported, "TRIM_AFTER_S", 3600.0)
    assert np.array_equal(kept(x), x + 3.0)
    assert trimmed == []
    monkeypatch.setattr(_exported, "TRIM_AFTER_S", 0.0)
    assert np.array_equal(kept(np.arange(5.0)), np.arange(5.0) + 3.0)  # a new signature: compiles
    assert trimmed == [1]
    assert np.array_equal(kept(np.arange(5.0)), np.arange(5.0) + 3.0)  # the same one: a plain call
    assert trimmed == [1]
