"""Sensitivities of the exchange's stress totals (``stress.sensitivities``) against central
finite differences of the same totals recomputed independently by ``stress.run``.

Every finite difference moves one input of ``stress.run`` (the scenario set's price
multipliers or vol shifts, the snapshot's prices, or a field of ``Params``) up and down by a
small step and reads ``res.scenarios`` / ``res.accounts``; the books are built so that no
account sits on a kink (zero equity, zero margin gap, zero net amount of an asset) within the
step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

import stress
from stress import margin
from stress import sensitivities as sens
from stress.cli import app
from stress.errors import InputError
from stress.snapshot import Market

from .conftest import EXCHANGE_TOML, write_snapshot

ASSETS = [
    {"asset": "USDC", "price": 1.0, "haircut": 0.0},
    {"asset": "BTC", "price": 90_000.0, "haircut": 0.05},
    {"asset": "ETH", "price": 3_000.0, "haircut": 0.10},
]
INSTRUMENTS = [
    {"instrument_id": "BTC-PERPETUAL", "mark_price": 90_100.0},  # inverse, 10 USD face value
    {"instrument_id": "ETH-PERPETUAL", "mark_price": 3_001.0},  # inverse, 1 USD face value
    {"instrument_id": "BTC-LIN", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
     "contract_size": 0.1, "mark_price": 90_050.0},
    {"instrument_id": "BTC-C", "kind": "option", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
     "expiry": "2026-12-25T08:00:00Z", "strike": 100_000.0, "option_type": "call", "mark_iv": 0.6},
    {"instrument_id": "ETH-25DEC26-2800-P", "mark_iv": 0.7},  # inverse option on 1 ETH
]
BALANCES = [
    {"account_id": "lin-long", "asset": "USDC", "amount": 20_000.0},
    {"account_id": "call-short", "asset": "USDC", "amount": 30_000.0},
    {"account_id": "inv-short", "asset": "BTC", "amount": 1.5},
    {"account_id": "put-short", "asset": "ETH", "amount": 2.0},
    {"account_id": "eth-long", "asset": "ETH", "amount": 0.5},
    {"account_id": "eth-long", "asset": "USDC", "amount": -500.0},
    {"account_id": "coins", "asset": "BTC", "amount": 1.0},
    {"account_id": "btc-collateral", "asset": "BTC", "amount": 0.2},
]
POSITIONS = [
    {"account_id": "lin-long", "instrument_id": "BTC-LIN", "quantity": 20.0},
    {"account_id": "call-short", "instrument_id": "BTC-C", "quantity": -10.0},
    {"account_id": "inv-short", "instrument_id": "BTC-PERPETUAL", "quantity": -30_000.0},
    {"account_id": "put-short", "instrument_id": "ETH-25DEC26-2800-P", "quantity": -30.0},
    {"account_id": "eth-long", "instrument_id": "ETH-PERPETUAL", "quantity": 6_000.0},
    {"account_id": "btc-collateral", "instrument_id": "BTC-LIN", "quantity": 10.0},
]
SCENARIOS = """\
[[scenario]]
name = "btc-down-30"
moves = { BTC = -0.30, ETH = -0.35 }
vol_shift = { BTC = 0.20, ETH = 0.25 }
horizon_days = 1

[[scenario]]
name = "up"
moves = { BTC = 0.27, ETH = 0.21 }
vol_shift = { BTC = -0.05 }

[[scenario]]
name = "flat"

[[scenario]]
name = "eth-down-45"
moves = { ETH = -0.45, BTC = -0.05 }
vol_shift = { ETH = 0.3 }
horizon_days = 3

[[scenario]]
name = "depeg"
moves = { USDC = -0.07, BTC = -0.12 }
"""
# Two steps per path: an account closed out at step 1 (its first breach) is taken there.
MONTECARLO = """
[[montecarlo]]
name = "mc"
paths = 24
steps = 2
horizon_days = 10
seed = 7
vol = { BTC = 1.5, ETH = 1.8 }
correlation = { "BTC/ETH" = 0.8 }
"""


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sens_book")
    return stress.load_snapshot(write_snapshot(folder, assets=ASSETS, instruments=INSTRUMENTS, balances=BALANCES,
                                               positions=POSITIONS, exchange_toml=EXCHANGE_TOML))


def scenario_file(folder, text):
    path = folder / "scenarios.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def scen(snap, tmp_path_factory):
    return stress.load_scenarios(scenario_file(tmp_path_factory.mktemp("sens_scen"), SCENARIOS), snap)


@pytest.fixture(scope="module")
def result(snap, scen):
    return sens.sensitivities(snap, scen)


def run_totals(snap, scen, worst: int, tau: float | None = None) -> dict:
    """The objectives recomputed by ``stress.run`` (a fixed worst scenario index)."""
    res = stress.run(snap, scen)
    sc, rnd = res.scenarios, np.asarray(scen.random)
    out = {("maintenance_margin", "now"): res.accounts.maintenance_margin.sum()}
    for name, col in (("shortfall", "shortfall_total"), ("bad_debt", "bad_debt"),
                      ("insurance_fund_after", "insurance_fund_after")):
        v = sc[col].to_numpy()
        out[(name, "sum")], out[(name, "worst")] = v.sum(), v[worst]
    if tau is not None:
        gap = (sc.bad_debt.to_numpy() - sc.insurance_fund_before.to_numpy())[rnd] / tau
        out[("p_fund_depleted_smooth", "random")] = np.mean(1.0 / (1.0 + np.exp(-gap)))
    return out


def moved_scenarios(scen, asset: int, dx: float = 0.0, dvol: float = 0.0):
    """The scenario set with asset ``asset``'s price times ``1 + dx`` and its vol + ``dvol``,
    at every step of every path."""
    moved = {}
    for name in ("spot_mult", "vol_shift", "path_spot_mult", "path_vol_shift"):
        v = getattr(scen, name)
        if v is not None:
            v = v.copy()
            if "spot" in name:
                v[..., asset] *= 1.0 + dx
            else:
                v[..., asset] += dvol
        moved[name] = v
    return dataclasses.replace(scen, **moved)


def with_price(snap, asset: int, dx: float):
    """The snapshot with asset ``asset``'s price times ``1 + dx`` (margin at the snapshot
    reads prices only, not the futures' marks)."""
    price = np.asarray(snap.market.price, np.float64).copy()
    price[asset] *= 1.0 + dx
    return dataclasses.replace(snap, market=Market(price=price, rate=snap.market.rate))


