"""Liquidation: close-out at the first breach, the liquidation fee and where it goes,
checked against hand arithmetic on a two-account book."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import stress
from stress import engine, liquidation, sensitivities
from stress.cli import app

from .conftest import copy_snapshot, write_snapshot

ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}]


def _book(folder, liquidation: str = "", collateral: float = 400_000.0):
    """Long 1000 x 0.5 BTC of a linear perpetual at 50,000 on 400,000 USDC; the short on 5M."""
    toml = f"""as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = {{ USDC = 1000000.0 }}
[margin]
[liquidation]
{liquidation}
"""
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.5, "mark_price": 50_000.0}],
        balances=[{"account_id": "long", "asset": "USDC", "amount": collateral},
                  {"account_id": "short", "asset": "USDC", "amount": 5_000_000.0}],
        positions=[{"account_id": "long", "instrument_id": "P", "quantity": 1000},
                   {"account_id": "short", "instrument_id": "P", "quantity": -1000}],
        exchange_toml=toml))


def _scen(tmp_path, snap):
    (tmp_path / "s.toml").write_text('[[scenario]]\nname = "down-1"\nmoves = { BTC = -0.01 }\n\n'
                                     '[[scenario]]\nname = "down-4"\nmoves = { BTC = -0.04 }\n\n'
                                     '[[scenario]]\nname = "flat"\n')
    return stress.load_scenarios(tmp_path / "s.toml", snap)


def test_liquidation_fee_comes_out_of_remaining_equity_into_the_fund(tmp_path):
    # down-1: F' = 49,500. Long equity 400,000 + 500 x (-500) = 150,000 < MM 1% x 500 x 49,500
    # = 247,500: liquidated. Fee 0.2% x 24,750,000 = 49,500 <= 150,000, so the long ends at
    # 100,500 (P&L -299,500) and the fund gains 49,500.
    # down-4: F' = 48,000, equity -600,000: the fee is capped at 0 and bad debt is 600,000.
    snap = _book(tmp_path / "snap", "fee_rate = 0.002")
    res = stress.run(snap, _scen(tmp_path, snap))
    sc = res.scenarios.set_index("scenario")
    assert sc.fees.to_dict() == pytest.approx({"down-1": 49_500.0, "down-4": 0.0, "flat": 0.0})
    assert sc.loc["down-1", "insurance_fund_after"] == pytest.approx(1_000_000.0 + 49_500.0)
    assert sc.loc["down-4", "bad_debt"] == pytest.approx(600_000.0)
    assert sc.loc["down-4", "insurance_fund_after"] == pytest.approx(400_000.0)
    long = res.accounts.set_index("account_id").loc["long"]
    assert long.pnl_worst == pytest.approx(-1_000_000.0)  # down-4
    assert long.liquidation_cost_worst == pytest.approx(49_500.0)
    pnl = stress.pnl_matrix(snap, _scen(tmp_path, snap))
    assert pnl.loc["long", "down-1"] == pytest.approx(-299_500.0)
    # conservation: accounts' P&L + fees (+ closed-out P&L, none here) = positions held to the end (0)
    np.testing.assert_allclose(pnl.sum(axis=0), sc.pnl_total, atol=1e-6)
    np.testing.assert_allclose(sc.pnl_total + sc.fees + sc.pnl_closed_out, 0.0, atol=1e-6)


def test_without_a_fee_the_close_out_costs_nothing(tmp_path):
    snap = _book(tmp_path / "snap")
    res = stress.run(snap, _scen(tmp_path, snap))
    assert (res.scenarios.fees == 0).all() and (res.accounts.liquidation_cost_worst == 0).all()
    assert res.scenarios.set_index("scenario").loc["down-1", "accounts_liquidatable"] == 1


@pytest.mark.parametrize("text, column", [("fee_rate = 1.5", "fee_rate"), ("fee_rate = true", "fee_rate"),
                                          ("impact = 0.1", "impact")])
def test_bad_liquidation_keys_fail_at_load(tmp_path, text, column):
    with pytest.raises(stress.InputError) as err:
        _book(tmp_path / "snap", text)
    assert (err.value.file, err.value.row, err.value.column) == ("exchange.toml", "[liquidation]", column)


def test_a_path_closes_out_at_the_breach_pays_the_fee_and_hands_on_the_recovery(tmp_path):
    # 50,000 -> 49,500 -> 50,500: the long is closed out at 49,500 (equity 150,000, fee 49,500,
    # P&L -299,500). Held to the end it would have had 400,000 + 500 x 500 = 650,000, so the
    # closed-out position hands 650,000 - 150,000 = 500,000 to the market. The short ends at
    # -250,000: accounts' P&L -549,500 = 0 (held) - 500,000 (closed out) - 49,500 (fees).
    snap = _book(tmp_path / "snap", "fee_rate = 0.002")
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49500\n2024-01-03,50500\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    scen = stress.load_scenarios(tmp_path / "p.toml", snap)
    res = stress.run(snap, scen)
    row = res.scenarios.iloc[0]
    assert (row.fees, row.pnl_closed_out, row.pnl_total) == pytest.approx((49_500.0, 500_000.0, -549_500.0))
    # 1000 contracts of 0.5 BTC closed at the breach's 49,500, not at the path's end (50,500)
    assert row.liquidated_notional == row.liquidated_notional_BTC == pytest.approx(24_750_000.0, rel=1e-12)
    assert res.accounts.set_index("account_id").loc["long", "pnl_worst"] == pytest.approx(-299_500.0)
    assert row.insurance_fund_after == pytest.approx(1_049_500.0)


def test_cover2_is_the_bad_debt_of_the_two_largest_defaulters(tmp_path):
    # Four longs of 10 BTC (linear, contract 1 BTC at 50,000) on 10,000 / 20,000 / 30,000 /
    # 200,000 USDC against one short. BTC -50%: each long loses 250,000, so bad debts are
    # 240,000 / 230,000 / 220,000 / 50,000: Cover 2 = 240,000 + 230,000 = 470,000 against a
    # fund of 300,000 (not covered); BTC -10%: losses 50,000, bad debt 40,000 / 30,000 / 20,000
    # / 0: Cover 2 = 70,000, covered.
    toml = "as_of = 2026-11-23T08:00:00Z\nrate = 0.0\ninsurance_fund = { USDC = 300000.0 }\n"
    balances = [10_000.0, 20_000.0, 30_000.0, 200_000.0]
    snap = stress.load_snapshot(write_snapshot(
        tmp_path / "snap", assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=[{"account_id": f"l{i}", "asset": "USDC", "amount": b} for i, b in enumerate(balances)]
        + [{"account_id": "short", "asset": "USDC", "amount": 10_000_000.0}],
        positions=[{"account_id": f"l{i}", "instrument_id": "P", "quantity": 10} for i in range(4)]
        + [{"account_id": "short", "instrument_id": "P", "quantity": -40}],
        exchange_toml=toml))
    (tmp_path / "s.toml").write_text('[[scenario]]\nname = "down-50"\nmoves = { BTC = -0.5 }\n\n'
                                     '[[scenario]]\nname = "down-10"\nmoves = { BTC = -0.1 }\n')
    res = stress.run(snap, stress.load_scenarios(tmp_path / "s.toml", snap), chunk_size=2)
    sc = res.scenarios.set_index("scenario")
    assert sc.cover2.to_dict() == pytest.approx({"down-50": 470_000.0, "down-10": 70_000.0})
    assert sc.cover2_covered.to_dict() == {"down-50": False, "down-10": True}
    assert res.summary["cover2_worst"] == pytest.approx(470_000.0) and res.summary["cover2_scenario"] == "down-50"
    assert res.summary["cover2_covered"] is False


def test_largest_two_counts_a_tie_at_the_top_twice():
    import numpy as np

    from stress.engine import largest_two

    x = np.array([[5.0, 0.0, 0.0], [5.0, 1.0, 0.0], [3.0, 1.0, 0.0], [4.0, 0.5, 0.0]])
    np.testing.assert_array_equal(np.asarray(largest_two(x)), [[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])


@pytest.mark.parametrize("rows", [2, 3, 7, 128, 131])
def test_the_elementwise_tree_of_two_largest_matches_the_sorted_columns(rows):
    # engine.column_top2 (the CPU kernel's two largest bad debts of a tile) and merge_top2
    # (merged with those of the chunks before) against a sort: small integers, so ties at the
    # top are common; odd row counts carry a row through the tree.
    import numpy as np

    from stress.engine import column_top2, merge_top2

    rng = np.random.default_rng(rows)
    x = rng.integers(0, 6, (rows, 40)).astype(float)
    top = -np.sort(-x, axis=0)[:2]
    np.testing.assert_array_equal(np.asarray(column_top2(x)), top)
    before = -np.sort(-rng.integers(0, 6, (2, 40)).astype(float), axis=0)
    union = -np.sort(-np.concatenate([x, before]), axis=0)[:2]
    np.testing.assert_array_equal(np.asarray(merge_top2(column_top2(x), before)), union)


def test_oracle_lag_closes_out_later_and_deeper(tmp_path):
    # 50,000 -> 49,000 -> 47,000 -> 50,500. The long (500 BTC on 400,000 USDC) breaches at
    # 49,000 (below 49,697). Lag 0: closed at 49,000, equity 400,000 - 500,000 = -100,000.
    # Lag 1: the breach is seen at the next step and acted on at 47,000: -1,100,000.
    # Lag 2: acted on at 50,500, after the recovery: +650,000, no bad debt.
    liq = "oracle_lag_steps = 1\noracle_lags = [0, 1, 2]"
    snap = _book(tmp_path / "snap", liq)
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49000\n2024-01-03,47000\n2024-01-04,50500\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 3\n')
    res = stress.run(snap, stress.load_scenarios(tmp_path / "p.toml", snap))
    by_lag = {r["lag"]: r["worst_bad_debt"] for r in res.summary["oracle_lags"]}
    assert by_lag == pytest.approx({0: 100_000.0, 1: 1_100_000.0, 2: 0.0})
    assert res.summary["oracle_lag_steps"] == 1
    assert res.scenarios.bad_debt.iloc[0] == pytest.approx(1_100_000.0)  # the run itself uses lag 1
    assert [r["p_fund_depleted"] for r in res.summary["oracle_lags"]] == [0.0, 1.0, 0.0]  # fund 1,000,000


def test_a_close_out_acted_on_after_the_recovery_still_counts_as_a_liquidation(tmp_path):
    # The path above under a lag of 2 steps: the breach at 49,000 is acted on at 50,500,
    # where the long's collateral (400,000 + 500 x 500 = 650,000) is back above its margin
    # (1% x 500 x 50,500 = 252,500). It is closed out all the same, with no shortfall and no
    # bad debt; the kernel's test for a tile with close-outs must not rest on the shortfall.
    snap = _book(tmp_path / "snap", "oracle_lag_steps = 2")
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49000\n2024-01-03,47000\n2024-01-04,50500\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 3\n')
    row = stress.run(snap, stress.load_scenarios(tmp_path / "p.toml", snap)).scenarios.iloc[0]
    assert row.accounts_liquidatable == 1
    assert row.shortfall_total == 0.0 and row.bad_debt == 0.0


def test_a_lag_of_a_whole_path_or_more_is_refused_and_a_shorter_one_keeps_one_off_shocks_instantaneous(tmp_path):
    # A lag of 3 would never act on a breach of the 3-step replay path. Beside it a one-off
    # shock is a path whose every step is the shock, and acts at once whatever the lag: BTC
    # -10% alone closes the long out (49,697 is its breach price) with 2,500,000 of loss on
    # 400,000, bad debt 2,100,000, and so it does beside the path under a lag of 2.
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49000\n2024-01-03,47000\n2024-01-04,50500\n")
    shock = '[[scenario]]\nname = "down"\nmoves = { BTC = -0.1 }\n'
    (tmp_path / "mixed.toml").write_text(shock + '\n[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 3\n')
    (tmp_path / "shock.toml").write_text(shock)
    for text, key in (("oracle_lag_steps = 3", "oracle_lag_steps"), ("oracle_lags = [0, 5]", "oracle_lags")):
        snap = _book(tmp_path / key, text)
        with pytest.raises(stress.InputError, match="not less than the 3 steps") as err:
            stress.load_scenarios(tmp_path / "mixed.toml", snap)
        assert (err.value.file, err.value.column) == ("exchange.toml", key)
        stress.load_scenarios(tmp_path / "shock.toml", snap)  # one-step only: the lag does not apply
        r = CliRunner().invoke(app, ["validate", str(tmp_path / key), "--scenarios", str(tmp_path / "mixed.toml")])
        assert r.exit_code == 2 and key in r.output
    # a snapshot changed in Python is checked by the run too
    plain = _book(tmp_path / "plain", "")
    scen = stress.load_scenarios(tmp_path / "mixed.toml", plain)
    with pytest.raises(stress.InputError, match="not less than"):
        stress.run(dataclasses.replace(plain, liquidation_config={"oracle_lag_steps": 3}), scen)
    alone = stress.run(plain, stress.load_scenarios(tmp_path / "shock.toml", plain)).scenarios.iloc[0]
    lagged = stress.run(dataclasses.replace(plain, liquidation_config={"oracle_lag_steps": 2}), scen).scenarios.iloc[0]
    assert alone.bad_debt == pytest.approx(2_100_000.0) and alone.accounts_liquidatable == 1
    for c in ("bad_debt", "accounts_liquidatable", "shortfall_total", "pnl_total"):
        assert lagged[c] == pytest.approx(alone[c], rel=1e-12), c


@pytest.mark.parametrize("text", ["oracle_lag_steps = -1", "oracle_lag_steps = 1.5", "oracle_lags = [1, -2]",
                                  "oracle_lags = 3"])
def test_bad_oracle_lags_fail_at_load(tmp_path, text):
    with pytest.raises(stress.InputError) as err:
        _book(tmp_path / "snap", text)
    assert err.value.column == text.split(" ")[0]


# --- price impact: two passes, net per instrument, shared pro rata --------------------------

IMPACT = """
[liquidation.impact.BTC]
spread = 0.001
k = 0.5
daily_vol = 0.04
daily_volume = 9.6e9
"""


def _three(folder, liquidation: str = IMPACT, fund: float = 1_000_000.0):
    """A matched book in one linear perpetual (0.5 BTC per contract, mark 50,000): L long 1000
    on 400,000 USDC, S short 1200 on a borrowed -50,000 USDC (liquidatable already), W long 200
    on 5M."""
    toml = f"as_of = 2026-11-23T08:00:00Z\nrate = 0.0\ninsurance_fund = {{ USDC = {fund} }}\n[margin]\n[liquidation]\n{liquidation}\n"
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.5, "mark_price": 50_000.0}],
        balances=[{"account_id": "L", "asset": "USDC", "amount": 400_000.0},
                  {"account_id": "S", "asset": "USDC", "amount": -50_000.0},
                  {"account_id": "W", "asset": "USDC", "amount": 5_000_000.0}],
        positions=[{"account_id": "L", "instrument_id": "P", "quantity": 1000},
                   {"account_id": "S", "instrument_id": "P", "quantity": -1200},
                   {"account_id": "W", "instrument_id": "P", "quantity": 200}],
        exchange_toml=toml))


def test_price_impact_is_charged_on_the_net_notional_and_shared_pro_rata(tmp_path):
    # down-1, F' = 49,500 (24,750 USD a contract). L: equity 400,000 - 500 x 500 = 150,000 <
    # MM 1% x 24,750,000 = 247,500: liquidated. S: collateral -50,000 + 600 x 500 = 250,000
    # < MM 1% x 1200 x 24,750 = 297,000: liquidated. W: fine. Contracts closed: L sells 1000,
    # S buys 1200: net -200 contracts = -4,950,000 USD (a net buy), gross 2,200 contracts.
    # Impact: 4.95e6 x (0.001 + 0.5 x 0.04 x sqrt(4.95e6 / 9.6e9)), of which L pays 1000/2200
    # and S 1200/2200.
    snap = _three(tmp_path / "snap")
    res = stress.run(snap, _scen(tmp_path, snap))
    sc = res.scenarios.set_index("scenario")
    cost = 4.95e6 * (0.001 + 0.5 * 0.04 * math.sqrt(4.95e6 / 9.6e9))
    assert sc.impact_cost["down-1"] == pytest.approx(cost, rel=1e-12)
    assert sc.liquidated_notional["down-1"] == pytest.approx(2200 * 24_750.0)
    assert sc.liquidated_notional_BTC["down-1"] == pytest.approx(2200 * 24_750.0)
    acc = res.accounts.set_index("account_id")
    pnl = stress.pnl_matrix(snap, _scen(tmp_path, snap))
    assert pnl.loc["L", "down-1"] == pytest.approx(-250_000.0 - cost * 1000 / 2200, rel=1e-12)
    assert pnl.loc["S", "down-1"] == pytest.approx(300_000.0 - cost * 1200 / 2200, rel=1e-12)
    assert pnl.loc["W", "down-1"] == pytest.approx(-50_000.0, rel=1e-12)
    assert acc.liquidation_cost_worst["W"] == 0.0
    # flat: only S is liquidated; it closes 1200 contracts of 25,000 USD alone, all its own
    flat = 1200 * 25_000.0
    assert sc.impact_cost["flat"] == pytest.approx(flat * (0.001 + 0.02 * math.sqrt(flat / 9.6e9)), rel=1e-12)
    # conservation on a matched USDC book: the accounts' P&L + impact paid = 0 in every scenario
    np.testing.assert_allclose(pnl.sum(axis=0) + sc.impact_cost, 0.0, atol=1e-6)
    np.testing.assert_allclose(sc.pnl_total + sc.impact_cost + sc.fees + sc.pnl_closed_out, 0.0, atol=1e-6)


def test_impact_can_create_bad_debt_but_the_fee_cannot(tmp_path):
    # down-4, F' = 48,000: L's equity is -600,000 before costs; S (collateral -50,000 +
    # 1,200,000) is not liquidated, so L closes 1000 contracts x 24,000 = 24M USD alone:
    # impact 24e6 x (0.001 + 0.5 x 0.04 x sqrt(24e6 / 9.6e9)) = 24e6 x 0.002 = 48,000, all
    # bad debt; the fee, out of remaining equity (none), adds nothing.
    snap = _three(tmp_path / "snap", "fee_rate = 0.002\n" + IMPACT)
    res = stress.run(snap, _scen(tmp_path, snap))
    sc = res.scenarios.set_index("scenario")
    assert sc.bad_debt["down-4"] == pytest.approx(648_000.0, rel=1e-12)
    assert sc.fees["down-4"] == 0.0
    # down-1: both pay the full fee, 0.2% of what they close, out of what the impact leaves
    assert sc.fees["down-1"] == pytest.approx(0.002 * 2200 * 24_750.0, rel=1e-12)
    # L's closing costs are largest at down-1: the fee 49,500 and its share of the impact
    share = 4.95e6 * (0.001 + 0.02 * math.sqrt(4.95e6 / 9.6e9)) * 1000 / 2200
    assert res.accounts.set_index("account_id").liquidation_cost_worst["L"] == pytest.approx(49_500.0 + share, rel=1e-12)


def test_without_impact_parameters_closing_moves_nothing(tmp_path):
    snap = _three(tmp_path / "snap", "")
    sc = stress.run(snap, _scen(tmp_path, snap)).scenarios.set_index("scenario")
    assert (sc.impact_cost == 0).all()
    # the same accounts are closed out as with impact: L and S at down-1, S alone when flat
    assert sc.liquidated_notional_BTC["down-1"] == pytest.approx(2200 * 24_750.0, rel=1e-12)
    assert sc.liquidated_notional_BTC["flat"] == pytest.approx(1200 * 25_000.0, rel=1e-12)


@pytest.mark.parametrize("text, column", [
    ("[liquidation.impact.BTC]\nspread = 0.001\nk = 0.5\ndaily_vol = 0.04\n", "daily_volume"),
    (IMPACT.replace("daily_volume = 9.6e9", "daily_volume = 0"), "daily_volume"),
    (IMPACT.replace("spread = 0.001", "spread = -1"), "spread"),
    (IMPACT.replace("k = 0.5", "k = 0.5\nkappa = 1"), "kappa"),
    (IMPACT.replace("BTC]", "DOGE]"), "impact"),
    ("adl = 1", "adl"),
])
def test_bad_impact_and_adl_keys_fail_at_load(tmp_path, text, column):
    with pytest.raises(stress.InputError) as err:
        _three(tmp_path / "snap", text)
    assert err.value.file == "exchange.toml" and err.value.column == column


# --- auto-deleveraging ------------------------------------------------------------------------


def _adl_book(folder, fund: float, adl: str = ""):
    """L long 1000 on 400,000 (bad debt 600,000 at -4%); two shorts of 500 contracts each:
    S1 on 1,000,000 (P&L% 50% x leverage 12.5 at -4%), S2 on 4,000,000 (12.5% x 3.125)."""
    toml = f"as_of = 2026-11-23T08:00:00Z\nrate = 0.0\ninsurance_fund = {{ USDC = {fund} }}\n[margin]\n[liquidation]\n{adl}\n"
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.5, "mark_price": 50_000.0}],
        balances=[{"account_id": "L", "asset": "USDC", "amount": 400_000.0},
                  {"account_id": "S1", "asset": "USDC", "amount": 1_000_000.0},
                  {"account_id": "S2", "asset": "USDC", "amount": 4_000_000.0}],
        positions=[{"account_id": "L", "instrument_id": "P", "quantity": 1000},
                   {"account_id": "S1", "instrument_id": "P", "quantity": -500},
                   {"account_id": "S2", "instrument_id": "P", "quantity": -500}],
        exchange_toml=toml))


@pytest.mark.parametrize("fund, s1, s2", [(100_000.0, 500_000.0, 0.0), (0.0, 500_000.0, 100_000.0),
                                          (550_000.0, 50_000.0, 0.0)])
def test_adl_charges_the_highest_ranked_winners_first_up_to_their_profit(tmp_path, fund, s1, s2):
    # down-4: bad debt 600,000; the fund pays what it has, the deficit 600,000 - fund is
    # charged to S1 first (rank 6.25 > 0.39), each short at most its profit of 500,000.
    snap = _adl_book(tmp_path / "snap", fund)
    res = stress.run(snap, _scen(tmp_path, snap))
    sc = res.scenarios.set_index("scenario")
    acc = res.accounts.set_index("account_id")
    deficit = 600_000.0 - fund
    assert sc.socialized_loss["down-4"] == pytest.approx(deficit)
    assert sc.adl_total["down-4"] == pytest.approx(deficit)
    assert (acc.adl_loss_worst["S1"], acc.adl_loss_worst["S2"], acc.adl_loss_worst["L"]) == pytest.approx((s1, s2, 0.0))
    # conservation, down-4: equity changes (bankrupt L floored at 0, winners after ADL) + fund
    # change = 0 on this matched USDC book; the fund never goes negative
    pnl = stress.pnl_matrix(snap, _scen(tmp_path, snap))["down-4"]
    after = np.maximum(pnl + acc.equity, 0.0) - acc.adl_loss_worst - acc.equity
    fund_change = sc.insurance_fund_after["down-4"] - sc.insurance_fund_before["down-4"]
    assert after.sum() + fund_change == pytest.approx(0.0, abs=1e-6)
    assert (sc.insurance_fund_after >= 0).all()
    assert sc.bad_debt["down-4"] == pytest.approx(fund - sc.insurance_fund_after["down-4"] + sc.socialized_loss["down-4"])


def test_adl_ranks_by_unrealised_pnl_against_the_entry_price_when_given(tmp_path):
    # With entry prices, S2 shorted at 60,000 (unrealised +5,000,000 at the 50,000 mark, base
    # 500 x 0.5 x 60,000 = 15M): rank (5M + 0.5M) / 15M x 3.125 = 1.15; S1 shorted at 50,000:
    # (0 + 0.5M) / 12.5M x 12.5 = 0.5. S2 now goes first.
    folder = tmp_path / "snap"
    _adl_book(folder, 100_000.0)
    pos = pd.read_csv(folder / "positions.csv")
    pos["entry_price"] = [50_000.0, 50_000.0, 60_000.0]
    pos.to_csv(folder / "positions.csv", index=False)
    snap = stress.load_snapshot(folder)
    acc = stress.run(snap, _scen(tmp_path, snap)).accounts.set_index("account_id")
    assert (acc.adl_loss_worst["S1"], acc.adl_loss_worst["S2"]) == pytest.approx((0.0, 500_000.0))


def test_adl_pass_compiles_once_for_deficit_counts_in_one_power_of_two(tmp_path):
    # 2W + 1 and 3W + 1 scenarios with a deficit (W: the widest tile) would be 3 and 4 tiles;
    # both are padded to 4W, so the second run's pass finds its kernel compiled. Every deficit
    # is still charged in full: S1 first (rank 6.25), S2 after it once S1's profit is gone.
    snap = _adl_book(tmp_path / "snap", 100_000.0)
    W = engine.scenario_tile(10_000, dtype=np.float64)
    kernel = engine.sharded_adl(len(engine.devices()))
    sizes = []
    for count in (2 * W + 1, 3 * W + 1):
        text = "".join(f'[[scenario]]\nname = "d{k}"\nmoves = {{ BTC = {-0.04 - 1e-5 * k} }}\n\n' for k in range(count))
        (tmp_path / "many.toml").write_text(text + '[[scenario]]\nname = "flat"\n')
        res = stress.run(snap, stress.load_scenarios(tmp_path / "many.toml", snap))
        sc = res.scenarios.set_index("scenario")
        deficit = sc.socialized_loss.drop("flat")
        assert len(deficit) == count and (deficit > 0).all()
        np.testing.assert_allclose(sc.adl_total.drop("flat"), deficit, rtol=1e-12)
        assert sc.adl_total["flat"] == 0.0
        sizes.append(kernel.cache_size())
    assert engine.adl_width(2 * W + 1, 10**6) == engine.adl_width(3 * W + 1, 10**6) == 4 * W
    assert sizes[1] == sizes[0] > 0


@pytest.mark.parametrize("liq", [
    "fee_rate = 0.002\noracle_lag_steps = 1\n[liquidation.impact.BTC]\nspread = 0.001\nk = 0.5\ndaily_vol = 0.04\n"
    "daily_volume = 2e8\n",
    'fee_rate = 0.002\nmode = "partial"\npartial_target = 1.25\n',
])
def test_adl_pass_values_each_account_as_the_sweep_does(tmp_path, sample_tables, small_default_path, liq):
    # The pass's own kernel (P&L and liquidated flags only) against the sweep's kernel asked
    # for the same matrices, on the sample under the default set's shocks and 4-step paths:
    # closing costs, price impact and an oracle lag, or partial close-outs.
    from stress import sample

    sample.write_snapshot(tmp_path / "snap", sample_tables)
    toml = (tmp_path / "snap" / "exchange.toml").read_text()
    (tmp_path / "snap" / "exchange.toml").write_text(toml.replace("[liquidation]\n", "[liquidation]\n" + liq))
    snap = stress.load_snapshot(tmp_path / "snap")
    scen = stress.load_scenarios(small_default_path, snap)
    local = engine.LocalAccounts(snap, None, np.float64)
    t, _ = engine.tables(snap, scen)
    if t.n_impact:
        t = engine._impact_pass(snap, t, local.closed(t), np.float64)
    cols = np.r_[np.arange(0, len(scen), 7), len(scen) - 1]  # one-step shocks and paths
    sub = engine._subset(t, cols, engine.adl_width(len(cols), 10**6))
    ref = local.sweep(sub, 0, True).mats
    pnl, liquidated = local.adl_mats(sub)
    assert pnl.shape == ref["pnl"].shape == (snap.n_accounts, len(cols))
    assert liquidated.any() and (pnl < 0).any()
    if "partial" in liq:  # the pass flags the accounts closed out in full; the rest of them are open
        assert not (liquidated & ~ref["liquidated"]).any() and (ref["liquidated"] & ~liquidated).any()
    else:
        np.testing.assert_array_equal(liquidated, ref["liquidated"])
    np.testing.assert_allclose(pnl, ref["pnl"], rtol=1e-12, atol=1e-9)


def test_adl_pass_shape_does_not_depend_on_how_many_deficits_are_random(sample_dir, small_default_path):
    # Two sets of 8 deficit scenarios, 2 and then 5 of them Monte Carlo paths: one signature,
    # one compilation per holdings shape, for both.
    snap = stress.load_snapshot(sample_dir)
    scen = stress.load_scenarios(small_default_path, snap)
    t, _ = engine.tables(snap, scen)
    local = engine.LocalAccounts(snap, None, np.float64)
    rnd, fixed = np.flatnonzero(scen.random), np.flatnonzero(~scen.random)
    kernel = engine.sharded_adl(len(engine.devices()))
    sizes = []
    for k in (2, 5):
        pnl, _ = local.adl_mats(engine._subset(t, np.sort(np.r_[fixed[: 8 - k], rnd[:k]]), 8))
        assert pnl.shape == (snap.n_accounts, 8)
        sizes.append(kernel.cache_size())
    assert sizes[1] == sizes[0] > 0


def test_adl_can_be_switched_off(tmp_path):
    snap = _adl_book(tmp_path / "snap", 100_000.0, "adl = false")
    res = stress.run(snap, _scen(tmp_path, snap))
    assert res.scenarios.socialized_loss.max() == pytest.approx(500_000.0)
    assert (res.accounts.adl_loss_worst == 0).all() and (res.scenarios.adl_total == 0).all()


# --- partial liquidation ---------------------------------------------------------------------

# The long of `_book` at 49,500: collateral C = 150,000, margin M = 247,500, notional G =
# 24,750,000. Closing a share f back to collateral / margin = 1.25, the fee 0.2% of what is
# closed included: 150,000 - f x 49,500 = 1.25 x (1 - f) x 247,500, so
# f = (309,375 - 150,000) / (309,375 - 49,500) = 159,375 / 259,875.
F1 = 159_375.0 / 259_875.0


def test_partial_liquidation_closes_just_enough_to_restore_the_target_ratio(tmp_path):
    snap = _book(tmp_path / "snap", 'fee_rate = 0.002\nmode = "partial"\npartial_target = 1.25')
    res = stress.run(snap, _scen(tmp_path, snap))
    sc = res.scenarios.set_index("scenario")
    assert sc.fees["down-1"] == pytest.approx(49_500.0 * F1, rel=1e-12)
    assert sc.liquidated_notional["down-1"] == pytest.approx(24_750_000.0 * F1, rel=1e-12)
    pnl = stress.pnl_matrix(snap, _scen(tmp_path, snap))
    assert pnl.loc["long", "down-1"] == pytest.approx(-250_000.0 - 49_500.0 * F1, rel=1e-12)
    # after the close: collateral 150,000 - fee = 1.25 x the margin left, (1 - f) x 247,500
    assert 150_000.0 - 49_500.0 * F1 == pytest.approx(1.25 * (1 - F1) * 247_500.0, rel=1e-12)
    # down-4: collateral -600,000 <= 0, so everything is closed, as in full mode
    assert sc.bad_debt["down-4"] == pytest.approx(600_000.0)
    assert sc.liquidated_notional["down-4"] == pytest.approx(24_000_000.0)


def test_partial_close_out_of_under_half_a_book_counts_one_account_and_its_share_of_notional(tmp_path):
    # At 49,600 (one step, and the second step of a path from 50,000): C = 400,000 - 500 x 400
    # = 200,000 < M = 1% x 24,800,000 = 248,000. Back to 1.25 M with the 0.2% fee: f =
    # (310,000 - 200,000) / (310,000 - 49,600) = 110,000 / 260,400, under half the book. One
    # account is liquidated (the count is of accounts, not of books closed), and the notional
    # closed is f of the book's, per underlying as in total.
    snap = _book(tmp_path / "snap", 'fee_rate = 0.002\nmode = "partial"\nadl = false')
    f = 110_000.0 / 260_400.0
    (tmp_path / "s.toml").write_text('[[scenario]]\nname = "down"\nmoves = { BTC = -0.008 }\n')
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,50000\n2024-01-03,49600\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    for name in ("s.toml", "p.toml"):
        row = stress.run(snap, stress.load_scenarios(tmp_path / name, snap)).scenarios.iloc[0]
        assert row.accounts_liquidatable == 1
        assert row.liquidated_notional == pytest.approx(24_800_000.0 * f, rel=1e-12)
        assert row.liquidated_notional_BTC == pytest.approx(24_800_000.0 * f, rel=1e-12)
        assert row.fees == pytest.approx(49_600.0 * f, rel=1e-12)


def test_partial_liquidation_along_a_path_keeps_the_rest_at_risk(tmp_path):
    # 50,000 -> 49,500 -> 50,500: a share F1 is closed at 49,500, locking in its -250,000 x F1,
    # and the rest rides the recovery: equity at the end 400,000 + (1 - F1) x 250,000 - F1 x
    # 250,000 - fee 49,500 x F1 = 650,000 - 549,500 x F1 (full close-out ended at 150,000). The
    # closed share's recovery, 500,000 x F1, goes to the market: accounts' P&L + closed-out +
    # fees = 0 on this matched book.
    snap = _book(tmp_path / "snap", 'fee_rate = 0.002\nmode = "partial"')
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49500\n2024-01-03,50500\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    scen = stress.load_scenarios(tmp_path / "p.toml", snap)
    res = stress.run(snap, scen)
    row = res.scenarios.iloc[0]
    assert row.fees == pytest.approx(49_500.0 * F1, rel=1e-12)
    assert row.pnl_closed_out == pytest.approx(500_000.0 * F1, rel=1e-12)
    assert row.pnl_total == pytest.approx(-549_500.0 * F1, rel=1e-12)
    assert row.liquidated_notional_BTC == pytest.approx(24_750_000.0 * F1, rel=1e-12)
    assert res.accounts.set_index("account_id").loc["long", "pnl_worst"] == pytest.approx(250_000.0 - 549_500.0 * F1, rel=1e-12)
    assert row.accounts_liquidatable == 1


def test_partial_mode_matches_full_mode_when_nothing_is_liquidated_and_results_ignore_chunking(tmp_path):
    snap = _three(tmp_path / "snap", 'mode = "partial"\n' + IMPACT)
    scen = _scen(tmp_path, snap)
    a = stress.run(snap, scen, chunk_size=1).scenarios
    b = stress.run(snap, scen, chunk_size=64).scenarios
    np.testing.assert_allclose(a.select_dtypes("number"), b.select_dtypes("number"), rtol=1e-12, atol=1e-9)
    # W is never liquidated; the books still balance: P&L + impact + fees + closed-out = 0
    np.testing.assert_allclose(a.pnl_total + a.impact_cost + a.fees + a.pnl_closed_out, 0.0, atol=1e-6)


@pytest.mark.parametrize("text, column", [('mode = "half"', "mode"), ("partial_target = 0.9", "partial_target"),
                                          ('mode = "partial"\noracle_lag_steps = 1', "oracle_lag_steps"),
                                          ('mode = "partial"\ncascade = true\n' + IMPACT, "cascade")])
def test_bad_partial_keys_fail_at_load(tmp_path, text, column):
    with pytest.raises(stress.InputError) as err:
        _book(tmp_path / "snap", text)
    assert err.value.column == column


def test_partial_close_outs_are_refused_under_the_var_model(tmp_path):
    # A partial close keeps a share of the book and needs the margin of that share: the var
    # model's ES includes the collateral's own risk, which a close does not scale, so the
    # share would be wrong. (The portfolio model's is solved: the tests above.)
    snap_dir = tmp_path / "snap"
    _book(snap_dir)
    (snap_dir / "h.csv").write_text("date,BTC\n" + "\n".join(f"2024-01-{d:02d},{50_000 + 100 * d}" for d in range(1, 29)) + "\n")
    margin = 'model = "var"\nvar_history = "h.csv"\nvar_min_windows = 10'
    toml = (snap_dir / "exchange.toml").read_text().replace("[margin]\n", f"[margin]\n{margin}\n")
    (snap_dir / "exchange.toml").write_text(toml + 'mode = "partial"\n')
    with pytest.raises(stress.InputError) as err:
        stress.load_snapshot(snap_dir)
    assert err.value.column == "mode" and "var" in str(err.value)
    (snap_dir / "exchange.toml").write_text(toml)  # full close-out: the same margin loads
    snap = stress.load_snapshot(snap_dir)
    partial = dataclasses.replace(snap, liquidation_config={**snap.liquidation_config, "mode": "partial"})
    with pytest.raises(stress.InputError) as err:  # and a run refuses it switched to partial in Python
        stress.run(partial, _scen(tmp_path, snap))
    assert err.value.column == "mode"


def test_auto_deleveraging_charges_a_winner_still_open_after_a_partial_close_out(tmp_path):
    # L long 10 BTC on 40,000 USDC, S short 10 on 14,000, no fund; 50,000 -> 51,000 -> 45,000.
    # At 51,000 S has 4,000 of collateral against 1% x 510,000 = 5,100: it closes f = (6,375 -
    # 4,000) / 6,375 back to 1.25 x margin (no fee), locking -1,000 a BTC on that share, and
    # keeps 10 (1 - f) short, which gains 5,000 a BTC by 45,000. L ends at -10,000: the deficit
    # is charged to S, the one winner, still open.
    toml = ('as_of = 2026-11-23T08:00:00Z\nrate = 0.0\ninsurance_fund = { USDC = 0.0 }\n[margin]\n'
            '[liquidation]\nmode = "partial"\n')
    snap = stress.load_snapshot(write_snapshot(
        tmp_path / "snap", assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=[{"account_id": "L", "asset": "USDC", "amount": 40_000.0}, {"account_id": "S", "asset": "USDC", "amount": 14_000.0}],
        positions=[{"account_id": "L", "instrument_id": "P", "quantity": 10}, {"account_id": "S", "instrument_id": "P", "quantity": -10}],
        exchange_toml=toml))
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,51000\n2024-01-03,45000\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    res = stress.run(snap, stress.load_scenarios(tmp_path / "p.toml", snap))
    f = (1.25 * 5_100.0 - 4_000.0) / (1.25 * 5_100.0)
    row, acc = res.scenarios.iloc[0], res.accounts.set_index("account_id")
    assert row.bad_debt == pytest.approx(10_000.0) and row.socialized_loss == pytest.approx(10_000.0)
    assert stress.pnl_matrix(snap, stress.load_scenarios(tmp_path / "p.toml", snap)).loc["S"].iloc[0] == pytest.approx(
        -f * 10 * 1_000.0 + (1 - f) * 10 * 5_000.0, rel=1e-12)
    assert row.adl_total == pytest.approx(10_000.0, rel=1e-12)
    assert acc.adl_loss_worst["S"] == pytest.approx(10_000.0, rel=1e-12)


# --- Cover 2 by account group -------------------------------------------------------------------


def _cover2_book(folder, groups):
    """The four longs of the Cover 2 test (bad debts 240k / 230k / 220k / 50k at BTC -50%),
    with a `group` column on balances (None: no group given), named by [liquidation] group_column."""
    toml = ("as_of = 2026-11-23T08:00:00Z\nrate = 0.0\ninsurance_fund = { USDC = 300000.0 }\n"
            '[liquidation]\ngroup_column = "group"\n')
    amounts = [10_000.0, 20_000.0, 30_000.0, 200_000.0]
    balances = [{"account_id": f"l{i}", "asset": "USDC", "amount": b, "group": g}
                for i, (b, g) in enumerate(zip(amounts, groups))]
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=balances + [{"account_id": "short", "asset": "USDC", "amount": 10_000_000.0, "group": None}],
        positions=[{"account_id": f"l{i}", "instrument_id": "P", "quantity": 10} for i in range(4)]
        + [{"account_id": "short", "instrument_id": "P", "quantity": -40}],
        exchange_toml=toml))


@pytest.mark.parametrize("groups, down50, down10", [
    # l2 and l3 under one control: 220,000 + 50,000 = 270,000 is the largest default
    ([None, None, "g", "g"], 270_000.0 + 240_000.0, 40_000.0 + 30_000.0),
    # l0 and l1 together: 470,000, then l2's 220,000
    (["a", "a", None, None], 470_000.0 + 220_000.0, 70_000.0 + 20_000.0),
    # a group of one is an account alone
    (["x", "y", "z", None], 470_000.0, 70_000.0),
])
def test_cover2_counts_a_group_of_accounts_as_one_defaulter(tmp_path, groups, down50, down10):
    snap = _cover2_book(tmp_path / "snap", groups)
    (tmp_path / "s.toml").write_text('[[scenario]]\nname = "down-50"\nmoves = { BTC = -0.5 }\n\n'
                                     '[[scenario]]\nname = "down-10"\nmoves = { BTC = -0.1 }\n')
    scen = stress.load_scenarios(tmp_path / "s.toml", snap)
    for chunk in (1, 2, 128):  # groups span chunks
        sc = stress.run(snap, scen, chunk_size=chunk).scenarios.set_index("scenario")
        assert sc.cover2.to_dict() == pytest.approx({"down-50": down50, "down-10": down10})


def test_a_group_column_counts_only_where_exchange_toml_names_it(tmp_path):
    # SPEC: extra columns are ignored. An export's own `group` column (a wallet, a segment)
    # changes nothing until [liquidation] group_column names it; a name with no column is an error.
    folder = tmp_path / "snap"
    grouped = _cover2_book(folder, ["a", "a", None, None])
    (tmp_path / "s.toml").write_text('[[scenario]]\nname = "down-50"\nmoves = { BTC = -0.5 }\n')
    toml = (folder / "exchange.toml").read_text()
    (folder / "exchange.toml").write_text(toml.replace('group_column = "group"\n', ""))
    plain = stress.load_snapshot(folder)
    scen = stress.load_scenarios(tmp_path / "s.toml", plain)
    assert stress.run(plain, scen).scenarios.cover2.iloc[0] == pytest.approx(240_000.0 + 230_000.0)
    assert stress.run(grouped, scen).scenarios.cover2.iloc[0] == pytest.approx(470_000.0 + 220_000.0)
    (folder / "exchange.toml").write_text(toml.replace('"group"', '"wallet"'))
    with pytest.raises(stress.InputError) as err:
        stress.load_snapshot(folder)
    assert (err.value.file, err.value.column) == ("exchange.toml", "group_column") and "wallet" in str(err.value)


def test_an_account_in_two_groups_is_an_input_error(tmp_path):
    folder = tmp_path / "snap"
    _cover2_book(folder, ["a", "a", None, None])
    bal = pd.read_csv(folder / "balances.csv")
    extra = pd.DataFrame([{"account_id": "l0", "asset": "BTC", "amount": 1.0, "group": "b"}])
    pd.concat([bal, extra]).to_csv(folder / "balances.csv", index=False)
    with pytest.raises(stress.InputError) as err:
        stress.load_snapshot(folder)
    assert (err.value.file, err.value.row, err.value.column) == ("balances.csv", "line 7", "group")


def test_partial_mode_closes_everything_when_the_fee_alone_exceeds_the_target_margin(tmp_path):
    # fee 2% > 1.25 x the 1% margin rate: no share of the long brings collateral back to 1.25 x
    # its margin, so it is closed in full at 49,500 and pays what the fee takes of its 150,000.
    snap = _book(tmp_path / "snap", 'fee_rate = 0.02\nmode = "partial"')
    sc = stress.run(snap, _scen(tmp_path, snap)).scenarios.set_index("scenario")
    assert sc.liquidated_notional["down-1"] == pytest.approx(24_750_000.0, rel=1e-12)
    assert sc.fees["down-1"] == pytest.approx(150_000.0, rel=1e-12)


def _tiered(folder, tiers: str, liquidation: str = 'fee_rate = 0.002\nmode = "partial"', collateral: float = 400_000.0):
    _book(folder, liquidation, collateral)
    toml = (folder / "exchange.toml").read_text().replace("[margin]\n", f"[margin]\nfuture_tiers = {tiers}\n")
    (folder / "exchange.toml").write_text(toml)
    return stress.load_snapshot(folder)


# The long of `_book` at 49,500 under risk-limit tiers: its 24,750,000 of notional is in the
# second tier (MM 1%, 247,500, as untiered) against collateral 150,000, so it is partly closed
# with the 0.2% fee back to 1.25 x the margin of what it keeps, at the rate of the tier the
# kept position falls in. Keeping a share x of it: D(x) = 150,000 - 49,500 (1 - x) - 1.25 x
# 24,750,000 rate(x) >= 0, the largest such x.
@pytest.mark.parametrize("tiers, kept", [
    # first tier to 20M at MM 0.8%: D(x) = 100,500 - 198,000 x = 0 at x = 0.5076 (12.56M, in it)
    ("[[20_000_000, 0.016, 0.008], [1e12, 0.02, 0.01]]", 100_500.0 / 198_000.0),
    # first tier to 10M at MM 0.5%: in it D(x) = 100,500 - 105,187.5 x > 0 up to its bound at
    # x = 10/24.75, above it 100,500 - 259,875 x < 0: the position is cut to the bound, 10M
    ("[[10_000_000, 0.01, 0.005], [1e12, 0.02, 0.01]]", 10.0 / 24.75),
])
def test_partial_close_under_tiers_keeps_what_the_lower_tier_allows(tmp_path, tiers, kept):
    snap = _tiered(tmp_path / "snap", tiers)
    sc = stress.run(snap, _scen(tmp_path, snap)).scenarios.set_index("scenario")
    f = 1.0 - kept
    assert sc.liquidated_notional["down-1"] == pytest.approx(24_750_000.0 * f, rel=1e-12)
    assert sc.fees["down-1"] == pytest.approx(49_500.0 * f, rel=1e-12)
    assert sc.accounts_liquidatable["down-1"] == 1
    # flat rates at the whole book's tier would close f = 0.61328 (F1), more than needed
    assert f < F1
    assert sc.bad_debt["down-4"] == pytest.approx(600_000.0)  # collateral < 0: everything


def test_partial_close_under_tiers_where_the_fee_is_above_the_first_tiers_margin(tmp_path):
    # A 1% fee against a first tier of MM 0.5% (T x 0.5% < 1%, as Binance's 1% fee against its
    # 0.4%): keeping more of the first tier costs less fee than it adds margin, so D rises there.
    # The long on 800,000 USDC at 49,500: C = 550,000 < MM 3% x 24,750,000 = 742,500. In the
    # first tier D(x) = 302,500 + 92,812.5 x; past its bound D(x) = 550,000 - 247,500 (1 - x)
    # - 1.25 x 0.03 x 24,750,000 x = 302,500 - 680,625 x, zero at x = 4/9 (11M kept, in the
    # second tier): f = 5/9, not everything.
    snap = _tiered(tmp_path / "snap", "[[10_000_000, 0.01, 0.005], [1e12, 0.06, 0.03]]",
                   'fee_rate = 0.01\nmode = "partial"', collateral=800_000.0)
    sc = stress.run(snap, _scen(tmp_path, snap)).scenarios.set_index("scenario")
    assert sc.liquidated_notional["down-1"] == pytest.approx(24_750_000.0 * 5 / 9, rel=1e-12)
    assert sc.fees["down-1"] == pytest.approx(247_500.0 * 5 / 9, rel=1e-12)
    assert 550_000.0 - 137_500.0 == pytest.approx(1.25 * 0.03 * 11_000_000.0, rel=1e-12)  # restored exactly
    # on 400,000 (C = 150,000) no share restores it, in either tier: everything is closed
    snap = _tiered(tmp_path / "snap2", "[[10_000_000, 0.01, 0.005], [1e12, 0.06, 0.03]]", 'fee_rate = 0.01\nmode = "partial"')
    sc = stress.run(snap, _scen(tmp_path, snap)).scenarios.set_index("scenario")
    assert sc.liquidated_notional["down-1"] == pytest.approx(24_750_000.0, rel=1e-12)


def _tiered_toml(tiers: str, liquidation: str = "") -> str:
    """exchange.toml of partial close-outs under ``tiers``, a fund of 1M USDC."""
    return f"""as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = {{ USDC = 1000000.0 }}
