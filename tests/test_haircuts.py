"""Dynamic collateral haircuts ([margin] haircut_model = "dynamic"): a vol-scaled haircut and a
concentration add-on against daily volume, checked against hand arithmetic (docs/margin.md,
"Dynamic haircuts")."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import stress
from stress import cascade, engine, margin, sample
from stress.errors import InputError

from .conftest import write_snapshot
from .test_cascade import MC, SAMPLE_IMPACT

# BTC haircut 10%, reference vol 50%; BTC trades 1e9 USD a day; add-on 0.2 * sqrt(share held).
DYNAMIC = """haircut_model = "dynamic"
haircut_reference_vol = { BTC = 0.50 }
haircut_daily_volume = { BTC = 1.0e9 }
haircut_concentration = { BTC = 0.2 }
haircut_max = 0.6
"""
ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.10}]
# 100 BTC at 50,000 is 5e6 USD, 0.005 of a day's volume: add-on 0.2 * sqrt(0.005)
ADDON_100 = 0.2 * math.sqrt(0.005)


def _book(folder, margin_keys: str = DYNAMIC, liquidation: str = "", whale_btc: float = 100.0):
    """``a``: 100 BTC and long 180 BTC of a linear perpetual (MM 5%); ``s``: the short on 1e8
    USDC; ``w``: ``whale_btc`` BTC alone; ``c``: 1 BTC alone."""
    toml = f"""as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = {{ USDC = 1000000.0 }}
[margin]
{margin_keys}
[liquidation]
{liquidation}
"""
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0, "im_rate": 0.1, "mm_rate": 0.05}],
        balances=[{"account_id": "a", "asset": "BTC", "amount": 100.0},
                  {"account_id": "s", "asset": "USDC", "amount": 1e8},
                  {"account_id": "w", "asset": "BTC", "amount": whale_btc},
                  {"account_id": "c", "asset": "BTC", "amount": 1.0}],
        positions=[{"account_id": "a", "instrument_id": "P", "quantity": 180},
                   {"account_id": "s", "instrument_id": "P", "quantity": -180}],
        exchange_toml=toml))


SCENARIOS = """[[scenario]]
name = "crash"
moves = { BTC = -0.30 }
vol_shift = { BTC = 0.25 }

[[scenario]]
name = "calm"
vol_shift = { BTC = -0.20 }