def with_param(snap, name: str, index, dp: float):
    p = snap.params
    v = np.array(getattr(p, name), np.float64, copy=True)
    if v.ndim:
        v[index] += dp
    else:
        v = v + dp
    return dataclasses.replace(snap, params=dataclasses.replace(p, **{name: v}))


def row(df, **where) -> float:
    hit = df
    for k, v in where.items():
        hit = hit[hit[k] == v]
    assert len(hit) == 1, f"expected one row for {where}, got {len(hit)}"
    return float(hit["gradient"].iloc[0])


def assert_price_gradients(r: dict, snap, scen, asset: str, keys, h: float = 1e-6):
    """The ``market`` rows of ``asset``'s price against central differences of the run."""
    a, worst = snap.asset_index(asset), r["worst_index"]
    plus = run_totals(snap, moved_scenarios(scen, a, dx=h), worst)
    minus = run_totals(snap, moved_scenarios(scen, a, dx=-h), worst)
    for k in keys:
        got = row(r["market"], factor="price", asset=asset, total=k[0], scope=k[1])
        assert_fd(got, plus[k], minus[k], h, scale=abs(plus[k]) + 1e6)


def assert_fd(got: float, plus: float, minus: float, step: float, scale: float):
    fd = (plus - minus) / (2.0 * step)
    assert got == pytest.approx(fd, rel=1e-5, abs=1e-7 * scale), f"autodiff {got!r} vs central difference {fd!r}"


def test_totals_equal_the_engine_run(snap, scen, result):
    res = stress.run(snap, scen)
    sc = result["scenarios"]
    for col in ("shortfall_total", "bad_debt", "insurance_fund_before", "insurance_fund_after"):
        np.testing.assert_allclose(sc[col], res.scenarios[col], rtol=1e-9, atol=1e-6)
    t = result["totals"].set_index(["total", "scope"]).value
    assert t["maintenance_margin", "now"] == pytest.approx(res.accounts.maintenance_margin.sum(), rel=1e-9)
    assert result["worst_scenario"] == res.summary["worst_scenario"]
    assert t["bad_debt", "worst"] == pytest.approx(res.summary["worst_bad_debt"], rel=1e-9)
    # the book is built to lose: otherwise every loss gradient below would be trivially 0
    assert t["bad_debt", "worst"] > 0 and t["shortfall", "sum"] > 0


def test_flat_scenario_margin_equals_margin_now(scen, result):
    flat = result["scenarios"].set_index("scenario").loc["flat", "maintenance_margin"]
    assert flat == pytest.approx(result["totals"].set_index(["total", "scope"]).value["maintenance_margin", "now"],
                                 rel=1e-12)


@pytest.mark.parametrize("asset", ["BTC", "ETH", "USDC"])
def test_price_gradients_match_central_differences_of_the_run(snap, scen, result, asset):
    a, h = snap.asset_index(asset), 1e-6
    worst = result["worst_index"]
    plus = run_totals(snap, moved_scenarios(scen, a, dx=h), worst)
    minus = run_totals(snap, moved_scenarios(scen, a, dx=-h), worst)
    mkt = result["market"]
    for key in [k for k in plus if k[1] != "now"]:
        got = row(mkt, factor="price", asset=asset, total=key[0], scope=key[1])
        assert_fd(got, plus[key], minus[key], h, scale=abs(plus[key]) + 1e6)
    # margin now moves with the snapshot's price itself
    mp = stress.run(with_price(snap, a, h), scen).accounts.maintenance_margin.sum()
    mm = stress.run(with_price(snap, a, -h), scen).accounts.maintenance_margin.sum()
    assert_fd(row(mkt, factor="price", asset=asset, total="maintenance_margin", scope="now"), mp, mm, h, scale=1e6)


