"""Benchmark: the engine on an accelerator (or any backend), stage by stage, across chunk and
scenario-tile sizes; and an agreement check of that backend against the CPU.

Usage (from the repository root)::

    python bench/gpu.py sweep --accounts 1000000 --scenarios 10000 --dtype float32 float64 \
        --config 8192:2048 2048:2048 32768:2048 8192:512 --budget 240
    python bench/gpu.py check --accounts 20000 --scenarios 1000    # this backend vs the CPU

``sweep`` loads the cached sample exchange (``bench/run.py``'s ``snapshot_dir``: the output
of ``stress.sample.write(..., fmt="parquet")``) and ``S`` explicit scenarios (``make_scenarios``).
For each dtype and each ``CHUNK:TILE[:KEEP,MATVEC]`` (accounts per chunk, widest scenario tile, and optionally
the kernel's fusion choices as 0/1; they set ``engine.CHUNK``, ``engine.TILE`` and
``engine.FUSION`` for the backend), or ``CHUNK:TILE:p[BA,BS,PER,WARPS]`` (the fused Pallas
kernel, ``engine.PALLAS``, with ``fused.BLOCKS`` for the dtype if given) it times, in one process:

- ``first``: the first ``stress.run`` with those sizes (compilation included; the disk
  compilation cache is off, ``STRESS_COMPILATION_CACHE=0``, so it is a cold start);
- ``run``: ``stress.run`` end to end, warm (minimum of ``--repeat``);
- ``tables``: ``engine.tables``, the instrument revaluation ``[I, S]``;
- ``layout``: the host-side holdings layout and chunk groups (``engine._groups``);
- ``kernel``: the gather-and-reduce alone: every chunk group already on the device, the
  sharded chunk kernel called on each, timed until all results are ready. Its rate,
  accounts x scenarios / seconds, is the number the scale issue's target is about;
- ``sweep``: ``LocalAccounts.sweep``, the whole pass over the accounts: layout, transfers,
  kernel and the host-side placement of results.

Results of every configuration are compared with the first one of the same dtype (and float32
with float64), and each record is appended to ``<out>/gpu.jsonl``. A time ``budget`` (seconds)
stops the sweep between configurations so that what was measured is printed.

``check`` runs ``stress.run`` on this backend and, in a subprocess with ``JAX_PLATFORMS=cpu``,
on the CPU, in float64, and prints the largest relative difference of every numeric column.
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

os.environ.setdefault("STRESS_COMPILATION_CACHE", "0")  # cold means cold

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from run import engine_version, make_scenarios, snapshot_dir  # noqa: E402



def now() -> float:
    return time.perf_counter()


def best_of(fn, repeat: int) -> float:
    walls = []
    for _ in range(repeat):
        t = now()
        fn()
        walls.append(now() - t)
    return min(walls)


def rel_diff(a, b) -> float:
    """Largest |a - b| over the column's scale (its largest |value|, at least 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def compare(res, ref) -> dict:
    """Largest relative difference of every numeric column (NaN where both are NaN counts as
    equal), and the share of accounts with the same worst scenario."""
    out = {}
    for table in ("accounts", "scenarios"):
        a, b = getattr(res, table), getattr(ref, table)
        for c in a.columns:
            if c == "scenario_worst" or not np.issubdtype(np.asarray(a[c]).dtype, np.number):
                continue
            x, y = np.asarray(a[c], np.float64), np.asarray(b[c], np.float64)
            nan = np.isnan(x) & np.isnan(y)
            out[f"{table}.{c}"] = rel_diff(np.where(nan, 0, x), np.where(nan, 0, y)) if (np.isnan(x) == np.isnan(y)).all() else float("inf")
    out["scenario_worst_same"] = float((res.accounts.scenario_worst == ref.accounts.scenario_worst).mean())
    return out


