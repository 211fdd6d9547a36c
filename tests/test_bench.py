"""`stress bench`: every stage is timed and reported, on a tiny synthetic exchange."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from stress import _exported
from stress.benchmark import run_stages
from stress.cli import app


def test_bench_times_every_stage_and_reuses_a_kept_sample(tmp_path):
    stages = run_stages(40, 12, "float64", tmp_path / "snap")
    names = [s.name for s in stages]
    assert names == ["generate sample", "load snapshot", "build scenarios", "revalue instruments", "holdings layout",
                     "compile", "gather (P&L)", "margin", "liquidation", "warm run", "write report", "peak memory"]
    assert all(s.seconds >= 0 for s in stages[:-1])
    assert "account-scenarios/s" in stages[6].note and "account-scenarios/s" in stages[9].note
    if _exported.folder() is not None:  # kept modules on (the tests' own folder): the first run read them
        assert re.search(r"\(\d+ kernels read, lowered and loaded: \d+\.\d\d s", stages[5].note), stages[5].note
    again = [s.name for s in run_stages(40, 12, "float32", tmp_path / "snap")]
    assert "generate sample" not in again  # the kept sample of the same size is reused


def test_the_timed_stages_compute_what_the_run_computes(tmp_path):
    # The stage kernels time parts of the run's fused kernel, so they must do that work: each
    # account's worst P&L as the run has it, the exchange's P&L per scenario as the instrument-
    # level sum (open interest x value change, no account in it: engine.exchange_pnl), and the
    # run's accounts short of margin and shortfall per scenario. Shocks large enough that some
    # accounts are short of margin.
    import jax.numpy as jnp
    import numpy as np

    from stress import benchmark, engine, io, sample
    from stress.scenarios import Scenarios

    sample.write(tmp_path, accounts=40, fmt="parquet")  # the size and scenario count the tests
    snap = io.load_snapshot(tmp_path)                   # above and below compile for
    rng = np.random.default_rng(3)
    S, A = 12, snap.n_assets
    scen = Scenarios(tuple(f"s{i}" for i in range(S)), ("explicit",) * S, np.exp(0.25 * rng.standard_normal((S, A))),
                     rng.normal(0.0, 0.2, (S, A)), np.zeros(S))
    res = engine.run(snap, scen)
    t, host = engine.tables(snap, scen, jnp.float64)
    total, gross = engine.exchange_pnl(snap, host)
    short = res.scenarios["accounts_liquidatable"].to_numpy()
    assert short.sum() > 0
    for stage in benchmark.STAGES:
        per, sums = benchmark.sweep_stage(snap, t, stage, jnp.float64)
        np.testing.assert_allclose(per["pnl_worst"], res.accounts["pnl_worst"], rtol=1e-12)
        assert np.abs(sums[0] - total).max() <= 1e-12 * gross.max()
    np.testing.assert_array_equal(sums[1], short)
    np.testing.assert_allclose(sums[2], res.scenarios["shortfall_total"], rtol=1e-12)
    np.testing.assert_allclose(np.maximum(per["gap_max"], 0.0), res.accounts["shortfall_worst"], rtol=1e-12)


def test_bench_command_prints_the_table_and_rejects_a_bad_dtype():
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "--accounts", "40", "--scenarios", "12"])
    assert r.exit_code == 0, r.output
    assert "warm run" in r.output and "gather (P&L)" in r.output and "40 accounts x 12 scenarios" in r.output
    assert runner.invoke(app, ["bench", "--dtype", "float16"]).exit_code == 2


def test_roofline_counts_the_work_of_a_hand_built_book(tmp_path):
    # bench/roofline.py's lower bound rests on these counts. Account a: USDC and BTC balances,
    # an inverse perpetual (settles in BTC) and a linear option (settles in USDC): 2 positions,
    # 2 slots. Account b: a USDT balance of 0 (no slot) and the other side of the perpetual:
    # 1 position, 1 slot (BTC). So P = 3, slots = 3, n = 2, one option and one perpetual.
    import importlib.util
    import sys
    from pathlib import Path

    import stress

    from .conftest import write_snapshot

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("roofline", bench / "roofline.py")
        roofline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(roofline)
    finally:
        sys.path.remove(str(bench))
    assets = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "USDT", "price": 1.0, "haircut": 0.02},
              {"asset": "BTC", "price": 90_000.0, "haircut": 0.05}]
    instruments = [
        {"instrument_id": "BTC-PERPETUAL", "mark_price": 90_000.0},
        {"instrument_id": "C", "kind": "option", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
         "expiry": "2026-12-25T08:00:00Z", "strike": 100_000.0, "option_type": "call", "mark_iv": 0.5},
    ]
    balances = [{"account_id": "a", "asset": "USDC", "amount": 1_000.0}, {"account_id": "a", "asset": "BTC", "amount": 1.0},
                {"account_id": "b", "asset": "USDT", "amount": 0.0}]
    positions = [{"account_id": "a", "instrument_id": "BTC-PERPETUAL", "quantity": 10},
                 {"account_id": "a", "instrument_id": "C", "quantity": -1},
                 {"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -10}]
    snap = stress.load_snapshot(write_snapshot(tmp_path, assets=assets, instruments=instruments, balances=balances,
                                               positions=positions, exchange_toml="as_of = 2026-11-23T08:00:00Z\n"))
    w = roofline.work(snap)
    assert (w["accounts"], w["positions"], w["slots"]) == (2, 3, 3)
    assert w["pnl"] == 3 + 3 + 2 * 2
    assert w["state"] == 2 * 3 + 2 * 3 + 9 * 2
    assert w["revalue"] == roofline.BS_OPS + roofline.LINEAR_OPS


def test_bench_refuses_to_keep_its_sample_in_a_folder_it_did_not_write(tmp_path):
    # a user's snapshot must not be written over by a synthetic one
    from stress import sample

    sample.write(tmp_path / "mine", accounts=30, fmt="csv")
    before = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()}
    r = CliRunner().invoke(app, ["bench", "--accounts", "40", "--scenarios", "12", "--keep", str(tmp_path / "mine")])
    assert r.exit_code == 2 and "did not write" in r.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == before