@pytest.mark.parametrize("asset", ["BTC", "ETH"])
def test_vol_gradients_match_central_differences_of_the_run(snap, scen, result, asset):
    a, h = snap.asset_index(asset), 1e-6
    worst = result["worst_index"]
    plus = run_totals(snap, moved_scenarios(scen, a, dvol=h), worst)
    minus = run_totals(snap, moved_scenarios(scen, a, dvol=-h), worst)
    mkt = result["market"]
    checked_nonzero = False
    for key in [k for k in plus if k[1] != "now"]:
        got = row(mkt, factor="vol", asset=asset, total=key[0], scope=key[1])
        assert_fd(got, plus[key], minus[key], h, scale=abs(plus[key]) + 1e6)
        checked_nonzero |= abs(got) > 1.0
    assert checked_nonzero, "no vol sensitivity of any size: the book does not exercise vega"


def test_bumps_scale_gradients_to_one_percent_and_one_vol_point(result):
    mkt = result["market"]
    price, vol = mkt[mkt.factor == "price"], mkt[mkt.factor == "vol"]
    np.testing.assert_allclose(price.sensitivity, 0.01 * price.gradient)
    np.testing.assert_allclose(vol.sensitivity, 0.01 * vol.gradient)


@pytest.mark.parametrize("instrument", ["BTC-C", "BTC-LIN", "ETH-25DEC26-2800-P", "ETH-PERPETUAL"])
def test_margin_rate_gradients_match_central_differences_of_the_run(snap, scen, result, instrument):
    """A group's row is the derivative of moving every rate of the group (underlying, kind)
    together: BTC-LIN and BTC-PERPETUAL are both BTC perpetuals."""
    inst = snap.instruments
    i = list(snap.instrument_ids.astype(str)).index(instrument)
    kind, under = np.asarray(inst.kind), np.asarray(inst.underlying)
    members = np.flatnonzero((kind == kind[i]) & (under == under[i]))
    group = f"{snap.assets[under[i]]} {sens.KIND_NAMES[int(kind[i])]}"
    h, worst = 1e-6, result["worst_index"]
    plus = run_totals(with_param(snap, "mm_rate", members, h), scen, worst)
    minus = run_totals(with_param(snap, "mm_rate", members, -h), scen, worst)
    p = result["params"]
    for key in plus:
        got = row(p, parameter="mm_rate", group=group, total=key[0], scope=key[1])
        assert_fd(got, plus[key], minus[key], h, scale=abs(plus[key]) + 1e6)
    assert row(p, parameter="mm_rate", group=group, total="maintenance_margin", scope="now") > 0


@pytest.mark.parametrize("asset", ["BTC", "ETH"])
def test_haircut_gradients_match_central_differences_of_the_run(snap, scen, result, asset):
    a, h, worst = snap.asset_index(asset), 1e-6, result["worst_index"]
    plus = run_totals(with_param(snap, "haircut", a, h), scen, worst)
    minus = run_totals(with_param(snap, "haircut", a, -h), scen, worst)
    p = result["params"]
    for key in plus:
        assert_fd(row(p, parameter="haircut", group=asset, total=key[0], scope=key[1]), plus[key], minus[key], h,
                  scale=abs(plus[key]) + 1e6)
    # a higher haircut lowers collateral, so shortfall rises where any account is short of margin
    assert row(p, parameter="haircut", group=asset, total="shortfall", scope="sum") > 0


def test_parameters_the_totals_cannot_depend_on_have_zero_gradient(snap, result):
    p = result["params"]
    # IM rates and the option IM floor enter initial margin only; no total reads it
    assert (p[p.parameter.isin(["im_rate", "option_im_floor"])].gradient == 0).all()
    # haircuts enter collateral only: bad debt (equity after closing) and the fund never read them
    hc = p[(p.parameter == "haircut") & p.total.isin(["bad_debt", "insurance_fund_after"])]
    assert (hc.gradient == 0).all()
    # margin rates do not move losses: bad debt is equity after closing, margin plays no part
    mm = p[(p.parameter == "mm_rate") & (p.total == "bad_debt")]
    assert (mm.gradient == 0).all()


def test_euler_allocation_sums_to_the_worst_bad_debt_and_is_each_accounts_own(snap, scen, result):
    acc = result["accounts"].set_index("account_id")
    t = result["totals"].set_index(["total", "scope"]).value
    assert acc.bad_debt_worst.sum() == pytest.approx(t["bad_debt", "worst"], rel=1e-12)
    assert acc.shortfall_worst.sum() == pytest.approx(t["shortfall", "worst"], rel=1e-12)
    assert acc.shortfall_sum.sum() == pytest.approx(t["shortfall", "sum"], rel=1e-12)
    # positive homogeneity: the allocation is each account's own bad debt in that scenario
    pnl = stress.pnl_matrix(snap, scen)[result["worst_scenario"]]
    equity = stress.run(snap, scen).accounts.set_index("account_id").equity
    own = np.maximum(-(equity + pnl), 0.0)
    np.testing.assert_allclose(acc.bad_debt_worst.reindex(own.index), own, rtol=1e-9, atol=1e-6)
    assert (acc.bad_debt_worst > 0).sum() >= 1 and (acc.bad_debt_worst >= 0).all()


