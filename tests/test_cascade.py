"""Liquidation cascades (stress.cascade): a chain of longs liquidated one after the other by
their own forced sales, checked step by step against hand arithmetic; the cascade with its
feedback switched off against the engine; invariance to chunk size and tiling."""

from __future__ import annotations

import dataclasses

import math

import numpy as np
import pytest

import stress
from stress import cascade, sample

from .conftest import write_snapshot

ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}]
# k * daily_vol = 0.02; a forced sale of X USD moves the price by -0.02 * sqrt(X / 1.96e6):
# 490,000 USD (a quarter of the daily volume) moves it by exactly -1%.
IMPACT = """cascade = true
{extra}
[liquidation.impact.BTC]
spread = 0.001
k = 0.5
daily_vol = 0.04
daily_volume = 1960000.0
"""


def _chain(folder, balances=(12_000.0, 17_000.0, 22_000.0), extra: str = ""):
    """Three longs A, B, C of 10 contracts of a linear BTC perpetual (1 BTC a contract, mark
    50,000) on USDC balances ``balances``; one short S of 30 on 10M USDC.

    MM is 1% of the notional: a long of 10 on balance b breaches when b + 10 (F - 50,000) <
    0.1 F, i.e. below F* = (500,000 - b) / 9.9: A 49,292.93, B 48,787.88, C 48,282.83.
    """
    toml = ("as_of = 2026-11-23T08:00:00Z\nrate = 0.0\ninsurance_fund = { USDC = 1000000.0 }\n[margin]\n"
            "[liquidation]\n" + IMPACT.format(extra=extra))
    names = ("A", "B", "C")
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=[{"account_id": a, "asset": "USDC", "amount": b} for a, b in zip(names, balances)]
        + [{"account_id": "S", "asset": "USDC", "amount": 10_000_000.0}],
        positions=[{"account_id": a, "instrument_id": "P", "quantity": 10} for a in names]
        + [{"account_id": "S", "instrument_id": "P", "quantity": -30}],
        exchange_toml=toml))


def _path_scenarios(folder, snap):
    """A replay window of 4 daily steps, BTC 50,000 -> 49,000 and flat after (an explicit path),
    and a one-off shock of -2% (49,000 too)."""
    (folder / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49000\n2024-01-03,49000\n"
                                  "2024-01-04,49000\n2024-01-05,49000\n")
    (folder / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 4\n\n'
                                   '[[scenario]]\nname = "down-2"\nmoves = { BTC = -0.02 }\n')
    scen = stress.load_scenarios(folder / "p.toml", snap)
    assert scen.steps == 4 and scen.kinds == ("replay", "explicit")
    return scen


def _cost(x):
    """Impact cost of closing x USD at once: x (0.001 + 0.02 sqrt(x / 1.96e6))."""
    return x * (0.001 + 0.02 * math.sqrt(x / 1.96e6))


