"""Calibration: the lowest maintenance-margin scale that meets a target, checked exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import stress
from stress import calibrate as cal
from stress.cli import app

from .conftest import write_snapshot

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
    _, masks = cal.parse_vary(VECTOR, snap)
    assert res["before"]["value"] > 0.03  # the current rates miss it: not vacuous
    scales = np.array(res["scales"])
    assert res["factor"] is not None and scales.shape == (2,)
    assert scales == pytest.approx(res["factor"] * np.array(res["direction"]), rel=1e-12)
    # exact, independent re-evaluation through stress.run
    at = stress.run(cal.scaled(snap, scales, masks), scen)
    below = stress.run(cal.scaled(snap, 0.98 * scales, masks), scen).summary["p_fund_depleted"]
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


def test_rate_multiplier_and_scaled_move_only_the_named_underlying(two_books):
    _, snap, _ = two_books
    names, masks = cal.parse_vary("mm_rate.ETH", snap)
    assert names == ("mm_rate.ETH",) and masks.tolist() == [[False, True]]
    rates = np.asarray(cal.scaled(snap, [3.0], masks).params.mm_rate)
    assert rates == pytest.approx(np.asarray(snap.params.mm_rate) * np.array([1.0, 3.0]))


@pytest.mark.parametrize("vary", ["haircut.BTC", "mm_rate.SOL", "mm_rate.USDC", "mm_rate,mm_rate.BTC",
                                  "mm_rate.BTC,mm_rate.BTC", ""])
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
    _, masks = cal.parse_vary(VECTOR, snap)
    assert stress.run(cal.scaled(snap, doc["scales"], masks), scen).summary["p_fund_depleted"] <= 0.03
    bad = CliRunner().invoke(app, ["calibrate", str(folder / "snap"), "--target", "p_fund_depleted<=0.03",
                                   "--vary", "mm_rate.DOGE"])
    assert bad.exit_code == 2 and "mm_rate.DOGE" in bad.output
