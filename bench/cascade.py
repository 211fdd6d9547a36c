"""Benchmark: liquidation cascades (``stress.cascade.run``) on the synthetic sample exchange.

Usage (from the repository root)::

    python bench/cascade.py --accounts 100000 --paths 1000 --steps 10

One fresh subprocess per invocation, so that its peak RSS (``ru_maxrss``) is the cascade's
alone. In it, with an empty compilation cache (a temporary ``STRESS_COMPILATION_CACHE``):

- ``load``: ``stress.load_snapshot`` and ``stress.load_scenarios`` (the Monte Carlo set);
- ``cold``: the first ``cascade.run`` in the process, compilation included;
- ``warm``: the minimum over ``--repeat`` further calls (and each call's process CPU seconds,
  less sensitive than wall time to other work on a shared machine);
- with ``--engine``, ``stress.run`` on the same inputs, first and warm, for comparison (the
  engine's model is the cascade's run without feedback).

The exchange is ``stress.sample.write(..., fmt="parquet")`` (seed 7), cached under
``bench/out/sample-<accounts>/`` and shared with ``bench/run.py`` and ``bench/scenarios.py``;
its ``[liquidation]`` table is replaced in memory by ``LIQUIDATION`` below (impact tables on
BTC, ETH and SOL, a fee, the cascade switched on). The scenarios are ``bench/scenarios.py``'s
Monte Carlo block (Student-t 4, jumps, spot-vol) with ``--paths`` paths of ``--steps`` steps
over ``--horizon`` days. The record is printed as one JSON line and appended to
``bench/out/cascade.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

# Liquidity of the sample's underlyings (per day), of the order of a mid-size venue's books.
LIQUIDATION = {
    "cascade": True,
    "fee_rate": 0.0005,
    "impact": {
        "BTC": {"spread": 0.0002, "k": 0.5, "daily_vol": 0.03, "daily_volume": 2e9},
        "ETH": {"spread": 0.0003, "k": 0.5, "daily_vol": 0.04, "daily_volume": 1e9},
        "SOL": {"spread": 0.0005, "k": 0.6, "daily_vol": 0.06, "daily_volume": 2e8},
    },
}
sys.path.insert(0, str(HERE))
from scenarios import MC  # noqa: E402  (bench/scenarios.py: the Monte Carlo block every bench uses)


def _rss_mib() -> float:
    from run import peak_rss_mib  # bench/run.py: this process's own peak (VmHWM)

    return peak_rss_mib()


def sample(accounts: int) -> Path:
    from stress import sample as smp

    folder = OUT / f"sample-{accounts}"
    if not (folder / "positions.parquet").exists():
        smp.write(folder, accounts=accounts, fmt="parquet")
    return folder


def worker(a: argparse.Namespace) -> dict:
    import numpy as np

    import stress
    from stress import cascade

    rec: dict = {}
    t = time.perf_counter()
    snap = stress.load_snapshot(sample(a.accounts))
    snap = dataclasses.replace(snap, liquidation_config=LIQUIDATION)
    path = OUT / f"cascade-mc-{a.paths}x{a.steps}.toml"
    path.write_text(MC.format(paths=a.paths, steps=a.steps, horizon=a.horizon))
    scen = stress.load_scenarios(path, snap)
    rec["load_s"] = time.perf_counter() - t
    rec["rss_after_load_mib"] = _rss_mib()

    t, c = time.perf_counter(), time.process_time()
    r = cascade.run(snap, scen, dtype=a.dtype)
    rec["cold_s"], rec["cold_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    walls, cpus = [], []
    for _ in range(a.repeat):
        t, c = time.perf_counter(), time.process_time()
        r = cascade.run(snap, scen, dtype=a.dtype)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    rec["warm_s"] = min(walls)
    rec["warm_walls"], rec["warm_cpu_s"] = walls, cpus  # CPU seconds of this process, all threads
    rec["account_path_steps_per_s"] = a.accounts * a.paths * a.steps / rec["warm_s"]
    rec["rss_after_cascade_mib"] = _rss_mib()
    rec["results"] = {
        "bad_debt_feedback_mean": float(r["bad_debt_feedback"].mean()),
        "bad_debt_no_feedback_mean": float(r["bad_debt_no_feedback"].mean()),
        "amplification_median": float(np.median(r["amplification"])),
        "amplification_max": float(r["amplification"].max()),
        "accounts_liquidated_feedback_mean": float(r["accounts_liquidated_feedback"].mean()),
        "accounts_liquidated_no_feedback_mean": float(r["accounts_liquidated_no_feedback"].mean()),
        "price_impact_BTC_min": float(r["price_impact"][:, snap.assets.index("BTC")].min()),
    }
    if a.engine:
        t = time.perf_counter()
        res = stress.run(snap, scen, dtype=a.dtype)
        rec["engine_cold_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = stress.run(snap, scen, dtype=a.dtype)
        rec["engine_warm_s"] = time.perf_counter() - t
        bad = res.scenarios.bad_debt.to_numpy()
        rec["engine_max_rel_diff_bad_debt"] = float(np.max(np.abs(r["bad_debt_no_feedback"] - bad)
                                                           / np.maximum(np.abs(bad), 1.0)))
    rec["peak_rss_mib"] = _rss_mib()
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--paths", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--horizon", type=float, default=2.0, help="horizon, days")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--engine", action="store_true", help="also time stress.run on the same inputs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    OUT.mkdir(exist_ok=True)
    sample(a.accounts)
    base = {"accounts": a.accounts, "paths": a.paths, "steps": a.steps, "horizon_days": a.horizon,
            "dtype": a.dtype, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as cache:  # cold: nothing compiled yet
        env = {**os.environ, "STRESS_COMPILATION_CACHE": cache}
        keys = ("accounts", "paths", "steps", "horizon", "dtype", "repeat")
        cmd = [sys.executable, __file__, "--worker"] + [x for k in keys for x in (f"--{k}", str(getattr(a, k)))]
        cmd += ["--engine"] if a.engine else []
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            sys.exit(out.stderr)
    rec = {**base, **json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t,
           "load_average_after": os.getloadavg()}
    print(json.dumps(rec))
    with open(OUT / "cascade.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
