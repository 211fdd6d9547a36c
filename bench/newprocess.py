"""Benchmark: ``stress run`` as a user starts it, a new process each time, with the disk caches
empty, with only JAX's compilation cache filled, and with both it and the kept traced kernels.

Usage (from the repository root)::

    python bench/newprocess.py --accounts 100000 --paths 5000 --dtype float64 --repeat 2
    python bench/newprocess.py --accounts 1000000 --paths 10000 --dtype float32    # on a GPU

Each run is ``python -m stress run SNAPSHOT --scenarios FILE --out DIR -q`` on the cached
sample exchange (``bench/run.py``'s ``snapshot_dir``) and a Monte Carlo set of ``--paths``
one-step paths, with its caches in fresh temporary folders (``XDG_CACHE_HOME``), in order:

- ``empty``: both caches empty (compiles everything, keeps the traced kernels);
- ``kept``: both filled: the kernels are read traced, then found compiled;
- ``empty, not kept``: ``STRESS_EXPORT_CACHE=0``, a second empty compilation cache;
- ``compiled``: ``STRESS_EXPORT_CACHE=0``, that cache filled: every kernel is traced and
  lowered, then found compiled (how every run went before ``stress/_exported.py``).

It prints the wall time of each (minimum and all), the child's peak RSS, and the largest
relative difference of every numeric column of ``accounts.parquet`` and ``scenarios.parquet``
against the ``empty`` run's; records go to ``bench/out/newprocess.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import engine_version, snapshot_dir  # noqa: E402

SCENARIOS = """[[montecarlo]]
name = "mc"
paths = {paths}
steps = 1
horizon_days = 1
seed = 7
vol = {{ BTC = 0.55, ETH = 0.70, SOL = 0.95 }}
"""


def one_run(snapshot: Path, toml: Path, out: Path, dtype: str, env: dict) -> tuple[float, float]:
    """``(wall seconds, peak RSS MiB)`` of one ``stress run`` in a new process."""
    cmd = [sys.executable, "-m", "stress", "run", str(snapshot), "--scenarios", str(toml), "--out", str(out),
           "--dtype", dtype, "-q"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) not in (0, 1):  # 1: a limit breached, the report is written
        raise SystemExit(f"stress run failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def largest_difference(a: Path, b: Path) -> float:
    """Largest |x - y| / max(1, max |y|) over the numeric columns of both report tables."""
    worst = 0.0
    for name in ("accounts.parquet", "scenarios.parquet"):
        x, y = pd.read_parquet(a / name), pd.read_parquet(b / name)
        for c in x.columns:
            if x[c].dtype.kind in "fiu":
                u, v = x[c].to_numpy(np.float64), y[c].to_numpy(np.float64)
                both_nan = np.isnan(u) & np.isnan(v)
                d = np.where(both_nan, 0.0, np.abs(u - v))
                worst = max(worst, float(np.nanmax(d, initial=0.0) / max(1.0, float(np.nanmax(np.abs(v), initial=0.0)))))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--paths", type=int, default=5_000)
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()

    snapshot = snapshot_dir(args.accounts)
    records = []
    with tempfile.TemporaryDirectory(prefix="stress-newprocess-") as tmp:
        tmp = Path(tmp)
        toml = tmp / "mc.toml"
        toml.write_text(SCENARIOS.format(paths=args.paths))
        env = {k: v for k, v in os.environ.items() if k not in ("STRESS_COMPILATION_CACHE", "STRESS_EXPORT_CACHE")}
        # two cache folders: a kept kernel is compiled as a call of the exported module, which
        # the compilation cache holds apart from the same kernel traced in the process
        kept = {**env, "XDG_CACHE_HOME": str(tmp / "cache-kept")}
        plain = {**env, "XDG_CACHE_HOME": str(tmp / "cache-plain"), "STRESS_EXPORT_CACHE": "0"}
        plan = [("empty", kept)] + [("kept", kept)] * args.repeat \
            + [("empty, not kept", plain)] + [("compiled", plain)] * args.repeat
        walls: dict[str, list] = {}
        for i, (name, env) in enumerate(plan):
            out = tmp / f"report-{i}"
            wall, rss = one_run(snapshot, toml, out, args.dtype, env)
            diff = largest_difference(out, tmp / "report-0")
            walls.setdefault(name, []).append(wall)
            print(f"{name:16s} {wall:7.2f} s  peak RSS {rss:7.0f} MiB  largest relative difference {diff:.1e}",
                  flush=True)
            records.append(dict(stage=name, wall=wall, rss_mib=rss, diff=diff))
    print("\nminimum wall, seconds: " + ", ".join(f"{k} {min(v):.2f}" for k, v in walls.items()))
    meta = dict(accounts=args.accounts, paths=args.paths, dtype=args.dtype, engine=engine_version(),
                machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (HERE / "out").mkdir(exist_ok=True)
    with open(HERE / "out" / "newprocess.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()