def device_peak_mib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def sweep(args) -> int:
    import jax

    import stress
    from stress import engine, fused

    backend = engine._backend()
    defaults = {dtype: dict(engine.fusion(engine.DTYPES[dtype])) for dtype in args.dtype}
    default_blocks = dict(fused.BLOCKS)
    info = {"jax": jax.__version__, "devices": [str(d) for d in jax.local_devices()],
            "device_kind": jax.local_devices()[0].device_kind, "host": platform.node(),
            "engine": engine_version(), "accounts": args.accounts, "scenarios": args.scenarios}
    print(json.dumps(info), flush=True)
    t = now()
    snap = stress.load_snapshot(snapshot_dir(args.accounts))
    scen = make_scenarios(args.scenarios, snap.n_assets)
    print(f"# loaded {args.accounts} accounts in {now() - t:.1f} s", flush=True)
    A, S = snap.n_accounts, len(scen)
    start = now()
    refs: dict = {}
    rows = []
    for dtype in args.dtype:
        dt = engine.DTYPES[dtype]
        for cfg in args.config:
            if now() - start > args.budget:
                print(f"# budget spent: {dtype} {cfg} and later not measured", flush=True)
                break
            chunk, tile, *flags = cfg.split(":")
            chunk, tile = int(chunk), int(tile)
            pallas = bool(flags) and flags[0].startswith("p")
            blocks = tuple(int(b) for b in flags[0][1:].split(",")) if pallas and len(flags[0]) > 1 else default_blocks[dtype]
            fusion = dict(zip(("keep", "matvec"), (f == "1" for f in flags[0].split(",")))) if flags and not pallas else defaults[dtype]
            if (fusion, pallas, blocks) != (engine.fusion(dt), engine.PALLAS[backend], fused.BLOCKS[dtype]):
                # traced into the kernels: compile them again
                engine.FUSION[f"{backend}-{dtype}"] = fusion
                engine.PALLAS[backend] = pallas
                fused.BLOCKS[dtype] = blocks
                engine.sharded_kernel.cache_clear()
                jax.clear_caches()
            engine.CHUNK[backend], engine.TILE[backend] = chunk, tile
            rec = {**info, "dtype": dtype, "chunk": chunk, "tile": tile, "fusion": fusion,
                   "pallas": list(blocks) if pallas else None}
            t = now()
            res = stress.run(snap, scen, dtype=dtype)
            rec["first_s"] = now() - t
            rec["run_s"] = best_of(lambda: stress.run(snap, scen, dtype=dtype), args.repeat)
            tab = [None]

            def build():
                tab[0] = engine.tables(snap, scen, dt)[0]
                jax.block_until_ready(tab[0])

            rec["tables_s"] = best_of(build, args.repeat)
            tb = tab[0]
            D = len(engine.devices())
            t = now()
            groups = list(engine._groups(snap, chunk, dt, D))
            rec["layout_s"] = now() - t
            on_device = [jax.device_put(h) for _, h in groups]
            kernel = engine.sharded_kernel(0, False, D)
            # each group's call on its own: what the run adds is a small merge
            top, acc = engine.no_top(tb, D), engine.no_sums(tb, D)
            jax.block_until_ready([kernel(h, tb, top, acc) for h in on_device])  # compiled already; warm
            rec["kernel_s"] = best_of(lambda: jax.block_until_ready([kernel(h, tb, top, acc) for h in on_device]),
                                      args.repeat)
            rec["kernel_rate"] = A * S / rec["kernel_s"]
            del on_device, groups
            sweeper = engine.LocalAccounts(snap, chunk, dt)
            rec["sweep_s"] = best_of(lambda: sweeper.sweep(tb, 0, False), args.repeat)
            rec["peak_device_mib"] = device_peak_mib()
            ref = refs.setdefault(dtype, res)
            rec["vs_first_config"] = compare(res, ref) if ref is not res else None
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            with open(Path(args.out) / "gpu.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
    if len(refs) == 2:  # each dtype's first configuration
        d = compare(refs["float32"], refs["float64"])
        print("# float32 vs float64:", json.dumps(d))
        with open(Path(args.out) / "gpu.jsonl", "a") as f:
            f.write(json.dumps({**info, "float32_vs_float64": d}) + "\n")
    print(f"\n{A:,} accounts x {S:,} scenarios on {info['device_kind']} (jax {info['jax']}), seconds")
    print(f"{'dtype':8} {'chunk':>6} {'tile':>5} {'fuse':>14} {'first':>7} {'run':>7} {'tables':>7} {'layout':>7} "
          f"{'kernel':>7} {'acc*scen/s':>10} {'sweep':>7} {'peak MiB':>9} {'max rel diff':>12}")
    for r in rows:
        diffs = (r.get("vs_first_config") or {}).items()
        worst = max((d for k, d in diffs if not k.endswith("_same")), default=0.0)
        fz = "P" + ",".join(map(str, r["pallas"])) if r["pallas"] else "".join("1" if r["fusion"][k] else "0" for k in ("keep", "matvec"))
        print(f"{r['dtype']:8} {r['chunk']:>6} {r['tile']:>5} {fz:>14} {r['first_s']:7.2f} {r['run_s']:7.2f} {r['tables_s']:7.3f} "
              f"{r['layout_s']:7.2f} {r['kernel_s']:7.3f} {r['kernel_rate']:10.2e} {r['sweep_s']:7.2f} "
              f"{r['peak_device_mib'] or float('nan'):9.0f} {worst:12.1e}")
    return 0


def check(args) -> int:
    """This backend against the CPU, float64, same inputs."""
    import stress

    folder = snapshot_dir(args.accounts)
    out = Path(args.out)
    if args.worker:
        snap = stress.load_snapshot(folder)
        res = stress.run(snap, make_scenarios(args.scenarios, snap.n_assets, kind=args.kind))
        res.accounts.to_parquet(out / f"check-{args.worker}-accounts.parquet")
        res.scenarios.to_parquet(out / f"check-{args.worker}-scenarios.parquet")
        return 0
    import jax
    import pandas as pd

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, __file__, "check", "--accounts", str(args.accounts), "--scenarios", str(args.scenarios),
            "--kind", args.kind, "--out", str(out)]
    timings = {}
    for name, e in (("device", os.environ), ("cpu", env)):
        t = now()
        subprocess.run(base + ["--worker", name], env=e, check=True)
        timings[name] = now() - t
    worst = {}
    for table in ("accounts", "scenarios"):
        a = pd.read_parquet(out / f"check-device-{table}.parquet")
        b = pd.read_parquet(out / f"check-cpu-{table}.parquet")
        assert list(a.columns) == list(b.columns) and len(a) == len(b), table
        for c in a.columns:
            if pd.api.types.is_numeric_dtype(a[c]) and not pd.api.types.is_bool_dtype(a[c]):
                x, y = a[c].to_numpy(np.float64), b[c].to_numpy(np.float64)
                both_nan = np.isnan(x) & np.isnan(y)
                worst[f"{table}.{c}"] = rel_diff(np.where(both_nan, 0, x), np.where(both_nan, 0, y)) if (np.isnan(x) == np.isnan(y)).all() else float("inf")
            else:
                worst[f"{table}.{c}"] = 0.0 if (a[c].astype(str) == b[c].astype(str)).all() else float("inf")
    rec = {"check": "device vs cpu", "jax": jax.__version__, "accounts": args.accounts, "scenarios": args.scenarios,
           "wall_s": timings, "max_rel_diff": max(worst.values()), "columns": worst}
    with open(out / "gpu.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    bad = {k: v for k, v in worst.items() if v > 1e-9}
    print(f"check {args.accounts} x {args.scenarios} float64, device vs cpu: {len(worst)} columns, "
          f"largest relative difference {rec['max_rel_diff']:.1e}; over 1e-9: {bad or 'none'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("sweep", "check"))
    p.add_argument("--accounts", type=int, default=1_000_000)
    p.add_argument("--scenarios", type=int, default=10_000)
    p.add_argument("--dtype", nargs="+", choices=("float64", "float32"), default=["float32", "float64"])
    p.add_argument("--config", nargs="+", default=["8192:2048"], help="CHUNK:TILE[:KEEP,MATVEC] configurations")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--kind", choices=("explicit", "montecarlo"), default="explicit", help="check: the scenarios' kind")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; no new configuration starts after it")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return sweep(args) if args.what == "sweep" else check(args)


if __name__ == "__main__":
    sys.exit(main())
