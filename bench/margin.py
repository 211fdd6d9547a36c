"""Benchmark: margin models at the snapshot and under stress.

Usage (from the repository root)::

    python bench/margin.py --accounts 100000 --scenarios 1000
    python bench/margin.py --show     # the latest recorded table

For each configuration a fresh subprocess ("worker") loads the cached sample exchange
(``bench/out/sample-<accounts>``, written by ``bench/run.py`` or here), switches
``exchange.toml [margin]`` to the configuration, and times:

- ``margin``: ``margin.account_margin(snap)`` (every account's IM and MM at the snapshot),
  first call (compiles) and the best of two later calls;
- ``run``: ``stress.run(snap, scen)`` on ``S`` explicit joint shocks (spot multipliers
  ``exp(0.05 z)`` per asset, vol shifts ``N(0, 0.05)``, ``numpy.random.default_rng(0)``, as
  ``bench/run.py``), so maintenance margin is recomputed in every scenario: first call and
  the best of two later ones.

Each worker reports its peak RSS (``ru_maxrss``), snapshot included. Configurations:
``standard``, ``portfolio`` (the risk matrix around every scenario state) and
``standard+dynamic-haircuts`` (vol-scaled haircuts and a concentration add-on) and ``var``
(expected shortfall over a synthetic history's windows, re-based at every scenario state).
Records are appended to ``bench/out/margin.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RECORDS = OUT / "margin.jsonl"
CONFIGS = {
    "standard": "",
    "portfolio": 'model = "portfolio"\n',
    "standard+dynamic-haircuts": ('haircut_model = "dynamic"\n'
                                  "haircut_daily_volume = { BTC = 2.0e10, ETH = 1.0e10, SOL = 2.0e9 }\n"),
    # 300 daily prices (299 one-day windows, tail of 3 at 99%): bench/out/var-history.csv
    "var": f'model = "var"\nvar_history = "{(OUT / "var-history.csv").as_posix()}"\nvar_horizon_days = 1\n',
}


def _history(days: int = 300) -> Path:
    """A synthetic daily price history of BTC, ETH and SOL for the var model: correlated
    lognormal returns (daily vols 3%, 4%, 5%), ``numpy.random.default_rng(1)``."""
    import numpy as np
    import pandas as pd

    path = OUT / "var-history.csv"
    rng = np.random.default_rng(1)
    z = rng.standard_normal((days - 1, 3)) @ np.linalg.cholesky([[1, 0.8, 0.7], [0.8, 1, 0.75], [0.7, 0.75, 1]]).T
    prices = np.array([90_000.0, 3_000.0, 150.0]) * np.exp(np.vstack([np.zeros(3), np.cumsum(z * [0.03, 0.04, 0.05], axis=0)]))
    OUT.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"date": pd.date_range("2025-09-01", periods=days).strftime("%Y-%m-%d"),
                  "BTC": prices[:, 0], "ETH": prices[:, 1], "SOL": prices[:, 2]}).to_csv(path, index=False)
    return path


def _sample(accounts: int) -> Path:
    folder = OUT / f"sample-{accounts}"
    if not (folder / "exchange.toml").exists():
        from stress import sample

        sample.write(folder, accounts=accounts, fmt="parquet")
    return folder


def configured_snapshot(folder: str | Path, margin_keys: str = "", liquidation_keys: str = ""):
    """The sample exchange in ``folder`` loaded with ``margin_keys`` added to its ``[margin]``
    table (a ``model`` replaces the sample's) and ``liquidation_keys`` to ``[liquidation]``."""
    import shutil
    import tempfile

    import stress

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "snap"
        shutil.copytree(folder, copy)
        toml = (copy / "exchange.toml").read_text()
        if "model =" in margin_keys:  # the sample names its model: this one replaces it
            toml = toml.replace('model = "standard"\n', "", 1)
        toml = toml.replace("[margin]\n", "[margin]\n" + margin_keys, 1)
        toml = toml.replace("[liquidation]\n", "[liquidation]\n" + liquidation_keys, 1)
        (copy / "exchange.toml").write_text(toml)
        return stress.load_snapshot(copy)


def _worker(folder: str, config: str, scenarios: int) -> dict:
    import numpy as np
    from run import peak_rss_mib  # bench/run.py: this process's own peak (VmHWM)

    import stress
    from stress import margin
    from stress.scenarios import Scenarios

    snap = configured_snapshot(folder, CONFIGS[config])
    rng = np.random.default_rng(0)
    A = snap.n_assets
    scen = Scenarios(names=tuple(f"s{i}" for i in range(scenarios)), kinds=("explicit",) * scenarios,
                     spot_mult=np.exp(0.05 * rng.standard_normal((scenarios, A))),
                     vol_shift=0.05 * rng.standard_normal((scenarios, A)), horizon_days=np.zeros(scenarios))

    def timed(f, repeat=3):
        out = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
        return out[0], min(out[1:])

    m_first, m_warm = timed(lambda: margin.account_margin(snap))
    r_first, r_warm = timed(lambda: stress.run(snap, scen))
    res = stress.run(snap, scen)
    return {"config": config, "accounts": snap.n_accounts, "positions": int(len(snap.pos_account)),
            "instruments": int(len(snap.instrument_ids)), "scenarios": scenarios,
            "margin_first_s": m_first, "margin_warm_s": m_warm, "run_first_s": r_first, "run_warm_s": r_warm,
            "accounts_liquidatable_max": int(res.scenarios.accounts_liquidatable.max()),
            "total_mm": float(res.summary["total_maintenance_margin"]),
            "peak_rss_mib": peak_rss_mib()}


def _show(records: list[dict]) -> None:
    print("| configuration | accounts × scenarios | margin: first / warm | run: first / warm | peak RSS | max liquidatable |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['config']} | {r['accounts']:,} × {r['scenarios']:,} | {r['margin_first_s']:.2f} s / "
              f"{r['margin_warm_s']:.2f} s | {r['run_first_s']:.1f} s / {r['run_warm_s']:.1f} s | "
              f"{r['peak_rss_mib']:,.0f} MiB | {r['accounts_liquidatable_max']:,} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--accounts", type=int, default=100_000)
    ap.add_argument("--scenarios", type=int, default=1000)
    ap.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "var"], choices=list(CONFIGS),
                    help="var is opt-in: about 300 times the standard run's account work")
    ap.add_argument("--show", action="store_true")
    ap.add_argument("--worker", nargs=3, metavar=("FOLDER", "CONFIG", "SCENARIOS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker[0], a.worker[1], int(a.worker[2]))))
        return
    if a.show:
        lines = RECORDS.read_text().splitlines() if RECORDS.exists() else []
        _show([json.loads(x) for x in lines][-len(CONFIGS):])
        return
    folder = _sample(a.accounts)
    if "var" in a.configs:
        _history()
    records = []
    for config in a.configs:
        out = subprocess.run([sys.executable, __file__, "--worker", str(folder), config, str(a.scenarios)],
                             check=True, capture_output=True, text=True, env=os.environ)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(machine=platform.processor() or platform.machine(), cores=os.cpu_count(),
                 date=time.strftime("%Y-%m-%d"))
        records.append(r)
        with RECORDS.open("a") as f:
            f.write(json.dumps(r) + "\n")
    _show(records)


if __name__ == "__main__":
    main()