def test_smoothed_fund_depletion_and_its_gradient_match_the_run(snap, tmp_path):
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), snap)
    tau = 2e6  # wide enough that every random scenario has a sigmoid slope worth checking
    r = sens.sensitivities(snap, scen, temperature=tau)
    worst, h = r["worst_index"], 1e-6
    base = run_totals(snap, scen, worst, tau)[("p_fund_depleted_smooth", "random")]
    assert r["p_fund_depleted_smooth"] == pytest.approx(base, rel=1e-9)
    assert r["temperature"] == tau
    res = stress.run(snap, scen)
    assert r["p_fund_depleted"] == res.summary["p_fund_depleted"]
    for col in ("shortfall_total", "bad_debt", "insurance_fund_after"):  # at first breach on paths
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6)
    a = snap.asset_index("BTC")
    plus = run_totals(snap, moved_scenarios(scen, a, dx=h), worst, tau)
    minus = run_totals(snap, moved_scenarios(scen, a, dx=-h), worst, tau)
    key = ("p_fund_depleted_smooth", "random")
    got = row(r["market"], factor="price", asset="BTC", total=key[0], scope=key[1])
    assert got != 0
    assert_fd(got, plus[key], minus[key], h, scale=1e-3)


def with_fee(snap, rate: float):
    return dataclasses.replace(snap, liquidation_config={**snap.liquidation_config, "fee_rate": rate})


def test_liquidation_fee_totals_and_gradient_match_the_run(snap, tmp_path):
    # on two-step paths accounts are closed out at their first breach and pay the fee there,
    # out of what equity they have left; the fund receives it before paying bad debt
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), snap)
    rate, h = 0.01, 1e-5
    r = sens.sensitivities(with_fee(snap, rate), scen, temperature=2e6)
    res = stress.run(with_fee(snap, rate), scen)
    assert res.scenarios.fees.sum() > 0 and (res.scenarios.fees > 0).sum() >= 5
    for col in ("fees", "bad_debt", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6, err_msg=col)
    assert r["p_fund_depleted"] == res.summary["p_fund_depleted"]
    worst = r["worst_index"]
    plus = run_totals(with_fee(snap, rate + h), scen, worst)
    minus = run_totals(with_fee(snap, rate - h), scen, worst)
    scale = abs(res.scenarios.insurance_fund_after).sum()
    got = row(r["params"], parameter="fee_rate", total="insurance_fund_after", scope="sum")
    assert got > 0  # a higher fee leaves more in the fund
    assert_fd(got, plus[("insurance_fund_after", "sum")], minus[("insurance_fund_after", "sum")], h, scale)
    # the fee never creates bad debt
    assert row(r["params"], parameter="fee_rate", total="bad_debt", scope="sum") == 0.0


def test_the_fee_rate_gradient_at_a_zero_rate_is_the_one_sided_derivative(snap, tmp_path):
    """At the default fee_rate = 0 a bankrupt account's fee is min(0 * notional, 0): the
    minimum's gradient split the tie and reported half its notional as fees the fund would
    gain, though a higher rate takes nothing from an account with no equity left. The
    derivative is checked against a forward difference from 0 (a rate below 0 is meaningless)."""
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), snap)
    base = with_fee(snap, 0.0)
    r = sens.sensitivities(base, scen, temperature=2e6)
    assert stress.run(base, scen).scenarios.bad_debt.sum() > 0  # bankrupt accounts: the tie is there
    h = 1e-6
    worst = r["worst_index"]
    at0, up = run_totals(base, scen, worst), run_totals(with_fee(snap, h), scen, worst)
    got = row(r["params"], parameter="fee_rate", total="insurance_fund_after", scope="sum")
    fd = (up[("insurance_fund_after", "sum")] - at0[("insurance_fund_after", "sum")]) / h
    assert got == pytest.approx(fd, rel=1e-5, abs=1e-3), (got, fd)


# Impact steep enough that closing costs create bad debt on the two-step paths.
IMPACT = {"BTC": {"spread": 0.002, "k": 1.0, "daily_vol": 0.04, "daily_volume": 2e7},
          "ETH": {"spread": 0.003, "k": 0.8, "daily_vol": 0.05, "daily_volume": 1e7}}


def with_impact(snap, asset: str | None = None, key: str = "", d: float = 0.0, fee_rate: float = 0.01):
    imp = {a: dict(t) for a, t in IMPACT.items()}
    if asset:
        imp[asset][key] += d
    return dataclasses.replace(snap, liquidation_config={**snap.liquidation_config, "impact": imp, "fee_rate": fee_rate})