[[scenario]]
name = "spike"
vol_shift = { BTC = 3.0 }
"""


def _scen(tmp_path, snap):
    (tmp_path / "s.toml").write_text(SCENARIOS)
    return stress.load_scenarios(tmp_path / "s.toml", snap)


def test_haircut_formula_scales_with_vol_adds_concentration_and_stops_at_the_cap(tmp_path):
    snap = _book(tmp_path / "snap")
    p, btc, usdc = snap.params, snap.asset_index("BTC"), snap.asset_index("USDC")
    price0 = np.asarray(snap.market.price)
    at = lambda net, dv: float(margin.haircut_at(p, btc, net, dv, price0))
    assert at(100.0, 0.0) == pytest.approx(0.10 + ADDON_100, rel=1e-14)
    # vol 50% -> 75%: 0.10 * 0.75 / 0.50 = 0.15, plus the same add-on (100 BTC is still 100 BTC)
    assert at(100.0, 0.25) == pytest.approx(0.15 + ADDON_100, rel=1e-14)
    # a calm scenario never releases collateral: vol 30% keeps the 10%
    assert at(100.0, -0.20) == pytest.approx(0.10 + ADDON_100, rel=1e-14)
    # vol 50% -> 350%: 0.70 + add-on, capped at haircut_max
    assert at(100.0, 3.0) == 0.6
    # square root of size: 1 BTC (0.00005 of a day) pays a tenth of 100 BTC's add-on
    assert at(1.0, 0.0) - 0.10 == pytest.approx(ADDON_100 / 10, rel=1e-12)
    # nothing held (or owed): no add-on; USDC has neither a reference vol nor a volume
    assert at(0.0, 0.0) == at(-5.0, 0.0) == pytest.approx(0.10)
    assert float(margin.haircut_at(p, usdc, 1e9, 1.0, price0)) == 0.0


def test_collateral_at_the_snapshot_pays_the_concentration_add_on(tmp_path):
    acc = margin.account_margin(_book(tmp_path / "snap"))["accounts"].set_index("account_id")
    # a: 100 BTC = 5e6 USD at (1 - 0.10 - ADDON_100); its perpetual is worth 0 at the mark
    assert acc.collateral_value["a"] == pytest.approx(5e6 * (0.9 - ADDON_100), rel=1e-14)
    assert acc.collateral_value["c"] == pytest.approx(5e4 * (0.9 - ADDON_100 / 10), rel=1e-14)
    assert acc.collateral_value["s"] == 1e8  # USDC: no haircut at all
    res = stress.run(_book(tmp_path / "snap2"), _scen(tmp_path, _book(tmp_path / "snap3")))
    np.testing.assert_allclose(res.accounts.set_index("account_id").collateral_value[acc.index], acc.collateral_value,
                               rtol=1e-14)


def test_a_vol_spike_makes_an_account_liquidatable_that_static_haircuts_leave_alone(tmp_path):
    # crash: BTC 35,000, vol +0.25. a's BTC 3.5e6 at 1 - (0.15 + ADDON_100); its perpetual
    # lost 180 x 15,000 = 2.7e6 USDC, counted in full. MM 5% x 180 x 35,000 = 315,000.
    # Dynamic collateral 3.5e6 x 0.835858 - 2.7e6 = 225,502.53 < 315,000: shortfall 89,497.47.
    # Static: 3.5e6 x 0.9 - 2.7e6 = 450,000 >= 315,000: not liquidatable.
    snap = _book(tmp_path / "snap")
    res = stress.run(snap, _scen(tmp_path, snap))
    assert res.summary["haircut_model"] == "dynamic"
    sc = res.scenarios.set_index("scenario")
    shortfall = 315_000.0 - (3.5e6 * (1 - 0.15 - ADDON_100) - 2.7e6)
    assert shortfall == pytest.approx(89_497.4746831, rel=1e-10)
    assert sc.shortfall_total["crash"] == pytest.approx(shortfall, rel=1e-12)
    assert sc.accounts_liquidatable["crash"] == 1
    static = _book(tmp_path / "static", margin_keys="")
    sc0 = stress.run(static, _scen(tmp_path, static)).scenarios.set_index("scenario")
    assert sc0.accounts_liquidatable["crash"] == 0 and sc0.shortfall_total["crash"] == 0.0
    # haircuts change who is liquidated, never what positions are worth
    np.testing.assert_array_equal(sc.pnl_total, sc0.pnl_total)


def test_a_larger_holding_pays_a_higher_haircut_share(tmp_path):
    # the whale holds 10,000 BTC (0.5 of a day's volume): add-on 0.2 * sqrt(0.5) = 0.1414
    acc = margin.account_margin(_book(tmp_path / "snap", whale_btc=10_000.0))["accounts"].set_index("account_id")
    share = 1.0 - acc.collateral_value / (acc.equity.where(acc.equity > 0))
    assert share["w"] == pytest.approx(0.10 + 0.2 * math.sqrt(0.5), rel=1e-12)
    assert share["c"] < share["a"] < share["w"]


def test_dynamic_haircuts_without_vols_or_volumes_are_the_static_haircuts(tmp_path):
    off = _book(tmp_path / "off", margin_keys='haircut_model = "dynamic"\nhaircut_reference_vol = { BTC = 0.0 }\n')
    static = _book(tmp_path / "static", margin_keys="")
    assert not off.params.haircut_dynamic
    a = stress.run(off, _scen(tmp_path, off))
    b = stress.run(static, _scen(tmp_path, static))
    pd.testing.assert_frame_equal(a.accounts, b.accounts)
    pd.testing.assert_frame_equal(a.scenarios, b.scenarios)


def test_the_reference_vol_defaults_to_the_median_option_iv_of_the_underlying():
    inst = stress.snapshot.Instruments(
        kind=np.array([2, 2, 2, 0]), underlying=np.array([1, 1, 1, 1]), settlement=np.array([1, 1, 1, 1]),
        inverse=np.array([True] * 4), contract_size=np.ones(4), strike=np.array([1.0, 1.0, 1.0, 0.0]),
        expiry=np.ones(4), is_call=np.array([True, True, False, False]), mark=np.array([0.0, 0.0, 0.0, 1.0]),
        iv=np.array([0.4, 0.9, 0.6, 0.0]))
    p = margin.params_from_config({"haircut_model": "dynamic"}, inst, np.array([0.0, 0.1]), (np.full(4, np.nan),) * 2,
                                  assets=("USDC", "BTC"))
    np.testing.assert_array_equal(p.haircut_vol, [0.0, 0.6])
    assert p.haircut_dynamic


def test_results_with_dynamic_haircuts_do_not_depend_on_chunking_or_mode(tmp_path):
    snap = _book(tmp_path / "snap")
    scen = _scen(tmp_path, snap)
    a = stress.run(snap, scen, chunk_size=1)
    b = stress.run(snap, scen, chunk_size=64)
    pd.testing.assert_frame_equal(a.accounts, b.accounts, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(a.scenarios, b.scenarios, check_exact=False, rtol=1e-12)
    # partial mode: the crash breaches a; what it counts as collateral is the same state
    part = _book(tmp_path / "part", liquidation='mode = "partial"')
    sp = stress.run(part, _scen(tmp_path, part)).scenarios
    np.testing.assert_allclose(sp.shortfall_total, a.scenarios.shortfall_total, rtol=1e-12)
    np.testing.assert_array_equal(sp.accounts_liquidatable, a.scenarios.accounts_liquidatable)


def test_tiles_proved_calm_under_dynamic_haircuts_change_no_result(tmp_path, monkeypatch):
    # Under dynamic haircuts engine.tile_ranges bounds a positive amount's share counted as
    # collateral by 1 - cap: the calm tiles' skipped margin work must change nothing.
    snap = _book(tmp_path / "snap")
    scen = _scen(tmp_path, snap)
    monkeypatch.setattr(engine, "CALM_MIN_STATES", 0)
    t = engine.with_ranges(engine.tables(snap, scen)[0], snap.n_accounts)
    np.testing.assert_allclose(np.asarray(t.ranges["keep"]), 1.0 - float(snap.params.haircut_max))
    engine.sharded_kernel.cache_clear()
    calm = stress.run(snap, scen, chunk_size=1)  # one account a chunk: three of the four are proved calm
    monkeypatch.setitem(engine.FUSION, "cpu", {**engine.FUSION["cpu"], "calm": False})
    engine.sharded_kernel.cache_clear()
    plain = stress.run(snap, scen, chunk_size=1)
    engine.sharded_kernel.cache_clear()
    pd.testing.assert_frame_equal(calm.accounts, plain.accounts, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(calm.scenarios, plain.scenarios, check_exact=False, rtol=1e-12)


def test_the_cascade_without_feedback_matches_the_engine_under_dynamic_haircuts(tmp_path, sample_tables):
    # The sample exchange on Monte Carlo paths whose vols rise as prices fall (vol_beta): the
    # engine lays each step's vol-scaled haircuts out in its tiles, the cascade recomputes them
    # step by step; their plain (no-feedback) runs must agree, and differ from static haircuts.
    folder = tmp_path / "snap"
    sample.write_snapshot(folder, sample_tables, "csv")
    toml = (folder / "exchange.toml").read_text()
    dynamic = ('haircut_model = "dynamic"\nhaircut_daily_volume = { BTC = 2e7, ETH = 1e7, SOL = 3e6 }\n'
               "haircut_concentration = 0.2\n")
    toml = toml.replace("[liquidation]\n", "[liquidation]\nfee_rate = 0.0005\n" + SAMPLE_IMPACT)
    (folder / "exchange.toml").write_text(toml.replace("[margin]\n", "[margin]\n" + dynamic))
    snap = stress.load_snapshot(folder)
    (folder / "mc.toml").write_text(MC.format())
    scen = stress.load_scenarios(folder / "mc.toml", snap)
    sc = stress.run(snap, scen).scenarios
    r = cascade.run(snap, scen)
    np.testing.assert_allclose(r["bad_debt_no_feedback"], sc.bad_debt, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(r["fees_no_feedback"], sc.fees, rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(r["accounts_liquidated_no_feedback"], sc.accounts_liquidatable)
    # stepped over account parts (as on a cluster), the step's haircuts travel with its tables
    from .test_cascade import PartsHere, assert_same_cascade

    assert_same_cascade(cascade.run(snap, scen, parts=PartsHere(snap, 3)), r)
    (folder / "exchange.toml").write_text(toml)
    static = stress.run(stress.load_snapshot(folder), scen).scenarios
    # a dynamic haircut is never below the static one, so every state breached before still is
    assert (sc.accounts_liquidatable >= static.accounts_liquidatable).all()
    assert sc.accounts_liquidatable.sum() > static.accounts_liquidatable.sum()
    one_step = ~np.asarray(scen.random)  # (on a path the deciding step can move earlier)
    assert (sc.shortfall_total[one_step] > static.shortfall_total[one_step]).all()


@pytest.mark.parametrize("keys, column", [
    ('haircut_model = "vol"', "haircut_model"),
    ('haircut_model = "dynamic"\nhaircut_max = 1.0', "haircut_max"),
    ('haircut_model = "dynamic"\nhaircut_max = 0.05', "haircut_max"),  # below BTC's static 10%
    ('haircut_model = "dynamic"\nhaircut_daily_volume = { BTC = -1.0 }', "haircut_daily_volume.BTC"),
    ('haircut_model = "dynamic"\nhaircut_reference_vol = { DOGE = 0.5 }', "haircut_reference_vol.DOGE"),
    ('haircut_model = "dynamic"\nhaircut_concentration = "high"', "haircut_concentration"),
])
def test_bad_haircut_keys_are_input_errors_naming_the_key(tmp_path, keys, column):
    with pytest.raises(InputError) as e:
        _book(tmp_path / "snap", margin_keys=keys)
    assert e.value.column == column and "exchange.toml" in str(e.value)


def test_the_hedge_values_dynamic_haircuts_as_the_run_does(tmp_path):
    # The hedge's exact numbers before a trade are the run's, with the vol-scaled haircut and
    # the concentration add-on on 100 BTC in every scenario (up to the cap); its trade cuts the
    # long's exposure and lifts its worst excess.
    from stress import greeks

    snap = _book(tmp_path / "snap")
    scen = _scen(tmp_path, snap)
    h = greeks.hedge(snap, "a", ["P"], scen)
    run = stress.run(snap, scen).accounts.set_index("account_id").loc["a"]
    b = h["before"]
    assert b["collateral_value"] == pytest.approx(run.collateral_value, rel=1e-12)
    assert b["maintenance_margin"] == pytest.approx(run.maintenance_margin, rel=1e-12)
    assert b["pnl_worst"] == pytest.approx(run.pnl_worst, rel=1e-12)
    assert b["shortfall_worst"] == pytest.approx(max(run.shortfall_worst, run.maintenance_margin - run.collateral_value,
                                                     0.0), rel=1e-12, abs=1e-9)
    assert h["trade"]["P"] < 0 and h["after"]["worst_excess"] > b["worst_excess"]
