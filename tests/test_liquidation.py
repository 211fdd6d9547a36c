"""Liquidation: close-out at the first breach, the liquidation fee and where it goes,
checked against hand arithmetic on a two-account book."""

from __future__ import annotations

import numpy as np
import pytest

import stress

from .conftest import write_snapshot

ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}]


def _book(folder, liquidation: str = ""):
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
        balances=[{"account_id": "long", "asset": "USDC", "amount": 400_000.0},
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


@pytest.mark.parametrize("text", ["oracle_lag_steps = -1", "oracle_lag_steps = 1.5", "oracle_lags = [1, -2]",
                                  "oracle_lags = 3"])
def test_bad_oracle_lags_fail_at_load(tmp_path, text):
    with pytest.raises(stress.InputError) as err:
        _book(tmp_path / "snap", text)
    assert err.value.column == text.split(" ")[0]
