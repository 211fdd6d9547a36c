"""Margin models (docs/margin.md) on hand-made snapshots, against hand-computed numbers.

Option values come from an independent Black-Scholes written here with scipy (not the
project's pricer); everything else is written out as arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from typer.testing import CliRunner

import stress
from stress import margin
from stress.cli import app

from .conftest import EXCHANGE_TOML, write_snapshot

S = 100_000.0  # BTC price, USD
AS_OF = datetime(2026, 11, 23, 8, tzinfo=UTC)
ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": S, "haircut": 0.0}]
# The risk matrix of the defaults for BTC: +-16% in 4 buckets each side, 3 vol scenarios.
MOVES = [-0.16, -0.12, -0.08, -0.04, 0.0, 0.04, 0.08, 0.12, 0.16]
EXTENDED = [-0.66, -0.33, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]


def bs(spot, strike, T, vol, call):
    """Black-Scholes per unit of underlying, rate 0 (Hull, ch. 15)."""
    d1 = (math.log(spot / strike) + 0.5 * vol * vol * T) / (vol * math.sqrt(T))
    d2 = d1 - vol * math.sqrt(T)
    if call:
        return spot * norm.cdf(d1) - strike * norm.cdf(d2)
    return strike * norm.cdf(-d2) - spot * norm.cdf(-d1)


def years_to(expiry: datetime) -> float:
    return (expiry - AS_OF).total_seconds() / (365 * 86400)


def toml(extra: str = "") -> str:
    return EXCHANGE_TOML.replace("[margin]\n", "[margin]\n" + extra)


def snapshot(tmp_path, instruments, positions, extra="", fmt="csv"):
    accounts = sorted({p["account_id"] for p in positions})
    balances = [{"account_id": a, "asset": "USDC", "amount": 1e7} for a in accounts]
    return stress.load_snapshot(write_snapshot(tmp_path, assets=ASSETS, instruments=instruments, balances=balances,
                                               positions=positions, exchange_toml=toml(extra), fmt=fmt))


def by_account(snap, model):
    return margin.account_margin(snap, model)["accounts"].set_index("account_id")


LIN = {"instrument_id": "LIN", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
       "contract_size": 0.1, "mark_price": 100_050.0}
LINC = {"instrument_id": "LINC", "kind": "option", "underlying": "BTC", "settlement": "USDC", "contract_size": 0.1,
        "expiry": "2026-12-25T08:00:00Z", "strike": 110_000, "option_type": "call", "mark_iv": 0.6}


# --------------------------------------------------------------------------------------------
# Standard model


def test_standard_margin_of_each_instrument_kind_hand_computed(tmp_path):
    T = years_to(datetime(2026, 12, 25, 8, tzinfo=UTC))  # 32 days
    snap = snapshot(tmp_path, [
        LIN, LINC,
        {"instrument_id": "BTC-PERPETUAL", "mark_price": 100_100.0},
        {"instrument_id": "BTC-25DEC26-90000-P", "mark_iv": 0.5},
    ], [
        {"account_id": "lin_future", "instrument_id": "LIN", "quantity": -3},
        {"account_id": "inv_future", "instrument_id": "BTC-PERPETUAL", "quantity": 250},
        {"account_id": "lin_call", "instrument_id": "LINC", "quantity": -4},
        {"account_id": "inv_put", "instrument_id": "BTC-25DEC26-90000-P", "quantity": -2},
    ])
    acc = by_account(snap, "standard")
    # Linear future: notional 3 * 0.1 * 100,000 = 30,000 USD; IM 2%, MM 1%.
    np.testing.assert_allclose(acc.loc["lin_future", ["initial_margin", "maintenance_margin"]].astype(float), [600.0, 300.0], rtol=1e-12)
    # Inverse future: 250 contracts of USD 10 face = 2,500 USD notional.
    np.testing.assert_allclose(acc.loc["inv_future", ["initial_margin", "maintenance_margin"]].astype(float), [50.0, 25.0], rtol=1e-12)
    # Short linear call, 4 contracts of 0.1 BTC, K = 110,000: OTM 10,000 = 10% of S, so the IM
    # rate is max(0.15 - 0.10, 0.10) = 0.10: IM = 0.4 * (10,000 + m), MM = 0.4 * (7,500 + m).
    m = bs(S, 110_000, T, 0.6, True)
    np.testing.assert_allclose(acc.loc["lin_call", "initial_margin"], 0.4 * (10_000 + m), rtol=1e-10)
    np.testing.assert_allclose(acc.loc["lin_call", "maintenance_margin"], 0.4 * (7_500 + m), rtol=1e-10)
    # Short inverse put K = 90,000 (OTM by 10,000): IM = 2 * max(10,000 + m, MM),
    # MM = 2 * (max(0.075 * S, 0.075 * m) + m).
    m = bs(S, 90_000, T, 0.5, False)
    mm = max(7_500, 0.075 * m) + m
    np.testing.assert_allclose(acc.loc["inv_put", "maintenance_margin"], 2 * mm, rtol=1e-10)
    np.testing.assert_allclose(acc.loc["inv_put", "initial_margin"], 2 * max(10_000 + m, mm), rtol=1e-10)


TIERS = "future_tiers = [[50_000, 0.01, 0.005], [250_000, 0.02, 0.01], [1_000_000, 0.05, 0.025]]\n"


def test_risk_limit_tiers_apply_the_rates_of_the_tier_the_notional_falls_in(tmp_path):
    lin1 = {**LIN, "instrument_id": "LIN1", "contract_size": 1.0}
    snap = snapshot(tmp_path, [lin1, {"instrument_id": "BTC-PERPETUAL", "mark_price": 100_100.0}], [
        {"account_id": "at_bound", "instrument_id": "LIN1", "quantity": 0.5},  # 50,000: tier 1 (bound inclusive)
        {"account_id": "above", "instrument_id": "LIN1", "quantity": -0.6},  # 60,000: tier 2
        {"account_id": "beyond", "instrument_id": "LIN1", "quantity": 20},  # 2,000,000: last tier
        {"account_id": "inverse", "instrument_id": "BTC-PERPETUAL", "quantity": 6_000},  # 60,000 USD face
    ], extra=TIERS)
    acc = by_account(snap, "standard")
    got = acc[["initial_margin", "maintenance_margin"]].astype(float)
    np.testing.assert_allclose(got.loc["at_bound"], [0.01 * 50_000, 0.005 * 50_000], rtol=1e-12)
    np.testing.assert_allclose(got.loc["above"], [0.02 * 60_000, 0.01 * 60_000], rtol=1e-12)
    np.testing.assert_allclose(got.loc["beyond"], [0.05 * 2_000_000, 0.025 * 2_000_000], rtol=1e-12)
    np.testing.assert_allclose(got.loc["inverse"], [0.02 * 60_000, 0.01 * 60_000], rtol=1e-12)


def test_tiers_per_underlying_and_instrument_rates_override_tiers(tmp_path):
    lin1 = {**LIN, "instrument_id": "LIN1", "contract_size": 1.0}
    lin2 = {**lin1, "instrument_id": "LIN2", "im_rate": 0.03}
    extra = "future_tiers = { BTC = [[50_000, 0.01, 0.005], [1e9, 0.04, 0.02]], default = [[1e9, 0.5, 0.4]] }\n"
    snap = snapshot(tmp_path, [lin1, lin2], [
        {"account_id": "a", "instrument_id": "LIN1", "quantity": 1},  # 100,000: BTC tier 2
        {"account_id": "b", "instrument_id": "LIN2", "quantity": 1},  # im_rate column wins; MM from tiers
    ], extra=extra)
    got = by_account(snap, "standard")[["initial_margin", "maintenance_margin"]].astype(float)
    np.testing.assert_allclose(got.loc["a"], [4_000.0, 2_000.0], rtol=1e-12)
    np.testing.assert_allclose(got.loc["b"], [3_000.0, 2_000.0], rtol=1e-12)


def test_tier_margin_is_monotone_in_position_size():
    bound = np.array([50_000.0, 250_000.0, 1_000_000.0])
    im, mm = np.array([0.01, 0.02, 0.05]), np.array([0.005, 0.01, 0.025])
    notional = np.linspace(0, 3e6, 3001)
    got_im, got_mm = (np.asarray(x) for x in margin.tier_margin(notional, np.broadcast_to(bound, (3001, 3)),
                                                                 np.broadcast_to(im, (3001, 3)), np.broadcast_to(mm, (3001, 3))))
    assert (np.diff(got_im) >= 0).all() and (np.diff(got_mm) >= 0).all()
    # The docstring's example: 100,000 USD is in tier 2.
    np.testing.assert_allclose([got_im[100], got_mm[100]], [0.02 * 100_000, 0.01 * 100_000])


@pytest.mark.parametrize("tiers, message", [
    ("future_tiers = [[50_000, 0.01, 0.005], [40_000, 0.02, 0.01]]\n", "bounds must increase"),
    ("future_tiers = [[50_000, 0.02, 0.01], [90_000, 0.01, 0.005]]\n", "must not decrease"),
    ("future_tiers = [[50_000, 0.01, 0.02]]\n", "mm_rate <= im_rate"),
    ("future_tiers = [[50_000, 0.01]]\n", "is not [notional_up_to_usd"),
    ("future_tiers = 0.02\n", "must be a list"),
    ("future_tiers = { DOGE = [[1e6, 0.1, 0.05]] }\n", "unknown asset 'DOGE'"),
    ("price_range = { BTC = 1.5 }\n", "outside"),
    ("buckets_count = 2.5\n", "whole number"),
    ("extended_moves = [-1.0, 0.5]\n", "outside"),
    ("mm_factor = 0\n", "outside"),
    ("pnl_offset = { NOPE = 0.5 }\n", "unknown asset 'NOPE'"),
    ("price_ranges = 0.1\n", "unknown key"),
])
def test_bad_margin_configuration_is_an_input_error_naming_the_key(tmp_path, tiers, message):
    with pytest.raises(stress.InputError) as exc:
        # Asset names are checked when the table is resolved against the snapshot's assets.
        snap = snapshot(tmp_path, [LIN], [{"account_id": "a", "instrument_id": "LIN", "quantity": 1}], extra=tiers)
        margin.account_margin(snap, "standard")
    text = str(exc.value)
    key = tiers.split(" =")[0]
    assert text.startswith("exchange.toml [margin], column " + key) and message in text, text


# --------------------------------------------------------------------------------------------
# Portfolio model


def test_portfolio_margin_of_a_linear_future_is_the_worst_grid_loss_plus_roll(tmp_path):
    snap = snapshot(tmp_path, [LIN], [{"account_id": "a", "instrument_id": "LIN", "quantity": 5}])
    res = margin.account_margin(snap, "portfolio")
    # P&L at move x: 5 * 0.1 * (F * (1 + x) - F) = 0.5 * 100,050 * x; worst at -16%:
    rm = 0.5 * 100_050 * 0.16  # 8,004; the extended -66% counts 0.03 * 0.5 * 100,050 * 0.66 = 990.5
    roll = 0.01 * 5 * 0.1 * S  # perpetual: min_annualised_move 1% of notional 50,000
    acc = res["accounts"].set_index("account_id").loc["a"]
    np.testing.assert_allclose(acc.initial_margin, rm + roll, rtol=1e-12)
    np.testing.assert_allclose(acc.maintenance_margin, 0.8 * (rm + roll), rtol=1e-12)
    row = res["underlyings"].iloc[0]
    np.testing.assert_allclose([row.risk_matrix_margin, row.roll_shock, row.delta_shock], [8_004.0, 500.0, 0.0], rtol=1e-12)
    assert row.grid_point == "BTC -16% vol up" and acc.grid_point == "BTC -16% vol up"


def test_portfolio_margin_of_a_short_inverse_future_in_usd(tmp_path):
    # Short 1,000 BTC-26MAR27 (USD 10 face, mark 100,500). In USD at the grid's coin price:
    # P&L = q * c * (1/F - 1/F') * S' = -10,000 * S * x / F (F' = F (1 + x), S' = S (1 + x)).
    F = 100_500.0
    snap = snapshot(tmp_path, [{"instrument_id": "BTC-26MAR27", "mark_price": F}],
                    [{"account_id": "a", "instrument_id": "BTC-26MAR27", "quantity": -1_000}])
    T = years_to(datetime(2027, 3, 26, 8, tzinfo=UTC))  # 123 days
    grid = [-10_000 * (1 / F - 1 / (F * (1 + x))) * S * (1 + x) for x in MOVES]
    ext = [0.03 * -10_000 * (1 / F - 1 / (F * (1 + x))) * S * (1 + x) for x in EXTENDED]
    rm = -min(grid + ext)
    np.testing.assert_allclose(rm, 10_000 * S * 0.16 / F, rtol=1e-12)  # +16% drives: 1,592.04
    roll = 10_000 * max(0.01, 0.075 * T)  # 0.075 * 123/365 = 2.53% > 1%
    acc = by_account(snap, "portfolio").loc["a"]
    np.testing.assert_allclose(acc.initial_margin, rm + roll, rtol=1e-12)
    np.testing.assert_allclose(acc.maintenance_margin, 0.8 * (rm + roll), rtol=1e-12)
    assert acc.grid_point == "BTC +16% vol up"


def test_portfolio_margin_of_a_short_option_against_independent_black_scholes(tmp_path):
    T = years_to(datetime(2026, 12, 25, 8, tzinfo=UTC))  # 32 days: long-term vega power
    iv, K, q = 0.5, 110_000.0, -2
    snap = snapshot(tmp_path, [{"instrument_id": "BTC-25DEC26-110000-C", "mark_iv": iv}],
                    [{"account_id": "a", "instrument_id": "BTC-25DEC26-110000-C", "quantity": q}])
    x = (30 / 32) ** 0.13
    vols = {"up": max(iv * (1 + 0.5 * x), 0.5), "unchanged": iv, "down": max(iv * (1 - 0.25 * x), 0.01)}
    v0 = bs(S, K, T, iv, True)
    # An inverse option's USD value is q * c * V (coins q * c * V / S' at price S'), so the USD
    # P&L is q * (V' - V).
    losses = {}
    for m in MOVES:
        for name, vol in vols.items():
            losses[(m, name, False)] = -q * (bs(S * (1 + m), K, T, vol, True) - v0)
    for m in EXTENDED:
        losses[(m, "up", True)] = 0.03 * -q * (bs(S * (1 + m), K, T, vols["up"], True) - v0)
    worst = max(losses, key=losses.get)
    acc = by_account(snap, "portfolio").loc["a"]
    np.testing.assert_allclose(acc.initial_margin, losses[worst], rtol=1e-9)
    np.testing.assert_allclose(acc.maintenance_margin, 0.8 * losses[worst], rtol=1e-9)
    # The extended table exists for such short out-of-the-money options: at +500% the call
    # loses about 2 * (600,000 - 110,000), and 3% of that beats the +16% vol-up loss.
    assert worst == (5.0, "up", True) and acc.grid_point == "BTC +500% vol up (extended)"
    assert losses[worst] > losses[(0.16, "up", False)] > losses[(0.16, "unchanged", False)]


def test_delta_shock_charges_net_delta_beyond_the_threshold(tmp_path):
    snap = snapshot(tmp_path, [LIN], [{"account_id": "a", "instrument_id": "LIN", "quantity": 5}],
                    extra="delta_shock_threshold = 1_000\nmax_delta_shock = 0.1\n")
    row = margin.account_margin(snap, "portfolio")["underlyings"].iloc[0]
    # USD delta of 5 contracts of 0.1 BTC at F = 100,050: dV/dS * S = 0.5 * 100,050 = 50,025.
    np.testing.assert_allclose(row.net_delta_usd, 50_025.0, rtol=1e-12)
    np.testing.assert_allclose(row.delta_shock, 0.1 * (50_025 - 1_000), rtol=1e-12)
    np.testing.assert_allclose(row.initial_margin, 8_004 + 500 + 4_902.5, rtol=1e-12)


def test_gains_offset_other_settlement_assets_at_pnl_offset():
    # One block (account, underlying) of two sub-blocks (settlement assets) over 2 grid points.
    pnl = np.array([[-100.0, 50.0], [80.0, -30.0]])  # position = sub-block here
    r = margin.portfolio_requirements(
        pnl, np.zeros(2), np.zeros(2), np.array([0, 1]), np.array([0, 0]), np.array([0.5, 0.5]),
        np.array([1.0]), np.array([0.0]), np.array([0.0]), 0.8, np.array([False, False]), n_sub=2, n_block=1)
    # Gains count at half: grid point 0: -100 + 0.5 * 80 = -60; point 1: 0.5 * 50 - 30 = -5.
    np.testing.assert_allclose(r["risk_matrix"], [60.0])
    assert int(r["worst"][0]) == 0


def _book(qty_calls, qty_perp, iv=0.5):
    return ([{"instrument_id": "BTC-25DEC26-100000-C", "mark_iv": iv}, {"instrument_id": "BTC-PERPETUAL", "mark_price": S}],
            [{"account_id": "a", "instrument_id": "BTC-25DEC26-100000-C", "quantity": qty_calls},
             {"account_id": "a", "instrument_id": "BTC-PERPETUAL", "quantity": qty_perp}])


def test_delta_hedged_short_calls_need_less_portfolio_than_standard_margin(tmp_path):
    T = years_to(datetime(2026, 12, 25, 8, tzinfo=UTC))
    d1 = (0.5 * 0.5 * 0.5 * T) / (0.5 * math.sqrt(T))
    # 10 short ATM calls have a USD delta of -10 * N(d1) * S; a USD 10 perpetual at F = S has 10.
    hedge = round(10 * norm.cdf(d1) * S / 10)
    snap = snapshot(tmp_path, *_book(-10, hedge))
    std, pm = by_account(snap, "standard").loc["a"], by_account(snap, "portfolio").loc["a"]
    assert pm.initial_margin < std.initial_margin and pm.maintenance_margin < std.maintenance_margin
    assert abs(margin.account_margin(snap, "portfolio")["underlyings"].net_delta_usd[0]) < 10.0


def test_naked_short_option_needs_more_margin_after_a_vol_up_shock(tmp_path):
    calm = snapshot(tmp_path / "calm", *_book(-10, 1, iv=0.5))
    shocked = snapshot(tmp_path / "shocked", *_book(-10, 1, iv=0.8))
    for model in ("portfolio", "standard"):
        assert by_account(shocked, model).loc["a"].maintenance_margin > by_account(calm, model).loc["a"].maintenance_margin
    assert margin.account_margin(calm, "portfolio")["underlyings"].vol_scenario[0] == "up"


def test_portfolio_margin_is_proportional_to_size_below_the_thresholds(tmp_path):
    mm = []
    for k, scale in enumerate((1.0, 2.0, 3.5)):
        snap = snapshot(tmp_path / str(k), [LIN, LINC, {"instrument_id": "BTC-25DEC26-90000-P", "mark_iv": 0.5}], [
            {"account_id": "a", "instrument_id": "LIN", "quantity": 3 * scale},
            {"account_id": "a", "instrument_id": "LINC", "quantity": -7 * scale},
            {"account_id": "a", "instrument_id": "BTC-25DEC26-90000-P", "quantity": 2 * scale},
        ])
        mm.append(by_account(snap, "portfolio").loc["a", "maintenance_margin"])
    assert mm[0] < mm[1] < mm[2]
    np.testing.assert_allclose(np.array(mm) / mm[0], [1.0, 2.0, 3.5], rtol=1e-10)


def test_portfolio_margin_of_a_merged_book_is_at_most_the_sum(tmp_path):
    insts = [LIN, LINC, {"instrument_id": "BTC-PERPETUAL", "mark_price": S},
             {"instrument_id": "BTC-25DEC26-90000-P", "mark_iv": 0.5}]
    a = {"LIN": 2, "LINC": -5, "BTC-25DEC26-90000-P": -1}
    b = {"LIN": -1, "BTC-PERPETUAL": 4_000, "BTC-25DEC26-90000-P": 3}
    merged = {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}
    rows = [{"account_id": name, "instrument_id": i, "quantity": q}
            for name, book in (("a", a), ("b", b), ("ab", merged)) for i, q in book.items() if q]
    acc = by_account(snapshot(tmp_path, insts, rows), "portfolio")
    assert acc.loc["ab", "initial_margin"] <= acc.loc["a", "initial_margin"] + acc.loc["b", "initial_margin"]
    assert acc.loc["ab", "initial_margin"] < acc.loc["a", "initial_margin"] + acc.loc["b", "initial_margin"] - 1.0


def test_margin_does_not_depend_on_positions_row_order_or_file_format(tmp_path):
    insts = [LIN, LINC, {"instrument_id": "BTC-PERPETUAL", "mark_price": S},
             {"instrument_id": "BTC-25DEC26-90000-P", "mark_iv": 0.5}]
    rng = np.random.default_rng(3)
    rows = [{"account_id": f"acc{k}", "instrument_id": i["instrument_id"], "quantity": float(rng.integers(-9, 10) or 1)}
            for k in range(12) for i in insts if rng.random() < 0.7]
    shuffled = [rows[j] for j in rng.permutation(len(rows))]
    first = snapshot(tmp_path / "a", insts, rows)
    second = snapshot(tmp_path / "b", insts, shuffled, fmt="parquet")
    for model in ("standard", "portfolio"):  # var needs a price history: tests/test_margin_var.py
        x, y = margin.account_margin(first, model), margin.account_margin(second, model)
        pd.testing.assert_frame_equal(x["accounts"], y["accounts"], rtol=1e-12)
        pd.testing.assert_frame_equal(x["underlyings"], y["underlyings"], rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The command


def test_margin_command_prints_accounts_and_writes_parquet(tmp_path):
    folder = tmp_path / "snap"
    snapshot(folder, [LIN, LINC], [{"account_id": "a", "instrument_id": "LIN", "quantity": 5},
                                   {"account_id": "b", "instrument_id": "LINC", "quantity": -4}])
    target = tmp_path / "out" / "margin.parquet"
    res = CliRunner().invoke(app, ["margin", str(folder), "--model", "portfolio", "--out", str(target)])
    assert res.exit_code == 0, res.output
    assert "BTC -16% vol up" in res.output
    acc = pd.read_parquet(target).set_index("account_id")
    np.testing.assert_allclose(acc.loc["a", "initial_margin"], 8_004 + 500, rtol=1e-12)
    und = pd.read_parquet(target.with_suffix(".underlyings.parquet"))
    assert list(und.account_id) == ["a", "b"] and set(und.underlying) == {"BTC"}

    # One account, standard model: IM = 0.02 * 5 * 0.1 * 100,000 = 1,000 USD, MM = 500 USD.
    one = CliRunner().invoke(app, ["margin", str(folder), "--account", "a"])
    assert one.exit_code == 0, one.output
    line = next(row for row in one.output.splitlines() if "│ a " in row)
    assert [c.strip() for c in line.split("│")[2:4]] == ["1,000", "500"]
    assert "│ b " not in one.output


@pytest.mark.parametrize("args, message", [
    (["--account", "nobody"], "unknown account 'nobody'"),
    (["--model", "span"], "'span' is not one of standard, portfolio, var"),
])
def test_margin_command_rejects_unknown_account_or_model_with_exit_2(tmp_path, args, message):
    folder = tmp_path / "snap"
    snapshot(folder, [LIN], [{"account_id": "a", "instrument_id": "LIN", "quantity": 5}])
    target = tmp_path / "m.parquet"
    res = CliRunner().invoke(app, ["margin", str(folder), *args, "--out", str(target)])
    assert res.exit_code == 2 and message in res.output
    assert not target.exists()


def test_stress_run_applies_risk_limit_tiers_at_the_snapshot_and_in_every_scenario(tmp_path):
    lin1 = {**LIN, "instrument_id": "LIN1", "contract_size": 1.0}
    positions = [{"account_id": "at_bound", "instrument_id": "LIN1", "quantity": 0.5},
                 {"account_id": "above", "instrument_id": "LIN1", "quantity": -0.6},
                 {"account_id": "beyond", "instrument_id": "LIN1", "quantity": 20}]
    snap = snapshot(tmp_path / "a", [lin1], positions, extra=TIERS)
    (tmp_path / "s.toml").write_text('[[scenario]]\nname = "flat"\n')
    res = stress.run(snap, stress.load_scenarios(tmp_path / "s.toml", snap)).accounts.set_index("account_id")
    want = by_account(snap, "standard")
    np.testing.assert_allclose(res.loc[want.index, "initial_margin"], want.initial_margin.astype(float), rtol=1e-12)
    np.testing.assert_allclose(res.loc[want.index, "maintenance_margin"], want.maintenance_margin.astype(float), rtol=1e-12)

    # Long 0.45 BTC (45,000 USD: tier 1, MM 0.5% = 225) on -8,600 USDC. BTC +20%: F' = 120,060,
    # P&L 0.45 x 20,010 = 9,004.5, collateral 404.5; the notional 54,000 is now in tier 2, MM
    # 1% = 540 > 404.5: liquidatable, shortfall 135.5 (the first tier's 270 would not be).
    folder = write_snapshot(tmp_path / "b", assets=ASSETS, instruments=[lin1],
                            balances=[{"account_id": "x", "asset": "USDC", "amount": -8_600.0}],
                            positions=[{"account_id": "x", "instrument_id": "LIN1", "quantity": 0.45}],
                            exchange_toml=toml(TIERS))
    snap = stress.load_snapshot(folder)
    (tmp_path / "up.toml").write_text('[[scenario]]\nname = "up-20"\nmoves = { BTC = 0.2 }\n')
    res = stress.run(snap, stress.load_scenarios(tmp_path / "up.toml", snap))
    assert res.accounts.maintenance_margin[0] == pytest.approx(225.0, rel=1e-12)
    assert res.accounts.shortfall_worst[0] == pytest.approx(135.5, rel=1e-9)
    assert res.scenarios.accounts_liquidatable[0] == 1


def _pm_book(folder, price: float, marks: dict, iv_shift: float, as_of: str):
    """A mixed BTC book under the portfolio model, at BTC = ``price`` (futures marks ``marks``,
    option vols shifted by ``iv_shift``), valued at ``as_of``; balances of 1,000 USDC only."""
    insts = [{**LIN, "mark_price": marks["LIN"]}, {**LINC, "mark_iv": LINC["mark_iv"] + iv_shift},
             {"instrument_id": "BTC-PERPETUAL", "mark_price": marks["BTC-PERPETUAL"]},
             {"instrument_id": "BTC-25DEC26-90000-P", "mark_iv": 0.5 + iv_shift}]
    rows = [{"account_id": "a", "instrument_id": "LIN", "quantity": 3},
            {"account_id": "a", "instrument_id": "LINC", "quantity": -4},
            {"account_id": "a", "instrument_id": "BTC-25DEC26-90000-P", "quantity": -2},
            {"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -2500},
            {"account_id": "b", "instrument_id": "LIN", "quantity": 2}]
    assets = [{**ASSETS[0]}, {**ASSETS[1], "price": price}]
    text = toml('model = "portfolio"\n').replace("as_of = 2026-11-23T08:00:00Z", f"as_of = {as_of}")
    return stress.load_snapshot(write_snapshot(
        folder, assets=assets, instruments=insts, positions=rows, exchange_toml=text,
        balances=[{"account_id": a, "asset": "USDC", "amount": 1_000.0} for a in ("a", "b")]))


def test_stress_run_recomputes_portfolio_margin_around_every_scenario(tmp_path):
    # The run's margin at a scenario (BTC -10%, vols +0.10, one day later) must be the portfolio
    # margin `stress margin` computes on a snapshot *of that scenario*: prices, marks and vols
    # moved, as_of a day on. With no haircuts and 1,000 USDC each, collateral = equity, so the
    # shortfall there is MM - (equity + P&L).
    marks = {"LIN": 100_050.0, "BTC-PERPETUAL": 100_100.0}
    snap = _pm_book(tmp_path / "now", S, marks, 0.0, "2026-11-23T08:00:00Z")
    (tmp_path / "s.toml").write_text('[[scenario]]\nname = "down"\nmoves = { BTC = -0.1 }\n'
                                     'vol_shift = { BTC = 0.1 }\nhorizon_days = 1\n')
    res = stress.run(snap, stress.load_scenarios(tmp_path / "s.toml", snap))
    acc = res.accounts.set_index("account_id")
    now = by_account(snap, "portfolio")
    np.testing.assert_allclose(acc.maintenance_margin, now.maintenance_margin.astype(float), rtol=1e-10)
    np.testing.assert_allclose(acc.initial_margin, now.initial_margin.astype(float), rtol=1e-10)
    assert res.summary["margin_model"] == "portfolio"

    later = _pm_book(tmp_path / "later", 0.9 * S, {k: 0.9 * v for k, v in marks.items()}, 0.1, "2026-11-24T08:00:00Z")
    mm_there = by_account(later, "portfolio").maintenance_margin.astype(float)
    assert (acc.shortfall_worst > 0).all()
    np.testing.assert_allclose(acc.shortfall_worst + acc.equity + acc.pnl_worst, mm_there, rtol=1e-9)


def test_portfolio_margin_under_stress_does_not_depend_on_chunking_or_tiling(tmp_path):
    marks = {"LIN": 100_050.0, "BTC-PERPETUAL": 100_100.0}
    snap = _pm_book(tmp_path / "snap", S, marks, 0.0, "2026-11-23T08:00:00Z")
    (tmp_path / "s.toml").write_text(
        '[[scenario]]\nname = "crash"\nmoves = { BTC = -0.3 }\nvol_shift = { BTC = 0.3 }\n\n'
        '[[montecarlo]]\nname = "mc"\npaths = 40\nsteps = 3\nhorizon_days = 3\nseed = 5\nvol = { BTC = 0.8 }\n')
    scen = stress.load_scenarios(tmp_path / "s.toml", snap)
    a = stress.run(snap, scen, chunk_size=1)  # 41 scenarios: two tiles of 32 columns
    b = stress.run(snap, scen, chunk_size=2)
    num = lambda df: df.select_dtypes("number")  # noqa: E731
    np.testing.assert_allclose(num(a.accounts), num(b.accounts), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(num(a.scenarios), num(b.scenarios), rtol=1e-12, atol=1e-9)
    assert (a.scenarios.accounts_liquidatable > 0).any()  # the margin decides something here


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_risk_limit_tiers_leave_the_portfolio_model_alone_and_cost_it_nothing(tmp_path, mode):
    # Tiers are the standard model's (docs/margin.md): under the portfolio model the run must
    # not change, and must not compute the tiers' margin only to drop it.
    from stress import engine

    marks = {"LIN": 100_050.0, "BTC-PERPETUAL": 100_100.0}
    plain = _pm_book(tmp_path / "plain", S, marks, 0.0, "2026-11-23T08:00:00Z")
    cfg = {"future_tiers": [[50_000, 0.01, 0.005], [250_000, 0.02, 0.01], [1e15, 0.05, 0.025]]}
    tiered = dataclasses.replace(plain, margin_config={**plain.margin_config, **cfg})
    tiered = dataclasses.replace(tiered, params=margin.resolve(tiered))
    assert np.diff(np.asarray(tiered.params.tier_mm), axis=1).any()  # the tiers are there
    plain, tiered = (dataclasses.replace(s, liquidation_config={"mode": mode}) for s in (plain, tiered))
    (tmp_path / "s.toml").write_text(
        '[[montecarlo]]\nname = "mc"\npaths = 40\nsteps = 3\nhorizon_days = 3\nseed = 5\nvol = { BTC = 0.8 }\n')
    scen = stress.load_scenarios(tmp_path / "s.toml", plain)
    assert engine.tables(tiered, scen)[0].tiers is None
    a, b = stress.run(plain, scen), stress.run(tiered, scen)
    num = lambda df: df.select_dtypes("number")  # noqa: E731
    np.testing.assert_array_equal(num(a.accounts), num(b.accounts))
    np.testing.assert_array_equal(num(a.scenarios), num(b.scenarios))
    assert (a.scenarios.accounts_liquidatable > 0).any()


def test_standard_margin_of_a_snapshot_of_new_size_compiles_a_few_executables(tmp_path, caplog):
    """Every position's margin and every account's haircut are one executable each: run as
    eager operations, each new snapshot size compiled one executable per operation (67 for a
    first ``stress margin``)."""
    import logging

    import jax

    from stress import sample

    for n in (40, 57):
        sample.write(tmp_path / str(n), accounts=n)
    margin.account_margin(stress.load_snapshot(tmp_path / "40"), "standard")
    snap = stress.load_snapshot(tmp_path / "57")
    assert snap.n_positions != stress.load_snapshot(tmp_path / "40").n_positions
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        margin.account_margin(snap, "standard")
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert 0 < len(compiled) <= 3, compiled  # the new size compiles, in at most three executables


@pytest.mark.parametrize("cfg, idle", [
    ({"model": "standard", "future_mm_rate": 0.01, "price_range": 0.5, "mm_factor": 0.3}, ["mm_factor", "price_range"]),
    ({"model": "portfolio", "future_tiers": [[1e6, 0.02, 0.01]], "future_mm_rate": 0.01, "mm_factor": 0.7},
     ["future_mm_rate", "future_tiers"]),
    # the var floor takes the standard initial rates; a short option's is at least its
    # maintenance margin, so option_mm_rate counts there and future_mm_rate does not
    ({"model": "var", "var_history": "h.csv", "future_im_rate": 0.02, "future_mm_rate": 0.01, "option_mm_rate": 0.07,
      "mm_factor": 0.8}, ["future_mm_rate"]),
    ({"model": "portfolio", "price_range": 0.2, "haircut_model": "dynamic", "confidence": 0.99}, []),
])
def test_keys_the_configured_model_does_not_use_are_named(cfg, idle):
    assert margin.idle_keys(cfg) == idle


def test_run_and_validate_note_margin_keys_that_change_nothing(tmp_path):
    snap_dir = tmp_path / "s"
    snapshot(snap_dir, [LIN], [{"account_id": "a", "instrument_id": "LIN", "quantity": 1}],
             extra="price_range = 0.5\nmm_factor = 0.3\n")
    r = CliRunner().invoke(app, ["validate", str(snap_dir)])
    assert r.exit_code == 0
    assert 'note: exchange.toml [margin] mm_factor, price_range: not used by model = "standard"' in r.stderr
    clean = tmp_path / "c"
    snapshot(clean, [LIN], [{"account_id": "a", "instrument_id": "LIN", "quantity": 1}])
    assert "note:" not in CliRunner().invoke(app, ["validate", str(clean)]).stderr
