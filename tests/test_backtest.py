"""Margin backtesting (docs/backtest.md): the test statistics against scipy re-derivations and
published tables, and the backtest itself on a hand-made book and a hand-made price history.

No backtesting library is a test dependency, so Kupiec's and Christoffersen's statistics are
re-derived here from their likelihoods with ``scipy.stats`` (binomial / Bernoulli log-pmfs,
chi-square survival functions), and checked against the published Kupiec (1995) non-rejection
regions and the Basel (1996) traffic-light table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import bernoulli, binom, chi2
from typer.testing import CliRunner

import stress
from stress import backtest as bt
from stress.cli import app

from .conftest import EXCHANGE_TOML, write_snapshot

# --------------------------------------------------------------------------------------------
# Kupiec proportion of failures


@pytest.mark.parametrize("x", [0, 1, 2, 3, 7, 15, 250])
def test_kupiec_is_the_binomial_likelihood_ratio(x):
    n, p = 250, 0.01
    # LR = -2 ln[ L(p) / L(x/n) ] with L the binomial likelihood; the coefficient cancels.
    expected = 2.0 * (binom.logpmf(x, n, x / n) - binom.logpmf(x, n, p))
    lr, pv = bt.kupiec_pof(x, n, p)
    assert lr == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert pv == pytest.approx(chi2.sf(expected, 1), rel=1e-9, abs=1e-300)


def test_kupiec_worked_value_seven_exceptions_in_250_days():
    # 7 exceptions where 2.5 are expected: LR = 2[7 ln(7/2.5) + 243 ln(243/247.5)] = 5.497,
    # rejected at 5% (chi2(1) 95% quantile 3.841), p = 0.019.
    by_hand = 2 * (7 * np.log(7 / 2.5) + 243 * np.log(243 / 247.5))
    lr, pv = bt.kupiec_pof(7, 250, 0.01)
    assert lr == pytest.approx(by_hand, rel=1e-12) and lr == pytest.approx(5.497, abs=1e-3)
    assert pv == pytest.approx(0.0190, abs=1e-4)


@pytest.mark.parametrize("p, n, lo, hi", [
    # Kupiec (1995), as tabulated in Jorion, Value at Risk (3rd ed.), ch. 6: the counts
    # N with lo < N < hi are not rejected at 95%. (The table's T = 255, p = 1% cell, "N < 7",
    # keeps N = 0, whose LR is 5.13 > 3.84; the formula rejects it, so that cell is left out.)
    (0.01, 510, 1, 11), (0.01, 1000, 4, 17),
    (0.025, 255, 2, 12), (0.025, 510, 6, 21), (0.025, 1000, 15, 36),
    (0.05, 255, 6, 21), (0.05, 510, 16, 36), (0.05, 1000, 37, 65),
])
def test_kupiec_reproduces_the_published_nonrejection_regions(p, n, lo, hi):
    kept = [x for x in range(n + 1) if bt.kupiec_lr(x, n, p) < chi2.ppf(0.95, 1)]
    assert (kept[0], kept[-1]) == (lo + 1, hi - 1)
    assert kept == list(range(lo + 1, hi))


def test_kupiec_vectorised_equals_scalar_and_rejects_impossible_counts():
    x = np.array([0, 3, 9, 40])
    lr, pv = bt.kupiec_pof(x, 250, 0.01)
    assert np.allclose(lr, [bt.kupiec_pof(int(v), 250, 0.01)[0] for v in x], rtol=1e-14)
    assert np.allclose(pv, [bt.kupiec_pof(int(v), 250, 0.01)[1] for v in x], rtol=1e-14)
    assert np.isnan(bt.kupiec_lr(0, 0, 0.01))
    with pytest.raises(ValueError):
        bt.kupiec_pof(5, 4, 0.01)
    with pytest.raises(ValueError):
        bt.kupiec_pof(1, 4, 1.0)


# --------------------------------------------------------------------------------------------
# Christoffersen independence and conditional coverage


def markov_lr(hits) -> float:
    """LR_ind re-derived from Bernoulli log-likelihoods of each transition (scipy)."""
    h = np.asarray(hits, int)
    prev, nxt = h[:-1], h[1:]
    pi = nxt.mean()
    ll_iid = bernoulli.logpmf(nxt, pi).sum()
    pi_s = {s: nxt[prev == s].mean() if (prev == s).any() else 0.5 for s in (0, 1)}
    ll_markov = sum(bernoulli.logpmf(nxt[prev == s], pi_s[s]).sum() for s in (0, 1))
    return 2.0 * (ll_markov - ll_iid)


SEQUENCES = {
    "clustered": [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
    "alternating": [0, 1, 0, 1, 0, 1, 0, 1, 0, 0],
    "one exceedance, last": [0] * 9 + [1],  # state 1 is never left: n10 = n11 = 0
    "one exceedance, first": [1] + [0] * 9,
    "never": [0] * 12,
    "always": [1] * 12,
    "long random": list(np.random.default_rng(3).random(300) < 0.04),
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_christoffersen_is_the_markov_likelihood_ratio(name):
    hits = SEQUENCES[name]
    lr, pv = bt.christoffersen_independence(hits)
    assert lr == pytest.approx(markov_lr(hits), rel=1e-10, abs=1e-12)
    assert pv == pytest.approx(chi2.sf(markov_lr(hits), 1), rel=1e-9)


def test_christoffersen_counts_transitions_and_flags_clustering():
    hits = SEQUENCES["clustered"]
    # pairs: 00 00 01 11 11 10 00 00 00 01 11 10 00 -> n00=6, n01=2, n10=2, n11=3
    assert bt.transition_counts(hits).tolist() == [[6, 2], [2, 3]]
    lr, _ = bt.christoffersen_independence(hits)
    # pi0 = 2/8, pi1 = 3/5, pi = 5/13, written out:
    by_hand = 2 * (6 * np.log(6 / 8) + 2 * np.log(2 / 8) + 2 * np.log(2 / 5) + 3 * np.log(3 / 5)
                   - 8 * np.log(8 / 13) - 5 * np.log(5 / 13))
    assert lr == pytest.approx(by_hand, rel=1e-12)
    # One block of five exceedances is rejected; a sequence whose transition rates equal its
    # overall rate (n00=4, n01=2, n10=2, n11=1: pi0 = pi1 = pi = 1/3) has LR exactly 0.
    assert bt.christoffersen_independence([0] * 10 + [1] * 5 + [0] * 10)[1] < 0.001
    assert bt.christoffersen_independence([0, 0, 1, 1, 0, 0, 0, 1, 0, 0]) == pytest.approx((0.0, 1.0), abs=1e-12)


def test_christoffersen_needs_two_observations():
    assert np.isnan(bt.christoffersen_independence([True])[0])
    assert np.isnan(bt.christoffersen_independence([])[1])


def test_christoffersen_vectorised_over_accounts_equals_each_row():
    rows = np.array([SEQUENCES["clustered"], SEQUENCES["alternating"][:10] + [0] * 4], bool)
    lr, _ = bt.christoffersen_independence(rows)
    assert np.allclose(lr, [markov_lr(r) for r in rows], rtol=1e-10)


def test_conditional_coverage_adds_both_statistics_with_two_degrees_of_freedom():
    hits = SEQUENCES["long random"]
    lr, pv = bt.conditional_coverage(hits, 0.01)
    expected = bt.kupiec_lr(int(np.sum(hits)), len(hits), 0.01) + markov_lr(hits)
    assert lr == pytest.approx(expected, rel=1e-10)
    assert pv == pytest.approx(chi2.sf(expected, 2), rel=1e-9)


# --------------------------------------------------------------------------------------------
# Basel traffic light


def test_basel_zones_reproduce_the_250_day_99_percent_table():
    # Basel Committee (1996), the 250-observation table: green 0-4, yellow 5-9, red 10 or more.
    zones = [bt.basel_zone(x, 250, 0.01) for x in range(16)]
    assert zones == ["green"] * 5 + ["yellow"] * 5 + ["red"] * 6
    assert list(bt.basel_zone(np.arange(16), 250, 0.01)) == zones
    # The cumulative probabilities the table prints next to the boundaries.
    assert [round(100 * binom.cdf(x, 250, 0.01), 2) for x in (4, 5, 9, 10)] == [89.22, 95.88, 99.97, 99.99]


@pytest.mark.parametrize("n, p", [(100, 0.01), (500, 0.01), (1000, 0.01), (250, 0.05), (750, 0.025), (40_000, 0.01)])
def test_basel_boundaries_follow_the_binomial_distribution(n, p):
    cdf = binom.cdf(np.arange(n + 1), n, p)
    yellow = int(np.argmax(cdf >= 0.95))
    red = int(np.argmax(cdf >= 0.9999))
    assert bt.basel_thresholds(n, p) == (max(yellow, 1), max(red, 1))


def test_no_exceedance_is_green_even_in_a_short_sample():
    assert binom.cdf(0, 5, 0.01) >= 0.95  # the cumulative rule alone would say yellow
    assert bt.basel_zone(0, 5, 0.01) == "green" and bt.basel_zone(1, 5, 0.01) == "yellow"


# --------------------------------------------------------------------------------------------
# The backtest on a hand-made book

S = 100_000.0
ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": S, "haircut": 0.10}]
# A linear perpetual of 1 BTC per contract, marked at spot: notional 100,000 USD per contract,
# standard maintenance margin 1% of it = 1,000 USD.
LIN = {"instrument_id": "LIN", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
       "contract_size": 1.0, "mark_price": S}
# Daily BTC closes (thousand USD). Two-day windows start on rows 0, 2, 4, 6, 8:
#   0->2: 100 -> 98    (-2%)      long loses 2,000  > 1,000: exceeds
#   2->4:  98 -> 98.5  (+0.51%)   short loses 510   (the dip to 50 on row 3 is inside a window)
#   4->6:  98.5 -> 101 (+2.54%)   short loses 2,538 > 1,000: exceeds
#   6->8: 101 -> 99.5  (-1.49%)   long loses 1,485  > 1,000: exceeds
#   8->10: flat
CLOSES = [100, 90, 98, 50, 98.5, 99.5, 101, 101, 99.5, 99.5, 99.5]


def book(tmp_path, extra_positions=(), extra_balances=()):
    positions = [{"account_id": "long", "instrument_id": "LIN", "quantity": 1},
                 {"account_id": "short", "instrument_id": "LIN", "quantity": -1}, *extra_positions]
    balances = [{"account_id": a, "asset": "USDC", "amount": 100_000.0} for a in ("long", "short", "cash")]
    folder = write_snapshot(tmp_path / "snap", assets=ASSETS, instruments=[LIN], balances=[*balances, *extra_balances],
                            positions=positions, exchange_toml=EXCHANGE_TOML)
    return stress.load_snapshot(folder)


def history(tmp_path, closes=CLOSES, dates=None, name="btc.csv", extra=None):
    dates = dates if dates is not None else pd.date_range("2026-01-01", periods=len(closes), freq="D")
    df = pd.DataFrame({"date": pd.DatetimeIndex(dates).strftime("%Y-%m-%d"), "BTC": np.asarray(closes, float) * 1000})
    for k, v in (extra or {}).items():
        df[k] = v
    path = tmp_path / name
    df.to_parquet(path, index=False) if name.endswith(".parquet") else df.to_csv(path, index=False)
    return path


def test_backtest_finds_the_hand_counted_exceedances(tmp_path):
    res = bt.backtest(book(tmp_path), history(tmp_path), 2)
    acc = res["accounts"].set_index("account_id")
    assert list(acc.index) == ["long", "short"]  # "cash" holds no position: no margin to test
    assert acc.margin.tolist() == [1000.0, 1000.0] and acc.coverage.tolist() == [1000.0, 1000.0]
    assert acc.windows.tolist() == [5, 5]
    assert acc.exceedances.tolist() == [2, 1]
    assert acc.loc["long", "worst_loss"] == pytest.approx(2000.0, rel=1e-12)
    assert acc.loc["short", "worst_loss"] == pytest.approx(100_000 * (101 / 98.5 - 1), rel=1e-12)
    assert acc.loc["short", "worst_window"] == "2026-01-05"
    assert acc.loc["long", "kupiec_p"] == pytest.approx(bt.kupiec_pof(2, 5, 0.01)[1], rel=1e-12)
    assert acc.loc["long", "christoffersen_p"] == pytest.approx(
        bt.christoffersen_independence([1, 0, 0, 1, 0])[1], rel=1e-12)
    assert acc.zone.tolist() == [bt.basel_zone(2, 5, 0.01), bt.basel_zone(1, 5, 0.01)]

    win = res["windows"]
    assert win.window.tolist() == ["2026-01-01", "2026-01-03", "2026-01-05", "2026-01-07", "2026-01-09"]
    assert win.accounts_exceeding.tolist() == [1, 0, 1, 1, 0]
    # Gross loss of the losing accounts against total coverage (2,000): only window 3 exceeds.
    np.testing.assert_allclose(win.loss_total, [2000, 100_000 * (98.5 / 98 - 1), 100_000 * (101 / 98.5 - 1),
                                                100_000 * (1 - 99.5 / 101), 0], rtol=1e-12, atol=1e-9)
    assert win.exceeded.tolist() == [False, False, True, False, False]

    ex = res["exchange"].set_index("test")
    assert ex.loc["pooled", ["observations", "exceedances"]].tolist() == [10, 3]
    assert ex.loc["pooled", "kupiec_p"] == pytest.approx(bt.kupiec_pof(3, 10, 0.01)[1], rel=1e-12)
    assert ex.loc["aggregate", ["observations", "exceedances"]].tolist() == [5, 1]
    assert ex.loc["aggregate", "cc_lr"] == pytest.approx(bt.conditional_coverage([0, 0, 1, 0, 0], 0.01)[0], rel=1e-12)
    assert ex.loc["aggregate", "zone"] == "yellow"
    assert res["confidence"] == 0.99 and res["model"] == "standard" and res["unmoved"] == ["USDC"]


def test_windows_do_not_overlap_and_a_partial_window_is_dropped(tmp_path):
    snap = book(tmp_path)
    # 12 rows: the window from row 10 would need row 12, so there are still 5 windows.
    assert len(bt.backtest(snap, history(tmp_path, CLOSES + [99.5]), 2)["windows"]) == 5
    # 3-day windows on 11 rows: 0->3, 3->6, 6->9 (9->12 is cut off).
    win = bt.backtest(snap, history(tmp_path, CLOSES), 3)["windows"]
    assert win.window.tolist() == ["2026-01-01", "2026-01-04", "2026-01-07"]
    # Irregular dates (days 0, 1, 3, 4, 7): a window ends at the first close at least H days on.
    dates = pd.to_datetime("2026-01-01") + pd.to_timedelta([0, 1, 3, 4, 7], unit="D")
    win = bt.backtest(snap, history(tmp_path, [100, 99, 98, 97, 96], dates=dates), 2)["windows"]
    assert win.days.tolist() == [3.0, 4.0] and win.window.tolist() == ["2026-01-01", "2026-01-04"]


def test_nonoverlapping_starts_chains_each_end_to_the_next_start():
    ends = np.array([2, 3, 4, 6, 6, 7, 7])  # R = 7: rows 5 and 6 have no full window
    assert bt.nonoverlapping_starts(ends).tolist() == [0, 2, 4]
    assert bt.nonoverlapping_starts(np.array([3, 3, 3])).tolist() == []


def test_haircuts_count_as_coverage_and_collateral_losses_as_loss(tmp_path):
    # "coin" holds 1 BTC (haircut 10%: 10,000 USD held back) and is long one perpetual.
    snap = book(tmp_path, [{"account_id": "coin", "instrument_id": "LIN", "quantity": 1}],
                [{"account_id": "coin", "asset": "BTC", "amount": 1.0}])
    acc = bt.backtest(snap, history(tmp_path), 2)["accounts"].set_index("account_id")
    assert acc.loc["coin", "haircut"] == pytest.approx(10_000.0) and acc.loc["coin", "coverage"] == pytest.approx(11_000.0)
    # Window 0->2 (-2%): the perpetual and the coin each lose 2,000 = 4,000 < 11,000.
    assert acc.loc["coin", "worst_loss"] == pytest.approx(4_000.0, rel=1e-12)
    assert acc.loc["coin", "exceedances"] == 0 and acc.loc["long", "exceedances"] == 2


def test_confidence_and_margin_basis_and_model_are_applied(tmp_path):
    snap = book(tmp_path)
    res = bt.backtest(snap, history(tmp_path), 2, confidence=0.95, basis="initial")
    acc = res["accounts"]
    assert acc.expected.tolist() == pytest.approx([0.25, 0.25]) and acc.coverage.tolist() == [2000.0, 2000.0]
    assert acc.exceedances.tolist() == [0, 1]  # with IM 2,000 only the short's +2.54% exceeds
    pm = bt.backtest(snap, history(tmp_path), 2, model="portfolio")
    mm = stress.margin.account_margin(snap, "portfolio")["accounts"].set_index("account_id").maintenance_margin
    assert pm["model"] == "portfolio"
    assert pm["accounts"].set_index("account_id").margin.to_dict() == mm[["long", "short"]].to_dict()


def test_confidence_defaults_to_the_margin_table_and_the_argument_wins(tmp_path):
    folder = write_snapshot(tmp_path / "conf", assets=ASSETS, instruments=[LIN],
                            balances=[{"account_id": "long", "asset": "USDC", "amount": 1e5}],
                            positions=[{"account_id": "long", "instrument_id": "LIN", "quantity": 1}],
                            exchange_toml=EXCHANGE_TOML.replace("[margin]\n", "[margin]\nconfidence = 0.95\n"))
    snap = stress.load_snapshot(folder)  # confidence is a [margin] key (the var model's level)
    assert bt.backtest(snap, history(tmp_path), 2)["confidence"] == 0.95
    assert bt.backtest(snap, history(tmp_path), 2, confidence=0.975)["confidence"] == 0.975
    assert bt.backtest(book(tmp_path), history(tmp_path), 2)["confidence"] == 0.99


def test_csv_and_parquet_histories_give_the_same_backtest(tmp_path):
    snap = book(tmp_path)
    a = bt.backtest(snap, history(tmp_path), 2)["accounts"]
    b = bt.backtest(snap, history(tmp_path, name="btc.parquet"), 2)["accounts"]
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"horizon_days": 20}, "shorter than one window of 20 days"),
    ({"horizon_days": 0}, "--horizon-days"),
    ({"confidence": 1.0}, "--confidence"),
    ({"model": "nonsense"}, "is not one of"),
    ({"basis": "variation"}, "--basis"),
])
def test_bad_arguments_are_input_errors(tmp_path, kwargs, message):
    args = {"horizon_days": 2, **kwargs}
    with pytest.raises(stress.InputError, match=message):
        bt.backtest(book(tmp_path), history(tmp_path), **args)


def test_a_history_without_an_underlying_of_the_book_is_an_input_error(tmp_path):
    path = tmp_path / "eth.csv"
    pd.DataFrame({"date": ["2026-01-01", "2026-01-02", "2026-01-03"], "ETH": [3000, 3100, 3200]}).to_csv(path, index=False)
    with pytest.raises(stress.InputError) as exc:
        bt.backtest(book(tmp_path), path, 1)
    assert exc.value.file == "eth.csv" and exc.value.column == "BTC"


def test_a_bad_price_in_the_history_names_its_line(tmp_path):
    closes = list(CLOSES)
    closes[4] = -1
    with pytest.raises(stress.InputError) as exc:
        bt.backtest(book(tmp_path), history(tmp_path, closes), 2)
    assert exc.value.row == "line 6" and exc.value.column == "BTC"


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_prints_the_tables_and_writes_per_account_parquet(tmp_path):
    book(tmp_path)
    target = tmp_path / "out" / "bt.parquet"
    res = CliRunner().invoke(app, ["backtest", str(tmp_path / "snap"), "--prices", str(history(tmp_path)),
                                   "--horizon-days", "2", "--out", str(target)])
    assert res.exit_code == 0, res.output
    assert "margin backtest" in res.output and "long" in res.output and "accounts by zone" in res.output
    acc = pd.read_parquet(target)
    assert acc.account_id.tolist() == ["long", "short"] and acc.exceedances.tolist() == [2, 1]


@pytest.mark.parametrize("args, message", [
    (["--horizon-days", "30"], "shorter than one window"),
    (["--horizon-days", "2", "--model", "nonsense"], "--model"),
    (["--horizon-days", "2", "--out", "x.csv"], "expected .parquet"),
    (["--horizon-days", "2", "--confidence", "99"], "--confidence"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, args, message):
    book(tmp_path)
    res = CliRunner().invoke(app, ["backtest", str(tmp_path / "snap"), "--prices", str(history(tmp_path)), *args])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "x.csv").exists()


def test_cli_missing_history_exits_2(tmp_path):
    book(tmp_path)
    res = CliRunner().invoke(app, ["backtest", str(tmp_path / "snap"), "--prices", str(tmp_path / "none.csv"),
                                   "--horizon-days", "2"])
    assert res.exit_code == 2 and "price history not found" in res.output


def test_under_the_var_model_a_book_of_collateral_alone_is_tested(tmp_path):
    # "loan" holds 1 BTC against 60,000 borrowed USDC and no position: the var model's ES of
    # its equity covers the BTC, so it has a requirement to backtest (the standard model's is
    # 0). Its loss in the first window (BTC 100,000 -> 98,000) is 2,000.
    closes = 100.0 * np.cumprod([1.0] + [1 + r for r in (0.01, -0.02, 0.03, -0.05, 0.004, -0.01, 0.02, -0.03, 0.005,
                                                          0.01, -0.04, 0.015)])
    var = 'model = "var"\nvar_history = "history.csv"\nvar_horizon_days = 1\nconfidence = 0.9\nvar_min_windows = 10\n'
    (tmp_path / "snap").mkdir()
    history(tmp_path / "snap", closes=closes, name="history.csv")
    loan = [{"account_id": "loan", "asset": "BTC", "amount": 1.0}, {"account_id": "loan", "asset": "USDC", "amount": -60_000.0}]
    folder = write_snapshot(tmp_path / "snap", assets=ASSETS, instruments=[LIN],
                            balances=[{"account_id": "long", "asset": "USDC", "amount": 100_000.0}, *loan],
                            positions=[{"account_id": "long", "instrument_id": "LIN", "quantity": 1}],
                            exchange_toml=EXCHANGE_TOML.replace("[margin]\n", "[margin]\n" + var))
    snap = stress.load_snapshot(folder)
    res = bt.backtest(snap, history(tmp_path), 2)
    acc = res["accounts"].set_index("account_id")
    mm = stress.margin.account_margin(snap)["accounts"].set_index("account_id").maintenance_margin
    assert res["model"] == "var" and sorted(acc.index) == ["loan", "long"] and res["untested"] == []
    assert mm["loan"] > 0 and acc.loc["loan", "margin"] == pytest.approx(mm["loan"], rel=1e-12)
    assert acc.loc["loan", "worst_loss"] == pytest.approx(2_000.0, rel=1e-12)
    assert list(bt.backtest(snap, history(tmp_path), 2, model="standard")["accounts"].account_id) == ["long"]
