"""Benchmark: one reverse-mode gradient of the exchange's bad debt against one forward run.

Usage (from the repository root)::

    python bench/sensitivities.py --accounts 10000 20000 --scenarios 1000 --repeat 2

For each size, a fresh process ("worker", so peak RSS is its own) loads the cached sample
exchange (``bench/run.py``'s ``snapshot_dir``) and ``S`` explicit scenarios (``make_scenarios``)
and times, warm (minimum of ``--repeat`` after a first, compiling call):

- ``run``: ``stress.run``, the engine's forward pass (chunked; the report's numbers);
- ``forward``: the differentiable model's forward pass alone (``sensitivities.state_sums`` over
  the chunks of accounts, float64);
- ``grad``: one gradient, of the bad debt summed over the scenarios, with respect to every
  input at once: asset prices and vols, every leaf of ``Params`` (margin rates and floors,
  haircuts, tiers, portfolio-margin parameters) and every account's scale: the forward pass,
  then one reverse pass per chunk (``_chunk_pullback`` with that objective's row only);
- ``sensitivities``: ``sensitivities.sensitivities``, the whole command: forward totals, the
  worst scenario, then the Jacobian of all ten objectives (per chunk one forward and ten
  pullbacks).

``--config`` picks the exchange's settings (``CONFIGS``): ``standard`` (the sample as
written), ``impact-partial`` (price impact on BTC, ETH and SOL, a 0.05% fee and partial
liquidation) or ``portfolio`` (the portfolio margin model). ``forward`` and ``grad`` are timed
for ``standard`` only (the other settings add passes that ``sensitivities`` runs).

Records go to ``bench/out/sensitivities.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from margin import configured_snapshot  # noqa: E402
from run import engine_version, make_scenarios, peak_rss_mib, snapshot_dir  # noqa: E402

IMPACT = "".join(f"[liquidation.impact.{a}]\nspread = {s}\nk = 0.7\ndaily_vol = {v}\ndaily_volume = {q}\n"
                 for a, s, v, q in (("BTC", 0.0005, 0.04, 2e9), ("ETH", 0.0007, 0.05, 1e9), ("SOL", 0.001, 0.07, 3e8)))
CONFIGS = {  # name -> ([margin] keys, [liquidation] keys)
    "standard": ("", ""),
    "impact-partial": ("", 'mode = "partial"\nfee_rate = 0.0005\n' + IMPACT),
    "portfolio": ('model = "portfolio"\n', ""),
}


def best_of(fn, repeat: int) -> float:
    fn()  # compile
    walls = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    return min(walls)


def worker(accounts: int, scenarios: int, repeat: int, config: str = "standard") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import stress
    from stress import sensitivities as sens

    snap = configured_snapshot(snapshot_dir(accounts, generate=False), *CONFIGS[config])
    scen = make_scenarios(scenarios, snap.n_assets)
    n, A = snap.n_accounts, snap.n_assets
    b = sens.book(snap, scen)
    params = sens._float_params(snap.params)
    inst = sens.safe_instruments(snap.instruments, snap.market)
    zero = jnp.zeros(A)
    k = sens.OBJECTIVES.index(("bad_debt", "sum"))
    C, chunks = sens.account_chunks(b, n)
    lam = jnp.ones(C)

    def forward():
        sums = sum(np.asarray(sens._state_sums(zero, zero, params, lam, inst, snap.market, bc, n=C)) for _, bc in chunks)
        return sums, sens.exchange_totals(sums, zero, snap.market, b)

    def grad():
        sums, _ = forward()
        _, (d_sums, d_x) = sens._outer(sums, zero, snap.market, b, 0)
        out = [sens._chunk_pullback(zero, zero, params, lam, 0.0, None, None, None, inst, snap.market, bc,
                                    d_sums[k:k + 1], n=C) for _, bc in chunks]
        jax.block_until_ready(out)

    rec = {"accounts": n, "positions": len(snap.pos_account), "scenarios": scenarios, "config": config,
           "chunk_accounts": C, "chunks": len(chunks), "engine": engine_version()}
    rec["run_s"] = best_of(lambda: stress.run(snap, scen), repeat)
    if config == "standard":
        rec["forward_s"] = best_of(lambda: jax.block_until_ready(forward()), repeat)
        rec["grad_s"] = best_of(grad, repeat)
    rec["sensitivities_s"] = best_of(lambda: sens.sensitivities(snap, scen), repeat)
    rec["peak_rss_mib"] = peak_rss_mib()
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, nargs="+", default=[10_000])
    p.add_argument("--scenarios", type=int, nargs="+", default=[1_000])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--config", choices=list(CONFIGS), default="standard")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.accounts[0], args.scenarios[0], args.repeat, args.config)))
        return 0
    rows = []
    for n in args.accounts:
        snapshot_dir(n)
        for s in args.scenarios:
            out = subprocess.run([sys.executable, __file__, "--worker", "--accounts", str(n), "--scenarios", str(s),
                                  "--repeat", str(args.repeat), "--config", args.config], capture_output=True, text=True)
            if out.returncode:
                rec = {"accounts": n, "scenarios": s, "failed": out.stderr.strip()[-500:]}
            else:
                rec = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(rec)
            with open(HERE / "out" / "sensitivities.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    print(f"\n{'config':>15} {'accounts':>9} {'positions':>9} {'scen':>6} {'run':>7} {'forward':>7} {'grad':>7} "
          f"{'grad/run':>8} {'sens':>7} {'sens/run':>8} {'peak MiB':>9}")
    for r in rows:
        if "run_s" not in r:
            print(f"{args.config:>15} {r['accounts']:>9} {'':>9} {r['scenarios']:>6}  failed")
            continue
        f, g = r.get("forward_s", float("nan")), r.get("grad_s", float("nan"))
        print(f"{r['config']:>15} {r['accounts']:>9} {r['positions']:>9} {r['scenarios']:>6} {r['run_s']:7.2f} {f:7.2f} "
              f"{g:7.2f} {g / r['run_s']:8.1f} {r['sensitivities_s']:7.2f} {r['sensitivities_s'] / r['run_s']:8.1f} "
              f"{r['peak_rss_mib']:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
