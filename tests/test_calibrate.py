"""Calibration: the lowest maintenance-margin scale that meets a target, checked exactly."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import stress
from stress import calibrate as cal
from stress import margin
from stress import sensitivities as sens
from stress.cli import app

from .conftest import copy_snapshot, write_snapshot

TOML = """as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = { USDC = 20000.0 }
[margin]
"""
PATHS = '[[montecarlo]]\nname = "mc"\npaths = 400\nsteps = 8\nhorizon_days = 8\nseed = 3\nvol = { BTC = 1.2 }\n'


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """Ten longs and ten shorts of one linear BTC perpetual on 5,000-9,500 USDC each."""
    folder = tmp_path_factory.mktemp("cal")
    snap = stress.load_snapshot(write_snapshot(
        folder / "snap",
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=[{"account_id": f"{side}{i}", "asset": "USDC", "amount": 5_000.0 + 500 * i} for side in "ls" for i in range(10)],
        positions=[{"account_id": f"{side}{i}", "instrument_id": "P", "quantity": q} for side, q in (("l", 1), ("s", -1))
                   for i in range(10)],
        exchange_toml=TOML))
    (folder / "mc.toml").write_text(PATHS)
    return folder, snap, stress.load_scenarios(folder / "mc.toml", snap)


def test_calibrated_scale_meets_the_target_and_one_step_below_does_not(book):
    _, snap, scen = book
    target = cal.parse_target("p_fund_depleted<=0.03")
    res = cal.calibrate(snap, scen, target, tolerance=0.01)
    assert res["before"]["value"] > 0.03  # the current 1% MM misses it: not vacuous
    f = res["factor"]
    assert f > 1.0 and f < 64.0  # a real rise, within the search bracket
    # exact, independent re-evaluation through stress.run
    at = stress.run(cal.scaled(snap, f), scen).summary["p_fund_depleted"]
    below = stress.run(cal.scaled(snap, f - 0.01), scen).summary["p_fund_depleted"]
    assert at <= 0.03 < below
    assert res["after"]["maintenance_margin"] == pytest.approx(f * res["before"]["maintenance_margin"], rel=1e-9)
    margins = [r["maintenance_margin"] for r in res["curve"]]
    assert margins == sorted(margins)  # the trade-off curve is ordered by margin
    assert "<svg" in cal.tradeoff_svg(res)


def test_a_target_met_today_gives_a_scale_no_lower_than_one_over_hi(book):
    """The search runs over [1/hi, hi] (docs/calibration.md): a target today's rates already
    meet gives the smallest scale there that meets it, not one below the floor."""
    _, snap, scen = book
    res = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=1"), hi=8.0, tolerance=0.01)
    assert res["factor"] == pytest.approx(0.13) and res["below"] is None  # 1/8 rounded up onto the grid
    assert res["before"]["factor"] == 1.0


def test_a_coarse_tolerance_still_evaluates_todays_rates_at_one_and_stays_within_hi(book):
    _, snap, scen = book
    res = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), hi=8.0, tolerance=0.3)
    assert res["before"]["factor"] == 1.0  # not rounded onto the grid (0.9)
    assert res["factor"] is None or res["factor"] <= 8.0
    with pytest.raises(stress.InputError, match="tolerance"):
        cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), hi=8.0, tolerance=100.0)


def test_calibration_does_not_depend_on_chunking(book):
    _, snap, scen = book
    target = cal.parse_target("bad_debt_mean<=1500")
    a = cal.calibrate(snap, scen, target, tolerance=0.05, chunk_size=4)
    b = cal.calibrate(snap, scen, target, tolerance=0.05, chunk_size=128)
    assert a["factor"] == b["factor"] is not None


def test_one_step_scenarios_say_margin_has_no_effect(book, tmp_path):
    _, snap, _ = book
    (tmp_path / "one.toml").write_text(PATHS.replace("steps = 8", "steps = 1"))
    scen = stress.load_scenarios(tmp_path / "one.toml", snap)
    with pytest.raises(stress.InputError, match="no effect"):
        cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.01"))


@pytest.mark.parametrize("text", ["p_fund_depleted<0.01", "pnl<=3", "p_fund_depleted<=-1", "", "p_fund_depleted<=2"])
def test_bad_targets_are_usage_errors(text):
    with pytest.raises(stress.InputError):
        cal.parse_target(text)


def test_calibrate_command_writes_the_result_and_the_tradeoff_chart(book, tmp_path):
    folder, _, _ = book
    out = tmp_path / "cal"
    r = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--scenarios", str(folder / "mc.toml"),
                                 "--target", "p_fund_depleted<=0.03", "--tolerance", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["factor"] > 1 and doc["target"] == {"metric": "p_fund_depleted", "limit": 0.03}
    assert (out / "tradeoff.svg").read_text().lstrip().startswith("<?xml")
    bad = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--target", "nonsense"])
    assert bad.exit_code == 2


@pytest.fixture(scope="module")
def two_books(tmp_path_factory):
    """Longs and shorts of a BTC perpetual (vol 120%) and of an ETH perpetual (vol 60%), ten
    accounts per side each, on 5,000-9,500 USDC."""
    folder = tmp_path_factory.mktemp("cal2")
    perp = lambda iid, u, c, p: {"instrument_id": iid, "kind": "perpetual", "underlying": u, "settlement": "USDC",
                                 "contract_size": c, "mark_price": p}
    snap = stress.load_snapshot(write_snapshot(
        folder / "snap",
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0},
                {"asset": "ETH", "price": 2_000.0, "haircut": 0.0}],
        instruments=[perp("PB", "BTC", 1.0, 50_000.0), perp("PE", "ETH", 10.0, 2_000.0)],
        balances=[{"account_id": f"{u}{side}{i}", "asset": "USDC", "amount": 5_000.0 + 500 * i}
                  for u in "be" for side in "ls" for i in range(10)],
        positions=[{"account_id": f"{u}{side}{i}", "instrument_id": iid, "quantity": q}
                   for u, iid in (("b", "PB"), ("e", "PE")) for side, q in (("l", 1), ("s", -1)) for i in range(10)],
        exchange_toml=TOML))
    (folder / "mc.toml").write_text(PATHS.replace("vol = { BTC = 1.2 }", "vol = { BTC = 1.2, ETH = 0.6 }"))
    return folder, snap, stress.load_scenarios(folder / "mc.toml", snap)


VECTOR = "mm_rate.BTC,mm_rate.ETH"


@pytest.fixture(scope="module")
def vector_result(two_books):
    _, snap, scen = two_books
    return cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), parameter=VECTOR, tolerance=0.01)


def test_vector_calibration_meets_the_target_exactly_and_098_of_it_does_not(two_books, vector_result):
    _, snap, scen = two_books
    res = vector_result
    levers = cal.parse_vary(VECTOR, snap)
    assert res["before"]["value"] > 0.03  # the current rates miss it: not vacuous
    scales = np.array(res["scales"])
    assert res["factor"] is not None and scales.shape == (2,)
    assert scales == pytest.approx(res["factor"] * np.array(res["direction"]), rel=1e-12)
    # exact, independent re-evaluation through stress.run
    at = stress.run(cal.scaled(snap, scales, levers), scen)
    below = stress.run(cal.scaled(snap, 0.98 * scales, levers), scen).summary["p_fund_depleted"]
    assert at.summary["p_fund_depleted"] <= 0.03 < below
    assert at.accounts.maintenance_margin.sum() == pytest.approx(res["after"]["maintenance_margin"], rel=1e-12)
    # BTC carries the risk (twice ETH's vol): its rates rise, ETH's do not rise as much
    assert scales[0] > 1.0 and scales[0] > scales[1]
    assert res["smooth"]["check"]["scales"] == pytest.approx(res["direction"])
    margins = [r["maintenance_margin"] for r in res["curve"]]
    assert margins == sorted(margins)


def test_vector_beats_one_scale_on_every_rate(two_books, vector_result):
    # one scale on every rate must also raise ETH's margin, which does not help: per-underlying
    # scales meet the same target at a lower total margin
    _, snap, scen = two_books
    one = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), tolerance=0.01)
    assert vector_result["after"]["maintenance_margin"] < one["after"]["maintenance_margin"]


def test_vector_calibration_does_not_depend_on_chunking(two_books, vector_result):
    _, snap, scen = two_books
    other = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), parameter=VECTOR, tolerance=0.01,
                          chunk_size=4)
    assert other["factor"] == vector_result["factor"] and other["scales"] == vector_result["scales"]


def test_vector_calibration_falls_back_to_one_scale_when_the_smooth_direction_cannot_reach_the_target(
        two_books, monkeypatch):
    # A relaxation that stops with ETH's scale at hi and BTC's rates (the riskier, at 120% vol)
    # cut to 1/hi: its ray ends at its own point (hi / max scale = 1), where BTC's accounts are
    # not liquidated in time and the target is missed, though raising every rate alike meets it. The calibration then
    # scales every parameter alike and finds what the one-scale calibration finds.
    _, snap, scen = two_books
    hi = 8.0
    stuck = {"scales": [1.0 / hi, hi], "value": 0.0, "maintenance_margin": 0.0, "history": []}
    one = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), hi=hi, tolerance=0.05)
    monkeypatch.setattr(cal, "optimise", lambda *a, **k: dict(stuck))
    res = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), parameter=VECTOR, hi=hi, tolerance=0.05)
    assert not res["smooth"]["met"] and res["fallback"]
    assert res["factor"] == pytest.approx(one["factor"]) and res["scales"] == pytest.approx([one["factor"]] * 2)
    assert res["direction"] == [1.0, 1.0] and res["smooth"]["scales"] == [1.0 / hi, hi]
    assert res["after"]["value"] <= 0.03 < res["below"]["value"]
    # today's rates were run once, and are in the trade-off curve once
    assert sum(r["scales"] == [1.0, 1.0] for r in res["curve"]) == 1


def test_multipliers_and_scaled_move_only_the_named_underlying(two_books):
    _, snap, _ = two_books
    levers = cal.parse_vary("mm_rate.ETH", snap)
    assert [lv.name for lv in levers] == ["mm_rate.ETH"] and levers[0].mask.tolist() == [False, True]
    assert cal.multipliers([3.0], levers)["mm_rate"].tolist() == [1.0, 3.0]
    rates = np.asarray(cal.scaled(snap, [3.0], levers).params.mm_rate)
    assert rates == pytest.approx(np.asarray(snap.params.mm_rate) * np.array([1.0, 3.0]))


@pytest.mark.parametrize("vary", ["haircut.BTC", "mm_rate.SOL", "mm_rate.USDC", "mm_rate,mm_rate.BTC",
                                  "mm_rate.BTC,mm_rate.BTC", "", "mm_factor", "price_range.BTC"])
def test_bad_vary_is_a_usage_error(two_books, vary):
    _, snap, _ = two_books
    with pytest.raises(stress.InputError):
        cal.parse_vary(vary, snap)


def test_calibrate_command_with_a_vector(two_books, tmp_path):
    folder, snap, scen = two_books
    out = tmp_path / "cal"
    r = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--scenarios", str(folder / "mc.toml"),
                                 "--target", "p_fund_depleted<=0.03", "--vary", VECTOR, "--tolerance", "0.05",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "recommended parameters" in r.output and "mm_rate.ETH" in r.output
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["parameters"] == ["mm_rate.BTC", "mm_rate.ETH"] and len(doc["scales"]) == 2
    levers = cal.parse_vary(VECTOR, snap)
    assert stress.run(cal.scaled(snap, doc["scales"], levers), scen).summary["p_fund_depleted"] <= 0.03
    bad = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--target", "p_fund_depleted<=0.03",
                                   "--vary", "mm_rate.DOGE"])
    assert bad.exit_code == 2 and "mm_rate.DOGE" in bad.output


def one_long(folder, margin_toml: str, balance: float = 10_000.0, history: str = ""):
    """A long of 1 BTC perpetual on ``balance`` USDC facing a short on 1,000,000, and one
    replay path of two daily steps: BTC 50,000 -> 45,000 -> 30,000. The long loses 5,000 by
    the first step and 20,000 by the second."""
    (folder / "snap").mkdir(parents=True)
    if history:  # the var model's
        (folder / "snap" / "history.csv").write_text(history)
    snap = stress.load_snapshot(write_snapshot(
        folder / "snap",
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=[{"account_id": "long", "asset": "USDC", "amount": balance},
                  {"account_id": "short", "asset": "USDC", "amount": 1_000_000.0}],
        positions=[{"account_id": "long", "instrument_id": "P", "quantity": 1},
                   {"account_id": "short", "instrument_id": "P", "quantity": -1}],
        exchange_toml=TOML.replace("{ USDC = 20000.0 }", "{ USDC = 0.0 }") + margin_toml))
    (folder / "path.csv").write_text("date,BTC\n2026-01-01,50000\n2026-01-02,45000\n2026-01-03,30000\n")
    (folder / "path.toml").write_text('[[replay]]\nname = "crash"\nprices = "path.csv"\nhorizon_days = 2\n')
    return snap, stress.load_scenarios(folder / "path.toml", snap)


@pytest.mark.parametrize("lever, expected, keys", [
    # MM at the first step = f x 0.8 x (0.16 price range + 0.01 roll shock) x 45,000 = 6,120 f
    # (docs/margin.md's linear perpetual): the long, with 5,000 left there, is closed out
    # there iff 5,000 < 6,120 f, f > 0.81699; held to the second step it owes 10,000
    ("mm_factor", 0.817, {"mm_factor": 0.8 * 0.817}),
    # MM = 0.8 x (0.16 s + 0.01) x 45,000 > 5,000 iff s > 0.80556 (the extended table's
    # -66% at 3%, 1.98% of notional, stays below 0.16 s there)
    ("price_range", 0.806, {"price_range": {"BTC": 0.16 * 0.806}}),
])
def test_portfolio_model_calibrates_to_the_hand_computed_level(tmp_path, lever, expected, keys):
    snap, scen = one_long(tmp_path, 'model = "portfolio"\n')
    res = cal.calibrate(snap, scen, cal.parse_target("worst_bad_debt<=0"), parameter=lever)
    assert res["before"]["value"] == 0.0  # today's 0.8 and 16% already close the long in time
    assert res["factor"] == pytest.approx(expected) and res["below"]["value"] == pytest.approx(10_000.0)
    assert res["margin"].keys() == keys.keys()
    for k, v in keys.items():
        assert res["margin"][k] == pytest.approx(v)
    # the keys, written into exchange.toml, give the calibrated run
    moved = dataclasses.replace(snap, margin_config={**snap.margin_config, **res["margin"]})
    run = stress.run(dataclasses.replace(moved, params=margin.resolve(moved)), scen)
    assert run.accounts.maintenance_margin.sum() == pytest.approx(res["after"]["maintenance_margin"], rel=1e-12)
    assert res["tops"] == [pytest.approx(1 / 0.8 if lever == "mm_factor" else 0.99 / 0.16)]


def _bs_call(spot, strike, T, vol):
    """Black-Scholes call per unit of underlying, rate 0 (Hull, ch. 15)."""
    from scipy.stats import norm

    d1 = (math.log(spot / strike) + 0.5 * vol * vol * T) / (vol * math.sqrt(T))
    return spot * norm.cdf(d1) - strike * norm.cdf(d1 - vol * math.sqrt(T))


def short_call(folder, margin_toml: str, balance: float = 11_700.0, buyer: bool = True):
    """A short of one USDC-settled at-the-money BTC call (strike 50,000, iv 60%, 40 days to
    expiry) on ``balance`` USDC facing its buyer on 1,000,000 (or no one), and one replay path
    of two daily steps: BTC 50,000 -> 52,000 -> 80,000. Held to the second step the call is
    worth about 30,000."""
    (folder / "snap").mkdir(parents=True)
    snap = stress.load_snapshot(write_snapshot(
        folder / "snap",
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "C", "kind": "option", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "expiry": "2027-01-02T08:00:00Z", "strike": 50_000.0,
                      "option_type": "call", "mark_iv": 0.6}],
        balances=[{"account_id": "short", "asset": "USDC", "amount": balance},
                  {"account_id": "long", "asset": "USDC", "amount": 1_000_000.0}][:1 + buyer],
        positions=[{"account_id": "short", "instrument_id": "C", "quantity": -1},
                   {"account_id": "long", "instrument_id": "C", "quantity": 1}][:1 + buyer],
        exchange_toml=TOML.replace("{ USDC = 20000.0 }", "{ USDC = 0.0 }") + margin_toml))
    (folder / "path.csv").write_text("date,BTC\n2026-01-01,50000\n2026-01-02,52000\n2026-01-03,80000\n")
    (folder / "path.toml").write_text('[[replay]]\nname = "squeeze"\nprices = "path.csv"\nhorizon_days = 2\n')
    return snap, stress.load_scenarios(folder / "path.toml", snap)


def test_portfolio_vol_shock_up_calibrates_to_the_black_scholes_level(tmp_path):
    # At the first step (BTC 52,000, 39 days left) the short's equity is 11,700 less the call,
    # and its MM is 0.8 x the worst loss of the 9 x 3 risk matrix (no extended table), the vol
    # shock up scaled by f: iv (1 + 0.5 f (30 / 39) ** 0.13). The short must be closed out there
    # (equity < MM) to owe nothing at the second step; f solves equity = MM, by Black-Scholes.
    from scipy.optimize import brentq

    snap, scen = short_call(tmp_path, 'model = "portfolio"\nextended_pnl_fraction = 0.0\n')
    S1, T1, iv = 52_000.0, 39 / 365, 0.6
    c1 = _bs_call(S1, 50_000.0, T1, iv)

    def mm(f):
        vols = (iv * (1 + 0.5 * f * (30 / 39) ** 0.13), iv, iv * (1 - 0.25 * (30 / 39) ** 0.13))
        return 0.8 * max(_bs_call(S1 * (1 + m / 100), 50_000.0, T1, v) - c1
                         for m in range(-16, 17, 4) for v in vols)

    f_star = brentq(lambda f: mm(f) - (11_700.0 - c1), 0.5, 3.0)
    assert f_star > 1.2 and f_star < 1.4  # today's shock (f = 1) leaves the short open at the first step
    res = cal.calibrate(snap, scen, cal.parse_target("worst_bad_debt<=0"), parameter="volatility_range_up")
    assert res["idle"] == []
    held = _bs_call(80_000.0, 50_000.0, 38 / 365, iv) - 11_700.0  # it owes the call less its 11,700
    assert res["before"]["value"] == pytest.approx(held, rel=1e-9)
    assert res["factor"] == pytest.approx(math.ceil(f_star / 1e-3) * 1e-3) and res["after"]["value"] == 0.0
    assert res["below"]["value"] == pytest.approx(held, rel=1e-9)
    assert res["tops"] == [64.0] and res["margin"] == {"volatility_range_up": {"BTC": pytest.approx(0.5 * res["factor"])}}
    # the key, written into exchange.toml, gives the calibrated run
    moved = dataclasses.replace(snap, margin_config={**snap.margin_config, **res["margin"]})
    run = stress.run(dataclasses.replace(moved, params=margin.resolve(moved)), scen)
    assert run.accounts.maintenance_margin.sum() == pytest.approx(res["after"]["maintenance_margin"], rel=1e-12)


@pytest.mark.parametrize("lever, key, today", [("volatility_range_up.BTC", "volatility_range_up", 0.5),
                                               ("volatility_range_down", "volatility_range_down", 0.25)])
def test_vol_shock_levers_scale_the_key_they_name_and_move_option_margin(tmp_path, lever, key, today):
    snap, _ = short_call(tmp_path, 'model = "portfolio"\nextended_pnl_fraction = 0.0\n')
    levers = cal.parse_vary(lever, snap)
    assert cal.margin_keys(snap, levers, [2.0]) == {key: {"BTC": pytest.approx(2 * today)}}
    mm = lambda s: margin.account_margin(s, "portfolio")["accounts"].set_index("account_id").maintenance_margin
    before, after = mm(snap), mm(cal.scaled(snap, [2.0], levers))
    # the short call's worst point is vol up, the long's vol down: each lever moves one of them
    moved, still = ("short", "long") if key.endswith("up") else ("long", "short")
    assert after[moved] > before[moved] and after[still] == before[still]


def long_linear(folder, margin_toml: str, kind: str = "perpetual"):
    """A long of one USDC-settled linear BTC contract of 1 BTC (a perpetual, or a future
    expiring a year after the snapshot), marked at 50,000, on 10,000 USDC, facing a short on
    1,000,000; one replay path of two daily steps: BTC 50,000 -> 48,000 -> 30,000. Held to the
    second step the long owes 10,000."""
    (folder / "snap").mkdir(parents=True)
    dated = {"expiry": "2027-11-23T08:00:00Z"} if kind == "future" else {}
    snap = stress.load_snapshot(write_snapshot(
        folder / "snap",
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "L", "kind": kind, "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0, **dated}],
        balances=[{"account_id": "long", "asset": "USDC", "amount": 10_000.0},
                  {"account_id": "short", "asset": "USDC", "amount": 1_000_000.0}],
        positions=[{"account_id": "long", "instrument_id": "L", "quantity": 1},
                   {"account_id": "short", "instrument_id": "L", "quantity": -1}],
        exchange_toml=TOML.replace("{ USDC = 20000.0 }", "{ USDC = 0.0 }") + 'model = "portfolio"\n'
        "extended_pnl_fraction = 0.0\n" + margin_toml))
    (folder / "path.csv").write_text("date,BTC\n2026-01-01,50000\n2026-01-02,48000\n2026-01-03,30000\n")
    (folder / "path.toml").write_text('[[replay]]\nname = "slide"\nprices = "path.csv"\nhorizon_days = 2\n')
    return snap, stress.load_scenarios(folder / "path.toml", snap)


# At the first step (BTC 48,000) the long has 10,000 - 2,000 = 8,000, and its MM is 0.8 x (the
# risk matrix's worst loss, 16% of 48,000 = 7,680, + the roll shock, notional x max(
# min_annualised_move, annualised_move_risk x years to expiry), + the delta shock, max_delta_shock
# x (48,000 - threshold) past the threshold). It must be closed out there (8,000 < MM) to owe
# nothing at the second step: MM = 8,000, i.e. the add-ons at 10,000 - 7,680 = 2,320, gives the
# lever's root, today's value times the scale.
ROLL_AND_DELTA = [
    # perpetual: the roll is the floor, 48,000 x m (today 0.01: MM 6,528, open)
    ("min_annualised_move", "perpetual", "", 0.01, 2_320 / 48_000),
    # the delta shock past 41,000 of net delta, beside the perpetual's roll of 480 (today 0.1:
    # 700 more, MM 7,088, open)
    ("max_delta_shock", "perpetual", "delta_shock_threshold = 41000\n", 0.1, (2_320 - 480) / 7_000),
    # a dated future 364 days from expiry at the first step: 48,000 x r x 364 / 365 (today 0.02:
    # MM 6,910, open)
    ("annualised_move_risk", "future", "annualised_move_risk = 0.02\n", 0.02, 2_320 / (48_000 * 364 / 365)),
]


@pytest.mark.parametrize("lever, kind, toml, today, root", ROLL_AND_DELTA, ids=[r[0] for r in ROLL_AND_DELTA])
def test_roll_and_delta_shock_levers_calibrate_to_the_hand_computed_level(tmp_path, lever, kind, toml, today, root):
    snap, scen = long_linear(tmp_path, toml, kind)
    res = cal.calibrate(snap, scen, cal.parse_target("worst_bad_debt<=0"), parameter=lever)
    assert res["before"]["value"] == pytest.approx(10_000.0, rel=1e-12)  # held to the second step
    assert res["factor"] == pytest.approx(math.ceil(root / today / 1e-3) * 1e-3) and res["after"]["value"] == 0.0
    assert res["below"]["value"] == pytest.approx(10_000.0, rel=1e-12)
    assert res["margin"] == {lever: {"BTC": pytest.approx(today * res["factor"])}}
    moved = dataclasses.replace(snap, margin_config={**snap.margin_config, **res["margin"]})
    run = stress.run(dataclasses.replace(moved, params=margin.resolve(moved)), scen)
    assert run.accounts.maintenance_margin.sum() == pytest.approx(res["after"]["maintenance_margin"], rel=1e-12)


def test_roll_shock_levers_need_a_future_to_move(tmp_path):
    snap, _ = long_linear(tmp_path, "")  # a perpetual: it has a roll shock, its floor, but no expiry
    cal.parse_vary("min_annualised_move,max_delta_shock.BTC", snap)
    with pytest.raises(stress.InputError, match="no dated future is on any underlying") as err:
        cal.parse_vary("annualised_move_risk", snap)
    assert err.value.file == "--vary"


def relaxed_margin_gradient(snap, scen, vary: str, theta: list[float], h: float = 1e-4):
    """The smooth stage's total maintenance margin at the snapshot, checked equal to the exact
    margin (margin.account_margin) at scales ``theta`` of the levers ``vary``; returns its
    gradient there and central differences of the exact margin."""
    levers = cal.parse_vary(vary, snap)
    b = sens.book(snap, scen)
    args = (sens._float_params(snap.params), sens.safe_instruments(snap.instruments, snap.market), snap.market,
            b, jnp.ones(snap.n_accounts), 1.0)
    statics = dict(levers=levers, metric="bad_debt_mean", n=snap.n_accounts, K=scen.steps, S=len(scen), n_random=1)
    total = lambda theta: cal.smooth_metric(theta, *args, **statics)[1]
    exact = lambda theta: margin.account_margin(cal.scaled(snap, theta, levers), "portfolio")[
        "accounts"].maintenance_margin.sum()
    theta = np.asarray(theta, np.float64)
    assert float(total(jnp.asarray(theta))) == pytest.approx(exact(theta), rel=1e-12)
    fd = [(exact(theta + h * e) - exact(theta - h * e)) / (2 * h) for e in np.eye(len(theta))]
    return np.asarray(jax.grad(total)(jnp.asarray(theta))), np.asarray(fd)


def test_the_relaxation_differentiates_the_vol_shocks_as_the_exact_margin_moves(tmp_path):
    # The smooth stage's margin at the snapshot, and its gradient in the vol-shock scales,
    # against the exact margin (margin.account_margin) at scaled snapshots, by central differences.
    snap, scen = short_call(tmp_path, 'model = "portfolio"\nextended_pnl_fraction = 0.0\n')
    grad, fd = relaxed_margin_gradient(snap, scen, "volatility_range_up,volatility_range_down", [1.3, 0.7])
    assert (grad > 0).all()  # the short's margin rises with the shock up, the long's with the one down
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_the_relaxation_differentiates_the_roll_and_delta_shocks_as_the_exact_margin_moves(tmp_path):
    # A long of a dated future (its roll the annualised move), a long of a perpetual (its roll
    # the floor) and the short of both, every net delta past a 41,000 threshold: the smooth
    # stage's margin and its gradient in the three scales against the exact margin, by central
    # differences, as the vol shocks' above.
    # long_linear writes the replay path and the [margin] keys this book shares
    long_linear(tmp_path, "delta_shock_threshold = 41000\nannualised_move_risk = 0.02\n", "future")
    snap = stress.load_snapshot(write_snapshot(
        tmp_path / "both",
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "F", "kind": "future", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0, "expiry": "2027-11-23T08:00:00Z"},
                     {"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=[{"account_id": a, "asset": "USDC", "amount": 1e6} for a in ("f", "p", "s")],
        positions=[{"account_id": "f", "instrument_id": "F", "quantity": 1},
                   {"account_id": "p", "instrument_id": "P", "quantity": 1},
                   {"account_id": "s", "instrument_id": "F", "quantity": -1},
                   {"account_id": "s", "instrument_id": "P", "quantity": -1}],
        exchange_toml=(tmp_path / "snap" / "exchange.toml").read_text()))
    scen = stress.load_scenarios(tmp_path / "path.toml", snap)
    grad, fd = relaxed_margin_gradient(snap, scen, "max_delta_shock,annualised_move_risk,min_annualised_move",
                                       [1.3, 0.7, 1.1])
    # 0.8 x 0.1 x (50,000 - 41,000) x 2 + 0.8 x 0.1 x (100,000 - 41,000); 0.8 x 0.02 x 50,000 x 2
    # (a year to expiry); 0.8 x 0.01 x 50,000 x 2
    np.testing.assert_allclose(grad, [0.08 * (18_000 + 59_000), 0.016 * 100_000, 0.008 * 100_000], rtol=1e-9)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_a_lever_with_no_effect_on_the_book_is_left_as_it_is_not_scaled_along_the_ray(tmp_path):
    # A short call alone: every risk matrix's worst point is vol up, so the vol shock down moves
    # no margin (nor the target). Searched with the shock up, it would be carried along the
    # exact stage's ray to a scale that means nothing here and would bite a book long options.
    snap, scen = short_call(tmp_path, 'model = "portfolio"\nextended_pnl_fraction = 0.0\n', buyer=False)
    target = cal.parse_target("worst_bad_debt<=0")
    levers = cal.parse_vary("volatility_range_up,volatility_range_down", snap)
    assert cal.idle_levers(snap, scen, target, levers).tolist() == [False, True]
    res = cal.calibrate(snap, scen, target, parameter="volatility_range_up,volatility_range_down")
    assert res["parameters"] == ("volatility_range_up",) and res["idle"] == ["volatility_range_down"]
    single = cal.calibrate(snap, scen, target, parameter="volatility_range_up")
    assert res["factor"] == single["factor"] and "direction" not in res  # the one lever left, bisected exactly
    assert set(res["margin"]) == {"volatility_range_up"}


def test_var_model_calibrates_mm_factor_to_the_hand_computed_level(tmp_path):
    # 20 one-day windows at confidence 0.9: IM is the mean of the long's three largest losses,
    # 6%, 5% and 4% of its notional (tests/test_margin_var.py), 2,250 at the first step's
    # 45,000; MM = f x 0.8 x 2,250 = 1,800 f. On 6,500 the long has 1,500 left there: closed
    # out iff 1,500 < 1,800 f, f > 0.8333 (today's f = 1 does); held to the second step it owes
    # 13,500. (At the snapshot MM = 2,000 f, below 6,500 at every f up to 1 / 0.8.)
    returns = [0.01, -0.02, 0.03, -0.05, 0.004, -0.01, 0.02, -0.03, 0.005, 0.01,
               -0.04, 0.015, 0.002, -0.001, 0.003, 0.006, -0.007, 0.008, 0.001, -0.06]
    prices = 50_000.0 * np.cumprod([1.0] + [1 + r for r in returns])
    history = "date,BTC\n" + "".join(f"2025-01-{d + 1:02d},{float(p)!r}\n" for d, p in enumerate(prices))
    var = ('model = "var"\nvar_history = "history.csv"\nvar_horizon_days = 1\nvar_filtered = false\n'
           'confidence = 0.9\nvar_min_windows = 10\n')
    snap, scen = one_long(tmp_path, var, balance=6_500.0, history=history)
    res = cal.calibrate(snap, scen, cal.parse_target("worst_bad_debt<=0"))  # default: mm_factor
    assert res["parameters"] == ("mm_factor",) and res["before"]["value"] == 0.0
    assert res["factor"] == pytest.approx(0.834) and res["below"]["value"] == pytest.approx(13_500.0)
    assert res["after"]["value"] == 0.0 and res["margin"] == {"mm_factor": pytest.approx(0.8 * 0.834)}
    assert res["after"]["maintenance_margin"] == pytest.approx(0.834 * res["before"]["maintenance_margin"], rel=1e-12)


def test_tier_rates_scale_with_mm_rate_in_the_run_and_in_the_relaxation(book, tmp_path):
    # Every position's notional (50,000) is past the 40,000 bound: MM = 3% of it, the first
    # tier's 0.5% plus the 2.5% step. Scaling every rate by 2 must give 6%, not 0.5 x 2 + 2.5.
    folder, snap, _ = book
    tiered = stress.load_snapshot(copy_snapshot(
        folder / "snap", tmp_path / "snap", lambda t: t + "future_tiers = [[40_000, 0.01, 0.005], [1e15, 0.05, 0.03]]\n"))
    scen = stress.load_scenarios(folder / "mc.toml", tiered)
    mm = lambda s: stress.run(s, scen).accounts.maintenance_margin.to_numpy()
    np.testing.assert_allclose(mm(tiered), 0.03 * 50_000.0, rtol=1e-12)
    np.testing.assert_allclose(mm(cal.scaled(tiered, 2.0)), 0.06 * 50_000.0, rtol=1e-12)
    # the smooth relaxation's margin at the snapshot scales the same way
    levers = cal.parse_vary("mm_rate", tiered)
    b = sens.book(tiered, scen)
    args = (sens._float_params(tiered.params), sens.safe_instruments(tiered.instruments, tiered.market), tiered.market,
            b, jnp.ones(tiered.n_accounts), 1.0)
    statics = dict(levers=levers, metric="bad_debt_mean", n=tiered.n_accounts, K=scen.steps, S=len(scen),
                   n_random=len(scen))
    total = lambda theta: float(cal.smooth_metric(jnp.array([theta]), *args, **statics)[1])
    assert total(1.0) == pytest.approx(20 * 0.03 * 50_000.0, rel=1e-12)
    assert total(2.0) == pytest.approx(20 * 0.06 * 50_000.0, rel=1e-12)


@pytest.fixture(scope="module")
def pm_books(two_books, tmp_path_factory):
    """``two_books`` under the portfolio margin model with thin price ranges (1% for BTC, 2.5%
    for ETH) and neither roll shock nor extended table, so that the price range sets the
    margin; 100 paths."""
    folder, snap, _ = two_books
    pm = tmp_path_factory.mktemp("pm")
    copy_snapshot(folder / "snap", pm / "snap", lambda _: TOML + 'model = "portfolio"\nprice_range = { BTC = 0.01, '
                  'ETH = 0.025 }\nmin_annualised_move = 0.0\nextended_pnl_fraction = 0.0\n')
    (pm / "mc.toml").write_text(PATHS.replace("paths = 400", "paths = 100").replace("vol = { BTC = 1.2 }",
                                                                                   "vol = { BTC = 1.2, ETH = 0.6 }"))
    snap = stress.load_snapshot(pm / "snap")
    return pm, snap, stress.load_scenarios(pm / "mc.toml", snap)


PM_VECTOR = "price_range.BTC,price_range.ETH"


def test_portfolio_vector_calibration_meets_the_target_exactly_within_what_margin_accepts(pm_books, monkeypatch):
    _, snap, scen = pm_books
    monkeypatch.setattr(cal, "STEPS", 30)  # a shorter smooth stage: the exact stage fixes the level
    monkeypatch.setattr(cal, "ROUNDS", 3)
    res = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), parameter=PM_VECTOR, tolerance=0.02)
    levers = cal.parse_vary(PM_VECTOR, snap)
    assert res["tops"] == pytest.approx([64.0, 0.99 / 0.025])  # hi, then what [margin] accepts
    assert res["before"]["value"] > 0.03 and res["factor"] is not None
    scales = np.array(res["scales"])
    assert (scales <= np.array(res["tops"]) * (1 + 1e-12)).all()
    at = stress.run(cal.scaled(snap, scales, levers), scen)
    below = stress.run(cal.scaled(snap, 0.98 * scales, levers), scen).summary["p_fund_depleted"]
    assert at.summary["p_fund_depleted"] <= 0.03 < below
    assert at.accounts.maintenance_margin.sum() == pytest.approx(res["after"]["maintenance_margin"], rel=1e-12)
    assert res["margin"]["price_range"] == pytest.approx({"BTC": 0.01 * scales[0], "ETH": 0.025 * scales[1]})
    assert scales[0] > 1.0 > scales[1]  # BTC, at twice ETH's vol, carries the risk
    one = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), parameter="price_range", tolerance=0.02)
    assert res["after"]["maintenance_margin"] < one["after"]["maintenance_margin"]


@pytest.mark.parametrize("vary, says", [
    ("mm_rate", "does not use mm_rate"), ("mm_rate.BTC", "does not use mm_rate"),
    ("mm_factor.BTC", "one number for every underlying"), ("price_range,price_range.BTC", "combine it with no"),
    ("price_range.USDC", "no instrument has the underlying"), ("price_range.BTC,price_range.BTC", "named twice"),
    ("volatility_range_up.ETH", "no option is on ETH"), ("volatility_range_down", "no option is on any underlying"),
])
def test_levers_of_another_margin_model_or_overlapping_ones_are_usage_errors(pm_books, vary, says):
    _, snap, _ = pm_books
    with pytest.raises(stress.InputError, match=says):
        cal.parse_vary(vary, snap)


def test_a_scale_past_what_margin_accepts_is_refused(pm_books):
    _, snap, _ = pm_books
    with pytest.raises(ValueError, match="mm_factor"):
        cal.scaled(snap, 1.3, cal.parse_vary("mm_factor", snap))  # 0.8 x 1.3 > 1
    assert cal.scaled(snap, 1.25, cal.parse_vary("mm_factor", snap)).margin_config["mm_factor"] == 1.0


def test_calibrate_command_under_the_portfolio_model_prints_the_margin_keys(pm_books, tmp_path):
    folder, snap, scen = pm_books
    out = tmp_path / "cal"
    r = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--scenarios", str(folder / "mc.toml"),
                                 "--target", "p_fund_depleted<=0.03", "--vary", "price_range", "--tolerance", "0.05",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "calibration.json").read_text())
    f = doc["factor"]
    assert doc["parameters"] == ["price_range"] and doc["margin"] == {
        "price_range": {"BTC": pytest.approx(0.01 * f), "ETH": pytest.approx(0.025 * f)}}
    assert f"price_range = {{ BTC = {0.01 * f:.10g}, ETH = {0.025 * f:.10g} }}" in " ".join(r.output.split())
    moved = dataclasses.replace(snap, margin_config={**snap.margin_config, **doc["margin"]})
    assert stress.run(dataclasses.replace(moved, params=margin.resolve(moved)), scen).summary["p_fund_depleted"] <= 0.03
    # mm_factor, the default under this model, cannot reach it: MM is at most IM there
    top = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--scenarios", str(folder / "mc.toml"),
                                   "--target", "p_fund_depleted<=0.03"])
    assert top.exit_code == 1 and "mm_factor x 1.25" in " ".join(top.output.split())
    bad = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--scenarios", str(folder / "mc.toml"),
                                   "--target", "p_fund_depleted<=0.03", "--vary", "mm_rate"])
    assert bad.exit_code == 2 and "does not use mm_rate" in bad.output


def test_worst_bad_debt_is_taken_over_the_paths_and_a_one_off_shock_does_not_block_it(tmp_path):
    # Beside the path, a one-step BTC -90% leaves the long 35,000 short whatever its margin: the
    # target is over the paths, where the standard model's 1% closes the long at the first
    # step iff 5,000 < 0.01 x 45,000 x f (f > 11.11), a rate above the initial 2%.
    snap, _ = one_long(tmp_path, "")
    (tmp_path / "mixed.toml").write_text('[[scenario]]\nname = "crash"\nmoves = { BTC = -0.9 }\n\n'
                                         + (tmp_path / "path.toml").read_text())
    scen = stress.load_scenarios(tmp_path / "mixed.toml", snap)
    assert stress.run(snap, scen).summary["worst_bad_debt"] == pytest.approx(35_000.0)
    res = cal.calibrate(snap, scen, cal.parse_target("worst_bad_debt<=0"))
    assert res["before"]["value"] == pytest.approx(10_000.0)
    assert res["factor"] == pytest.approx(11.112) and res["after"]["value"] == 0.0
    assert res["above_initial"] == ["P"] and res["margin"] == {}
    r = CliRunner().invoke(app, ["calibrate", str(tmp_path / "snap"), "--scenarios", str(tmp_path / "mixed.toml"),
                                 "--target", "worst_bad_debt<=0"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "over the set's 1 paths" in text and "passes the initial rate of 1 instrument(s) there (P)" in text


def test_margin_keys_name_every_underlying_so_that_written_into_exchange_toml_they_give_the_run(pm_books):
    _, snap, _ = pm_books
    levers = cal.parse_vary("price_range.BTC", snap)
    keys = cal.margin_keys(snap, levers, [3.0])
    assert keys == {"price_range": {"BTC": pytest.approx(0.03), "ETH": pytest.approx(0.025)}}
    moved = dataclasses.replace(snap, margin_config={**snap.margin_config, **keys})
    np.testing.assert_array_equal(np.asarray(margin.resolve(moved).pm_price_range),
                                  np.asarray(cal.scaled(snap, [3.0], levers).params.pm_price_range))


def test_a_top_off_the_tolerance_grid_is_tried_as_it_is(tmp_path):
    # On 12,528 the long keeps 7,528 at the first step: closed out there iff 7,528 < 6,120 f,
    # f > 1.2301, which only mm_factor's top, 1 / 0.8 = 1.25, reaches. With a tolerance of 0.1
    # the grid stops at 1.2, which holds the long to the second step (owing 20,000 - 12,528):
    # the top itself is the answer.
    snap, scen = one_long(tmp_path, 'model = "portfolio"\n', balance=12_528.0)
    res = cal.calibrate(snap, scen, cal.parse_target("worst_bad_debt<=0"), tolerance=0.1)
    assert res["factor"] == 1.25 and res["after"]["value"] == 0.0
    assert res["below"]["factor"] == pytest.approx(1.2) and res["below"]["value"] == pytest.approx(7_472.0)
    assert res["margin"] == {"mm_factor": 1.0}


def test_a_ray_with_no_grid_point_falls_back_rather_than_failing(pm_books, monkeypatch):
    # A smooth stage that ends with BTC at its top and ETH at its floor leaves a ray from 1 to
    # 1: no point of a 0.3 grid on it. That is the ray missing, not a usage error.
    _, snap, scen = pm_books
    monkeypatch.setattr(cal, "optimise", lambda *a, **k: {"scales": [64.0, 1 / 64], "value": 0.0,
                                                          "maintenance_margin": 0.0, "history": []})
    res = cal.calibrate(snap, scen, cal.parse_target("p_fund_depleted<=0.03"), parameter=PM_VECTOR, tolerance=0.3)
    assert res["factor"] is not None and res["after"]["value"] <= 0.03
    assert res["fallback"] or res["direction"] == pytest.approx([64.0, 1 / 64])


def test_printed_margin_keys_paste_into_exchange_toml_and_give_the_calibrated_run(pm_books, tmp_path, monkeypatch):
    import tomllib

    folder, snap, scen = pm_books
    monkeypatch.setattr(cal, "STEPS", 10)  # a short smooth stage: the exact stage fixes the level
    monkeypatch.setattr(cal, "ROUNDS", 2)
    r = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--scenarios", str(folder / "mc.toml"),
                                 "--target", "p_fund_depleted<=0.03", "--vary", "price_range.BTC,mm_factor",
                                 "--tolerance", "0.05", "--out", str(tmp_path / "out")], terminal_width=60)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "out" / "calibration.json").read_text())
    lines = r.output.split("in exchange.toml [margin]:\n")[1].splitlines()[:2]
    keys = tomllib.loads("\n".join(lines))  # one key a line, unwrapped at 60 columns
    assert set(keys) == {"mm_factor", "price_range"} and set(keys["price_range"]) == {"BTC", "ETH"}

    def pasted_in(toml: str) -> str:  # the printed lines in place of those keys
        kept = [line for line in toml.splitlines() if not line.startswith(("price_range", "mm_factor"))]
        return "\n".join(kept + lines) + "\n"

    pasted = stress.load_snapshot(copy_snapshot(folder / "snap", tmp_path / "snap", pasted_in))
    run = stress.run(pasted, stress.load_scenarios(folder / "mc.toml", pasted))
    assert run.accounts.maintenance_margin.sum() == pytest.approx(doc["after"]["maintenance_margin"], rel=1e-9)


@pytest.mark.parametrize("args, says", [(["--vary", ""], "--vary"), (["--hi", "inf"], "--hi")])
def test_an_empty_vary_or_an_infinite_hi_is_a_usage_error(book, args, says):
    folder, _, _ = book
    r = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--scenarios", str(folder / "mc.toml"),
                                 "--target", "p_fund_depleted<=0.03", *args])
    assert r.exit_code == 2 and says in r.output
