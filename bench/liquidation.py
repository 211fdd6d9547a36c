"""Cost of the liquidation models: one exchange, one scenario set, several ``[liquidation]``
tables, each timed warm (``stress.run``, minimum of ``--repeat``) in one process.

    python bench/liquidation.py --accounts 100000 --scenarios 2000

The snapshot is ``bench/run.py``'s sample (written once under ``bench/out/``); each variant is
a copy of its ``exchange.toml`` with another ``[liquidation]`` table beside the same tables
(symlinked). The scenarios are ``bench/run.py``'s explicit random shocks, or with ``--paths``
a Monte Carlo set of that many paths of ``--steps`` steps, where partial liquidation and
first-breach close-out differ. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import run as bench  # noqa: E402  (bench/run.py)

IMPACT = """
[liquidation.impact.BTC]
spread = 0.0002
k = 0.5
daily_vol = 0.04
daily_volume = 2.0e10

[liquidation.impact.ETH]
spread = 0.0003
k = 0.6
daily_vol = 0.05
daily_volume = 1.0e10
"""

VARIANTS = {
    "none": "",
    "fee": "fee_rate = 0.0005\n",
    "fee+impact": "fee_rate = 0.0005\n" + IMPACT,
    "fee+impact, partial": 'fee_rate = 0.0005\nmode = "partial"\n' + IMPACT,
}


def variant(src: Path, root: Path, name: str, liquidation: str, model: str = "standard") -> Path:
    """A snapshot folder sharing ``src``'s tables, with ``liquidation`` as its table and
    ``[margin] model = model``."""
    folder = root / name.replace(" ", "").replace(",", "-").replace("+", "-")
    folder.mkdir()
    for f in src.iterdir():
        if f.name != "exchange.toml":
            (folder / f.name).symlink_to(f.resolve())
    text = (src / "exchange.toml").read_text()
    head = text.split("[liquidation]")[0].replace('model = "standard"', f'model = "{model}"')
    (folder / "exchange.toml").write_text(head + "[liquidation]\n" + liquidation)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--scenarios", type=int, default=2_000)
    p.add_argument("--paths", type=int, default=0, help="Monte Carlo paths instead of explicit shocks")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default="", help="variant names, separated by '/'")
    p.add_argument("--model", default="standard", help="[margin] model: standard or portfolio")
    args = p.parse_args(argv)

    import stress

    src = bench.snapshot_dir(args.accounts)
    names = [v for v in VARIANTS if not args.only or v in args.only.split("/")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            snap = stress.load_snapshot(variant(src, Path(tmp), name, VARIANTS[name], args.model))
            if args.paths:
                text = (f'[[montecarlo]]\nname = "mc"\npaths = {args.paths}\nsteps = {args.steps}\n'
                        f'horizon_days = {args.steps}\nseed = 1\nvol = {{ BTC = 0.55, ETH = 0.70 }}\n'
                        'correlation = { "BTC/ETH" = 0.8 }\ndf = 4\n'
                        'jumps = { intensity = 8.0, mean = -0.04, std = 0.05 }\n')
                (Path(tmp) / "mc.toml").write_text(text)
                scen = stress.load_scenarios(Path(tmp) / "mc.toml", snap)
            else:
                scen = bench.make_scenarios(args.scenarios, snap.n_assets)
            walls = []
            for _ in range(args.repeat + 1):  # the first call compiles
                t0 = time.perf_counter()
                res = stress.run(snap, scen)
                walls.append(time.perf_counter() - t0)
            sc = res.scenarios
            print(json.dumps({
                "variant": name, "model": args.model, "accounts": snap.n_accounts, "scenarios": len(scen), "steps": scen.steps,
                "first_s": round(walls[0], 3), "warm_min_s": round(min(walls[1:]), 3),
                "warm_max_s": round(max(walls[1:]), 3), "peak_rss_mib": round(bench.peak_rss_mib()),
                "bad_debt_max": float(sc.bad_debt.max()), "impact_max": float(sc.impact_cost.max()),
                "fees_max": float(sc.fees.max()), "socialized_max": float(sc.socialized_loss.max()),
            }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