def test_a_chain_of_longs_liquidates_one_after_the_other_step_by_step(tmp_path):
    snap = _chain(tmp_path / "snap")
    scen = _path_scenarios(tmp_path, snap)
    r = cascade.run(snap, scen, accounts=True)
    # Step 0, F = 49,000 on both runs. A: collateral 12,000 - 10,000 = 2,000 < MM 4,900:
    # closed out, selling 10 x 49,000 = 490,000 USD. Impact cost 490,000 x (0.001 + 0.02 x
    # 0.5) = 5,390, all A's: A ends at 2,000 - 5,390 = -3,390, bad debt 3,390. B (7,000 >
    # 4,900) and C (12,000) hold. The sale moves BTC by -0.02 x sqrt(0.25) = -1%.
    p0 = 49_000.0
    x0 = 10 * p0
    m0 = -0.02 * math.sqrt(x0 / 1.96e6)
    assert m0 == pytest.approx(-0.01, rel=1e-15)
    # Step 1 with feedback: F = 49,000 x 0.99 = 48,510 < B's 48,787.88. B: collateral 17,000 -
    # 14,900 = 2,100 < MM 4,851: closed out, selling 485,100 USD; cost 485,100 x (0.001 + 0.02 x
    # sqrt(0.2475)) = 5,311.78; B's bad debt 5,311.78 - 2,100 = 3,211.78. C: 22,000 - 14,900 =
    # 7,100 > 4,851, holds. Move -0.02 x sqrt(0.2475) = -0.995%.
    p1 = p0 * (1 + m0)
    x1 = 10 * p1
    m1 = -0.02 * math.sqrt(x1 / 1.96e6)
    # Step 2: F = 48,510 x (1 - 0.00995) = 48,027.33 < C's 48,282.83. C: collateral 22,000 -
    # 19,726.68 = 2,273.32 < MM 4,802.73: closed out, selling 480,273.32 USD; cost 5,235.10;
    # bad debt 2,961.78. Its move takes step 3 to 47,551.85, where no long is left.
    p2 = p1 * (1 + m1)
    x2 = 10 * p2
    m2 = -0.02 * math.sqrt(x2 / 1.96e6)
    p3 = p2 * (1 + m2)
    assert (p1, p2, p3) == pytest.approx((48_510.0, 48_027.3316, 47_551.849), rel=1e-8)
    btc, usdc = snap.asset_index("BTC"), snap.asset_index("USDC")
    np.testing.assert_allclose(r["price_steps"][0, :, btc], [p0, p1, p2, p3], rtol=1e-13)
    np.testing.assert_allclose(r["price_steps"][0, :, usdc], 1.0)  # USDC does not move
    np.testing.assert_allclose(r["net_notional_steps"][0, :, btc], [x0, x1, x2, 0.0], rtol=1e-13)
    np.testing.assert_array_equal(r["accounts_liquidated_steps"][0], [1, 1, 1, 0])
    costs = [_cost(x0), _cost(x1), _cost(x2)]
    np.testing.assert_allclose(r["impact_cost_steps"][0], costs + [0.0], rtol=1e-13)
    # who, when (accounts in id order A, B, C, S; -1: never)
    np.testing.assert_array_equal(r["liquidation_step_feedback"][:, 0], [0, 1, 2, -1])
    np.testing.assert_array_equal(r["liquidation_step_no_feedback"][:, 0], [0, -1, -1, -1])
    eq = [12_000.0 + 10 * (p0 - 50_000.0), 17_000.0 + 10 * (p1 - 50_000.0), 22_000.0 + 10 * (p2 - 50_000.0)]
    assert eq == pytest.approx([2_000.0, 2_100.0, 2_273.316], rel=1e-6)
    bad = sum(c - e for c, e in zip(costs, eq))
    assert bad == pytest.approx(3_390.0 + 3_211.784 + 2_961.783, rel=1e-6)
    assert r["bad_debt_feedback"][0] == pytest.approx(bad, rel=1e-12)
    assert r["bad_debt_no_feedback"][0] == pytest.approx(3_390.0, rel=1e-12)
    assert r["amplification"][0] == pytest.approx(bad / 3_390.0, rel=1e-12)
    assert r["impact_cost_feedback"][0] == pytest.approx(sum(costs), rel=1e-12)
    assert r["liquidated_notional_feedback"][0] == pytest.approx(x0 + x1 + x2, rel=1e-12)
    assert r["accounts_liquidated_feedback"][0] == 3 and r["accounts_liquidated_no_feedback"][0] == 1
    assert r["price_impact"][0][usdc] == 0.0
    assert r["price_impact"][0][btc] == pytest.approx(p3 / p0 - 1.0, rel=1e-12)
    # The one-off shock (-2%, repeated at every step of the set) has no later step to move:
    # A alone, as without feedback.
    assert r["bad_debt_feedback"][1] == r["bad_debt_no_feedback"][1] == pytest.approx(3_390.0, rel=1e-12)
    assert r["amplification"][1] == 1.0 and (r["price_impact"][1] == 0.0).all()
    np.testing.assert_array_equal(r["liquidation_step_feedback"][:, 1], [0, -1, -1, -1])
    # Without feedback the cascade is the engine's model.
    res = stress.run(snap, scen)
    sc = res.scenarios
    np.testing.assert_allclose(r["bad_debt_no_feedback"], sc.bad_debt, rtol=1e-12)
    np.testing.assert_allclose(r["impact_cost_no_feedback"], sc.impact_cost, rtol=1e-12)
    # ... and `stress run` (cascade = true) reports the feedback run beside its own
    assert sc.bad_debt_feedback[0] == pytest.approx(bad, rel=1e-12)
    assert sc.amplification[0] == pytest.approx(bad / 3_390.0, rel=1e-12) and sc.amplification[1] == 1.0
    assert sc.price_impact_BTC[0] == pytest.approx(p3 / p0 - 1.0, rel=1e-12)
    assert res.summary["cascade"] is True
    assert res.summary["amplification_worst"] == pytest.approx(bad / 3_390.0, rel=1e-12)


