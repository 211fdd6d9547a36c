"""Options and futures that expire before a scenario's horizon have settled: their value stays
in equity (an option at its intrinsic value, SPEC section 3), and they need no margin, pay no
liquidation fee or price impact and are not counted as notional closed. Hand-computed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import stress
from stress import engine, margin
from stress.cascade import _market
from stress.pricing import black_scholes
from stress.scenarios import Scenarios

from .conftest import write_snapshot

# as_of 2026-11-23T08:00Z: the 27NOV26 contracts expire in 4 days, the 25DEC26 ones in 32
TOML = """\
as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = { USDC = 1000000.0 }
[margin]
[liquidation]
fee_rate = 0.001
"""
ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 600.0, "haircut": 0.0}]
LINPUT = {"instrument_id": "LINPUT", "kind": "option", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
          "expiry": "2026-11-27T08:00:00Z", "strike": 700.0, "option_type": "put", "mark_iv": 0.5}
LINPERP = {"instrument_id": "LINPERP", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
           "contract_size": 1.0, "mark_price": 600.0}


def _scen(snap, horizons, moves=None):
    S, A = len(horizons), snap.n_assets
    spot = np.ones((S, A))
    if moves is not None:
        spot[:, snap.asset_index("BTC")] = 1 + np.asarray(moves)
    names = tuple(f"h{h:g}" for h in horizons)
    return Scenarios(names, ("explicit",) * S, spot, np.zeros((S, A)), np.asarray(horizons, float))


def _put(T):
    return float(black_scholes(600.0, 700.0, T, 0.5, 0.0, False))


def test_settled_short_put_needs_no_margin_and_closes_no_notional(tmp_path):
    # a: 150 USDC, short 1 put K=700 at S=600 (intrinsic 100). At a 5-day horizon the put has
    #    settled: equity 50, no margin, not liquidatable. At 3 days it is live: MM = 0.075 * 600
    #    + V (Deribit's short put) against collateral 150 - V, liquidatable, closing 600 USD.
    # b: 103 USDC, the same put, long 1 perp (1 BTC): at 5 days equity 3 against the perp's MM
    #    of 6: liquidated, closing the perp's 600 USD only, fee 0.001 * 600 = 0.6, shortfall 3.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS, instruments=[LINPUT, LINPERP],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 150.0}, {"account_id": "b", "asset": "USDC", "amount": 103.0}],
        positions=[{"account_id": "a", "instrument_id": "LINPUT", "quantity": -1},
                   {"account_id": "b", "instrument_id": "LINPUT", "quantity": -1},
                   {"account_id": "b", "instrument_id": "LINPERP", "quantity": 1}],
        exchange_toml=TOML))
    res = stress.run(snap, _scen(snap, [5.0, 3.0]))
    sc = res.scenarios.set_index("scenario")

    after = sc.loc["h5"]
    assert after.accounts_liquidatable == 1
    np.testing.assert_allclose(after.shortfall_total, 6.0 - 3.0, rtol=1e-12)
    np.testing.assert_allclose(after.liquidated_notional, 600.0, rtol=1e-12)
    np.testing.assert_allclose(after.liquidated_notional_BTC, 600.0, rtol=1e-12)
    np.testing.assert_allclose(after.fees, 0.6, rtol=1e-12)
    # the shorts keep the puts' time value; the fee leaves b's equity (docs/liquidation.md)
    np.testing.assert_allclose(after.pnl_total + after.fees, 2 * (_put(4 / 365) - 100.0), rtol=1e-9)

    before = sc.loc["h3"]
    V = _put(1 / 365)
    assert before.accounts_liquidatable == 2
    short_a = (0.075 * 600 + V) - (150 - V)
    short_b = (0.075 * 600 + V + 6.0) - (103 - V)
    np.testing.assert_allclose(before.shortfall_total, short_a + short_b, rtol=1e-12)
    np.testing.assert_allclose(before.liquidated_notional, 600.0 + 1200.0, rtol=1e-12)
    np.testing.assert_allclose(before.liquidated_notional_BTC, 1800.0, rtol=1e-12)


def test_tables_zero_margin_and_notional_of_contracts_past_expiry(tmp_path):
    # An inverse future and call of 27NOV26 (4 days), a call of 25DEC26 (32 days) and the perp,
    # at horizons 0, 3.9, 4 and 10 days: each dated contract's margin and notional per contract
    # are 0 from its expiry on, and what they are without a horizon before it.
    insts = [{"instrument_id": "BTC-27NOV26", "mark_price": 601.0}, {"instrument_id": "BTC-27NOV26-500-C", "mark_iv": 0.5},
             {"instrument_id": "BTC-25DEC26-500-C", "mark_iv": 0.5}, {"instrument_id": "BTC-PERPETUAL", "mark_price": 600.0}]
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS, instruments=insts,
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1e6}],
        positions=[{"account_id": "a", "instrument_id": i["instrument_id"], "quantity": -1} for i in insts],
        exchange_toml=TOML))
    horizons = [0.0, 3.9, 4.0, 10.0]
    t, _ = engine.tables(snap, _scen(snap, horizons))
    W = t.user.shape[1]

    def col(x, s):
        return np.asarray(x)[s // W, :, s % W]

    live = np.array([[True, True, False, False], [True, True, False, False], [True] * 4, [True] * 4])  # [I, S]
    i = {k["instrument_id"]: n for n, k in enumerate(insts)}
    for s in range(len(horizons)):
        mm, notional = col(t.mm, s), col(t.notional, s)
        assert np.all((mm > 0) == live[:, s]) and np.all((notional > 0) == live[:, s])
    # the perp and a live future's per-contract margin and notional, by hand ($10 face value, 1%)
    np.testing.assert_allclose(col(t.notional, 1)[[i["BTC-27NOV26"], i["BTC-PERPETUAL"]]], [10.0, 10.0], rtol=1e-12)
    np.testing.assert_allclose(col(t.mm, 3)[i["BTC-PERPETUAL"]], 0.1, rtol=1e-12)
    # and the short calls' value is their intrinsic value once settled (100 USD, in coins)
    np.testing.assert_allclose(col(t.value, 2)[i["BTC-27NOV26-500-C"]], 100.0 / 600.0, rtol=1e-12)
    # the two settling contracts share one class (one expiry), the others never settle
    assert np.asarray(t.und_rep).shape == (1,)


def test_portfolio_grid_holds_a_settled_contract_at_its_settlement_amount(tmp_path):
    # Around a state 10 days on, the 27NOV26 inverse call (K=500, S=600) has settled into
    # 100 / 600 BTC: its grid P&L is that amount at the grid's BTC price less today's, its USD
    # delta 100; a settled linear put is USDC, which the grid does not move (P&L and delta 0),
    # and a settled future has no roll shock. The 25DEC26 call is still an option there.
    insts = [{"instrument_id": "BTC-27NOV26-500-C", "mark_iv": 0.5}, LINPUT, {"instrument_id": "BTC-27NOV26", "mark_price": 601.0},
             {"instrument_id": "BTC-25DEC26-500-C", "mark_iv": 0.5}]
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS, instruments=insts,
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1e6}],
        positions=[{"account_id": "a", "instrument_id": "LINPUT", "quantity": -1}],
        exchange_toml=TOML.replace("[margin]", '[margin]\nmodel = "portfolio"')))
    params = margin.resolve(snap)
    A = snap.n_assets
    g = margin.scenario_grids(snap.instruments, snap.market, params, jnp.ones((1, A)), jnp.zeros((1, A)), jnp.array([10.0]))
    spot_mult = np.asarray(margin.grid_moves(params)[0])[:, snap.asset_index("BTC")]  # [G]
    pnl = np.asarray(g["pnl"])[0]
    np.testing.assert_allclose(pnl[0], 100.0 / 600.0 * 600.0 * (spot_mult - 1.0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pnl[1], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g["delta"])[0, :2], [100.0, 0.0], rtol=1e-12, atol=1e-12)
    assert np.asarray(g["roll"])[0, 2] == 0.0
    live = np.asarray(margin.scenario_grids(snap.instruments, snap.market, params, jnp.ones((1, A)), jnp.zeros((1, A)),
                                            jnp.array([0.0]))["pnl"])[0, 3]
    assert np.ptp(pnl[3] - live) > 0  # still valued as an option, 10 days shorter


def test_var_windows_hold_a_settled_contract_at_its_settlement_amount(tmp_path):
    # The var model's windows around a state past expiry: the settled inverse call is 100 / 600
    # BTC, so its USD change in a window is that amount times BTC's price change; the settled
    # linear put is USDC, unmoved.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS, instruments=[{"instrument_id": "BTC-27NOV26-500-C", "mark_iv": 0.5}, LINPUT],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1e6}],
        positions=[{"account_id": "a", "instrument_id": "LINPUT", "quantity": -1}],
        exchange_toml=TOML))
    A, b = snap.n_assets, snap.asset_index("BTC")
    windows = np.ones((3, A))
    windows[:, b] = [0.8, 1.0, 1.3]
    g = margin.var_grids(snap.instruments, snap.market, jnp.ones((1, A)), jnp.zeros((1, A)), jnp.array([10.0]),
                         window_mult=jnp.asarray(windows), window_days=2.0)
    pnl = np.asarray(g["pnl"])[0]
    np.testing.assert_allclose(pnl[0], 100.0 / 600.0 * 600.0 * (windows[:, b] - 1.0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pnl[1], 0.0, atol=1e-12)


def test_cascade_sells_nothing_of_a_settled_contract(tmp_path):
    # What a forced close pushes into the market per contract: a live option's delta notional, a
    # perp's notional, nothing for the option that settled before the step.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS, instruments=[LINPUT, LINPERP],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1e6}],
        positions=[{"account_id": "a", "instrument_id": "LINPUT", "quantity": -1}],
        exchange_toml=TOML))
    A = snap.n_assets
    _, _, move = _market(snap.instruments, snap.market, snap.params, jnp.ones((2, A)), jnp.zeros((2, A)), jnp.array([1.0, 5.0]))
    move = np.asarray(move)
    assert move[0, 0] < 0 and move[0, 1] == 0.0  # the put's delta notional at 1 day; settled at 5
    np.testing.assert_allclose(move[1], [600.0, 600.0], rtol=1e-12)


MC_ACROSS_EXPIRY = """\
[[montecarlo]]
name = "mc"
paths = 96
steps = 4
horizon_days = 8
seed = 5
vol = { BTC = 1.5, ETH = 1.8, SOL = 2.0 }
correlation = { "BTC/ETH" = 0.8 }
"""


def test_notional_closed_per_underlying_adds_up_along_paths_across_an_expiry(tmp_path, sample_dir):
    # Paths of 4 steps over 8 days cross the sample's 4-day expiry at their second step, so a
    # close at the first step sells that expiry's contracts and a later one does not. The
    # notional closed per underlying (summed per expiry class in the kernel) must add up to
    # the total, which with a fee comes from each position's own notional instead (without
    # one it is that sum, so the check across the two runs is the one that can fail).
    import dataclasses

    snap = stress.load_snapshot(sample_dir)
    (tmp_path / "mc.toml").write_text(MC_ACROSS_EXPIRY)
    scen = stress.load_scenarios(tmp_path / "mc.toml", snap)
    assert np.asarray(engine.tables(snap, scen)[0].und_rep).shape == (1,)
    totals = {}
    for fee in (0.0, 0.001):
        liq = {**snap.liquidation_config, "fee_rate": fee, "adl": False}
        sc = stress.run(dataclasses.replace(snap, liquidation_config=liq), scen).scenarios
        per_und = sc[[c for c in sc.columns if c.startswith("liquidated_notional_")]].sum(axis=1)
        assert (sc.liquidated_notional > 0).sum() > 10
        np.testing.assert_allclose(per_und, sc.liquidated_notional, rtol=1e-9)
        totals[fee] = sc.liquidated_notional.to_numpy()
    np.testing.assert_allclose(totals[0.0], totals[0.001], rtol=1e-9)


# A short linear put that expires in 2 days, and one path at 1, 3 and 5 days: BTC 59,500 /
# 58,000 / 50,000 (the put settles at the second step, at 58,000, at its intrinsic 4,000).
PUT2 = {"instrument_id": "P2", "kind": "option", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
        "expiry": "2026-11-25T08:00:00Z", "strike": 62_000.0, "option_type": "put", "mark_iv": 0.5}
V_PUT2 = float(black_scholes(60_000.0, 62_000.0, 2 / 365, 0.5, 0.0, False))  # its value now


def _settling_path(tmp_path, instruments, balances, positions):
    """A BTC-at-60,000 snapshot of these rows (no fee, no ADL) and the one path above."""
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 60_000.0, "haircut": 0.0}],
        instruments=instruments, balances=balances, positions=positions,
        exchange_toml=TOML.replace("fee_rate = 0.001", "adl = false")))
    A, b = snap.n_assets, snap.asset_index("BTC")
    m = np.ones((1, 3, A))
    m[0, :, b] = np.array([59_500.0, 58_000.0, 50_000.0]) / 60_000.0
    h = np.array([[1.0, 3.0, 5.0]])
    return snap, Scenarios(("p",), ("montecarlo",), m[:, -1], np.zeros((1, A)), h[:, -1], m[:, :-1], np.zeros((1, 2, A)),
                           h[:, :-1])


def test_a_contract_settled_along_a_path_is_held_at_its_settlement_value(tmp_path):
    # Both contracts expire in 2 days; one path at 1, 3 and 5 days, BTC 59,500 / 58,000 /
    # 50,000. They settle at the second step, at its price, into fixed USDC amounts:
    # - fut: 21,000 USDC, long 10 linear futures marked 60,000: 10 * (58,000 - 60,000) =
    #   -20,000 at settlement, equity 1,000 from then on (50,000 at the last step no longer
    #   moves it, which would leave -79,000 of bad debt), no margin: not liquidated.
    # - put: 11,000 USDC, short 1 put K=62,000: settles at its intrinsic value 4,000, equity
    #   7,000 (at the last step's intrinsic 12,000 it would be -1,000).
    from stress import calibrate, cascade
    from stress import sensitivities as sens

    fut = {"instrument_id": "LF2", "kind": "future", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
           "expiry": "2026-11-25T08:00:00Z", "mark_price": 60_000.0}
    snap, scen = _settling_path(tmp_path, [fut, PUT2],
                                [{"account_id": "fut", "asset": "USDC", "amount": 21_000.0},
                                 {"account_id": "put", "asset": "USDC", "amount": 11_000.0}],
                                [{"account_id": "fut", "instrument_id": "LF2", "quantity": 10},
                                 {"account_id": "put", "instrument_id": "P2", "quantity": -1}])
    A = snap.n_assets
    equity_end = np.array([1_000.0, 7_000.0])
    pnl = equity_end - np.array([21_000.0, 11_000.0 - V_PUT2])

    for chunk in (1, 8):
        res = stress.run(snap, scen, chunk_size=chunk)
        assert res.scenarios.accounts_liquidatable[0] == 0 and res.scenarios.bad_debt[0] == 0.0
        np.testing.assert_allclose(res.accounts.set_index("account_id").loc[["fut", "put"], "pnl_worst"], pnl, rtol=1e-9)

    # the same along the sensitivities' states, calibration's scan over steps and the cascade's
    bk = sens.book(snap, scen)
    st = sens.account_states(jnp.zeros(A), jnp.zeros(A), snap.params, jnp.ones(2), snap.instruments, snap.market, bk, 2)
    np.testing.assert_allclose(np.asarray(st["equity"])[:, -1], equity_end, rtol=1e-9)
    eq, _ = calibrate._soft_path(snap.params, snap.instruments, snap.market, bk, 2, 3, 1, jnp.ones(2))
    np.testing.assert_allclose(np.asarray(eq)[:, 0], equity_end, rtol=1e-9)
    cas = cascade.run(snap, scen)
    assert cas["bad_debt_no_feedback"][0] == 0.0 and cas["accounts_liquidated_no_feedback"][0] == 0


def test_hedge_values_a_contract_settled_along_the_path_as_the_run_does(tmp_path):
    # The short put K=62,000 settles at 58,000 (second step) into -4,000 USDC: equity 7,000 at
    # the path's end, no shortfall, so there is nothing to hedge. At the last step's intrinsic
    # value (12,000) it would look 1,000 short and a hedge would be proposed.
    from stress import greeks

    perp = {"instrument_id": "PERP", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
            "contract_size": 1.0, "mark_price": 60_000.0}
    snap, scen = _settling_path(tmp_path, [PUT2, perp], [{"account_id": "put", "asset": "USDC", "amount": 11_000.0}],
                                [{"account_id": "put", "instrument_id": "P2", "quantity": -1}])
    res = stress.run(snap, scen)
    hg = greeks.hedge(snap, "put", ["PERP"], scen)
    assert hg["before"]["shortfall_worst"] == 0.0 and not hg["trade"]
    np.testing.assert_allclose([hg["before"]["pnl_worst"], res.accounts.pnl_worst[0]], 7_000.0 - (11_000.0 - V_PUT2),
                               rtol=1e-9)


def test_contracts_settling_in_the_same_states_share_one_class(tmp_path):
    # Expiries in 4 and 5 days: horizons 0 and 10 settle both in the same state (one class of
    # notional closed per underlying); a horizon of 4.5 days between them makes two.
    fut5 = {"instrument_id": "F5", "kind": "future", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
            "expiry": "2026-11-28T08:00:00Z", "mark_price": 600.0}
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS, instruments=[{"instrument_id": "BTC-27NOV26", "mark_price": 601.0}, fut5, LINPERP],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1e6}],
        positions=[{"account_id": "a", "instrument_id": "F5", "quantity": 1}],
        exchange_toml=TOML))
    assert np.asarray(engine.tables(snap, _scen(snap, [0.0, 10.0]))[0].und_rep).shape == (1,)
    assert np.asarray(engine.tables(snap, _scen(snap, [0.0, 4.5, 10.0]))[0].und_rep).shape == (2,)
    assert engine.tables(snap, _scen(snap, [0.0, 3.0]))[0].und_rep is None
