"""`stress bench`: time each stage of a run on a synthetic exchange.

The side-by-side comparison against a plain NumPy implementation lives in ``bench/`` (it
needs the reference code, which is not part of the package); this is the quick, installable
answer to "how fast is it on this machine": generate a sample exchange, then time loading,
scenario building, instrument revaluation, the first run (compilation included), a warm run
and writing the report, each once, in one process.
"""

from __future__ import annotations

import dataclasses
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    note: str = ""


def random_shocks(snap, n: int, seed: int = 0):
    """``n`` explicit joint shocks: spot multipliers ``exp(0.05 z)`` and vol shifts
    ``N(0, 0.05)`` per non-stable asset (the shocks of ``bench/run.py``)."""
    from .scenarios import Scenarios

    rng = np.random.default_rng(seed)
    A = snap.n_assets
    spot = np.exp(0.05 * rng.standard_normal((n, A)))
    vol = rng.normal(0.0, 0.05, (n, A))
    return Scenarios(tuple(f"shock-{i}" for i in range(n)), ("explicit",) * n, spot, vol, np.zeros(n))


def run_stages(accounts: int, scenarios: int, dtype: str = "float64", folder: Path | None = None,
               progress: Callable[[str], None] | None = None) -> list[Stage]:
    """Time every stage once; returns them in order. ``folder`` keeps the sample (reused when
    it already holds one of the same size)."""
    import jax

    from . import engine, io, report, sample

    stages: list[Stage] = []

    def timed(name: str, fn: Callable, note: Callable[[object], str] = lambda _: ""):
        if progress:
            progress(name)
        t = time.perf_counter()
        value = fn()
        jax.block_until_ready(value) if not isinstance(value, (engine.Result, Path, type(None))) else None
        stages.append(Stage(name, time.perf_counter() - t, note(value)))
        return value

    with tempfile.TemporaryDirectory(prefix="stress-bench-") as tmp:
        where = Path(folder) if folder else Path(tmp) / "snapshot"
        marker = where / ".accounts"
        if not (marker.exists() and marker.read_text() == str(accounts)):
            timed("generate sample", lambda: sample.write(where, accounts=accounts, fmt="parquet"))
            marker.write_text(str(accounts))
        snap = timed("load snapshot", lambda: io.load_snapshot(where),
                     lambda s: f"{s.n_accounts:,} accounts, {s.n_positions:,} positions")
        scen = timed("build scenarios", lambda: random_shocks(snap, scenarios), lambda s: f"{len(s):,} explicit shocks")
        dt = engine.DTYPES[dtype]
        timed("revalue instruments", lambda: engine.tables(snap, scen, dt)[0],
              lambda _: f"{len(snap.instrument_ids):,} instruments x {scenarios:,} scenarios")
        cells = snap.n_accounts * scenarios
        timed("first run (compiles)", lambda: engine.run(snap, scen, dtype=dtype))
        res = timed("warm run", lambda: engine.run(snap, scen, dtype=dtype))
        devices = jax.local_devices()
        kind, backend = devices[0].device_kind, jax.default_backend()
        kind = kind if kind == backend else f"{kind} ({backend})"  # "cpu", or "NVIDIA H200 (gpu)"
        where_run = (f"{len(devices)} x {kind}, chunks of {engine.default_chunk():,} accounts, "
                     f"tiles of up to {engine.max_tile():,} scenarios")
        stages[-1] = dataclasses.replace(stages[-1], note=f"{cells / stages[-1].seconds:.3g} account-scenarios/s on {where_run}")
        timed("write report", lambda: report.write(res, Path(tmp) / "report"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stages.append(Stage("peak memory", float("nan"), f"{peak:,.0f} MB resident"))
    return stages