def test_price_impact_totals_and_gradients_match_the_run(snap, tmp_path):
    # The engine's two passes: who is liquidated where (pass 1) fixes the contracts each
    # instrument closes exchange-wide; its cost |X| (spread + k daily_vol sqrt(|X| / V)) is
    # shared pro rata, paid before the fee, and can create bad debt. The gradients in the
    # impact parameters and in prices (through the notional closed) are checked against
    # central differences of stress.run.
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), snap)
    r = sens.sensitivities(with_impact(snap), scen, temperature=2e6)
    res = stress.run(with_impact(snap), scen)
    assert (res.scenarios.impact_cost > 0).sum() >= 10
    for col in ("impact_cost", "fees", "bad_debt", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6, err_msg=col)
    worst = r["worst_index"]
    scale = abs(res.scenarios.bad_debt).sum()
    for asset, key, h in (("BTC", "spread", 1e-6), ("ETH", "k", 1e-5), ("BTC", "daily_vol", 1e-6),
                          ("BTC", "daily_volume", 1e2)):
        plus = run_totals(with_impact(snap, asset, key, h), scen, worst)
        minus = run_totals(with_impact(snap, asset, key, -h), scen, worst)
        for total in ("bad_debt", "insurance_fund_after"):
            got = row(r["params"], parameter=f"impact.{key}", group=asset, total=total, scope="sum")
            assert got != 0 and (got > 0) == ((total == "bad_debt") == (key != "daily_volume"))
            assert_fd(got, plus[(total, "sum")], minus[(total, "sum")], h, scale)
    volume = r["params"].query("parameter == 'impact.daily_volume' and group == 'BTC' and total == 'bad_debt'")
    assert (volume.bump == "+1%").all()
    np.testing.assert_allclose(volume.sensitivity, 0.01 * 2e7 * volume.gradient)
    a, h = snap.asset_index("ETH"), 1e-6
    plus = run_totals(with_impact(snap), moved_scenarios(scen, a, dx=h), worst)
    minus = run_totals(with_impact(snap), moved_scenarios(scen, a, dx=-h), worst)
    got = row(r["market"], factor="price", asset="ETH", total="bad_debt", scope="sum")
    assert_fd(got, plus[("bad_debt", "sum")], minus[("bad_debt", "sum")], h, scale)


# MM 1% of a position's notional up to 100,000 USD, 2% to 250,000, 5% beyond: BTC-LIN's
# 180,000 and BTC-PERPETUAL's 300,000 sit in tiers 2 and 3, and paths move them across bounds.
TIERS = "future_tiers = [[100_000, 0.02, 0.01], [250_000, 0.04, 0.02], [1e12, 0.1, 0.05]]\n"


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sens_tiers")
    toml = EXCHANGE_TOML.replace("[margin]\n", "[margin]\n" + TIERS)
    return stress.load_snapshot(write_snapshot(folder, assets=ASSETS, instruments=INSTRUMENTS, balances=BALANCES,
                                               positions=POSITIONS, exchange_toml=toml))


@pytest.mark.parametrize("lag", [0, 1])
def test_tiers_and_an_oracle_lag_match_the_run_and_its_central_differences(tiered, tmp_path, lag):
    # each position pays the tier its notional is in at each state; with a lag of one step a
    # breach at step 1 of a two-step path is acted on at step 2 (at its prices), and one at
    # step 2 not at all
    snap = dataclasses.replace(tiered, liquidation_config={**tiered.liquidation_config, "oracle_lag_steps": lag,
                                                           "fee_rate": 0.01})
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), snap)
    r = sens.sensitivities(snap, scen, temperature=2e6)
    res = stress.run(snap, scen)
    for col in ("shortfall_total", "bad_debt", "fees", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6, err_msg=col)
    t = r["totals"].set_index(["total", "scope"]).value
    assert t["maintenance_margin", "now"] == pytest.approx(res.accounts.maintenance_margin.sum(), rel=1e-12)
    flat = sens.sensitivities(dataclasses.replace(snap, params=dataclasses.replace(
        snap.params, tier_mm=np.repeat(snap.params.tier_mm[:, :1], 3, axis=1))), scen, temperature=2e6)
    assert t["maintenance_margin", "now"] > flat["totals"].set_index(["total", "scope"]).value["maintenance_margin", "now"]
    worst, h = r["worst_index"], 1e-6
    i = list(snap.instrument_ids.astype(str)).index("BTC-LIN")
    members = np.flatnonzero((np.asarray(snap.instruments.kind) == 1) & (np.asarray(snap.instruments.underlying) == snap.asset_index("BTC")))
    plus = run_totals(with_param(snap, "mm_rate", members, h), scen, worst)
    minus = run_totals(with_param(snap, "mm_rate", members, -h), scen, worst)
    assert i in members
    for key in (("maintenance_margin", "now"), ("shortfall", "sum"), ("shortfall", "worst")):
        got = row(r["params"], parameter="mm_rate", group="BTC perpetual", total=key[0], scope=key[1])
        assert_fd(got, plus[key], minus[key], h, scale=abs(plus[key]) + 1e6)
    assert_price_gradients(r, snap, scen, "BTC", (("shortfall", "sum"), ("bad_debt", "sum")))


def test_an_oracle_lag_changes_who_pays_what(tiered, tmp_path):
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), tiered)
    lagged = dataclasses.replace(tiered, liquidation_config={"oracle_lag_steps": 1})
    a = sens.sensitivities(tiered, scen, temperature=2e6)["scenarios"]
    b = sens.sensitivities(lagged, scen, temperature=2e6)["scenarios"]
    paths = np.asarray(scen.random)
    assert (a.bad_debt[~paths].to_numpy() == b.bad_debt[~paths].to_numpy()).all()  # one step: no lag
    assert (a.bad_debt[paths] != b.bad_debt[paths]).any()


def with_margin(snap, **keys):
    """The snapshot with ``[margin]`` keys changed and its parameters resolved again from them
    (the engine and sensitivities read the parameters, not the table)."""
    moved = dataclasses.replace(snap, margin_config={**snap.margin_config, **keys})
    return dataclasses.replace(moved, params=margin.resolve(moved))