def test_an_oracle_lag_delays_each_link_of_the_chain(tmp_path):
    # Lag 1: A breaches at step 0 (49,000) and is closed at step 1, still at 49,000 (nothing has
    # sold yet): bad debt 3,390 as before. Its sale moves step 2 to 48,510, where B breaches; B
    # is closed at step 3, at 48,510 too (its own sale comes after): bad debt 3,211.78. C would
    # need step 4's price: the path has ended, so C is never closed out.
    snap = _chain(tmp_path / "snap", extra="oracle_lag_steps = 1")
    scen = _path_scenarios(tmp_path, snap)
    r = cascade.run(snap, scen, accounts=True)
    np.testing.assert_array_equal(r["liquidation_step_feedback"][:, 0], [1, 3, -1, -1])
    np.testing.assert_allclose(r["price_steps"][0, :, snap.asset_index("BTC")], [49_000.0, 49_000.0, 48_510.0, 48_510.0],
                               rtol=1e-13)
    x1 = 10 * 48_510.0
    expected = 3_390.0 + _cost(x1) - (17_000.0 + 10 * (48_510.0 - 50_000.0))
    assert r["bad_debt_feedback"][0] == pytest.approx(expected, rel=1e-12)
    sc = stress.run(snap, scen).scenarios
    np.testing.assert_allclose(r["bad_debt_no_feedback"], sc.bad_debt, rtol=1e-12)


def test_a_breach_the_lag_leaves_unacted_on_counts_its_shortfall_and_bad_debt(tmp_path):
    # BTC flat at 50,000 for three steps, 49,000 at the last. A (9,000 USDC, long 10) breaches
    # only there; with a lag of one step the liquidation engine never acts on it, so nobody is
    # closed out, and A ends the path 1,000 underwater: margin 0.01 * 10 * 49,000 = 4,900
    # against collateral 9,000 - 10,000 = -1,000, a shortfall of 5,900 and bad debt of 1,000.
    # (The engine once skipped the sums of a tile where no account was closed out, and
    # reported 0 for both; whether it did depended on who shared the chunk.)
    snap = _chain(tmp_path / "snap", balances=(9_000.0, 17_000.0, 22_000.0), extra="oracle_lag_steps = 1")
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,50000\n2024-01-03,50000\n"
                                    "2024-01-04,50000\n2024-01-05,49000\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 4\n')
    scen = stress.load_scenarios(tmp_path / "p.toml", snap)
    for chunk in (None, 1):
        res = stress.run(snap, scen, chunk_size=chunk)
        sc = res.scenarios
        assert sc.accounts_liquidatable[0] == 0
        assert sc.shortfall_total[0] == pytest.approx(5_900.0, rel=1e-12)
        assert sc.bad_debt[0] == pytest.approx(1_000.0, rel=1e-12)
        assert sc.bad_debt_feedback[0] == pytest.approx(1_000.0, rel=1e-12)  # nothing sold: nothing moved


