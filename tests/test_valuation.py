"""SPEC section 2 conventions on hand-made snapshots, against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

import stress
from stress.pricing import black_scholes
from stress.scenarios import Scenarios

from .conftest import EXCHANGE_TOML, write_snapshot

ASSETS = [
    {"asset": "USDC", "price": 1.0, "haircut": 0.0},
    {"asset": "BTC", "price": 600.0, "haircut": 0.05},
]


def _scen(snap, names, moves, vol=None, horizon=None):
    """Explicit scenarios: ``moves`` and ``vol`` (vol shifts) are ``{asset: value}`` per scenario."""
    A = snap.n_assets
    spot, shift = np.ones((len(names), A)), np.zeros((len(names), A))
    for s, m in enumerate(moves):
        for a, v in m.items():
            spot[s, snap.asset_index(a)] = 1 + v
    for s, m in enumerate(vol or []):
        for a, v in m.items():
            shift[s, snap.asset_index(a)] = v
    return Scenarios(tuple(names), ("explicit",) * len(names), spot, shift, np.zeros(len(names)) if horizon is None else horizon)


def test_inverse_future_pnl_matches_deribit_worked_example(tmp_path):
    # Deribit's futures example: 100 BTC contracts ($10 each) bought at 600, closed at 700:
    # P&L = 1000/600 - 1000/700 = 0.238095 BTC, worth 0.238095 * 700 = 166.67 USD at 700.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS,
        instruments=[{"instrument_id": "BTC-PERPETUAL", "mark_price": 600.0}],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1000.0}, {"account_id": "b", "asset": "USDC", "amount": 1000.0}],
        positions=[{"account_id": "a", "instrument_id": "BTC-PERPETUAL", "quantity": 100},
                   {"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -100}],
        exchange_toml=EXCHANGE_TOML))
    pnl = stress.pnl_matrix(snap, _scen(snap, ["up"], [{"BTC": 700 / 600 - 1}]))
    np.testing.assert_allclose(pnl.loc["a", "up"], (1000 / 600 - 1000 / 700) * 700, rtol=1e-12)
    np.testing.assert_allclose(round((1000 / 600 - 1000 / 700), 6), 0.238095)
    np.testing.assert_allclose(pnl.loc["b", "up"], -pnl.loc["a", "up"], rtol=1e-12)


def test_linear_future_pnl_and_depeg_revalue_settlement_asset(tmp_path):
    # 2 contracts of 0.5 BTC, USDC-settled, mark 610: BTC +10% -> F' = 671, P&L = 2*0.5*61 USDC;
    # with USDC at 0.9 that is worth 0.9 * 61 USD.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS,
        instruments=[{"instrument_id": "LIN", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.5, "mark_price": 610.0}],
        balances=[{"account_id": "a", "asset": "BTC", "amount": 0.0}],
        positions=[{"account_id": "a", "instrument_id": "LIN", "quantity": 2}],
        exchange_toml=EXCHANGE_TOML))
    pnl = stress.pnl_matrix(snap, _scen(snap, ["up", "depeg"], [{"BTC": 0.1}, {"BTC": 0.1, "USDC": -0.1}]))
    np.testing.assert_allclose(pnl.loc["a"].to_numpy(), [61.0, 0.9 * 61.0], rtol=1e-12)


def test_inverse_and_linear_options_value_per_spec(tmp_path):
    # Inverse option: q * c * V / S coins, worth q * c * V USD at S. Linear: q * c * V USDC.
    T = 32 / 365
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 90_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "BTC-25DEC26-100000-C", "mark_iv": 0.5},
                     {"instrument_id": "LINPUT", "kind": "option", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.1, "expiry": "2026-12-25T08:00:00Z", "strike": 80_000, "option_type": "put", "mark_iv": 0.6}],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 0.0}],
        positions=[{"account_id": "a", "instrument_id": "BTC-25DEC26-100000-C", "quantity": 3},
                   {"account_id": "a", "instrument_id": "LINPUT", "quantity": -5}],
        exchange_toml=EXCHANGE_TOML))
    res = stress.run(snap, _scen(snap, ["down"], [{"BTC": -0.2}], vol=[{"BTC": 0.1}], horizon=np.array([2.0])))
    call0 = black_scholes(90_000.0, 100_000.0, T, 0.5, 0.0, True)
    put0 = black_scholes(90_000.0, 80_000.0, T, 0.6, 0.0, False)
    eq0 = 3 * call0 - 5 * 0.1 * put0
    np.testing.assert_allclose(res.accounts.equity[0], eq0, rtol=1e-12)
    call1 = black_scholes(72_000.0, 100_000.0, T - 2 / 365, 0.6, 0.0, True)
    put1 = black_scholes(72_000.0, 80_000.0, T - 2 / 365, 0.7, 0.0, False)
    np.testing.assert_allclose(res.accounts.pnl_worst[0], 3 * call1 - 0.5 * put1 - eq0, rtol=1e-12)


def test_horizon_beyond_expiry_values_option_at_intrinsic(tmp_path):
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS,
        instruments=[{"instrument_id": "BTC-27NOV26-500-C", "mark_iv": 0.5}],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 0.0}],
        positions=[{"account_id": "a", "instrument_id": "BTC-27NOV26-500-C", "quantity": 1}],
        exchange_toml=EXCHANGE_TOML))
    pnl = stress.pnl_matrix(snap, _scen(snap, ["later"], [{"BTC": 0.0}], horizon=np.array([30.0])))
    eq0 = float(black_scholes(600.0, 500.0, 4 / 365, 0.5, 0.0, True))
    np.testing.assert_allclose(pnl.loc["a", "later"], 100.0 - eq0, rtol=0, atol=1e-9)


def test_collateral_haircuts_apply_to_positive_net_amounts_only(tmp_path):
    # 1 BTC at 600 with a 5% haircut, 100 USDC borrowed: equity 500, collateral 570 - 100.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS,
        instruments=[{"instrument_id": "BTC-PERPETUAL", "mark_price": 600.0}],
        balances=[{"account_id": "a", "asset": "BTC", "amount": 1.0}, {"account_id": "a", "asset": "USDC", "amount": -100.0},
                  {"account_id": "b", "asset": "BTC", "amount": -0.5}],
        positions=[{"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": 1}],
        exchange_toml=EXCHANGE_TOML))
    res = stress.run(snap, _scen(snap, ["flat"], [{}]))
    acc = res.accounts.set_index("account_id")
    np.testing.assert_allclose(acc.loc["a", ["equity", "collateral_value"]].astype(float), [500.0, 470.0], rtol=1e-12)
    # A negative net amount is valued without a haircut.
    np.testing.assert_allclose(acc.loc["b", "collateral_value"], -300.0, rtol=1e-12)


def test_standard_margin_hand_computed(tmp_path):
    # Short 2 BTC calls K=100000 at S=90000 (Deribit standard option margin):
    #   IM = 2 * (max(0.15 - 10000/90000, 0.10) * 90000 + mark) = 2 * (9000 + mark)
    #   MM = 2 * (0.075 * 90000 + mark) = 2 * (6750 + mark)
    # Long 10 BTC-PERPETUAL ($10 each, inverse): IM 2% and MM 1% of $100.
    # Long 0.5 linear perp (0.1 BTC per contract): notional 0.5 * 0.1 * 90000 = 4500 USD.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 90_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "BTC-25DEC26-100000-C", "mark_iv": 0.5},
                     {"instrument_id": "BTC-PERPETUAL", "mark_price": 90_100.0},
                     {"instrument_id": "LIN", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.1, "mark_price": 90_050.0, "im_rate": 0.05, "mm_rate": 0.03}],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1e6}],
        positions=[{"account_id": "a", "instrument_id": "BTC-25DEC26-100000-C", "quantity": -2},
                   {"account_id": "a", "instrument_id": "BTC-PERPETUAL", "quantity": 10},
                   {"account_id": "a", "instrument_id": "LIN", "quantity": 0.5}],
        exchange_toml=EXCHANGE_TOML))
    res = stress.run(snap, _scen(snap, ["flat"], [{}]))
    mark = float(black_scholes(90_000.0, 100_000.0, 32 / 365, 0.5, 0.0, True))
    im = 2 * (9000 + mark) + 0.02 * 100 + 0.05 * 4500
    mm = 2 * (6750 + mark) + 0.01 * 100 + 0.03 * 4500
    np.testing.assert_allclose(res.accounts.initial_margin[0], im, rtol=1e-12)
    np.testing.assert_allclose(res.accounts.maintenance_margin[0], mm, rtol=1e-12)


def test_short_put_margin_floors_im_at_mm(tmp_path):
    # Deep ITM short put, K=200000 at S=90000: mark in coins > 1, so MM = max(0.075 S, 0.075 m) + m.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 90_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "BTC-25DEC26-200000-P", "mark_iv": 0.5}],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 1e6}],
        positions=[{"account_id": "a", "instrument_id": "BTC-25DEC26-200000-P", "quantity": -1}],
        exchange_toml=EXCHANGE_TOML))
    res = stress.run(snap, _scen(snap, ["flat"], [{}]))
    m = float(black_scholes(90_000.0, 200_000.0, 32 / 365, 0.5, 0.0, False))
    mm = max(0.075 * 90_000, 0.075 * m) + m
    im = max(max(0.15 - 0.0, 0.10) * 90_000 + m, mm)
    np.testing.assert_allclose(res.accounts.maintenance_margin[0], mm, rtol=1e-12)
    np.testing.assert_allclose(res.accounts.initial_margin[0], im, rtol=1e-12)


def test_bad_debt_and_insurance_waterfall_hand_computed(tmp_path):
    # Account a: 10 BTC-PERPETUAL long ($10 face, mark 600) on 0.01 BTC collateral.
    # BTC -50%: P&L = 100 * (1/600 - 1/300) = -1/6 BTC; equity = (0.01 - 1/6) * 300 = -47 USD.
    # Fund: 1,000,000 USDC + 10 BTC at 300 = 1,003,000 USD; after: 1,002,953; nothing socialised.
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS,
        instruments=[{"instrument_id": "BTC-PERPETUAL", "mark_price": 600.0}],
        balances=[{"account_id": "a", "asset": "BTC", "amount": 0.01}, {"account_id": "b", "asset": "USDC", "amount": 1e4}],
        positions=[{"account_id": "a", "instrument_id": "BTC-PERPETUAL", "quantity": 10},
                   {"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -10}],
        exchange_toml=EXCHANGE_TOML))
    res = stress.run(snap, _scen(snap, ["crash"], [{"BTC": -0.5}]))
    row = res.scenarios.iloc[0]
    np.testing.assert_allclose(row.bad_debt, 47.0, rtol=1e-12)
    np.testing.assert_allclose(row.insurance_fund_before, 1_003_000.0, rtol=1e-12)
    np.testing.assert_allclose(row.insurance_fund_after, 1_003_000.0 - 47.0, rtol=1e-12)
    assert row.socialized_loss == 0.0 and row.accounts_liquidatable == 1
    assert res.summary["worst_scenario"] == "crash" and res.summary["worst_bad_debt"] == pytest.approx(47.0)


@pytest.mark.parametrize("mark", [100_000.0, 4_000.0, 97_531.37])
def test_a_future_at_its_mark_is_worth_exactly_zero(tmp_path, mark):
    """An account holding exactly its maintenance margin in collateral is not liquidatable
    (SPEC section 2: liquidatable when collateral < MM). ``F * S / S`` rounded a few ulps off
    the mark, which made a perpetual at its mark worth -7e-12 USD and the account liquidatable;
    100,000 is a mark that rounded so."""
    notional = 0.5 * mark
    mm = 0.01 * notional  # the default future_mm_rate
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": mark, "haircut": 0.0}],
        instruments=[{"instrument_id": "LIN", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.5, "mark_price": mark}],
        balances=[{"account_id": "short", "asset": "USDC", "amount": mm}, {"account_id": "long", "asset": "USDC", "amount": mm}],
        positions=[{"account_id": "short", "instrument_id": "LIN", "quantity": -1},
                   {"account_id": "long", "instrument_id": "LIN", "quantity": 1}],
        exchange_toml=EXCHANGE_TOML))
    res = stress.run(snap, _scen(snap, ["calm", "up"], [{}, {"BTC": 0.1}]))
    acc = res.accounts.set_index("account_id")
    assert (acc.equity == mm).all() and (acc.collateral_value == mm).all()
    np.testing.assert_allclose(acc.maintenance_margin, mm, rtol=1e-15)
    assert not acc.liquidatable.any()
    pnl = stress.pnl_matrix(snap, _scen(snap, ["calm"], [{}]))
    assert (pnl.to_numpy() == 0.0).all()