def test_portfolio_margin_totals_and_parameter_gradients_match_the_run(tmp_path):
    # The risk matrix around every state is revalued once for the exchange and pulled back
    # into prices and parameters after the chunks (here several) add up their shares.
    toml = EXCHANGE_TOML.replace("[margin]\n", '[margin]\nmodel = "portfolio"\n')
    snap = stress.load_snapshot(write_snapshot(tmp_path / "snap", assets=ASSETS, instruments=INSTRUMENTS,
                                               balances=BALANCES, positions=POSITIONS, exchange_toml=toml))
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), snap)
    r = sens.sensitivities(snap, scen, temperature=2e6, cells=20_000)
    res = stress.run(snap, scen)
    t = r["totals"].set_index(["total", "scope"]).value
    assert t["maintenance_margin", "now"] == pytest.approx(res.accounts.maintenance_margin.sum(), rel=1e-12)
    for col in ("shortfall_total", "bad_debt", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6, err_msg=col)
    worst, h, p = r["worst_index"], 1e-6, r["params"]
    eth = float(snap.params.pm_price_range[snap.asset_index("ETH")])
    for key, group, up, down in (
            ("price_range", "BTC", {"price_range": {"BTC": 0.16 + h, "ETH": eth}}, {"price_range": {"BTC": 0.16 - h, "ETH": eth}}),
            ("mm_factor", "all", {"mm_factor": 0.8 + h}, {"mm_factor": 0.8 - h}),
            ("volatility_range_up", "ETH", {"volatility_range_up": {"BTC": 0.5, "ETH": 0.5 + h}},
             {"volatility_range_up": {"BTC": 0.5, "ETH": 0.5 - h}})):
        plus, minus = run_totals(with_margin(snap, **up), scen, worst), run_totals(with_margin(snap, **down), scen, worst)
        for k in (("maintenance_margin", "now"), ("shortfall", "sum"), ("shortfall", "worst")):
            got = row(p, parameter=key, group=group, total=k[0], scope=k[1])
            assert_fd(got, plus[k], minus[k], h, scale=abs(plus[k]) + 1e6)
        assert row(p, parameter=key, group=group, total="maintenance_margin", scope="sum") > 0
    assert_price_gradients(r, snap, scen, "BTC", (("shortfall", "sum"), ("bad_debt", "sum")))
    # standard-model rates enter no total under the portfolio model; one chunk gives the same
    assert (p[p.parameter == "mm_rate"].gradient == 0).all()
    whole = sens.sensitivities(snap, scen, temperature=2e6)
    np.testing.assert_allclose(whole["params"].gradient, p.gradient, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(whole["accounts"].shortfall_sum, r["accounts"].shortfall_sum, rtol=1e-9, atol=1e-6)


DYNAMIC = ('haircut_model = "dynamic"\nhaircut_reference_vol = { BTC = 0.6, ETH = 0.7 }\n'
           "haircut_daily_volume = { BTC = 5e6, ETH = 1e6 }\nhaircut_max = 0.5\n")


def test_dynamic_haircut_totals_and_gradients_match_the_run(tmp_path):
    # vol-scaled haircuts move with each state's vol shift, the concentration add-on with what
    # each account holds; both enter collateral, so shortfalls
    toml = EXCHANGE_TOML.replace("[margin]\n", "[margin]\n" + DYNAMIC)
    snap = stress.load_snapshot(write_snapshot(tmp_path / "snap", assets=ASSETS, instruments=INSTRUMENTS,
                                               balances=BALANCES, positions=POSITIONS, exchange_toml=toml))
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), snap)
    r = sens.sensitivities(snap, scen, temperature=2e6)
    res = stress.run(snap, scen)
    for col in ("shortfall_total", "bad_debt", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6, err_msg=col)
    worst, h, p = r["worst_index"], 1e-6, r["params"]
    for key, group, step, up, down in (
            ("haircut_reference_vol", "BTC", h, {"BTC": 0.6 + h, "ETH": 0.7}, {"BTC": 0.6 - h, "ETH": 0.7}),
            ("haircut_concentration", "ETH", h, {"BTC": 0.1, "ETH": 0.1 + h}, {"BTC": 0.1, "ETH": 0.1 - h}),
            ("haircut_daily_volume", "BTC", 1.0, {"BTC": 5e6 + 1, "ETH": 1e6}, {"BTC": 5e6 - 1, "ETH": 1e6})):
        plus = run_totals(with_margin(snap, **{key: up}), scen, worst)
        minus = run_totals(with_margin(snap, **{key: down}), scen, worst)
        got = row(p, parameter=key, group=group, total="shortfall", scope="sum")
        assert got != 0
        assert_fd(got, plus[("shortfall", "sum")], minus[("shortfall", "sum")], step, scale=1e6)
    a = snap.asset_index("BTC")
    plus, minus = run_totals(with_param(snap, "haircut", a, h), scen, worst), run_totals(with_param(snap, "haircut", a, -h), scen, worst)
    assert_fd(row(p, parameter="haircut", group="BTC", total="shortfall", scope="sum"),
              plus[("shortfall", "sum")], minus[("shortfall", "sum")], h, scale=1e6)
    assert_price_gradients(r, snap, scen, "ETH", (("shortfall", "sum"),))
    # a vol shift of exactly 0 sits on the kink of max(1, (v + dv) / v): the gradient is the
    # side of a vol rise, so it matches a forward difference
    base, dvol = run_totals(snap, scen, worst)[("shortfall", "sum")], 1e-7
    up = run_totals(snap, moved_scenarios(scen, a, dvol=dvol), worst)[("shortfall", "sum")]
    assert row(r["market"], factor="vol", asset="BTC", total="shortfall", scope="sum") == pytest.approx(
        (up - base) / dvol, rel=1e-6)