def test_float32_follows_float64(tmp_path):
    snap = _chain(tmp_path / "snap")
    scen = _path_scenarios(tmp_path, snap)
    r64, r32 = cascade.run(snap, scen), cascade.run(snap, scen, dtype="float32")
    for k in ("bad_debt_feedback", "bad_debt_no_feedback", "impact_cost_feedback", "price_impact"):
        np.testing.assert_allclose(r32[k], r64[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r32["accounts_liquidated_feedback"], [3, 1])


def test_a_book_without_liquidations_has_amplification_one(tmp_path):
    # Balances of 1M each: at 49,000 every long keeps 990,000 of collateral. Nobody is closed
    # out, nothing is sold, no price moves.
    snap = _chain(tmp_path / "snap", balances=(1e6, 1e6, 1e6))
    r = cascade.run(snap, _path_scenarios(tmp_path, snap))
    np.testing.assert_array_equal(r["amplification"], [1.0, 1.0])
    for k in ("bad_debt_feedback", "bad_debt_no_feedback", "impact_cost_feedback", "price_impact"):
        assert (r[k] == 0.0).all(), k
    assert (r["accounts_liquidated_feedback"] == 0).all()


def test_amplification_of_zero_bad_debt():
    amp = cascade.amplification(np.array([0.0, 5.0, 6.0, 0.0]), np.array([0.0, 0.0, 3.0, 2.0]))
    np.testing.assert_array_equal(amp, [1.0, np.inf, 2.0, 0.0])


# --- the sample exchange under Monte Carlo paths --------------------------------------------

SAMPLE_IMPACT = """
[liquidation.impact.BTC]
spread = 0.0005
k = 0.7
daily_vol = 0.04
daily_volume = 2e7

[liquidation.impact.ETH]
spread = 0.0007
k = 0.7
daily_vol = 0.05
daily_volume = 1e7

[liquidation.impact.SOL]
spread = 0.001
k = 0.8
daily_vol = 0.07
daily_volume = 3e6
"""
MC = """[[scenario]]
name = "btc-down-20"
moves = {{ BTC = -0.20, ETH = -0.25, SOL = -0.3 }}

[[montecarlo]]
name = "mc"
paths = 20
steps = 4
horizon_days = 8
seed = 3
df = 4
vol = {{ BTC = 1.2, ETH = 1.4, SOL = 1.8 }}
correlation = {{ "BTC/ETH" = 0.8, "BTC/SOL" = 0.7, "ETH/SOL" = 0.75 }}
jumps = {{ intensity = 20.0, mean = -0.08, std = 0.05 }}
vol_beta = {{ BTC = -0.8, ETH = -0.9, SOL = -1.0 }}
"""


# risk-limit tiers of futures and perpetuals: MM 1% up to 20,000 USD a position, 3% to 100,000,
# 8% beyond (steep enough that a cascade that ignored them would close out other accounts)
TIERS = "future_tiers = [[20000.0, 0.02, 0.01], [100000.0, 0.04, 0.03], [1e15, 0.1, 0.08]]\n"


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, sample_tables):
    """The 400-account sample with impact tables, a fee, an oracle lag of 1 step, risk-limit
    tiers and the cascade switched on (the chain tests above cover lag 0 and flat rates)."""
    lag, tiers = 1, TIERS
    folder = tmp_path_factory.mktemp("cascade_sample")
    sample.write_snapshot(folder, sample_tables, "csv")
    toml = (folder / "exchange.toml").read_text()
    liq = f"[liquidation]\ncascade = true\nfee_rate = 0.0005\noracle_lag_steps = {lag}\n{SAMPLE_IMPACT}"
    toml = toml.replace("[liquidation]\n", liq).replace("[margin]\n", "[margin]\n" + tiers)
    (folder / "exchange.toml").write_text(toml)
    snap = stress.load_snapshot(folder)
    (folder / "mc.toml").write_text(MC.format())
    scen = stress.load_scenarios(folder / "mc.toml", snap)
    return snap, scen, cascade.run(snap, scen, accounts=True)


