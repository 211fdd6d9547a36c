"""Greeks by autodiff (SPEC section 5) against QuantLib's analytic Black-Scholes Greeks, hand
derivations for inverse instruments, and central finite differences of ``stress.pnl_matrix``.

Conventions checked here (``docs/greeks.md``): equity is SPEC section 2 equity in USD;
``delta`` is dE/dS in units of the asset, collateral included; ``gamma`` d2E/dS2; ``vega`` the
equity change per +0.01 of implied vol (QuantLib's ``vega()`` is per 1.00, so divided by 100);
``theta`` the equity change per calendar day (QuantLib's ``thetaPerDay()`` is ``theta() / 365``
with ``theta() = dV/dt`` in years, and time to expiry is Actual/365 in both, so they match).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import stress
from stress import margin
from stress.cli import app
from stress.scenarios import Scenarios

from .conftest import write_snapshot

RATE = 0.03
S0 = 90_000.0
DAYS = 32  # as_of 2026-11-23T08:00Z to 2026-12-25T08:00Z
EXCHANGE = f"""\
as_of = 2026-11-23T08:00:00Z
rate = {RATE}
insurance_fund = {{ USDC = 1000000.0 }}
[margin]
[liquidation]
"""
ASSETS = [
    {"asset": "USDC", "price": 1.0, "haircut": 0.0},
    {"asset": "USDT", "price": 0.9995, "haircut": 0.02},
    {"asset": "BTC", "price": S0, "haircut": 0.05},
]


def quantlib(K: float, vol: float, call: bool, S: float = S0, days: int = DAYS) -> dict:
    """Value and Greeks per coin from QuantLib's analytic European engine (flat rate RATE, no
    dividend, flat vol, Actual/365). QuantLib is a test dependency (``.[test]``)."""
    ql = pytest.importorskip("QuantLib")
    today = ql.Date(23, 11, 2026)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    payoff = ql.PlainVanillaPayoff(ql.Option.Call if call else ql.Option.Put, K)
    option = ql.VanillaOption(payoff, ql.EuropeanExercise(today + days))
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(S)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, 0.0, dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, RATE, dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(today, ql.NullCalendar(), vol, dc)),
    )
    option.setPricingEngine(ql.AnalyticEuropeanEngine(process))
    return {"V": option.NPV(), "delta": option.delta(), "gamma": option.gamma(),
            "vega": option.vega() / 100.0, "theta": option.thetaPerDay()}


def linear_option(iid: str, K: float, cp: str, iv: float, size: float = 1.0) -> dict:
    return {"instrument_id": iid, "kind": "option", "underlying": "BTC", "settlement": "USDC", "contract_size": size,
            "expiry": "2026-12-25T08:00:00Z", "strike": K, "option_type": cp, "mark_iv": iv}


def snapshot(tmp_path, instruments, balances, positions, exchange=EXCHANGE):
    return stress.load_snapshot(write_snapshot(tmp_path, assets=ASSETS, instruments=instruments, balances=balances,
                                               positions=positions, exchange_toml=exchange))


def row(g: pd.DataFrame, account: str, asset: str) -> pd.Series:
    r = g[(g.account_id == account) & (g.underlying == asset)]
    assert len(r) == 1, f"expected one row for ({account}, {asset}), got\n{g}"
    return r.iloc[0]


def assert_greeks(r: pd.Series, delta, gamma, vega, theta, rtol=1e-9, atol=1e-9):
    got = r[["delta", "gamma", "vega", "theta"]].to_numpy(float)
    np.testing.assert_allclose(got, [delta, gamma, vega, theta], rtol=rtol, atol=atol)
    np.testing.assert_allclose(r.delta_usd, r.delta * S0 if r.underlying == "BTC" else r.delta_usd, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Against QuantLib


def test_linear_call_and_put_match_quantlib(tmp_path):
    # USDC-settled options on c coins: E = bal * P_usdc + q * c * V(S) * P_usdc, so the BTC
    # Greeks are q * c times QuantLib's per-coin ones; the USDC delta is the USDC held,
    # balance plus the options' value in USDC.
    snap = snapshot(tmp_path,
                    [linear_option("LC", 100_000, "call", 0.5, size=0.1), linear_option("LP", 80_000, "put", 0.6)],
                    [{"account_id": "call", "asset": "USDC", "amount": 5_000.0},
                     {"account_id": "put", "asset": "USDC", "amount": 20_000.0}],
                    [{"account_id": "call", "instrument_id": "LC", "quantity": 3},
                     {"account_id": "put", "instrument_id": "LP", "quantity": -2}])
    g = stress.greeks(snap)
    assert list(g.columns) == ["account_id", "underlying", "delta", "gamma", "vega", "theta", "delta_usd"]
    # assets in name order, whatever the assets file's row order
    assert list(zip(g.account_id, g.underlying)) == [("call", "BTC"), ("call", "USDC"), ("put", "BTC"), ("put", "USDC")]
    for acc, qc, ref in (("call", 3 * 0.1, quantlib(100_000, 0.5, True)), ("put", -2.0, quantlib(80_000, 0.6, False))):
        assert_greeks(row(g, acc, "BTC"), qc * ref["delta"], qc * ref["gamma"], qc * ref["vega"], qc * ref["theta"])
        bal = {"call": 5_000.0, "put": 20_000.0}[acc]
        assert_greeks(row(g, acc, "USDC"), bal + qc * ref["V"], 0.0, 0.0, 0.0)
    # Signs an exchange expects: long call delta in (0, q c), short put delta > 0, short put theta > 0.
    assert 0 < row(g, "call", "BTC").delta < 0.3 and row(g, "put", "BTC").delta > 0
    assert row(g, "call", "BTC").theta < 0 < row(g, "put", "BTC").theta


@pytest.mark.parametrize("cp,K,iv", [("C", 100_000, 0.5), ("P", 85_000, 0.55)])
def test_inverse_option_greeks_by_product_rule(tmp_path, cp, K, iv):
    # Deribit option on 1 BTC, settled in BTC; the account also holds b BTC. With V(S) the
    # USD Black-Scholes value per coin (QuantLib's NPV), its coin value is C(S) = q V(S) / S and
    # the account's USD equity is
    #     E(S) = (b + C(S)) * S.
    # Product rule:
    #     dE/dS   = b + C(S) + S C'(S),   C'(S) = q (V'/S - V/S^2)
    #             = b + q V/S + q (V' - V/S) = b + q V'            (= b + q * delta_QL)
    #     d2E/dS2 = d/dS (b + q V') = q V''                         (= q * gamma_QL)
    # and vol and time enter through V only: vega = q * vega_QL / 100, theta = q * thetaPerDay.
    # In coins the option's own delta is q (V' - V/S), the "premium-adjusted" delta; adding the
    # coins it is worth, q V/S, gives q V' — the collateral coins are part of delta.
    b, q = 0.7, -4.0
    iid = f"BTC-25DEC26-{K}-{cp}"
    snap = snapshot(tmp_path, [{"instrument_id": iid, "mark_iv": iv}],
                    [{"account_id": "inv", "asset": "BTC", "amount": b}],
                    [{"account_id": "inv", "instrument_id": iid, "quantity": q}])
    ref = quantlib(K, iv, cp == "C")
    g = stress.greeks(snap)
    assert list(g.underlying) == ["BTC"]  # settled in the underlying: one row
    r = row(g, "inv", "BTC")
    assert_greeks(r, b + q * ref["delta"], q * ref["gamma"], q * ref["vega"], q * ref["theta"])
    np.testing.assert_allclose(r.delta_usd, (b + q * ref["delta"]) * S0, rtol=1e-9)
    # The coin-denominated split: premium-adjusted delta plus the coins the options are worth.
    np.testing.assert_allclose(r.delta - b, q * (ref["delta"] - ref["V"] / S0) + q * ref["V"] / S0, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Futures, perpetuals, balances (hand-derived)


def test_linear_future_and_perpetual(tmp_path):
    # USDC-settled, c coins per contract, marked to market: E = bal + q c (F S'/S - F) (USDC at 1).
    # dE/dS' = q c F / S (= q c when F = S), gamma 0, vega 0, theta 0 (F' = F S'/S at any horizon).
    # USDC delta: the USDC held, the balance (a future is worth 0 at its mark).
    futures = [
        {"instrument_id": "LPERP", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
         "contract_size": 0.5, "mark_price": S0},
        {"instrument_id": "LFUT", "kind": "future", "underlying": "BTC", "settlement": "USDC",
         "contract_size": 0.01, "mark_price": 90_900.0, "expiry": "2026-12-25T08:00:00Z"},
    ]
    snap = snapshot(tmp_path, futures,
                    [{"account_id": "p", "asset": "USDC", "amount": 1_000.0}, {"account_id": "f", "asset": "USDC", "amount": 2_000.0}],
                    [{"account_id": "p", "instrument_id": "LPERP", "quantity": 6},
                     {"account_id": "f", "instrument_id": "LFUT", "quantity": -30}])
    g = stress.greeks(snap)
    assert_greeks(row(g, "p", "BTC"), 6 * 0.5, 0.0, 0.0, 0.0)
    assert_greeks(row(g, "f", "BTC"), -30 * 0.01 * 90_900.0 / S0, 0.0, 0.0, 0.0)
    assert_greeks(row(g, "p", "USDC"), 1_000.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(row(g, "p", "BTC").delta_usd, 3 * S0, rtol=1e-12)


def test_inverse_future_delta_in_coins(tmp_path):
    # Deribit BTC future, c = USD 10 face per contract, mark F; b BTC of collateral. Its coin
    # P&L at S' is q c (1/F - 1/F'), F' = F S'/S, worth that many coins at S':
    #     E(S') = (b + q c (1/F - S/(F S'))) S' = b S' + q c (S' - S) / F,
    # linear in S': delta = b + q c / F coins, gamma 0, vega 0, theta 0. A short of b F USD of
    # face (q c = -b F) makes the coin-margined account flat: delta 0.
    F = 90_400.0
    snap = snapshot(tmp_path, [{"instrument_id": "BTC-25DEC26", "mark_price": F}],
                    [{"account_id": "long", "asset": "BTC", "amount": 0.2}, {"account_id": "flat", "asset": "BTC", "amount": 0.5}],
                    [{"account_id": "long", "instrument_id": "BTC-25DEC26", "quantity": 1000},
                     {"account_id": "flat", "instrument_id": "BTC-25DEC26", "quantity": -0.5 * F / 10}])
    g = stress.greeks(snap)
    assert_greeks(row(g, "long", "BTC"), 0.2 + 1000 * 10 / F, 0.0, 0.0, 0.0)
    assert_greeks(row(g, "flat", "BTC"), 0.0, 0.0, 0.0, 0.0, atol=1e-12)


def test_balance_only_account(tmp_path):
    # No positions: delta is the amount of each asset held (borrowed: negative); nothing else.
    snap = snapshot(tmp_path, [{"instrument_id": "BTC-PERPETUAL", "mark_price": S0}],
                    [{"account_id": "hodl", "asset": "BTC", "amount": 2.0}, {"account_id": "hodl", "asset": "USDT", "amount": -300.0}],
                    [{"account_id": "other", "instrument_id": "BTC-PERPETUAL", "quantity": 1}])
    g = stress.greeks(snap)
    h = g[g.account_id == "hodl"].set_index("underlying")
    assert list(h.index) == ["BTC", "USDT"]
    np.testing.assert_allclose(h.delta, [2.0, -300.0], rtol=1e-15)
    np.testing.assert_allclose(h.delta_usd, [2.0 * S0, -300.0 * 0.9995], rtol=1e-15)
    assert (h[["gamma", "vega", "theta"]] == 0).all().all()


def test_account_subset_and_unknown_account(tmp_path):
    snap = snapshot(tmp_path, [{"instrument_id": "BTC-PERPETUAL", "mark_price": S0}],
                    [{"account_id": "a", "asset": "BTC", "amount": 1.0}, {"account_id": "b", "asset": "BTC", "amount": 3.0}],
                    [{"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -10}])
    full = stress.greeks(snap)
    sub = stress.greeks(snap, accounts=["b"])
    pd.testing.assert_frame_equal(sub, full[full.account_id == "b"].reset_index(drop=True))
    with pytest.raises(stress.InputError, match="'zz'"):
        stress.greeks(snap, accounts=["zz"])


# --------------------------------------------------------------------------------------------
# The sample exchange against finite differences of the engine's P&L


def test_sample_greeks_match_central_differences_of_pnl_matrix(sample_dir):
    snap = stress.load_snapshot(sample_dir)
    g = stress.greeks(snap)
    A, names = snap.n_assets, snap.assets
    h, dv, dt = 1e-4, 1e-4, 1e-3  # relative price move, vol shift, days
    rows, spot, vol, hor = [], [], [], []

    def add(name, m=None, v=None, t=0.0):
        s, w = np.ones(A), np.zeros(A)
        if m:
            s[m[0]] += m[1]
        if v:
            w[v[0]] += v[1]
        rows.append(name), spot.append(s), vol.append(w), hor.append(t)

    for a in range(A):
        add(f"up-{a}", (a, h)), add(f"down-{a}", (a, -h)), add(f"vup-{a}", v=(a, dv)), add(f"vdown-{a}", v=(a, -dv))
    add("later", t=dt), add("earlier", t=-dt)  # a negative horizon is time running back
    scen = Scenarios(tuple(rows), ("explicit",) * len(rows), np.array(spot), np.array(vol), np.array(hor))
    pnl = stress.pnl_matrix(snap, scen)

    P = np.asarray(snap.market.price)
    fd = {}
    for a, name in enumerate(names):
        up, down = pnl[f"up-{a}"].to_numpy(), pnl[f"down-{a}"].to_numpy()
        fd[("delta", name)] = (up - down) / (2 * h * P[a])
        fd[("gamma", name)] = (up + down) / (h * P[a]) ** 2  # P&L at the centre is 0
        fd[("vega", name)] = 0.01 * (pnl[f"vup-{a}"].to_numpy() - pnl[f"vdown-{a}"].to_numpy()) / (2 * dv)
    theta_fd = (pnl["later"].to_numpy() - pnl["earlier"].to_numpy()) / (2 * dt)

    pos = {acc: i for i, acc in enumerate(pnl.index)}
    ia = g.account_id.map(pos).to_numpy()
    ja = g.underlying.map({n: i for i, n in enumerate(names)}).to_numpy()
    # Compared in USD (delta * S, gamma * S^2): a stablecoin's price of 1 would otherwise blow
    # up the rounding noise of its (exactly zero) second difference by 1 / (h S)^2.
    for col, power in (("delta", 1), ("gamma", 2), ("vega", 0)):
        want = np.stack([fd[(col, n)] for n in names], axis=1) * P**power  # [n, A]
        got = np.zeros_like(want)
        got[ia, ja] = g[col].to_numpy() * P[ja] ** power
        scale = np.abs(want).max()
        assert scale > 0
        # Every exposure has a row (no row: a zero finite difference), and each row matches.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=col)
    theta = np.bincount(ia, weights=g.theta.to_numpy(), minlength=len(pnl))  # per account
    np.testing.assert_allclose(theta, theta_fd, rtol=1e-6, atol=1e-6 * np.abs(theta_fd).max())
    # The sample has options on BTC and ETH, so there is gamma, vega and theta to check.
    assert (g.gamma != 0).sum() > 10 and (g.vega != 0).sum() > 10 and (g.theta != 0).sum() > 10


def test_exchange_delta_of_a_matched_book_is_its_balances(sample_dir):
    # Every instrument's quantities sum to zero in the sample, so the positions' Greeks cancel
    # and the exchange-wide delta per asset is the sum of balances.
    snap = stress.load_snapshot(sample_dir)
    g = stress.greeks(snap)
    tot = g.groupby("underlying")[["delta", "gamma", "vega", "theta"]].sum()
    bal = pd.Series(snap.balances.sum(axis=0), index=list(snap.assets))
    np.testing.assert_allclose(tot.delta, bal[tot.index], rtol=1e-9, atol=1e-6)
    for col in ("gamma", "vega", "theta"):
        np.testing.assert_allclose(tot[col], 0.0, atol=1e-6 * g[col].abs().sum())


# --------------------------------------------------------------------------------------------
# CLI

runner = CliRunner()


def test_cli_greeks_prints_and_writes(sample_dir, tmp_path):
    res = runner.invoke(app, ["greeks", str(sample_dir)])
    assert res.exit_code == 0, res.output
    assert "delta_usd" in res.stdout and "BTC" in res.stdout and "exchange" in res.stdout.lower()
    expected = stress.greeks(stress.load_snapshot(sample_dir))
    for suffix in ("parquet", "csv"):
        target = tmp_path / f"g.{suffix}"
        res = runner.invoke(app, ["greeks", str(sample_dir), "--out", str(target)])
        assert res.exit_code == 0, res.output
        got = pd.read_parquet(target) if suffix == "parquet" else pd.read_csv(target)
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)


def test_cli_greeks_one_account(sample_dir):
    acc = stress.load_snapshot(sample_dir).account_ids[3]
    res = runner.invoke(app, ["greeks", str(sample_dir), "--account", acc])
    assert res.exit_code == 0, res.output
    assert acc in res.stdout
    others = [a for a in stress.load_snapshot(sample_dir).account_ids[:10] if a != acc]
    assert not any(o in res.stdout for o in others)


def test_cli_greeks_bad_input_exits_2(sample_dir, tmp_path):
    res = runner.invoke(app, ["greeks", str(sample_dir), "--account", "no-such-account"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --account: unknown account 'no-such-account'") and "Traceback" not in res.output
    res = runner.invoke(app, ["greeks", str(sample_dir), "--out", str(tmp_path / "g.xlsx")])
    assert res.exit_code == 2 and ".xlsx" in res.stderr
    assert not (tmp_path / "g.xlsx").exists()
    res = runner.invoke(app, ["greeks", str(tmp_path / "missing")])
    assert res.exit_code == 2


# --------------------------------------------------------------------------------------------
# Hedge suggestion

LINEAR_FUTURES = [
    {"instrument_id": "LFUT", "kind": "future", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
     "mark_price": 90_900.0, "expiry": "2026-12-25T08:00:00Z"},
    {"instrument_id": "LPERP", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
     "mark_price": S0},
]


def _default_scenarios(snap):
    from stress.scenarios import default_path

    return stress.load_scenarios(default_path(), snap, skip_unknown_assets=True)


def _engine_after(tmp_path, positions, balances, account, trade, scen, exchange=EXCHANGE):
    """The account after the trade, through the engine: a snapshot with the trade booked."""
    pos = pd.DataFrame(positions)
    for iid, q in trade.items():
        hit = (pos.account_id == account) & (pos.instrument_id == iid)
        if hit.any():
            pos.loc[hit, "quantity"] += q
        else:
            pos = pd.concat([pos, pd.DataFrame([{"account_id": account, "instrument_id": iid, "quantity": q}])])
    pos = pos[pos.quantity != 0]
    snap = snapshot(tmp_path / "after", LINEAR_FUTURES, balances, pos, exchange)
    res = stress.run(snap, scen).accounts.set_index("account_id").loc[account]
    g = stress.greeks(snap, accounts=[account]).set_index("underlying")
    return res, g


def test_hedge_long_future_with_perpetual(tmp_path):
    # Long 2 BTC of a linear dated future on 30,000 USDC: the default set's crash leaves it
    # short of margin. Shorting the perpetual cuts the delta and lifts the worst-case excess
    # (collateral - maintenance margin); under the standard model the perpetual carries its
    # own 1% margin, so the margin now goes *up* by exactly 1% of the notional sold.
    balances = [{"account_id": "f", "asset": "USDC", "amount": 30_000.0}]
    positions = [{"account_id": "f", "instrument_id": "LFUT", "quantity": 2.0}]
    snap = snapshot(tmp_path / "before", LINEAR_FUTURES, balances, positions)
    scen = _default_scenarios(snap)
    h = stress.greeks.hedge(snap, "f", ["LPERP"], scen)
    b, a = h["before"], h["after"]
    x = h["trade"]["LPERP"]
    assert -2.2 < x < -1.5, h
    assert abs(a["delta"]["BTC"]) < 0.25 * abs(b["delta"]["BTC"])
    assert b["shortfall_worst"] > 0 and a["worst_excess"] > b["worst_excess"] + 20_000
    np.testing.assert_allclose(a["maintenance_margin"], b["maintenance_margin"] + 0.01 * abs(x) * S0, rtol=1e-12)
    # A nearby trade is no better: the search found the minimum (up to the 0.001 lot).
    for dx in (-0.05, 0.05):
        assert stress.greeks.evaluate(snap, "f", {"LPERP": x + dx}, scen)["worst_excess"] <= a["worst_excess"] + 1e-6

    # "After" is an exact re-evaluation: the engine on a snapshot with the trade booked agrees.
    res, g = _engine_after(tmp_path, positions, balances, "f", h["trade"], scen)
    np.testing.assert_allclose(a["maintenance_margin"], res.maintenance_margin, rtol=1e-12)
    np.testing.assert_allclose(a["collateral_value"], res.collateral_value, rtol=1e-12)
    np.testing.assert_allclose(a["pnl_worst"], res.pnl_worst, rtol=1e-12)
    shortfall_now = max(0.0, res.maintenance_margin - res.collateral_value)
    np.testing.assert_allclose(a["shortfall_worst"], max(res.shortfall_worst, shortfall_now), atol=1e-9)
    np.testing.assert_allclose(a["delta"]["BTC"], g.loc["BTC", "delta"], rtol=1e-12)


def worst_excess_on_a_grid(snap, instrument: str, scen, lo: float, hi: float, lot: float = 0.001):
    """Brute force: the exact worst margin excess of account 0 after every trade of
    ``instrument`` on a grid of ``lot`` from ``lo`` to ``hi``, ``(trades, excess)``, a few
    hundred trades at a time (each is every state of the set)."""
    b, _, _ = stress.greeks._book(snap, 0, [instrument], scen)
    xs = np.round(np.arange(lo, hi + lot / 2, lot) / lot) * lot
    state = jax.jit(jax.vmap(lambda x: stress.greeks._state(b, x)))
    out = []
    for k in range(0, len(xs), 250):
        _, coll, mm = state(jnp.asarray(xs[k:k + 250])[:, None])
        out.append(np.min(np.asarray(coll - mm), axis=1))
    return np.round(xs, 6), np.concatenate(out)


@pytest.mark.parametrize("tiers, x_best", [
    # past 100,000 of notional the whole position pays 5%: worth it, the best short is past the bound
    ("[[100000, 0.02, 0.01], [1000000, 0.1, 0.05]]", -1.709),
    # it pays 20%: the best short stays at the bound in the state that binds
    ("[[100000, 0.02, 0.01], [1000000, 0.4, 0.2]]", -1.092)], ids=["past-the-bound", "at-the-bound"])
def test_hedge_under_risk_limit_tiers_finds_the_best_trade_of_a_brute_force_search(tmp_path, tiers, x_best):
    # The long future of test_hedge_long_future_with_perpetual on a tiered exchange. A tier's
    # step makes the margin jump with the perpetual's notional in each state, so the objective
    # is not convex; the search smooths the steps. Against every trade on the 0.001 lot from
    # -2.5 to 0 evaluated exactly, it finds the best, and the engine agrees with its numbers.
    exchange = EXCHANGE.replace("[margin]", f"[margin]\nfuture_tiers = {tiers}")
    balances = [{"account_id": "f", "asset": "USDC", "amount": 30_000.0}]
    positions = [{"account_id": "f", "instrument_id": "LFUT", "quantity": 2.0}]
    snap = snapshot(tmp_path / "before", LINEAR_FUTURES, balances, positions, exchange)
    scen = _default_scenarios(snap)
    h = stress.greeks.hedge(snap, "f", ["LPERP"], scen)
    xs, excess = worst_excess_on_a_grid(snap, "LPERP", scen, -2.5, 0.0)
    assert xs[np.argmax(excess)] == x_best and h["trade"] == {"LPERP": x_best}
    assert h["after"]["worst_excess"] == pytest.approx(excess.max(), rel=1e-12)
    untiered = stress.greeks.hedge(snapshot(tmp_path / "flat", LINEAR_FUTURES, balances, positions), "f", ["LPERP"], scen)
    assert untiered["trade"]["LPERP"] != x_best  # the tiers move the answer
    r = runner.invoke(app, ["hedge", str(tmp_path / "before"), "--account", "f", "--with", "LPERP"])
    assert r.exit_code == 0, r.output
    assert "with risk-limit tiers" in " ".join(r.stdout.split()) and f"{x_best:+,.6g}" in r.stdout
    res, _ = _engine_after(tmp_path, positions, balances, "f", h["trade"], scen, exchange)
    a = h["after"]
    np.testing.assert_allclose(a["maintenance_margin"], res.maintenance_margin, rtol=1e-12)
    np.testing.assert_allclose(a["pnl_worst"], res.pnl_worst, rtol=1e-12)
    np.testing.assert_allclose(a["shortfall_worst"], max(res.shortfall_worst, res.maintenance_margin - res.collateral_value,
                                                         0.0), rtol=1e-12)


TWO_UNDERLYINGS = [
    {"instrument_id": "LPERP", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
     "mark_price": S0},
    {"instrument_id": "LFUT", "kind": "future", "underlying": "BTC", "settlement": "USDC", "contract_size": 1.0,
     "mark_price": 90_900.0, "expiry": "2026-12-25T08:00:00Z"},
    {"instrument_id": "EPERP", "kind": "perpetual", "underlying": "ETH", "settlement": "USDC", "contract_size": 1.0,
     "mark_price": 3_000.0},
    {"instrument_id": "EFUT", "kind": "future", "underlying": "ETH", "settlement": "USDC", "contract_size": 1.0,
     "mark_price": 3_010.0, "expiry": "2026-12-25T08:00:00Z"}]
LADDERS = ("future_tiers = { BTC = [[100000, 0.02, 0.01], [250000, 0.05, 0.025], [500000, 0.12, 0.06], "
           "[3000000, 0.3, 0.15]], default = [[60000, 0.02, 0.01], [150000, 0.06, 0.03], [400000, 0.14, 0.07], "
           "[3000000, 0.3, 0.15]] }")
CRASHES_AND_PATHS = """[[scenario]]\nname = "down-20"\nmoves = { BTC = -0.20, ETH = -0.25 }
[[scenario]]\nname = "down-40-late"\nmoves = { BTC = -0.40, ETH = -0.45 }\nhorizon_days = 3
[[scenario]]\nname = "up-30"\nmoves = { BTC = 0.30, ETH = 0.35 }\nhorizon_days = 1
[[scenario]]\nname = "up-60-late"\nmoves = { BTC = 0.60, ETH = 0.50 }\nhorizon_days = 3
[[scenario]]\nname = "eth-down"\nmoves = { BTC = -0.05, ETH = -0.35 }
[[montecarlo]]\nname = "mc"\npaths = 200\nsteps = 4\nhorizon_days = 4\nseed = 7\nvol = { BTC = 1.2, ETH = 1.5 }
correlation = { "BTC/ETH" = 0.8 }
"""


@pytest.mark.parametrize("held, usdc", [
    # the search stops at a bound; rounded to the nearest lot it crossed it (8,748 USD worse)
    ((3.701, -2.727, 118.634, 111.659), 33_148.0),
    # between bounds the objective is linear, the Newton step absurd: the search stalled a lot short
    ((-4.142, 3.449, -39.636, 135.307), 97_902.0)], ids=["at-a-bound", "between-bounds"])
def test_hedge_under_many_tiers_lands_on_the_best_lot(tmp_path, held, usdc):
    # A review's random books: BTC and ETH perpetuals and futures under four-rung ladders per
    # underlying, hedged with the BTC perpetual. Against every trade on the 0.001 lot (a 0.01
    # grid from -12 to 12, then the lot around its best) the trade found is the best.
    assets = ASSETS + [{"asset": "ETH", "price": 3_000.0, "haircut": 0.1}]
    snap = stress.load_snapshot(write_snapshot(
        tmp_path / "snap", assets=assets, instruments=TWO_UNDERLYINGS,
        balances=[{"account_id": "a", "asset": "USDC", "amount": usdc}],
        positions=[{"account_id": "a", "instrument_id": i["instrument_id"], "quantity": q}
                   for i, q in zip(TWO_UNDERLYINGS, held)],
        exchange_toml=EXCHANGE.replace("[margin]", "[margin]\n" + LADDERS)))
    (tmp_path / "s.toml").write_text(CRASHES_AND_PATHS)
    scen = stress.load_scenarios(tmp_path / "s.toml", snap)
    h = stress.greeks.hedge(snap, "a", ["LPERP"], scen)
    coarse, excess = worst_excess_on_a_grid(snap, "LPERP", scen, -12.0, 12.0, lot=0.01)
    x0 = coarse[np.argmax(excess)]
    xs, excess = worst_excess_on_a_grid(snap, "LPERP", scen, x0 - 0.02, x0 + 0.02)
    assert h["trade"] == {"LPERP": xs[np.argmax(excess)]}
    assert h["after"]["worst_excess"] == pytest.approx(excess.max(), rel=1e-12)


def test_hedge_under_dynamic_haircuts_finds_the_best_trade_and_reports_what_the_run_reports(tmp_path):
    # Collateral in BTC under dynamic haircuts: the haircut grows with BTC's implied vol in each
    # scenario, and with the amount held (a concentration add-on on 30 BTC, 2.7 million USD,
    # against 1e8 traded a day). The perpetual sold against the long future turns BTC losses
    # into USDC gains. Against every trade evaluated exactly (on a 0.1 grid, then the 0.001 lot
    # around its best) the one found is the best up to the lot, and the engine on the booked
    # snapshot gives the same numbers.
    exchange = EXCHANGE.replace("[margin]", "[margin]\nhaircut_model = \"dynamic\"\nhaircut_reference_vol = "
                                "{ BTC = 0.5 }\nhaircut_daily_volume = { BTC = 1.0e8 }\nhaircut_concentration = "
                                "{ BTC = 0.5 }\nhaircut_max = 0.5")
    balances = [{"account_id": "f", "asset": "BTC", "amount": 30.0}, {"account_id": "f", "asset": "USDC", "amount": -2.0e6}]
    positions = [{"account_id": "f", "instrument_id": "LFUT", "quantity": 2.0}]
    snap = snapshot(tmp_path / "before", LINEAR_FUTURES, balances, positions, exchange)
    assert snap.params.haircut_dynamic
    scen = _default_scenarios(snap)
    h = stress.greeks.hedge(snap, "f", ["LPERP"], scen)
    coarse, excess = worst_excess_on_a_grid(snap, "LPERP", scen, -40.0, 0.0, lot=0.1)
    x0 = coarse[np.argmax(excess)]
    xs, excess = worst_excess_on_a_grid(snap, "LPERP", scen, x0 - 0.2, x0 + 0.2)
    best = int(np.argmax(excess))
    # the best lot, or its neighbour: the search's answer is rounded to the lot
    assert abs(h["trade"]["LPERP"] - xs[best]) <= 0.0010001 and h["trade"]["LPERP"] < -10
    assert h["after"]["worst_excess"] >= excess[best] - np.abs(np.diff(excess[best - 1:best + 2])).max()
    for got, trade in ((h["before"], {}), (h["after"], h["trade"])):
        res, _ = _engine_after(tmp_path / str(len(trade)), positions, balances, "f", trade, scen, exchange)
        np.testing.assert_allclose(got["maintenance_margin"], res.maintenance_margin, rtol=1e-12)
        np.testing.assert_allclose(got["collateral_value"], res.collateral_value, rtol=1e-12)
        np.testing.assert_allclose(got["pnl_worst"], res.pnl_worst, rtol=1e-12)
        np.testing.assert_allclose(got["shortfall_worst"],
                                   max(res.shortfall_worst, res.maintenance_margin - res.collateral_value, 0.0), rtol=1e-12)


def test_an_idle_balance_does_not_move_the_hedge(tmp_path):
    # Under paths that move BTC alone, USDC at no haircut adds the same to the excess in every
    # state, so the best trade is the same; as the smoothing's scale it had coarsened the
    # search (the trade 1% off on 1e10 USDC).
    positions = [{"account_id": "f", "instrument_id": "LFUT", "quantity": 20.0}]
    (tmp_path / "mc.toml").write_text('[[montecarlo]]\nname = "mc"\npaths = 50\nsteps = 2\nhorizon_days = 2\n'
                                      'seed = 5\nvol = { BTC = 1.5 }\n')
    trades = []
    for k, usdc in enumerate((100_000.0, 1e10)):
        snap = snapshot(tmp_path / str(k), LINEAR_FUTURES, [{"account_id": "f", "asset": "USDC", "amount": usdc}], positions)
        h = stress.greeks.hedge(snap, "f", ["LPERP"], stress.load_scenarios(tmp_path / "mc.toml", snap))
        trades.append(h["trade"]["LPERP"])
    assert trades[0] < -1.0 and trades[1] == pytest.approx(trades[0], abs=2e-3)


def test_hedge_with_the_held_perpetual_closes_it(tmp_path):
    # Long 3 of the perpetual, hedged with the same perpetual: the trade nearly closes it, so
    # margin and delta both fall. It ends a little short, not flat: the USDC depeg scenario
    # (USDC -10% with BTC -5%) then binds against the +50% squeeze.
    balances = [{"account_id": "p", "asset": "USDC", "amount": 20_000.0}]
    positions = [{"account_id": "p", "instrument_id": "LPERP", "quantity": 3.0}]
    snap = snapshot(tmp_path / "before", LINEAR_FUTURES, balances, positions)
    scen = _default_scenarios(snap)
    h = stress.greeks.hedge(snap, "p", None, scen)  # default: the perpetual on BTC it holds
    assert h["instruments"] == ["LPERP"]
    b, a = h["before"], h["after"]
    assert a["maintenance_margin"] < 0.05 * b["maintenance_margin"]
    assert abs(a["delta"]["BTC"]) < 0.05 * b["delta"]["BTC"]
    assert a["worst_excess"] > b["worst_excess"]
    res, _ = _engine_after(tmp_path, positions, balances, "p", h["trade"], scen)
    np.testing.assert_allclose(a["maintenance_margin"], res.maintenance_margin, rtol=1e-12)
    np.testing.assert_allclose(a["pnl_worst"], res.pnl_worst, rtol=1e-12)
    assert stress.greeks.evaluate(snap, "p", h["trade"], scen) == a


def test_hedge_takes_every_step_of_a_path_and_reports_what_the_run_reports(tmp_path):
    # Long 1 BTC perpetual at 90,000 on 12,000 USDC, one replay path 90,000 -> 76,500 ->
    # 90,000. At the first step the long has lost 13,500: collateral -1,500 against a margin
    # of 1% x 76,500 = 765, a shortfall of 2,265, and stress run closes it out there. By the
    # last step it is whole again, which is all a last-step view would see.
    balances = [{"account_id": "a", "asset": "USDC", "amount": 12_000.0}]
    positions = [{"account_id": "a", "instrument_id": "LPERP", "quantity": 1.0}]
    snap = snapshot(tmp_path / "before", LINEAR_FUTURES, balances, positions)
    (tmp_path / "h.csv").write_text("date,BTC\n2026-01-01,90000\n2026-01-02,76500\n2026-01-03,90000\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    scen = stress.load_scenarios(tmp_path / "p.toml", snap)
    run = stress.run(snap, scen).accounts.set_index("account_id").loc["a"]
    assert run.shortfall_worst == pytest.approx(2_265.0) and run.pnl_worst == pytest.approx(-13_500.0)
    h = stress.greeks.hedge(snap, "a", ["LPERP"], scen)
    b, a = h["before"], h["after"]
    assert b["worst_excess"] == pytest.approx(-2_265.0) and b["worst_state"] == "h:2026-01-01 step 1/2"
    assert b["shortfall_worst"] == pytest.approx(run.shortfall_worst, rel=1e-12)
    assert b["pnl_worst"] == pytest.approx(run.pnl_worst, rel=1e-12)
    # the hedge sells enough of the perpetual to clear the first step, and the run agrees
    assert h["trade"]["LPERP"] < 0 and a["worst_excess"] >= 0.0
    res, _ = _engine_after(tmp_path, positions, balances, "a", h["trade"], scen)
    assert a["shortfall_worst"] == pytest.approx(res.shortfall_worst, abs=1e-9) and res.p_liquidation == 0.0
    assert a["pnl_worst"] == pytest.approx(res.pnl_worst, rel=1e-12)


def test_default_hedge_instruments_do_not_follow_the_instruments_row_order(tmp_path):
    # Two USDC perpetuals on BTC, neither held, both funded by the account's USDC: the first by
    # id is chosen, however the instruments table lists them (it took the first row).
    other = dict(LINEAR_FUTURES[1], instrument_id="APERP")
    balances = [{"account_id": "f", "asset": "USDC", "amount": 30_000.0}]
    positions = [{"account_id": "f", "instrument_id": "LFUT", "quantity": 2.0}]
    picks = []
    for k, rows in enumerate((LINEAR_FUTURES + [other], [other] + LINEAR_FUTURES[::-1])):
        snap = snapshot(tmp_path / str(k), rows, balances, positions)
        picks.append(stress.greeks.default_hedge_instruments(snap, 0))
    assert picks == [["APERP"], ["APERP"]]


def test_hedge_bad_input(tmp_path):
    snap = snapshot(tmp_path, LINEAR_FUTURES, [{"account_id": "u", "asset": "USDC", "amount": 1.0}],
                    [{"account_id": "f", "instrument_id": "LFUT", "quantity": 1.0}])
    with pytest.raises(stress.InputError, match="'nobody'"):
        stress.greeks.hedge(snap, "nobody")
    with pytest.raises(stress.InputError, match="'NOPE'"):
        stress.greeks.hedge(snap, "f", ["NOPE"])
    with pytest.raises(stress.InputError, match="perpetual"):
        stress.greeks.hedge(snap, "u")  # USDC only: nothing to hedge with by default


def test_cli_hedge(sample_dir):
    acc = "acct-0000357"
    res = runner.invoke(app, ["hedge", str(sample_dir), "--account", acc])
    assert res.exit_code == 0, res.output
    assert "maintenance margin" in res.stdout and "worst margin excess" in res.stdout
    res = runner.invoke(app, ["hedge", str(sample_dir), "--account", acc, "--with", "BTC-PERPETUAL,NOPE"])
    assert res.exit_code == 2 and "NOPE" in res.stderr
    res = runner.invoke(app, ["hedge", str(sample_dir), "--account", "nobody"])
    assert res.exit_code == 2 and "nobody" in res.stderr


def test_module_and_function_are_one_name():
    # stress.greeks is the SPEC's function and the module holding hedge: one callable object,
    # whichever import ran first.
    import stress.greeks as mod
    from stress import greeks as via_from

    assert stress.greeks is mod is via_from and callable(mod) and callable(mod.hedge)


def test_gross_notional_per_account_and_underlying(tmp_path):
    # SPEC section 2 notional: |q| c S for linear instruments (6 x 0.5 BTC at S0 plus 30 x
    # 0.01 BTC at S0), |q| x face value for inverse futures (100 x 10 USD).
    from stress.greeks import gross_notional

    instruments = [
        {"instrument_id": "LPERP", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
         "contract_size": 0.5, "mark_price": S0},
        {"instrument_id": "LFUT", "kind": "future", "underlying": "BTC", "settlement": "USDC",
         "contract_size": 0.01, "mark_price": 90_900.0, "expiry": "2026-12-25T08:00:00Z"},
        {"instrument_id": "BTC-PERPETUAL", "mark_price": S0},
    ]
    snap = snapshot(tmp_path, instruments, [{"account_id": "a", "asset": "USDC", "amount": 1_000.0}],
                    [{"account_id": "a", "instrument_id": "LPERP", "quantity": 6},
                     {"account_id": "a", "instrument_id": "LFUT", "quantity": -30},
                     {"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -100}])
    g = gross_notional(snap).set_index(["account_id", "underlying"]).gross_notional
    assert g.loc[("a", "BTC")] == pytest.approx((6 * 0.5 + 30 * 0.01) * S0, rel=1e-12)
    assert g.loc[("b", "BTC")] == pytest.approx(100 * 10.0, rel=1e-12)


def test_exposure_rows_are_the_greeks_with_their_gross_notional(sample_dir):
    # exposure() matches (account, underlying) by integer codes; it must give exactly the
    # rows of a merge on the id strings, NaN where the account holds no position on the
    # asset (a settlement or collateral asset only).
    from stress.greeks import account_greeks, exposure, gross_notional

    snap = stress.load_snapshot(sample_dir)
    want = account_greeks(snap).merge(gross_notional(snap), on=["account_id", "underlying"], how="left")
    got = exposure(snap)
    assert want.gross_notional.isna().any() and want.gross_notional.notna().any()
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=0.0)


def test_names_at_gives_the_column_pandas_makes_of_the_same_strings():
    from stress.snapshot import names_at

    names = ("BTC", "ETH", "SOL ", "é")
    codes = np.array([3, 0, 0, 2, 1, 3], np.int32)
    got = pd.Series(names_at(names, codes))
    want = pd.Series([names[c] for c in codes])
    assert got.dtype == want.dtype
    pd.testing.assert_series_equal(got, want)
    assert len(names_at(names, np.zeros(0, np.int64))) == 0


@pytest.mark.parametrize("iv", [0.01, 0.005])
def test_an_option_marked_at_or_below_the_vol_floor_is_valued_at_its_mark_with_full_vega(tmp_path, iv):
    """Shifted vols are floored at 0.01 (SPEC section 3), but an unshifted option is valued at
    its mark (section 2) even below that, and a vol rise from the floor moves it at the full
    rate: a maximum's gradient at the tie had halved the vega of a mark at 0.01, and a mark
    below it was valued at 0.01 with no vega at all."""
    snap = snapshot(tmp_path, [linear_option("LC", S0, "call", iv)],
                    [{"account_id": "a", "asset": "USDC", "amount": 1_000.0}],
                    [{"account_id": "a", "instrument_id": "LC", "quantity": 1}])
    ref = quantlib(S0, iv, True)
    g = stress.greeks(snap)
    assert_greeks(row(g, "a", "BTC"), ref["delta"], ref["gamma"], ref["vega"], ref["theta"], rtol=1e-7)
    np.testing.assert_allclose(row(g, "a", "USDC").delta, 1_000.0 + ref["V"], rtol=1e-12)
    assert ref["vega"] > 1.0  # ATM, 32 days: the vega a halving or a floor would have lost


def test_hedge_under_the_portfolio_model_lowers_margin_now_and_reports_what_the_run_reports(tmp_path):
    # Three short calls on 40,000 USDC. Under the portfolio model the perpetual bought against
    # them shares BTC's risk matrix, so margin now falls (the standard model would add 1% of
    # the perpetual's notional); the default set's worst state, BTC +500%, improves most. The
    # standard model's rates, 0 here, are not the portfolio model's: the search ignores them.
    pm = EXCHANGE.replace("[margin]", '[margin]\nmodel = "portfolio"\nfuture_im_rate = 0.0\nfuture_mm_rate = 0.0')
    instruments = LINEAR_FUTURES + [linear_option("LC", 95_000.0, "call", 0.6)]
    balances = [{"account_id": "o", "asset": "USDC", "amount": 40_000.0}]
    positions = [{"account_id": "o", "instrument_id": "LC", "quantity": -3.0}]

    def load(folder, pos):
        return stress.load_snapshot(write_snapshot(folder, assets=ASSETS, instruments=instruments, balances=balances,
                                                   positions=pos, exchange_toml=pm))

    snap = load(tmp_path / "before", positions)
    scen = _default_scenarios(snap)
    h = stress.greeks.hedge(snap, "o", ["LPERP"], scen)
    b, a = h["before"], h["after"]
    x = h["trade"]["LPERP"]
    assert x > 0 and a["maintenance_margin"] < b["maintenance_margin"] and a["worst_excess"] > b["worst_excess"]
    for dx in (-0.05, 0.05):  # the search found the minimum, up to the lot
        assert stress.greeks.evaluate(snap, "o", {"LPERP": x + dx}, scen)["worst_excess"] <= a["worst_excess"] + 1e-6
    # before and after are exact: the engine, before and with the trade booked, agrees
    after = load(tmp_path / "after", positions + [{"account_id": "o", "instrument_id": "LPERP", "quantity": x}])
    for got, s_ in ((b, snap), (a, after)):
        res = stress.run(s_, scen).accounts.set_index("account_id").loc["o"]
        assert got["maintenance_margin"] == pytest.approx(res.maintenance_margin, rel=1e-12)
        assert got["maintenance_margin"] == pytest.approx(
            margin.account_margin(s_, "portfolio")["accounts"].set_index("account_id").maintenance_margin["o"],
            rel=1e-12)
        assert got["pnl_worst"] == pytest.approx(res.pnl_worst, rel=1e-12)
        assert got["shortfall_worst"] == pytest.approx(res.shortfall_worst, rel=1e-12)


@pytest.mark.parametrize("margin_toml, field", [('model = "var"\nvar_history = "h.csv"', "model")])
def test_hedge_refuses_margin_it_does_not_model(tmp_path, margin_toml, field):
    """The hedge optimises the standard model's margin per contract (tiers included) or the
    portfolio model's: on a book under the var model its 'exact' before and after would be
    another exchange's numbers (300 against stress margin's 600 on a review's book, when tiers
    were not modelled)."""
    days = pd.date_range("2024-01-01", periods=300, freq="D")
    pd.DataFrame({"date": days.strftime("%Y-%m-%d"), "BTC": S0 * np.exp(np.linspace(0.0, 0.3, 300)),
                  "USDT": 0.9995}).to_csv(tmp_path / "h.csv", index=False)
    snap = stress.load_snapshot(write_snapshot(
        tmp_path, assets=ASSETS,
        instruments=[{"instrument_id": "BTC_USDC-PERPETUAL", "kind": "perpetual", "underlying": "BTC",
                      "settlement": "USDC", "contract_size": 1.0, "mark_price": S0}],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 10_000.0}],
        positions=[{"account_id": "a", "instrument_id": "BTC_USDC-PERPETUAL", "quantity": 1}],
        exchange_toml=EXCHANGE.replace("[margin]", "[margin]\n" + margin_toml)))
    with pytest.raises(stress.InputError) as info:
        stress.greeks.hedge(snap, "a", ["BTC_USDC-PERPETUAL"])
    assert info.value.column == field and "stress hedge" in info.value.message


def test_hedge_refuses_a_lag_of_a_whole_path_on_a_set_built_in_python(tmp_path):
    import dataclasses

    snap = snapshot(tmp_path, LINEAR_FUTURES, [{"account_id": "a", "asset": "USDC", "amount": 12_000.0}],
                    [{"account_id": "a", "instrument_id": "LPERP", "quantity": 1.0}])
    (tmp_path / "h.csv").write_text("date,BTC\n2026-01-01,90000\n2026-01-02,76500\n2026-01-03,90000\n")
    (tmp_path / "p.toml").write_text('[[replay]]\nname = "h"\nprices = "h.csv"\nhorizon_days = 2\n')
    scen = stress.load_scenarios(tmp_path / "p.toml", snap)
    lagged = dataclasses.replace(snap, liquidation_config={"oracle_lag_steps": 2})
    with pytest.raises(stress.InputError, match="not less than the 2 steps"):
        stress.greeks.hedge(lagged, "a", ["LPERP"], scen)


def test_cli_greeks_top_cuts_a_tie_by_account_name_whatever_the_row_order(tmp_path):
    # Four accounts long 2 contracts of one perpetual (equal |delta_usd|), one long 5: --top 3
    # shows the largest, then the tie's first two by name, in any order of the files' rows (the
    # 100 USDC balances are rows of their own, below the cut).
    inst = [{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
             "contract_size": 0.1, "mark_price": S0}]
    names = ["dd", "bb", "big", "cc", "aa"]
    outputs = []
    for order in (names, names[::-1]):
        folder = write_snapshot(
            tmp_path / "-".join(order), assets=ASSETS, instruments=inst, exchange_toml=EXCHANGE,
            balances=[{"account_id": a, "asset": "USDC", "amount": 100.0} for a in order],
            positions=[{"account_id": a, "instrument_id": "P", "quantity": 5.0 if a == "big" else 2.0} for a in order])
        res = runner.invoke(app, ["greeks", str(folder), "--top", "3"])
        assert res.exit_code == 0, res.output
        shown = [a for a in names if f" {a} " in res.stdout]
        assert sorted(shown) == ["aa", "bb", "big"], res.stdout
        assert res.stdout.index(" big ") < res.stdout.index(" aa ") < res.stdout.index(" bb ")
        outputs.append(res.stdout)
    assert outputs[0] == outputs[1]