@pytest.mark.parametrize("impact, tiers", [(False, False), (True, False), (False, True)])
def test_partial_liquidation_totals_and_gradients_match_the_run(snap, tmp_path, request, impact, tiers):
    # each breach closes just enough of the book to restore the target ratio, so the closed
    # share is a smooth function of margin and collateral: margin rates now move bad debt
    # by slopes, not only by jumps. Under risk-limit tiers the share kept is found with each
    # position's tier at that share (a root of a run of one tier, or a tier's bound).
    liq = {"mode": "partial", "partial_target": 1.25, "fee_rate": 0.01, **({"impact": IMPACT} if impact else {})}
    part = dataclasses.replace(request.getfixturevalue("tiered") if tiers else snap, liquidation_config=liq)
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), part)
    r = sens.sensitivities(part, scen, temperature=2e6, cells=2_000)
    res = stress.run(part, scen)
    assert res.scenarios.fees.sum() > 0
    for col in ("shortfall_total", "bad_debt", "fees", "impact_cost", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6, err_msg=col)
    worst, h = r["worst_index"], 1e-6
    # the short ETH put: a higher option MM rate closes more of it earlier, so less bad debt
    members = np.flatnonzero((np.asarray(snap.instruments.kind) == 2) & (np.asarray(snap.instruments.underlying) == snap.asset_index("ETH")))
    plus = run_totals(with_param(part, "mm_rate", members, h), scen, worst)
    minus = run_totals(with_param(part, "mm_rate", members, -h), scen, worst)
    for key in (("bad_debt", "sum"), ("insurance_fund_after", "sum"), ("shortfall", "sum")):
        got = row(r["params"], parameter="mm_rate", group="ETH option", total=key[0], scope=key[1])
        assert_fd(got, plus[key], minus[key], h, scale=abs(plus[key]) + 1e6)
    assert row(r["params"], parameter="mm_rate", group="ETH option", total="bad_debt", scope="sum") < 0
    plus, minus = run_totals(with_fee(part, 0.01 + h), scen, worst), run_totals(with_fee(part, 0.01 - h), scen, worst)
    got = row(r["params"], parameter="fee_rate", group="liquidation", total="bad_debt", scope="sum")
    assert_fd(got, plus[("bad_debt", "sum")], minus[("bad_debt", "sum")], h, scale=1e6)
    assert_price_gradients(r, part, scen, "BTC", (("bad_debt", "sum"), ("shortfall", "sum")))


def test_the_var_model_is_refused_with_a_clear_error(snap, scen):
    # stress run models the var margin under stress (an ES over windows around every state);
    # the differentiable exchange does not, so it says so rather than differentiate another model
    var = dataclasses.replace(snap, margin_config={"model": "var", "var_history": "history.csv"})
    with pytest.raises(InputError, match=r"\[margin\].*model.*var model"):
        sens.sensitivities(var, scen)


def test_default_temperature_is_one_percent_of_the_fund(snap, result):
    fund = float(np.asarray(snap.insurance_fund) @ np.asarray(snap.market.price))
    assert result["temperature"] == pytest.approx(0.01 * fund)
    # without random scenarios there is no probability to report
    assert result["p_fund_depleted"] is None and result["p_fund_depleted_smooth"] is None
    assert "p_fund_depleted_smooth" not in set(result["market"].total)


def test_sample_exchange_totals_match_the_run(sample_dir, tmp_path):
    snap = stress.load_snapshot(sample_dir)
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS.replace("USDC = -0.07, ", "") + MONTECARLO), snap)
    r = sens.sensitivities(snap, scen)
    res = stress.run(snap, scen)
    for col in ("shortfall_total", "bad_debt", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6)
    t = r["totals"].set_index(["total", "scope"])
    assert t.value["maintenance_margin", "now"] == pytest.approx(res.accounts.maintenance_margin.sum(), rel=1e-9)
    assert t.exact["p_fund_depleted_smooth", "random"] == res.summary["p_fund_depleted"]
    assert r["accounts"].bad_debt_worst.sum() == pytest.approx(res.summary["worst_bad_debt"], rel=1e-9)
    for df in (r["market"], r["params"]):
        assert np.isfinite(df.gradient).all()


def test_results_do_not_depend_on_how_accounts_are_chunked(sample_dir, tmp_path):
    # 400 accounts in one chunk, and in chunks of a few accounts (uneven positions per chunk)
    snap = stress.load_snapshot(sample_dir)
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS.replace("USDC = -0.07, ", "") + MONTECARLO), snap)
    whole = sens.sensitivities(snap, scen, cells=1 << 40)
    b = sens.book(snap, scen)
    small = 2_000 * b.spot_mult.shape[0] * len(b.pos_account) // snap.n_accounts // 1_000  # ~2 accounts a chunk
    C, chunks = sens.account_chunks(b, snap.n_accounts, small)
    assert C < 10 and len(chunks) > 40
    parts = sens.sensitivities(snap, scen, cells=small)
    assert parts["worst_scenario"] == whole["worst_scenario"]
    for key, col in (("totals", "value"), ("scenarios", "bad_debt"), ("market", "gradient"), ("params", "gradient"),
                     ("accounts", "bad_debt_worst"), ("accounts", "shortfall_sum")):
        a, w = parts[key][col].to_numpy(), whole[key][col].to_numpy()
        np.testing.assert_allclose(a, w, rtol=1e-9, atol=1e-9 * max(1.0, np.nanmax(np.abs(w))), err_msg=f"{key}.{col}")