[margin]
future_tiers = {tiers}
[liquidation]
mode = "partial"
{liquidation}
"""


@pytest.mark.parametrize("q, cash", [(20, 25_000.0), (21, 26_500.0)])
def test_where_only_the_rising_part_restores_the_target_the_position_is_cut_to_its_bound(tmp_path, q, cash):
    # A 2% fee against a first tier of MM 0.5% up to 500,000: at 49,500 (N = 49,500 q) D rises
    # to the first tier's bound, D = C - 0.02 (N - 500,000) - 1.25 x 0.005 x 500,000 >= 0
    # (2,075 for q = 20, 2,085 for q = 21), and past it the second tier's 2% leaves it < 0. So
    # the position is cut to the bound: N - 500,000 closed. For q = 20, 500,000 / N * N rounds
    # over the bound; a review saw the whole book closed there.
    write_snapshot(tmp_path / "snap", assets=ASSETS,
                   instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                                 "contract_size": 1.0, "mark_price": 50_000.0}],
                   balances=[{"account_id": "long", "asset": "USDC", "amount": cash},
                             {"account_id": "short", "asset": "USDC", "amount": 1e8}],
                   positions=[{"account_id": "long", "instrument_id": "P", "quantity": q},
                              {"account_id": "short", "instrument_id": "P", "quantity": -q}],
                   exchange_toml=_tiered_toml("[[500_000, 0.01, 0.005], [1e12, 0.04, 0.02]]", "fee_rate = 0.02"))
    snap = stress.load_snapshot(tmp_path / "snap")
    N = q * 49_500.0
    if q == 20:  # the rounding this guards against
        assert (500_000.0 / N) * N > 500_000.0
    row = _scen(tmp_path, snap).names.index("down-1")
    sc = stress.run(snap, _scen(tmp_path, snap)).scenarios.iloc[row]
    assert sc.liquidated_notional == pytest.approx(N - 500_000.0, rel=1e-12)
    assert sc.fees == pytest.approx(0.02 * (N - 500_000.0), rel=1e-12)


@pytest.mark.parametrize("q", [9_990_000.0, 9_990_004.0, 9_990_009.0])
def test_a_position_cut_to_a_tier_bound_is_judged_in_the_lower_tier_at_the_next_step(tmp_path, q):
    # A review's case: q inverse contracts (10 USD face: the notional does not move with the
    # price) on 0.606 q USDC, tiers [[1M, 0.5%], [.., 10%]], no fee; 50,000 -> 47,000 -> 47,511.
    # At 47,000 it can keep the first tier only: cut to 1,000,000 of face. At 47,511 the kept 1M
    # has MM 5,000 against collateral of about 5,640: no second close, whatever the rounding
    # of a kept share about 1% of the book.
    write_snapshot(tmp_path / "snap", assets=ASSETS,
                   instruments=[{"instrument_id": "INV", "kind": "perpetual", "underlying": "BTC", "settlement": "BTC",
                                 "contract_size": 10.0, "mark_price": 50_000.0}],
                   balances=[{"account_id": "acc", "asset": "USDC", "amount": 0.606 * q}],
                   positions=[{"account_id": "acc", "instrument_id": "INV", "quantity": q}],
                   exchange_toml=_tiered_toml("[[1_000_000, 0.01, 0.005], [1e12, 0.2, 0.1]]"))
    snap = stress.load_snapshot(tmp_path / "snap")
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,47000\n2024-01-03,47511\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    row = stress.run(snap, stress.load_scenarios(tmp_path / "p.toml", snap)).scenarios.iloc[0]
    assert row.liquidated_notional == pytest.approx(10 * q - 1e6, rel=1e-12)


def test_partial_close_under_tiers_judges_the_rest_at_its_own_tier_along_a_path(tmp_path):
    # 50,000 -> 49,500 -> 49,300. At 49,500 the long is cut to the first tier's bound, 10M
    # (kept x = 10 / 24.75 of 1,000 contracts), paying 49,500 (1 - x) of fee: collateral
    # 120,500. At 49,300 the rest, 404 contracts (9.96M, first tier, MM 0.5%: 49,798), has lost
    # 1000 x 0.5 x 200 x x = 40,404: collateral 80,096 > 49,798, no second close (at the whole
    # book's 1% it would be 99,596, a breach). End equity 400,000 - 250,000 (1 - x) - 350,000 x
    # - 49,500 (1 - x).
    snap = _tiered(tmp_path / "snap", "[[10_000_000, 0.01, 0.005], [1e12, 0.02, 0.01]]")
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49500\n2024-01-03,49300\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    res = stress.run(snap, stress.load_scenarios(tmp_path / "p.toml", snap))
    x = 10.0 / 24.75
    row = res.scenarios.iloc[0]
    assert row.fees == pytest.approx(49_500.0 * (1 - x), rel=1e-12)
    assert row.liquidated_notional == pytest.approx(24_750_000.0 * (1 - x), rel=1e-12)
    end = 400_000.0 - 250_000.0 * (1 - x) - 350_000.0 * x - 49_500.0 * (1 - x)
    assert end == pytest.approx(80_096.0, abs=1.0)
    long = res.accounts.set_index("account_id").loc["long"]
    assert long.pnl_worst == pytest.approx(end - 400_000.0, rel=1e-12)


def _random_tiered_books(rng, n: int, Q: int, W: int, steps: tuple, present: float, held_low: float):
    """Random books for ``liquidation.kept_share``: ``n`` accounts of ``Q`` positions (each there
    with probability ``present``), their notional ``pn [n, Q, W]`` in ``W`` states, two tier
    bounds each and the rate ``step`` past each, the gross notional ``g [n, W]``, and the share
    ``held [n, W]`` (the whole book in half the states, a share from ``held_low`` in the rest)."""
    pn = rng.uniform(0, 2e6, (n, Q, W)) * (rng.random((n, Q, 1)) < present)
    bound = np.sort(rng.uniform(1e5, 1.5e6, (n, Q, 2)), axis=-1)
    step = rng.uniform(*steps, (n, Q, 2))
    held = np.where(rng.random((n, W)) < 0.5, 1.0, rng.uniform(held_low, 1.0, (n, W)))
    return pn, bound, step, pn.sum(axis=1), held


@pytest.fixture(params=[(1000, 1000), (0, 1000), (0, 0)], ids=["at-once", "walk", "halve-walk"])
def search(request, monkeypatch):
    """kept_share's three searches: every bound at once (AT_ONCE_BOUNDS), a walk between
    bounds (WALK_BOUNDS), halvings then a walk."""
    monkeypatch.setattr(liquidation, "AT_ONCE_BOUNDS", request.param[0])
    monkeypatch.setattr(liquidation, "WALK_BOUNDS", request.param[1])


def test_kept_share_under_tiers_is_the_largest_share_that_restores_the_target(search):
    # The defining property against a NumPy evaluation of D(x) (written here, not the
    # engine's): D(x) >= 0 and D just above x < 0, on random books of several positions with
    # three tiers each, collateral, fee and targets; x = 0 where even D(0) < 0. With each of
    # the searches.
    rng, n, W = np.random.default_rng(11), 40, 16
    pn, bound, step, g, held = _random_tiered_books(rng, n, 5, W, (0.001, 0.02), 0.8, 0.2)
    m = 0.005 * g + rng.uniform(0, 1e4, (n, W))  # first-tier margin, options' included
    target, fee_rate = 1.25, 0.0005

    def margin(y):  # of a share y of the book: each position at the rate of its tier there
        extra = np.sum(pn * np.sum(step[:, :, None, :] * ((y[:, None, :] * pn)[..., None] > bound[:, :, None, :]), -1), 1)
        return y * (m + extra)

    coll = rng.uniform(-0.05, 0.999, (n, W)) * margin(held)  # every account in breach

    def D(x):
        return coll - fee_rate * g * held * (1 - x) - target * margin(held * x)

    x = np.asarray(liquidation.kept_share(*(jnp.asarray(v) for v in (coll, held, m, g, pn)),
                                          (jnp.asarray(bound), jnp.asarray(step)), target, fee_rate))
    scale = np.abs(coll) + m + g * fee_rate
    some = (D(np.zeros_like(x)) >= 0)
    assert some.mean() > 0.2 and (~some).mean() > 0.05
    assert np.all(x[~some] == 0.0)
    assert np.all(D(x)[some] >= -1e-9 * scale[some])
    assert np.all(D(np.minimum(x + 1e-6, 1.0))[some & (x < 1)] < 0)
    # and a close where a tier bound cuts the position: x at a bound exactly for some
    cut = np.isclose((held * x)[:, None, :, None] * pn[..., None], bound[:, :, None, :], rtol=1e-12).any(axis=(1, 3))
    assert cut[some].any() and (~cut[some]).any()


def test_kept_share_under_tiers_where_the_fee_is_above_the_first_tiers_margin_against_a_grid(search):
    # A 2% fee against first-tier rates of 0.5%: D rises through the low tiers and falls past
    # the share x_t where 1.25 x the rate reaches the fee. Against D(x) on a grid of 20,001
    # shares (NumPy, written here): the share kept restores the target, and it is no smaller
    # than the largest grid share past x_t that does (one grid step of slack). With each of
    # the searches.
    rng, n, W = np.random.default_rng(12), 30, 8
    pn, bound, step, g, held = _random_tiered_books(rng, n, 3, W, (0.005, 0.05), 0.9, 0.3)
    m = 0.005 * g
    target, fee_rate = 1.25, 0.02

    def rate(y, right=False):  # margin per unit of the book held at a share y: [n, W] or [n, W, G]
        yy = y[:, None] if y.ndim == 2 else y[:, None, :, :]
        pq = pn if y.ndim == 2 else pn[..., None]
        scaled = (yy * pq)[..., None]
        b = bound[:, :, None, :] if y.ndim == 2 else bound[:, :, None, None, :]
        st = step[:, :, None, :] if y.ndim == 2 else step[:, :, None, None, :]
        over = scaled >= b if right else scaled > b
        return (m if y.ndim == 2 else m[..., None]) + np.sum(pq * np.sum(st * over, -1), 1)

    coll = rng.uniform(-0.05, 0.999, (n, W)) * held * rate(held)  # every account in breach

    def D(x, right=False):
        h = held if x.ndim == 2 else held[..., None]
        c, gg = (coll, g) if x.ndim == 2 else (coll[..., None], g[..., None])
        return c - fee_rate * gg * h * (1 - x) - target * h * x * rate(h * x, right)

    x = np.asarray(liquidation.kept_share(*(jnp.asarray(v) for v in (coll, held, m, g, pn)),
                                          (jnp.asarray(bound), jnp.asarray(step)), target, fee_rate))
    grid = np.broadcast_to(np.linspace(0.0, 1.0, 20_001), (n, W, 20_001))
    falling = target * rate(held[..., None] * grid, right=True) >= fee_rate * g[..., None]
    ok = (D(grid) >= 0) & falling
    best = np.where(ok.any(-1), np.max(np.where(ok, grid, -1.0), -1), -1.0)
    scale = np.abs(coll) + m + g * fee_rate
    assert (target * m < fee_rate * g).mean() > 0.5 and (best > 0).mean() > 0.2  # the case is exercised
    kept = x > 0  # x = 0: everything is closed, the outcome where no share is found to restore it
    assert np.all(D(x)[kept] >= -1e-9 * scale[kept])
    assert np.all(x >= best - 1e-4)
    # Where no share past x_t restores the target, x_t itself is kept if it does (D rises up to
    # it). x_t exactly: the first tier bound (as a share) where 1.25 x the rate reaches the fee.
    cand = (bound[:, :, None, :] / (np.where(pn > 0, pn, np.inf) * held[:, None, :])[..., None])  # [n, Q, W, 2]
    cand = np.moveaxis(cand, 2, 1).reshape(n, W, -1)
    cand = np.concatenate([cand, np.ones((n, W, 1))], axis=-1)
    falls = target * rate(held[..., None] * cand, right=True) >= fee_rate * g[..., None]
    x_t = np.min(np.where(falls & (cand > 0), cand, 1.0), axis=-1)
    keep_t = (best < 0) & (x_t < 1) & (D(x_t * (1 - 1e-12)) >= 0)
    assert keep_t.sum() >= 3  # the case is exercised
    np.testing.assert_allclose(x[keep_t], x_t[keep_t], rtol=1e-12)


def test_kept_share_under_tiers_is_exact_between_bounds_closer_than_float32s_precision(search):
    # Two positions of 1M notional with bounds at 300,000 and 300,000.0005 (shares 0.3 and
    # 0.3 + 5e-10 of the book): the root of the run between them, x* = 0.3 + 2.5e-10, is kept,
    # not the first bound (a search to 2^-24 of the book cannot tell them apart: the halvings
    # kept 0.3 less a few ulps).
    m, rise, target = 20_000.0, 1_000.0, 1.25
    x_star = 0.3 + 2.5e-10
    coll = target * x_star * (m + rise)  # D(x*) = 0 on the run's line, rate m + one step
    pn = jnp.asarray([[[1e6], [1e6]]])  # [n, Q, W]
    ladder = (jnp.asarray([[[300_000.0], [300_000.0005]]]), jnp.asarray([[[rise / 1e6], [rise / 1e6]]]))
    x = liquidation.kept_share(jnp.asarray([[coll]]), jnp.ones((1, 1)), jnp.asarray([[m]]), jnp.asarray([[2e6]]),
                               pn, ladder, target, None)
    assert float(x[0, 0]) == pytest.approx(x_star, rel=1e-14)


def test_kept_share_under_tiers_keeps_a_flat_run_where_d_is_zero_along_it(search):
    # target x m = the fee on the book and C = the fee: D(0) = 0 and D stays 0 up to the first
    # position's bound at 0.6 (a second position's bound at 0.1, of step 0, lies inside that
    # run). The largest share that restores the target is the bound, kept a few ulps under it.
    args = (jnp.asarray([[10_000.0]]), jnp.ones((1, 1)), jnp.asarray([[5_000.0]]), jnp.asarray([[1_000_000.0]]),
            jnp.asarray([[[1_000_000.0], [1.0]]]))
    ladder = (jnp.asarray([[[600_000.0], [0.1]]]), jnp.asarray([[[0.01], [0.0]]]))
    x = float(liquidation.kept_share(*args, ladder, 2.0, 0.01)[0, 0])
    assert 0.6 * (1 - 1e-14) < x < 0.6


def test_kept_share_looking_at_every_bound_at_once_holds_no_bounds_squared_array():
    # [accounts, scenarios, bounds, bounds] written out would be 16 x 16 x 8 bytes a cell at 16
    # bounds: the at-once search's temporaries stay within twice the walk's
    import jax

    n, W, Q, K1 = 64, 64, 4, 4
    S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float64)  # noqa: E731
    args = (S(n, W), S(n, W), S(n, W), S(n, W), S(n, Q, W), (S(n, Q, K1), S(n, Q, K1)))
    temp = {}
    for name, at_once in (("at once", 1000), ("walk", 0)):
        liquidation.AT_ONCE_BOUNDS, saved = at_once, liquidation.AT_ONCE_BOUNDS
        try:
            fn = jax.jit(lambda c, h, m, g, pn, lad: liquidation.kept_share(c, h, m, g, pn, lad, 1.25, 0.001))
            temp[name] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
        finally:
            liquidation.AT_ONCE_BOUNDS = saved
    assert temp["at once"] <= 2 * temp["walk"], temp


def _portfolio_book(folder, liquidation: str, collateral: float = 3_900_000.0):
    """``_book`` under the portfolio model (Deribit's BTC defaults)."""
    _book(folder, liquidation, collateral)
    toml = (folder / "exchange.toml").read_text().replace("[margin]\n", '[margin]\nmodel = "portfolio"\n')
    (folder / "exchange.toml").write_text(toml)
    return stress.load_snapshot(folder)


# Under the portfolio model (BTC: +-16% grid, 1% roll shock on a perpetual, delta shock 10% of
# the net delta above 20M USD, MM 0.8 x IM) a linear long of notional n at a state needs
# M(y) = 0.8 (0.17 n y + 0.1 max(n y - 20M, 0)) for a share y of it: a kink at y = 20M / n.
def _pm_share(n: float, y: float) -> float:
    return 0.8 * (0.17 * n * y + 0.1 * max(n * y - 20e6, 0.0))


def test_partial_close_under_the_portfolio_model_solves_past_and_below_the_delta_shock_kink(tmp_path):
    # The long of _book on 3,900,000 USDC, fee 0.2%, target 1.25.
    # down-1 (49,500, n = 24.75M): C = 3,650,000 < M(1) = 0.8 (4,207,500 + 475,000) = 3,746,000.
    # Kink at y = 0.80808: D there = 3,600,500 - 4,158,000 y > 0, so the root is past it, on
    # D(y) = 3,600,500 + 2,000,000 - 6,633,000 y: y = 5,600,500 / 6,633,000.
    # down-4 (48,000, n = 24M): C = 2,900,000, M(1) = 0.8 (4,080,000 + 400,000). Below the kink
    # at 0.8333, D(y) = 2,852,000 - 4,032,000 y, whose root 0.70734 is below it: the kept share
    # pays no delta shock at all.
    # Scaling the whole book's margin (the flat formula) would keep 0.77714 and 0.64350.
    snap = _portfolio_book(tmp_path / "snap", 'fee_rate = 0.002\nmode = "partial"\nadl = false')
    res = stress.run(snap, _scen(tmp_path, snap))
    sc = res.scenarios.set_index("scenario")
    y1, y4 = 5_600_500.0 / 6_633_000.0, 2_852_000.0 / 4_032_000.0
    for name, n, y, c in (("down-1", 24.75e6, y1, 3_650_000.0), ("down-4", 24e6, y4, 2_900_000.0)):
        assert sc.fees[name] == pytest.approx(0.002 * n * (1 - y), rel=1e-12)
        assert sc.liquidated_notional[name] == pytest.approx(n * (1 - y), rel=1e-12)
        assert sc.accounts_liquidatable[name] == 1
        # after the close, collateral is the target times the margin of what is kept
        assert c - 0.002 * n * (1 - y) == pytest.approx(1.25 * _pm_share(n, y), rel=1e-12)
        flat = 1 - (1.25 * _pm_share(n, 1.0) - c) / (1.25 * _pm_share(n, 1.0) - 0.002 * n)
        assert abs(flat - y) > 0.06
    assert sc.fees["flat"] == 0.0  # C = 3,900,000 > M(1) = 3,800,000 at 50,000
    # the market takes the closed share over at the mark: the matched book still sums to 0
    np.testing.assert_allclose(sc.pnl_total + sc.pnl_closed_out + sc.fees, 0.0, atol=1e-6)
    one = stress.run(snap, _scen(tmp_path, snap), chunk_size=1).scenarios.set_index("scenario")
    np.testing.assert_allclose(one.select_dtypes("number"), sc.select_dtypes("number"), rtol=1e-12, atol=1e-9)


def test_partial_close_under_the_portfolio_model_judges_the_rest_at_its_own_delta_shock_along_a_path(tmp_path):
    # 50,000 -> 49,500 -> 47,000. At 49,500 the share y1 of down-1 above is kept. At 47,000 (n
    # = 23.5M) the rest's delta, 23.5M y1 = 19.84M, is under the threshold: its margin is
    # 0.8 x 0.17 x 23.5M y1 = 2,698,507, without the 10% shock the whole book would pay there,
    # and collateral 3,900,000 - 250,000 (1 - y1) - 1,500,000 y1 - fee1 = 2,586,871 is below it:
    # a second close, to y2 = (C2 - 47,000 y1) / (1.25 x 0.8 x 0.17 x 23.5M - 47,000).
    snap = _portfolio_book(tmp_path / "snap", 'fee_rate = 0.002\nmode = "partial"\nadl = false')
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49500\n2024-01-03,47000\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    row = stress.run(snap, stress.load_scenarios(tmp_path / "p.toml", snap)).scenarios.iloc[0]
    y1 = 5_600_500.0 / 6_633_000.0
    fee1 = 0.002 * 24.75e6 * (1 - y1)
    c2 = 3_900_000.0 - 250_000.0 * (1 - y1) - 1_500_000.0 * y1 - fee1
    assert 23.5e6 * y1 < 20e6 < 23.5e6 and c2 < _pm_share(23.5e6, y1)
    y2 = (c2 - 47_000.0 * y1) / (1.25 * 0.8 * 0.17 * 23.5e6 - 47_000.0)
    assert row.fees == pytest.approx(fee1 + 0.002 * 23.5e6 * (y1 - y2), rel=1e-12)
    assert row.liquidated_notional == pytest.approx(24.75e6 * (1 - y1) + 23.5e6 * (y1 - y2), rel=1e-12)
    assert row.accounts_liquidatable == 1


def test_kept_share_under_the_portfolio_model_is_the_largest_share_that_restores_the_target():
    # Against D(y) on a grid of 20,001 shares of what is held, NumPy, written here: random
    # books of four blocks with delta-shock kinks, collateral, a fee up to 2% (on hedged books,
    # whose notional is far above their risk, D may then rise before it falls) and targets. D(y) = 0 at the share kept (or it is all of what is
    # held... never here: every account breaches), D < 0 just above it, and no grid share above
    # it restores the target; y = 0 exactly where no grid share does.
    rng, n, B, W = np.random.default_rng(21), 60, 4, 16
    lin = rng.uniform(0.01, 0.2, (n, W)) * rng.uniform(1e5, 1e7, (n, 1))
    delta = rng.uniform(0, 3e6, (n, B, W)) * (rng.random((n, B, 1)) < 0.8)
    mds, thr, factor = rng.uniform(0.05, 0.3, (1, B, 1)), rng.uniform(0, 1.5e6, (1, B, 1)), 0.8
    g = rng.uniform(0.5, 100.0, (n, W)) * lin  # hedged books: a gross notional far above the risk
    held = np.where(rng.random((n, W)) < 0.5, 1.0, rng.uniform(0.2, 1.0, (n, W)))
    target, fee_rate = 1.25, rng.choice([0.0, 0.002, 0.02], (n, 1))

    def M(y):  # [n, W, X] shares of the original book
        return y * lin[..., None] + factor * np.sum(
            mds[..., None] * np.maximum(y[:, None] * delta[..., None] - thr[..., None], 0.0), axis=1)

    coll = rng.uniform(-0.05, 0.999, (n, W)) * M(held[..., None])[..., 0]  # every account in breach

    def D(y):
        return coll[..., None] - fee_rate[..., None] * g[..., None] * (held[..., None] - y) - target * M(y)

    blocks = liquidation.Blocks(lin=jnp.asarray(lin), delta=jnp.asarray(delta), mds=jnp.asarray(mds),
                                thr=jnp.asarray(thr), factor=factor)
    y = np.asarray(liquidation.kept_share_blocks(jnp.asarray(coll), jnp.asarray(held), jnp.asarray(g), blocks,
                                                 blocks.lin, blocks.delta, target, jnp.asarray(fee_rate)))
    grid = held[..., None] * np.linspace(0.0, 1.0, 20_001)
    ok = D(grid) >= 0
    best = np.where(ok.any(-1), np.max(np.where(ok, grid, -1.0), -1), -1.0)
    scale = np.abs(coll) + lin + g * 0.02
    some = best >= 0
    assert some.mean() > 0.3 and (~some).mean() > 0.05
    assert ((best > 0) & ~ok[..., 0]).sum() >= 3  # D rises to where it restores the target
    kinked = (y[:, None] * delta > thr) & (delta > 0)  # some kept shares pay a delta shock
    assert kinked.any() and (~kinked.any(axis=1) & some).any()
    assert np.all(y[~some] == 0.0)
    assert np.all(np.abs(D(y[..., None])[..., 0][some]) <= 1e-9 * scale[some])
    assert np.all(D(np.minimum(y + 1e-6 * held, held)[..., None])[..., 0][some] < 0)
    assert np.all(y[some] >= best[some] - 1e-12 * held[some])


def test_a_group_column_left_empty_means_no_groups(tmp_path):
    folder = tmp_path / "snap"
    _cover2_book(folder, [None, None, None, None])
    snap = stress.load_snapshot(folder)
    assert all(g is None for g in snap.account_group)


@pytest.mark.parametrize("columns", [1, 4, 64])
def test_adl_charges_from_each_parts_candidates_equal_the_whole_exchanges(monkeypatch, columns):
    # Auto-deleveraging by hand (a loop over winners in rank order, ties by id) against the
    # candidates of three parts of the exchange merged (what a cluster's workers send), with
    # the 6 deficit scenarios ranked one, four (blocks of 4 and 2) or all at a time.
    monkeypatch.setattr(engine, "ADL_COLUMNS", columns)
    rng = np.random.default_rng(4)
    n, C = 300, 6
    pnl = rng.normal(0.0, 100.0, (n, C))
    pnl[:40] = np.round(pnl[:40])  # equal P&L, equal terms below: ties in rank
    liq = rng.random((n, C)) < 0.2
    unrealised, base = np.where(np.arange(n) < 40, 0.0, rng.normal(0, 50, n)), np.where(np.arange(n) < 40, 100.0, rng.uniform(50, 500, n))
    leverage = np.where(np.arange(n) < 40, 2.0, rng.uniform(0, 10, n))
    tie = rng.permutation(n)  # the id order
    deficit = np.array([0.0, 10.0, 500.0, 3_000.0, 1e9, 50.0])

    want = np.zeros((n, C))
    for c in range(C):
        rank = (unrealised + pnl[:, c]) / base * leverage
        left = deficit[c]
        for a in sorted(range(n), key=lambda a: (-rank[a], tie[a])):
            profit = 0.0 if liq[a, c] else max(pnl[a, c], 0.0)
            want[a, c] = min(max(left, 0.0), profit)
            left -= profit

    parts = np.array_split(np.arange(n), 3)
    cands = [engine.adl_candidates(pnl[p], liq[p], deficit, unrealised[p], base[p], leverage[p], tie[p]) for p in parts]
    col, _, *rest = (np.concatenate(x) for x in zip(*cands))
    rows = np.concatenate([p[c[1]] for p, c in zip(parts, cands)])
    assert len(col) < n * C / 2  # a part sends its winners up to the deficit, not its P&L
    got = np.zeros((n, C))
    c, r, charge = engine.adl_charges((col, rows, *rest), deficit)
    got[r, c] = charge
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    assert got[:, 4].sum() == pytest.approx(np.where(liq[:, 4], 0, np.maximum(pnl[:, 4], 0)).sum())  # all winners


SHOCKS = """[[scenario]]
name = "btc-down-30"
moves = { BTC = -0.30, ETH = -0.35, SOL = -0.45 }
vol_shift = { BTC = 0.20, ETH = 0.25, SOL = 0.30 }

[[scenario]]
name = "btc-up-20"
moves = { BTC = 0.20, ETH = 0.22, SOL = 0.30 }
vol_shift = { BTC = 0.05, ETH = 0.05, SOL = 0.05 }
"""


def test_a_one_off_shock_in_partial_mode_with_impact_does_not_depend_on_the_paths_beside_it(sample_dir, tmp_path):
    # In a file with paths a one-off shock is a path whose every step is the shock. The impact
    # charged at its first partial close could leave an account below the target, and the
    # repeated step closed it again: the shock's row (fees, notional closed, P&L) then
    # depended on whether the file also held paths. It acts at its first step only.
    snap_dir = copy_snapshot(sample_dir, tmp_path / "snap", lambda toml: toml.replace(
        '[liquidation]\n', '[liquidation]\nmode = "partial"\nfee_rate = 0.002\n[liquidation.impact.BTC]\nspread = 0.001\nk = 0.5\n'
        'daily_vol = 0.04\ndaily_volume = 2e8\n[liquidation.impact.ETH]\nspread = 0.002\nk = 0.6\ndaily_vol = 0.05\n'
        'daily_volume = 1e8'))
    assert 'mode = "partial"' in (snap_dir / "exchange.toml").read_text()
    (tmp_path / "alone.toml").write_text(SHOCKS)
    (tmp_path / "mixed.toml").write_text(SHOCKS + '\n[[montecarlo]]\nname = "mc"\npaths = 8\nsteps = 2\nhorizon_days = 2\n'
                                         'seed = 1\nvol = { BTC = 0.8, ETH = 1.0, SOL = 1.2 }\n')
    snap = stress.load_snapshot(snap_dir)
    alone, mixed = (stress.load_scenarios(tmp_path / f"{k}.toml", snap) for k in ("alone", "mixed"))
    assert mixed.steps == 2
    cols = ["liquidated_notional", "impact_cost", "fees", "bad_debt", "pnl_total"]
    a = stress.run(snap, alone).scenarios.set_index("scenario")[cols]
    m = stress.run(snap, mixed).scenarios.set_index("scenario").loc[a.index, cols]
    assert (a.impact_cost > 0).all() and (a.fees > 0).all()  # partial closes that pay impact
    pd.testing.assert_frame_equal(m, a, check_exact=False, rtol=1e-12, atol=1e-6)
    pa = stress.pnl_matrix(snap, alone)
    np.testing.assert_allclose(stress.pnl_matrix(snap, mixed)[pa.columns].to_numpy(), pa.to_numpy(), rtol=0, atol=1e-6)


COSTS = ('fee_rate = 0.002\n[liquidation.impact.BTC]\nspread = 0.001\nk = 0.5\ndaily_vol = 0.04\n'
         'daily_volume = 2e8\n[liquidation.impact.ETH]\nspread = 0.002\nk = 0.6\ndaily_vol = 0.05\ndaily_volume = 1e8\n')


@pytest.mark.parametrize("mode", ['mode = "partial"', "oracle_lag_steps = 1"], ids=["partial", "lag"])
def test_a_short_replay_window_does_not_depend_on_the_longer_windows_beside_it(sample_dir, tmp_path, mode):
    # Daily prices without the 5th: the 3-day window from the 3rd holds two rows (the 4th and
    # the 6th) beside windows of three, so it is padded with its last row. That row is the
    # same instant again: a partial close there closed again after its fee and impact, and
    # an oracle lag of 1 acted on the 6th's breach, which the same window in a history of its
    # own rows (two steps) never does. It acts at its own steps only (Scenarios.length).
    snap_dir = copy_snapshot(sample_dir, tmp_path / "snap", lambda toml: toml.replace(
        "[liquidation]\n", f"[liquidation]\n{mode}\n{COSTS}"))
    snap = stress.load_snapshot(snap_dir)
    days, btc = [1, 2, 3, 4, 6, 7], [50_000, 48_000, 47_000, 44_000, 41_000, 40_000]
    for name, keep in (("all", days), ("own", [3, 4, 6])):
        rows = [f"2024-01-{d:02d},{b},{b / 20},{b / 500}" for d, b in zip(days, btc) if d in keep]
        (tmp_path / f"{name}.csv").write_text("date,BTC,ETH,SOL\n" + "\n".join(rows) + "\n")
        (tmp_path / f"{name}.toml").write_text(f'[[replay]]\nname = "h"\nprices = "{name}.csv"\nhorizon_days = 3\n')
    every, own = (stress.load_scenarios(tmp_path / f"{n}.toml", snap) for n in ("all", "own"))
    assert (every.steps, own.steps, own.names) == (3, 2, ("h:2024-01-03",))
    # a window ends at the first row 3 days on or later: from the 2nd, the 3rd, 4th and 6th
    np.testing.assert_array_equal(every.length, [3, 3, 2, 2])
    cols = ["liquidated_notional", "impact_cost", "fees", "bad_debt", "shortfall_total", "pnl_total",
            "accounts_liquidatable"]
    got = stress.run(snap, every).scenarios.set_index("scenario").loc[["h:2024-01-03"], cols]
    want = stress.run(snap, own).scenarios.set_index("scenario")[cols]
    assert (want.fees > 0).all() and (want.impact_cost > 0).all()  # closes that pay both
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=1e-6)
    sens = [sensitivities.sensitivities(snap, s)["scenarios"].set_index("scenario").loc[["h:2024-01-03"]] for s in (every, own)]
    pd.testing.assert_frame_equal(sens[0][["bad_debt", "shortfall_total"]], sens[1][["bad_debt", "shortfall_total"]],
                                  check_exact=False, rtol=1e-12, atol=1e-6)
    if "lag" in mode:  # cascades model full close-out only: with feedback, nothing moves past the 6th either
        from stress import cascade

        a, b = cascade.run(snap, every), cascade.run(snap, own)
        for k in ("bad_debt_feedback", "fees_feedback", "accounts_liquidated_feedback", "bad_debt_no_feedback"):
            np.testing.assert_allclose(a[k][2], b[k][0], rtol=1e-12, err_msg=k)
        np.testing.assert_allclose(a["price_impact"][2], b["price_impact"][0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(a["accounts_liquidated_steps"][2], [*b["accounts_liquidated_steps"][0], 0])


def test_a_lag_is_refused_where_it_reaches_past_the_shortest_replay_window(tmp_path):
    # 3-day windows over daily prices missing the 5th: the window from the 3rd holds two rows,
    # the others three. A lag of 2 would never act on that window's breaches (nor on the one
    # from the 4th), as the window alone would refuse it; it is refused, naming the window.
    rows = [f"2024-01-{d:02d},{50_000 - 1_000 * d}" for d in (1, 2, 3, 4, 6, 7)]
    (tmp_path / "h.csv").write_text("date,BTC\n" + "\n".join(rows) + "\n")
    (tmp_path / "h.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 3\n')
    for text, key in (("oracle_lag_steps = 2", "oracle_lag_steps"), ("oracle_lags = [0, 2]", "oracle_lags")):
        with pytest.raises(stress.InputError, match="not less than the 2 steps of path 'h:2024-01-03', the shortest") as err:
            stress.load_scenarios(tmp_path / "h.toml", _book(tmp_path / key, text))
        assert (err.value.file, err.value.column) == ("exchange.toml", key)
    scen = stress.load_scenarios(tmp_path / "h.toml", _book(tmp_path / "one", "oracle_lag_steps = 1"))
    assert scen.steps == 3 and scen.length.tolist() == [3, 3, 2, 2]


def test_partial_mode_worst_pnl_is_the_worst_scenarios_where_tiles_are_padded(sample_dir, tmp_path):
    # 12 paths in tiles of 16: the 4 padding columns repeat the last path, and take its flags.
    # Treated as one-off shocks (acting at the first step only) they gave accounts a worst P&L
    # no scenario of the set has (a review's 9 of 300 accounts).
    snap_dir = copy_snapshot(sample_dir, tmp_path / "snap",
                             lambda toml: toml.replace("[liquidation]\n", '[liquidation]\nmode = "partial"\n'))
    (tmp_path / "mc.toml").write_text('[[montecarlo]]\nname = "mc"\npaths = 12\nsteps = 3\nhorizon_days = 3\nseed = 1\n'
                                      'vol = { BTC = 1.2, ETH = 1.4, SOL = 1.8 }\n')
    snap = stress.load_snapshot(snap_dir)
    scen = stress.load_scenarios(tmp_path / "mc.toml", snap)
    assert engine.scenario_tile(len(scen), scen.steps, False, np.float64) > len(scen)  # padded
    res = stress.run(snap, scen)
    acc = res.accounts.set_index("account_id")
    pnl = stress.pnl_matrix(snap, scen).loc[acc.index]
    assert (res.scenarios.liquidated_notional > 0).any()  # partial close-outs happen
    np.testing.assert_allclose(acc.pnl_worst, pnl.min(axis=1), rtol=1e-12, atol=1e-9)
    assert (acc.scenario_worst == pnl.idxmin(axis=1)).all()
