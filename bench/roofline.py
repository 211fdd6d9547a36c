"""How far each engine stage is from the compute-bound lower bound on this machine.

Usage (from the repository root, after ``bench/run.py`` recorded the stages)::

    python bench/roofline.py --accounts 100000 --scenarios 5000 --dtype float64

1. **Peak.** The machine's measured peak is the best of a few large matrix products (2 n^3
   floating-point operations each), with NumPy's BLAS and with XLA, in the run's dtype. A
   multiply-add (FMA) is 2 of those operations, so the peak FMA rate is half the FLOP/s.
2. **Work.** The multiply-adds a stage cannot avoid, counted from the snapshot itself (its
   positions and its non-zero (account, asset) slots; padding is the engine's cost, not the
   problem's), per scenario:

   - *P&L gather-and-reduce* (the scale issue's "pure P&L"): each position's quantity times its
     value per contract (1), each slot's amount times the asset's price (1), and per account
     the P&L against the snapshot and the running minimum (2).
   - *whole per-scenario account work* (collateral, margin, shortfall, losses): per position
     value and margin (2), per slot equity and haircut collateral (2), and per account the
     P&L, the minimum, margin minus collateral, its maximum, the liquidated flag, the bad
     debt, and the per-scenario sums of liquidated, shortfall and bad debt (9). Comparisons,
     maxima and adds count as one vector operation each, as a multiply-add does.
   - *revaluation* (the instrument tables ``[I, S]``): only a rough figure. Black-Scholes
     costs about 60 operations per option and scenario (a log, an exp, two normal CDFs at
     about 10 each, and some 20 arithmetic), a future or perpetual about 4.

   lower bound = work x scenarios / peak multiply-add rate.
3. **Measured.** The stage times of the latest record in ``bench/out/results.jsonl`` for the
   same accounts, scenarios and dtype (engine and NumPy reference); the ratio measured / lower
   bound says how far each stage is from the machine's arithmetic limit.

The bound ignores gathers (the engine reads each position's row of the instrument table per
scenario: one load per multiply-add) and memory traffic; it is what no implementation on these
cores can beat, not what one should expect to reach.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the stress package of this checkout, not an installed one

from run import OUT, machine, snapshot_dir  # noqa: E402  (bench/run.py, beside this file)

BS_OPS = 60  # operations per option and scenario in Black-Scholes (see the module docstring)
LINEAR_OPS = 4  # a future or perpetual


def peak_flops(dtype: str, n: int = 2048, repeat: int = 5) -> dict:
    """Best FLOP/s of ``repeat`` ``[n, n] @ [n, n]`` products with NumPy's BLAS and with XLA."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    flops = 2.0 * n**3
    best = {}
    for name, fn in (("numpy", lambda: a @ b), ("xla", None)):
        if name == "xla":
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            dot = jax.jit(jnp.dot)
            dot(ja, jb).block_until_ready()
            fn = lambda: dot(ja, jb).block_until_ready()  # noqa: E731
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best[name] = flops / min(times)
    return best


def work(snap) -> dict:
    """Multiply-adds per scenario of each stage (see the module docstring), from ``snap``."""
    from stress.snapshot import OPTION

    n, A = snap.n_accounts, snap.n_assets
    settle = np.asarray(snap.instruments.settlement)[snap.pos_instrument]
    keys = np.concatenate([snap.pos_account.astype(np.int64) * A + settle,
                           np.flatnonzero(np.asarray(snap.balances).reshape(-1) != 0)])
    slots = len(np.unique(keys))
    P = snap.n_positions
    options = int((np.asarray(snap.instruments.kind) == OPTION).sum())
    linear = len(snap.instrument_ids) - options
    return {
        "accounts": n,
        "positions": P,
        "slots": slots,
        "pnl": P + slots + 2 * n,
        "state": 2 * P + 2 * slots + 9 * n,
        "revalue": options * BS_OPS + linear * LINEAR_OPS,
    }


def recorded(accounts: int, scenarios: int, dtype: str) -> dict | None:
    """The latest ``bench/run.py`` record of this configuration, or None."""
    path = OUT / "results.jsonl"
    if not path.exists():
        return None
    best = None
    for line in open(path):
        rec = json.loads(line)
        if (rec.get("accounts"), rec.get("scenarios"), rec.get("dtype")) == (accounts, scenarios, dtype) and rec.get("engine"):
            best = rec
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--accounts", type=int, default=100_000)
    ap.add_argument("--scenarios", type=int, default=5_000)
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import stress

    snap = stress.load_snapshot(snapshot_dir(args.accounts))
    w = work(snap)
    peak = peak_flops(args.dtype)
    fma = max(peak.values()) / 2.0  # multiply-adds per second
    S = args.scenarios
    bound = {k: w[k] * S / fma for k in ("pnl", "state", "revalue")}
    rec = recorded(args.accounts, S, args.dtype)

    def stage(impl: str, name: str):
        try:
            return rec[impl]["stages"][name]["wall"]
        except (TypeError, KeyError):
            return None

    rows = [
        ("P&L gather-and-reduce (engine: pnl gather+reduce)", "pnl", stage("engine", "pnl gather+reduce"), None),
        ("whole per-scenario account work (engine: gather+reduce)", "state", stage("engine", "gather+reduce"),
         stage("numpy", "gather+reduce")),
        ("revaluation (instrument tables)", "revalue", stage("engine", "tables"), stage("numpy", "tables")),
    ]
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores")
    print(f"peak {args.dtype}: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items())
          + f" -> {fma / 1e9:.1f} G multiply-adds/s")
    print(f"snapshot: {w['accounts']:,} accounts, {w['positions']:,} positions, {w['slots']:,} slots; {S:,} scenarios")
    if rec:
        commit = rec["engine"].get("engine_version", {}).get("commit", "?")
        print(f"measured: bench/out/results.jsonl record of {rec.get('when', '?')} (engine {commit})")
        buckets = rec["engine"].get("buckets")
        if buckets:  # [J, P, L, accounts] per holdings shape ([J, L, accounts] before the
            # balance-only slots, when P was J): what the engine computes, padding included
            shapes = [b if len(b) == 4 else (b[0], b[0], b[1], b[2]) for b in buckets]
            pos = sum(P * L * m for J, P, L, m in shapes)
            slots = sum(J * m for J, P, L, m in shapes)
            print(f"engine layout: {pos:,} position and {slots:,} slot entries per scenario with padding "
                  f"({pos / w['positions']:.2f}x and {slots / w['slots']:.2f}x the snapshot's)")
    print(f"{'stage':<58} {'MA/scen':>12} {'bound s':>9} {'engine s':>9} {'x bound':>8} {'numpy s':>9} {'x bound':>8}")
    out = {"peak_flops": peak, "work": w, "bound_s": bound, "rows": []}
    for label, key, eng, ref in rows:
        b = bound[key]
        fx = lambda t: (f"{t:9.3f}", f"{t / b:8.1f}") if t else (f"{'-':>9}", f"{'-':>8}")  # noqa: E731
        e, ex = fx(eng)
        r, rx = fx(ref)
        print(f"{label:<58} {w[key]:>12,} {b:9.4f} {e} {ex} {r} {rx}")
        out["rows"].append({"stage": label, "work": w[key], "bound_s": b, "engine_s": eng, "numpy_s": ref})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
