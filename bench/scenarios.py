"""Benchmark: scenario generation and a full Monte Carlo run.

Usage (from the repository root)::

    python bench/scenarios.py --accounts 100000 --paths 10000 --steps 1

Reports, each in its own subprocess so that peak RSS (``ru_maxrss``) is that stage's alone:

- ``generate``: ``stress.montecarlo.simulate`` for ``--paths`` paths over 3 assets (Student-t
  4, jumps, spot-vol), first call (compilation included) and warm; paths x steps per second.
- ``load``: ``stress.load_scenarios`` of a ``[[montecarlo]]`` file with ``--paths`` paths
  (generation plus building the ``[S, K, A]`` arrays on the host).
- ``run``: ``stress.run`` of the ``--accounts`` sample exchange under those paths, first call in
  the process and warm (minimum of ``--repeat``), with the process's peak RSS.

The sample exchange is ``stress.sample.write(..., fmt="parquet")`` cached under
``bench/out/sample-<accounts>/`` (shared with ``bench/run.py``). Results are printed as JSON
lines and appended to ``bench/out/scenarios.jsonl``.
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

MC = """[[montecarlo]]
name = "mc"
paths = {paths}
steps = {steps}
horizon_days = {horizon}
seed = 1
df = 4
vol = {{ BTC = 0.55, ETH = 0.70, SOL = 0.95 }}
correlation = {{ "BTC/ETH" = 0.80, "BTC/SOL" = 0.70, "ETH/SOL" = 0.75 }}
jumps = {{ intensity = 8.0, mean = -0.04, std = 0.05 }}
vol_beta = {{ BTC = -0.8, ETH = -0.9, SOL = -1.0 }}
"""


def _rss_mb() -> float:
    from run import peak_rss_mib  # bench/run.py: this process's own peak (VmHWM)

    return peak_rss_mib()


def worker(stage: str, a: argparse.Namespace) -> dict:
    import numpy as np

    import stress
    from stress import montecarlo

    rec: dict = {"stage": stage}
    if stage == "generate":
        m = montecarlo.model(np.array([0.55, 0.7, 0.95]), np.array([[1, 0.8, 0.7], [0.8, 1, 0.75], [0.7, 0.75, 1]]),
                             jump_intensity=8.0, jump_mean=-0.04, jump_std=0.05, vol_beta=np.array([-0.8, -0.9, -1.0]))
        dt = a.horizon / a.steps / 365
        t = time.perf_counter()
        r, _ = montecarlo.simulate(1, m, paths=a.paths, steps=a.steps, dt=dt, df=4)
        r.block_until_ready()
        rec["first_s"] = time.perf_counter() - t
        best = float("inf")
        for _ in range(a.repeat):
            t = time.perf_counter()
            r, _ = montecarlo.simulate(1, m, paths=a.paths, steps=a.steps, dt=dt, df=4)
            r.block_until_ready()
            best = min(best, time.perf_counter() - t)
        rec["warm_s"] = best
        rec["path_steps_per_s"] = a.paths * a.steps / best
    else:
        snap = stress.load_snapshot(sample(a.accounts))
        path = OUT / f"mc-{a.paths}x{a.steps}.toml"
        t = time.perf_counter()
        scen = stress.load_scenarios(path, snap)
        rec["load_scenarios_s"] = time.perf_counter() - t
        if stage == "run":
            t = time.perf_counter()
            stress.run(snap, scen, dtype=a.dtype)
            rec["first_s"] = time.perf_counter() - t
            best = float("inf")
            for _ in range(a.repeat):
                t = time.perf_counter()
                res = stress.run(snap, scen, dtype=a.dtype)
                best = min(best, time.perf_counter() - t)
            rec["warm_s"] = best
            rec["account_scenarios_per_s"] = snap.n_accounts * len(scen) / best
            rec["var_99_median"] = float(res.accounts.var_99.median())
    rec["peak_rss_mb"] = _rss_mb()
    return rec


def sample(accounts: int) -> Path:
    from stress import sample as smp

    folder = OUT / f"sample-{accounts}"
    if not (folder / "positions.parquet").exists():
        smp.write(folder, accounts=accounts, fmt="parquet")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--paths", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--horizon", type=float, default=1.0, help="horizon, days")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--stages", nargs="+", default=["generate", "load", "run"], choices=("generate", "load", "run"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    OUT.mkdir(exist_ok=True)
    sample(a.accounts)
    (OUT / f"mc-{a.paths}x{a.steps}.toml").write_text(MC.format(paths=a.paths, steps=a.steps, horizon=a.horizon))
    base = {"accounts": a.accounts, "paths": a.paths, "steps": a.steps, "dtype": a.dtype,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d")}
    for stage in a.stages:
        cmd = [sys.executable, __file__, "--worker", stage] + sum(
            ([f"--{k}", str(v)] for k, v in vars(a).items() if k in ("accounts", "paths", "steps", "horizon", "dtype", "repeat")), [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rec = {**base, **json.loads(out.stdout.strip().splitlines()[-1])}
        print(json.dumps(rec))
        with open(OUT / "scenarios.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