def test_without_feedback_the_cascade_is_the_engine(sample_run):
    snap, scen, r = sample_run
    # the engine alone (stress run with the switch on would run this cascade again)
    engine_only = dataclasses.replace(snap, liquidation_config={**snap.liquidation_config, "cascade": False})
    sc = stress.run(engine_only, scen).scenarios
    assert (sc.bad_debt > 0).sum() >= 5  # the comparison has bad debt to compare
    np.testing.assert_allclose(r["bad_debt_no_feedback"], sc.bad_debt, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(r["impact_cost_no_feedback"], sc.impact_cost, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(r["fees_no_feedback"], sc.fees, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(r["liquidated_notional_no_feedback"], sc.liquidated_notional, rtol=1e-9)
    np.testing.assert_array_equal(r["accounts_liquidated_no_feedback"], sc.accounts_liquidatable)
    # the feedback run differs on the paths (and only there): more closed out, prices lower
    paths = np.asarray(scen.random)
    assert (r["accounts_liquidated_feedback"][paths] > r["accounts_liquidated_no_feedback"][paths]).any()
    assert (r["price_impact"][paths] < 0).any()
    assert r["bad_debt_feedback"][0] == r["bad_debt_no_feedback"][0] and r["amplification"][0] == 1.0
    # closes in a step after the first (with the lag: after the second) are where feedback acts
    steps = r["liquidation_step_feedback"][:, paths]
    assert ((steps >= 1) & (r["liquidation_step_no_feedback"][:, paths] != steps)).any()


def test_the_engine_under_an_oracle_lag_does_not_depend_on_chunk_size(sample_run):
    # Under a lag, breaches in a path's last step are never acted on: the per-scenario sums
    # must count their shortfall and bad debt whoever else shares their chunk (one account a
    # chunk, against the default's hundreds)
    snap, scen, _ = sample_run
    engine_only = dataclasses.replace(snap, liquidation_config={**snap.liquidation_config, "cascade": False})
    a, b = stress.run(engine_only, scen, chunk_size=1), stress.run(engine_only, scen)
    for c in ("shortfall_total", "bad_debt", "accounts_liquidatable", "insurance_fund_after", "fees"):
        x, y = a.scenarios[c].to_numpy(), b.scenarios[c].to_numpy()
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.abs(y).max(), err_msg=c)


def test_results_do_not_depend_on_chunk_size_or_tiling(tmp_path):
    # the chain, where feedback decides who is closed when (a chunk of one account each, and
    # tiles of 8 paths, against the defaults)
    snap = _chain(tmp_path / "snap")
    scen = _path_scenarios(tmp_path, snap)
    r = cascade.run(snap, scen, accounts=True)
    assert r["amplification"][0] > 1.0
    other = cascade.run(snap, scen, chunk_size=1, paths_per_tile=8, accounts=True)
    assert set(other) == set(r)
    for k, v in r.items():
        if v.dtype.kind in "iu":
            np.testing.assert_array_equal(other[k], v, err_msg=k)
        else:
            np.testing.assert_allclose(other[k], v, rtol=1e-12, atol=1e-9, err_msg=k)


class PartsHere:
    """The protocol of ``cascade.run(parts=...)`` in this process: the accounts cut into
    partitions as the cluster cuts them (``cluster.split_accounts``, ``take_accounts``), each
    stepped on its own with ``cascade.part_*``. It is what ``cluster.ClusterAccounts`` does
    over Dask, without the workers."""

    def __init__(self, snap, n_parts: int, chunk_size: int | None = None):
        from stress import cluster

        self.index = cluster.split_accounts(snap, n_parts)
        self.subs = [cluster.take_accounts(snap, idx) for idx in self.index]
        self.n, self.chunk_size, self.steps, self.laid_out = snap.n_accounts, chunk_size, 0, None

    def cascade_begin(self, *, W2, K, lag, fee_rate, dtype):
        self.args = (K, lag, fee_rate)
        if self.laid_out is None:  # once, as each cluster worker does: tiles reuse it
            self.laid_out = [cascade.part_of(sub, self.chunk_size, dtype) for sub in self.subs]
        self.states = [cascade.part_begin(p, W2, K) for p in self.laid_out]

    def cascade_step(self, t, acc):
        K, lag, _ = self.args
        out = [cascade.part_step(p, t, acc, K, lag) for p in self.states]
        self.states = [o[0] for o in out]
        self.steps += 1
        return cascade.add_steps([o[1] for o in out])

    def cascade_settle(self, tab, with_accounts):
        K, lag, fee_rate = self.args
        got = [cascade.part_settle(p, tab, fee_rate, K, lag, with_accounts) for p in self.states]
        return cascade.add_settled(got, self.index, self.n, with_accounts)


def assert_same_cascade(got: dict, want: dict) -> None:
    """Same keys; integer results equal; floats to 1e-12 of each result's largest magnitude."""
    assert set(got) == set(want)
    for k, v in want.items():
        if v.dtype.kind in "iu":
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        else:
            scale = np.abs(v[np.isfinite(v)]).max(initial=0.0)  # amplification may be inf
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-12 * scale, err_msg=k)


@pytest.mark.parametrize("n_parts", [1, 4])
def test_the_chain_stepped_over_account_parts_is_the_one_scan_run(tmp_path, n_parts):
    # the chain, where each step's price depends on who the previous steps closed out: with
    # four parts, one account each, A's close-out reaches B's part only through the contracts
    snap = _chain(tmp_path / "snap", extra="oracle_lag_steps = 1")
    scen = _path_scenarios(tmp_path, snap)
    want = cascade.run(snap, scen, accounts=True)
    parts = PartsHere(snap, n_parts, chunk_size=1)
    assert len(parts.index) == n_parts
    got = cascade.run(snap, scen, accounts=True, parts=parts)
    assert parts.steps == scen.steps * math.ceil(len(scen) / 8)  # one round per step and tile
    np.testing.assert_array_equal(got["liquidation_step_feedback"][:, 0], [1, 3, -1, -1])
    assert_same_cascade(got, want)


def test_the_sample_stepped_over_account_parts_is_the_one_scan_run(sample_run):
    # risk-limit tiers, a fee, an oracle lag and Monte Carlo paths that feed back
    snap, scen, want = sample_run
    parts = PartsHere(snap, 3)
    got = cascade.run(snap, scen, accounts=True, parts=parts, paths_per_tile=8)  # 3 tiles of 8 paths
    assert parts.steps == scen.steps * 3
    assert (want["amplification"][np.isfinite(want["amplification"])] != 1.0).any()  # feedback acts
    assert_same_cascade(got, want)