def test_cli_prints_tables_and_writes_parquet(snap, scen, tmp_path):
    folder = snap.source
    path = scenario_file(tmp_path, SCENARIOS)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["sensitivities", str(folder), "--scenarios", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"worst scenario {sens.sensitivities(snap, scen)['worst_scenario']}" in r.output
    import pandas as pd

    for name in ("totals", "scenarios", "market", "params", "accounts"):
        assert len(pd.read_parquet(out / f"{name}.parquet"))


def test_cli_bad_scenario_file_exits_2(snap, tmp_path):
    path = scenario_file(tmp_path, '[[scenario]]\nname = "x"\nmoves = { DOGE = -0.5 }\n')
    r = CliRunner().invoke(app, ["sensitivities", str(snap.source), "--scenarios", str(path)])
    assert r.exit_code == 2
    assert "DOGE" in r.stderr


def test_partial_liquidation_under_the_portfolio_model_matches_the_run_and_its_central_differences(tmp_path):
    # A low delta-shock threshold puts kinks in the margin of a share of each book: the share
    # kept is the root of a concave piecewise-linear D (liquidation.kept_share_blocks), smooth
    # in the model's parameters between kinks, so they move bad debt by slopes.
    pm = 'model = "portfolio"\nmax_delta_shock = 0.2\ndelta_shock_threshold = 100000\n'
    toml = EXCHANGE_TOML.replace("[margin]\n", "[margin]\n" + pm)
    snap = stress.load_snapshot(write_snapshot(tmp_path / "snap", assets=ASSETS, instruments=INSTRUMENTS,
                                               balances=BALANCES, positions=POSITIONS, exchange_toml=toml))
    part = dataclasses.replace(snap, liquidation_config={"mode": "partial", "partial_target": 1.25, "fee_rate": 0.01})
    scen = stress.load_scenarios(scenario_file(tmp_path, SCENARIOS + MONTECARLO), part)
    r = sens.sensitivities(part, scen, temperature=2e6, cells=2_000)
    res = stress.run(part, scen)
    assert res.scenarios.fees.sum() > 0
    for col in ("shortfall_total", "bad_debt", "fees", "insurance_fund_after"):
        np.testing.assert_allclose(r["scenarios"][col], res.scenarios[col], rtol=1e-9, atol=1e-6, err_msg=col)
    worst, h, p = r["worst_index"], 1e-6, r["params"]
    for key, group, up, down in (
            ("max_delta_shock", "BTC", {"max_delta_shock": {"BTC": 0.2 + h, "ETH": 0.2}}, {"max_delta_shock": {"BTC": 0.2 - h, "ETH": 0.2}}),
            ("mm_factor", "all", {"mm_factor": 0.8 + h}, {"mm_factor": 0.8 - h})):
        plus, minus = run_totals(with_margin(part, **up), scen, worst), run_totals(with_margin(part, **down), scen, worst)
        for k in (("bad_debt", "sum"), ("insurance_fund_after", "sum"), ("shortfall", "sum")):
            got = row(p, parameter=key, group=group, total=k[0], scope=k[1])
            assert_fd(got, plus[k], minus[k], h, scale=abs(plus[k]) + 1e6)
        # the fees of the shares closed move with it (bad debt here comes from books closed in full)
        assert row(p, parameter=key, group=group, total="insurance_fund_after", scope="sum") != 0
    assert_price_gradients(r, part, scen, "BTC", (("bad_debt", "sum"), ("shortfall", "sum"), ("insurance_fund_after", "sum")))


def test_cli_says_when_the_euler_allocation_does_not_add_up_to_the_bad_debt(tmp_path):
    # Partial close-outs under the portfolio model: a long of 24.75M notional at 49,500 keeps
    # a share past the delta shock's kink, which depends on its book's size, then goes
    # bankrupt at 40,000. Its bad debt is 368,315 but its derivative in its book scale is
    # about -1.05M: the headline is the run's bad debt, and it says the allocations differ.
    from .test_liquidation import _portfolio_book

    snap = _portfolio_book(tmp_path / "snap", 'fee_rate = 0.002\nmode = "partial"\nadl = false')
    (tmp_path / "h.csv").write_text("date,BTC\n2024-01-01,50000\n2024-01-02,49500\n2024-01-03,40000\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    bad = stress.run(snap, stress.load_scenarios(tmp_path / "p.toml", snap)).scenarios.bad_debt.iloc[0]
    assert bad == pytest.approx(368_315.0, abs=1.0)
    r = CliRunner().invoke(app, ["sensitivities", str(tmp_path / "snap"), "--scenarios", str(tmp_path / "p.toml")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "368,315 USD; allocations sum to -1,048,99" in text and "not homogeneous" in text
