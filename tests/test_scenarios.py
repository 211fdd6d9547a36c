"""Scenario forms (grid, event, replay, Monte Carlo) and the statistics over random scenarios,
checked against their documented parameters, closed forms and independent libraries."""

from __future__ import annotations

import dataclasses
import math
import tomllib

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import stress
from stress import montecarlo
from stress.cli import app
from stress.scenarios import events_path, grid_points

from .conftest import EXCHANGE_TOML, write_snapshot

ASSETS = [
    {"asset": "USDC", "price": 1.0, "haircut": 0.0},
    {"asset": "BTC", "price": 50_000.0, "haircut": 0.05},
    {"asset": "ETH", "price": 2_500.0, "haircut": 0.05},
]


@pytest.fixture(scope="module")
def linear_snap(tmp_path_factory):
    """A long linear BTC perpetual (1000 contracts of 0.5 BTC at mark 50,000) on 400,000 USDC,
    matched by a short on 5,000,000 USDC, plus an ETH holder."""
    folder = tmp_path_factory.mktemp("linear")
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "BTC_USDC-PERPETUAL", "kind": "perpetual", "underlying": "BTC",
                      "settlement": "USDC", "contract_size": 0.5, "mark_price": 50_000.0}],
        balances=[{"account_id": "long", "asset": "USDC", "amount": 400_000.0},
                  {"account_id": "short", "asset": "USDC", "amount": 5_000_000.0},
                  {"account_id": "eth", "asset": "ETH", "amount": 3.0}],
        positions=[{"account_id": "long", "instrument_id": "BTC_USDC-PERPETUAL", "quantity": 1000},
                   {"account_id": "short", "instrument_id": "BTC_USDC-PERPETUAL", "quantity": -1000}],
        exchange_toml=EXCHANGE_TOML))


def write(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------------------------
# Monte Carlo


CORR = np.array([[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.0]])
VOL = np.array([0.5, 0.7, 0.9])


def test_montecarlo_moments_and_correlations_match_inputs_within_sampling_error():
    n, T, steps = 200_000, 10 / 365, 5
    mu = np.array([0.2, -0.1, 0.0])
    m = montecarlo.model(VOL, CORR, drift=mu)
    r, _ = montecarlo.simulate(3, m, paths=n, steps=steps, dt=T / steps)
    x = np.asarray(r[:, -1])  # log return over the horizon: N((mu - s^2/2) T, s^2 T)
    sd = VOL * math.sqrt(T)
    se_mean = sd / math.sqrt(n)
    assert np.all(np.abs(x.mean(0) - (mu - VOL**2 / 2) * T) < 4 * se_mean)
    se_sd = sd / math.sqrt(2 * n)  # normal sample standard deviation
    assert np.all(np.abs(x.std(0) - sd) < 4 * se_sd)
    c = np.corrcoef(x.T)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        se_rho = (1 - CORR[i, j] ** 2) / math.sqrt(n)  # Fisher: sd of the sample correlation
        assert abs(c[i, j] - CORR[i, j]) < 4 * se_rho
    # steps add up: one step's returns are uncorrelated with the next's
    d = np.diff(np.asarray(r[:, :, 0]), axis=1, prepend=0.0)
    assert abs(np.corrcoef(d[:, 0], d[:, 1])[0, 1]) < 4 / math.sqrt(n)


def test_montecarlo_student_t_tails_match_the_t_quantile():
    # Marginals are t_df scaled to unit variance: the 0.5% quantile of eps is
    # t.ppf(0.005, df) * sqrt((df - 2) / df) (scipy), far beyond the normal's -2.576.
    n, df, dt = 400_000, 4, 1 / 365
    m = montecarlo.model(VOL[:1], np.eye(1))
    r, _ = montecarlo.simulate(5, m, paths=n, steps=1, dt=dt, df=df)
    eps = (np.asarray(r[:, 0, 0]) + 0.5 * VOL[0] ** 2 * dt) / (VOL[0] * math.sqrt(dt))
    p = 0.005
    q = stats.t.ppf(p, df) * math.sqrt((df - 2) / df)
    density = stats.t.pdf(q / math.sqrt((df - 2) / df), df) / math.sqrt((df - 2) / df)
    se = math.sqrt(p * (1 - p) / n) / density  # standard error of an empirical quantile
    assert abs(np.quantile(eps, p) - q) < 4 * se
    assert abs(eps.std() - 1.0) < 0.02  # unit variance (t4 has no finite fourth moment: loose)
    assert np.quantile(eps, p) < stats.norm.ppf(p) - 10 * se  # fatter than Gaussian


def test_montecarlo_jumps_match_merton_mean_and_variance():
    # Merton: over dt the log return has variance s^2 dt + lam dt (m^2 + d^2), and the jump
    # compensator keeps E[S_T / S_0] = exp(mu T) = 1 for mu = 0.
    n, dt, lam, jm, js = 400_000, 30 / 365, 12.0, -0.05, 0.04
    m = montecarlo.model(VOL[:1], np.eye(1), jump_intensity=lam, jump_mean=jm, jump_std=js)
    r, _ = montecarlo.simulate(11, m, paths=n, steps=1, dt=dt)
    x = np.asarray(r[:, 0, 0])
    var = VOL[0] ** 2 * dt + lam * dt * (jm**2 + js**2)
    assert abs(x.var() - var) < 4 * var * math.sqrt(2 / n) * 2  # kurtosis > 3: twice the normal SE
    g = np.exp(x)
    assert abs(g.mean() - 1.0) < 4 * g.std() / math.sqrt(n)


def test_montecarlo_vol_follows_cumulative_return_with_floor():
    m = montecarlo.model(VOL[:2], CORR[:2, :2], vol_beta=np.array([-0.8, -1.0]), min_vol_shift=-0.1)
    r, v = montecarlo.simulate(1, m, paths=2000, steps=3, dt=5 / 365)
    r, v = np.asarray(r), np.asarray(v)
    np.testing.assert_allclose(v, np.maximum(np.array([-0.8, -1.0]) * r, -0.1), rtol=1e-12, atol=1e-15)
    assert (v == -0.1).any() and (v > 0.1).any()


def test_montecarlo_same_seed_same_paths_whatever_the_path_count():
    m = montecarlo.model(VOL, CORR, jump_intensity=5.0, jump_mean=-0.03, jump_std=0.02)
    a, _ = montecarlo.simulate(42, m, paths=1000, steps=2, dt=1 / 365, df=5)
    a2, _ = montecarlo.simulate(42, m, paths=1000, steps=2, dt=1 / 365, df=5)
    b, _ = montecarlo.simulate(42, m, paths=300, steps=2, dt=1 / 365, df=5)
    c, _ = montecarlo.simulate(43, m, paths=300, steps=2, dt=1 / 365, df=5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    # path i draws from its own key: the same draws in a longer set (XLA may vectorise the
    # arithmetic differently for another batch size, hence the last-bit tolerance)
    np.testing.assert_allclose(np.asarray(a)[:300], np.asarray(b), rtol=1e-12, atol=1e-16)
    assert not np.allclose(np.asarray(b), np.asarray(c))


def test_poisson_inversion_matches_the_poisson_distribution():
    for rate in (0.01, 0.3, 5.0):  # the smallest count with a tail below 1e-15
        k = montecarlo.max_jumps(rate)
        assert stats.poisson.sf(k, rate) < 1e-15 <= stats.poisson.sf(k - 1, rate)
    u = np.random.default_rng(0).uniform(size=200_000)
    n = np.asarray(montecarlo._poisson(u, 2.5, montecarlo.max_jumps(2.5)))
    counts = np.bincount(n.astype(int), minlength=12)[:12]
    expected = stats.poisson.pmf(np.arange(12), 2.5) * len(u)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < stats.chi2.ppf(0.999, 11)


def _mc_toml(paths, horizon, vol=0.6, steps=1, extra=""):
    return f"""
[[montecarlo]]
name = "mc"
paths = {paths}
steps = {steps}
horizon_days = {horizon}
seed = 99
vol = {{ BTC = {vol} }}
{extra}
"""


def test_var_and_es_of_a_linear_position_match_the_lognormal_closed_form(tmp_path, linear_snap):
    # Long 1000 x 0.5 BTC at F = 50,000 under Gaussian log returns r ~ N(-s^2 T/2, s^2 T):
    # loss L = Q F (1 - e^r), Q = 500 BTC. VaR_99 = Q F (1 - exp(mu + s sqrt(T) z_.01)),
    # ES_99 = Q F (1 - exp(mu + s^2 T / 2) Phi(z_.01 - s sqrt(T)) / 0.01).
    n, T, s = 40_000, 10 / 365, 0.6
    scen = stress.load_scenarios(write(tmp_path, _mc_toml(n, 10, s)), linear_snap)
    res = stress.run(linear_snap, scen)
    row = res.accounts.set_index("account_id").loc["long"]
    QF, mu, sd, z = 500 * 50_000.0, -0.5 * s * s * T, s * math.sqrt(T), stats.norm.ppf(0.01)
    var = QF * (1 - math.exp(mu + sd * z))
    es = QF * (1 - math.exp(mu + sd * sd / 2) * stats.norm.cdf(z - sd) / 0.01)
    # standard errors: quantile sqrt(p(1-p)/n)/f(VaR); ES ~ sqrt((Var(L|tail) + (1-p)(ES-VaR)^2)/(n p))
    r_q = mu + sd * z
    f_loss = stats.norm.pdf(z) / sd / (QF * math.exp(r_q))  # density of L at VaR
    se_var = math.sqrt(0.01 * 0.99 / n) / f_loss
    tail = QF * (1 - np.exp(mu + sd * stats.norm.ppf(np.linspace(0.00005, 0.00995, 200))))
    se_es = math.sqrt((tail.var() + 0.99 * (es - var) ** 2) / (n * 0.01))
    assert abs(row.var_99 - var) < 4 * se_var, (row.var_99, var, se_var)
    assert abs(row.es_99 - es) < 4 * se_es, (row.es_99, es, se_es)
    assert row.es_99 > row.var_99 > 0
    # the short side's tail is the up move: VaR = Q F (exp(mu + sd z_.99) - 1)
    short = res.accounts.set_index("account_id").loc["short"]
    assert abs(short.var_99 - QF * (math.exp(mu + sd * stats.norm.ppf(0.99)) - 1)) < 4 * se_var * 1.1


def test_p_liquidation_matches_the_lognormal_probability(tmp_path, linear_snap):
    # The long is liquidatable when 400,000 + Q (F' - F) < 0.01 Q F' (mm 1%, no haircut on
    # USDC): F' < (Q F - 400,000) / (0.99 Q), so p = Phi((ln(F*/F) - mu) / sd).
    n, T, s = 40_000, 1 / 365, 0.6
    scen = stress.load_scenarios(write(tmp_path, _mc_toml(n, 1, s)), linear_snap)
    res = stress.run(linear_snap, scen)
    p_hat = res.accounts.set_index("account_id").loc["long"].p_liquidation
    Q, F = 500.0, 50_000.0
    f_star = (Q * F - 400_000) / (0.99 * Q)
    p = stats.norm.cdf((math.log(f_star / F) + 0.5 * s * s * T) / (s * math.sqrt(T)))
    assert 0.05 < p < 0.5
    assert abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_an_account_is_closed_out_at_the_first_step_of_a_path_that_breaches(tmp_path, linear_snap):
    # A replay window that dips 4% and recovers: the long (liquidatable below 49,697, -0.6%)
    # is liquidated at the dip although the window ends flat; the short (above 59,406) never.
    hist = pd.DataFrame({"date": ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"],
                         "BTC": [50_000.0, 48_000.0, 50_000.0, 50_500.0]})
    hist.to_csv(tmp_path / "h.csv", index=False)
    scen = stress.load_scenarios(write(tmp_path, """
[[replay]]
name = "h"
prices = "h.csv"
horizon_days = 2
"""), linear_snap)
    assert scen.names == ("h:2024-01-01", "h:2024-01-02") and scen.steps == 2
    res = stress.run(linear_snap, scen)
    long = res.accounts.set_index("account_id").loc["long"]
    assert long.p_liquidation == 0.5  # the first window dips at its middle step; the second never
    assert list(res.scenarios.accounts_liquidatable) == [1, 0]
    np.testing.assert_allclose(scen.spot_mult[:, linear_snap.asset_index("BTC")], [1.0, 50_500 / 48_000], rtol=0)
    # Closed out at the dip: 500 BTC x (48,000 - 50,000) = -1,000,000 on 400,000 of collateral,
    # so 600,000 of bad debt although the window ends flat; the recovery (+1,000,000) goes to
    # whoever took the position over, and the accounts' P&L is -1,000,000 (the short ends flat).
    assert long.pnl_worst == pytest.approx(-1_000_000.0, rel=1e-12)
    assert long.scenario_worst == "h:2024-01-01"
    first = res.scenarios.iloc[0]
    assert first.bad_debt == pytest.approx(600_000.0, rel=1e-12)
    assert first.pnl_closed_out == pytest.approx(1_000_000.0, rel=1e-12)
    assert first.pnl_total == pytest.approx(-1_000_000.0, rel=1e-12)
    assert res.scenarios.iloc[1].bad_debt == 0 and res.scenarios.iloc[1].pnl_closed_out == 0


def test_statistics_are_nan_without_random_scenarios(tmp_path, linear_snap):
    scen = stress.load_scenarios(write(tmp_path, '[[scenario]]\nname = "x"\nmoves = { BTC = -0.1 }\n'), linear_snap)
    res = stress.run(linear_snap, scen)
    assert res.accounts[["var_99", "es_99", "p_liquidation"]].isna().all().all()
    assert res.summary["p_fund_depleted"] is None and res.summary["bad_debt_q99"] is None


def test_exchange_bad_debt_distribution_uses_the_documented_order_statistic(tmp_path, linear_snap):
    scen = stress.load_scenarios(write(tmp_path, _mc_toml(500, 5, 1.5)), linear_snap)
    res = stress.run(linear_snap, scen)
    bad = np.sort(res.scenarios.bad_debt.to_numpy())
    k = math.ceil(0.99 * 500)  # VaR = L(k) of the ascending losses, ES = mean(L(k..m))
    assert bad[-1] > 0
    assert res.summary["bad_debt_q99"] == pytest.approx(bad[k - 1], rel=1e-12)
    assert res.summary["bad_debt_es99"] == pytest.approx(bad[k - 1:].mean(), rel=1e-12)
    assert res.summary["bad_debt_mean"] == pytest.approx(bad.mean(), rel=1e-12)


def test_random_statistics_do_not_depend_on_chunking(tmp_path, sample_dir):
    snap = stress.load_snapshot(sample_dir)
    scen = stress.load_scenarios(write(tmp_path, _mc_toml(300, 2, steps=3, extra='df = 4\nvol_beta = { BTC = -1.0 }')), snap)
    a, b = stress.run(snap, scen, chunk_size=16), stress.run(snap, scen, chunk_size=128)
    for c in ("var_99", "es_99", "p_liquidation", "pnl_worst"):
        np.testing.assert_allclose(a.accounts[c], b.accounts[c], rtol=1e-12, atol=1e-9, err_msg=c)
    assert (a.scenarios.accounts_liquidatable == b.scenarios.accounts_liquidatable).all()


# --------------------------------------------------------------------------------------------
# Grids


def test_risk_matrix_grid_points_follow_the_documented_parameters(tmp_path, linear_snap):
    scen = stress.load_scenarios(write(tmp_path, """
[[grid]]
name = "pm"
underlyings = ["BTC", "ETH"]
range = { BTC = 0.16, ETH = 0.20 }
buckets = 4
vol_shifts = [0.3, 0.0, -0.2]
extended = [-0.66, 0.5]
"""), linear_snap)
    btc, eth = linear_snap.asset_index("BTC"), linear_snap.asset_index("ETH")
    per = 9 * 3 + 2  # (2 * 4 + 1) moves x 3 vol shifts + 2 extended
    assert len(scen) == 2 * per and set(scen.kinds) == {"grid"}
    moves = scen.spot_mult[:per, btc] - 1
    expected = [-0.16, -0.12, -0.08, -0.04, 0.0, 0.04, 0.08, 0.12, 0.16] * 3 + [-0.66, 0.5]
    np.testing.assert_allclose(moves, expected, atol=1e-15)
    np.testing.assert_allclose(scen.vol_shift[:per, btc], [0.3] * 9 + [0.0] * 9 + [-0.2] * 9 + [0.3, 0.3])
    assert (scen.spot_mult[:per, eth] == 1).all() and (scen.vol_shift[:per, eth] == 0).all()  # one at a time
    np.testing.assert_allclose(scen.spot_mult[per:per + 9, eth] - 1, np.linspace(-0.2, 0.2, 9), atol=1e-15)
    assert scen.names[0] == "pm:BTC-16.0%:vol+0.30" and scen.names[per - 1] == "pm:BTC+50.0%:vol+0.30:ext"


def test_a_fine_grid_gets_names_precise_enough_to_be_unique(tmp_path, linear_snap):
    scen = stress.load_scenarios(write(tmp_path, '[[grid]]\nname = "g"\nunderlyings = ["BTC"]\nrange = 0.01\n'
                                                 'buckets = 20\nvol_shifts = [0.3, 0.301]\nextended = []\n'), linear_snap)
    assert len(scen) == 2 * 41 and len(set(scen.names)) == len(scen.names)
    assert "g:BTC-0.05%:vol+0.300" in scen.names and "g:BTC+1.00%:vol+0.301" in scen.names


def test_a_grid_point_given_twice_is_a_duplicate_named_as_written(tmp_path, linear_snap):
    with pytest.raises(stress.InputError, match=r"g:BTC-16\.0%:vol\+0\.30'.*duplicate"):
        stress.load_scenarios(write(tmp_path, '[[grid]]\nname = "g"\nunderlyings = ["BTC"]\nvol_shifts = [0.3, 0.3]\n'),
                              linear_snap)


def test_span_grid_is_the_sixteen_cme_risk_array_scenarios(tmp_path, linear_snap):
    # CME SPAN: 1-2 unchanged, vol up/down; 3-14 up/down 1/3, 2/3, 3/3 of the range, each vol
    # up then down; 15-16 up/down an extreme move of 2x the range, vol unchanged.
    scen = stress.load_scenarios(write(tmp_path, """
[[grid]]
name = "span"
style = "span"
mode = "joint"
underlyings = ["BTC", "ETH"]
range = { BTC = 0.15, ETH = 0.30 }
vol_range = 0.25
"""), linear_snap)
    btc, eth = linear_snap.asset_index("BTC"), linear_snap.asset_index("ETH")
    frac = [0, 0, 1 / 3, 1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3, 1, 1, -1, -1, 2, -2]
    vol = [0.25, -0.25] * 7 + [0.0, 0.0]
    assert len(scen) == 16
    np.testing.assert_allclose(scen.spot_mult[:, btc] - 1, 0.15 * np.array(frac), atol=1e-15)
    np.testing.assert_allclose(scen.spot_mult[:, eth] - 1, 0.30 * np.array(frac), atol=1e-15)  # joint
    np.testing.assert_allclose(scen.vol_shift[:, btc], vol)
    assert len(grid_points("span")) == 16


# --------------------------------------------------------------------------------------------
# Historical events and replay


def test_every_shipped_event_loads_with_its_file_moves(tmp_path, linear_snap):
    with open(events_path(), "rb") as f:
        library = tomllib.load(f)["event"]
    assert len({e["event"] for e in library}) >= 6
    for date in ("2020-03-12", "2021-05-19", "2022-05", "2022-11", "2024-08-05", "2025-10-10"):
        assert any(e["name"].startswith(date) for e in library), date
    for e in library:
        assert e["sources"] and e["variant"] in ("close", "trough")
        assert {"BTC", "ETH"} <= set(e["moves"])
    scen = stress.load_scenarios(write(tmp_path, '[[event]]\nuse = "all"\n'), linear_snap)
    assert scen.names == tuple(e["name"] for e in library) and set(scen.kinds) == {"event"}
    btc = linear_snap.asset_index("BTC")
    np.testing.assert_allclose(scen.spot_mult[:, btc], [1 + e["moves"]["BTC"] for e in library], rtol=1e-15)
    np.testing.assert_allclose(scen.horizon_days, [e["horizon_days"] for e in library])


def test_event_proxy_moves_an_unlisted_asset_like_another(tmp_path, linear_snap):
    with open(events_path(), "rb") as f:
        first = next(e for e in tomllib.load(f)["event"] if "USDC" not in e["moves"])
    scen = stress.load_scenarios(write(tmp_path, f'[[event]]\nuse = "{first["name"]}"\nproxy = {{ USDC = "ETH" }}\n'),
                                 linear_snap)
    assert scen.spot_mult[0, linear_snap.asset_index("USDC")] == pytest.approx(1 + first["moves"]["ETH"])



def test_event_proxy_naming_an_asset_no_event_lists_is_an_error(tmp_path, linear_snap):
    # a typo ("ETC" for "ETH") would otherwise leave the asset unmoved without a word
    path = write(tmp_path, '[[event]]\nuse = "all"\nproxy = { USDC = "ETC" }\n')
    with pytest.raises(stress.InputError) as err:
        stress.load_scenarios(path, linear_snap)
    assert err.value.column == "proxy.USDC" and "'ETC' is not an asset the shipped events list" in err.value.message

def _history(n=60, seed=1):
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2024-01-01", periods=n, freq="D")
    btc = 40_000 * np.exp(np.cumsum(rng.normal(0, 0.03, n)))
    eth = 2_000 * np.exp(np.cumsum(rng.normal(0, 0.04, n)))
    iv = 0.5 + 0.1 * np.sin(np.arange(n) / 5)
    return pd.DataFrame({"date": dates.strftime("%Y-%m-%d"), "BTC": btc, "ETH": eth, "BTC_iv": iv, "DOGE": 0.1})


def test_replay_reproduces_every_window_return_exactly(tmp_path, linear_snap):
    h = _history()
    h.to_csv(tmp_path / "hist.csv", index=False)
    scen = stress.load_scenarios(write(tmp_path, '[[replay]]\nname = "h"\nprices = "hist.csv"\nhorizon_days = 3\n'),
                                 linear_snap)
    btc, eth = linear_snap.asset_index("BTC"), linear_snap.asset_index("ETH")
    n = len(h) - 3
    assert len(scen) == n and set(scen.kinds) == {"replay"} and scen.steps == 3
    P = h[["BTC", "ETH"]].to_numpy()
    np.testing.assert_array_equal(scen.spot_mult[:, [btc, eth]], P[3:] / P[:n])
    np.testing.assert_array_equal(scen.path_spot_mult[:, 0][:, [btc, eth]], P[1:n + 1] / P[:n])
    np.testing.assert_allclose(scen.vol_shift[:, btc], h.BTC_iv.to_numpy()[3:] - h.BTC_iv.to_numpy()[:n], atol=1e-15)
    np.testing.assert_array_equal(scen.horizon_days, 3.0)
    assert scen.names[0] == "h:2024-01-01" and scen.random.all()


def test_replay_ignores_the_columns_of_assets_the_book_lacks_blank_or_not(tmp_path, linear_snap):
    """A history is broader than one book: an asset listed mid-history (blank before) or a
    column with a bad value, for an asset the snapshot lacks, is not the book's error."""
    h = _history(20)
    h["SOL"] = [None] * 8 + [150.0] * 12  # listed on day 9
    h["DOGE"] = ["n/a"] + [0.1] * 19
    h.to_csv(tmp_path / "hist.csv", index=False)
    scen = stress.load_scenarios(write(tmp_path, '[[replay]]\nname = "h"\nprices = "hist.csv"\nhorizon_days = 1\n'),
                                 linear_snap)
    assert len(scen) == 19
    h["BTC"] = h["BTC"].astype(object)
    h.loc[3, "BTC"] = "n/a"  # the book's own asset is still checked
    h.to_csv(tmp_path / "hist.csv", index=False)
    with pytest.raises(stress.InputError, match="line 5, column BTC"):
        stress.load_scenarios(tmp_path / "s.toml", linear_snap)


def test_filtered_replay_rescales_returns_by_ewma_vol(tmp_path, linear_snap):
    # The EWMA recursion checked against pandas' ewm (adjust=False) seeded with the mean square
    # of the first 30 returns: r*_t = r_t * sigma_today / sigma_t.
    h = _history(80, seed=4)
    h.to_csv(tmp_path / "hist.csv", index=False)
    scen = stress.load_scenarios(write(tmp_path, """
[[replay]]
name = "f"
prices = "hist.csv"
horizon_days = 1
filtered = true
ewma_lambda = 0.9
"""), linear_snap)
    r = np.diff(np.log(h.BTC.to_numpy()))
    seed = np.mean(r[:30] ** 2)
    var = pd.Series(np.r_[seed, r**2]).ewm(alpha=0.1, adjust=False).mean().to_numpy()  # var[t] after t returns
    scaled = r * np.sqrt(var[-1]) / np.sqrt(var[:-1])
    np.testing.assert_allclose(np.log(scen.spot_mult[:, linear_snap.asset_index("BTC")]), scaled, rtol=1e-10)


def test_filtered_replay_of_a_series_that_starts_flat_keeps_its_moves_finite(tmp_path, linear_snap):
    """A stablecoin at exactly 1.0 for weeks has an EWMA vol of 0 until its first move; divided
    by 0 that move became a price of 0 (and later moves vanished into the huge log price). The
    vol is floored at 0.1 of the series' RMS return, so the move is scaled by a finite ratio."""
    h = _history(50, seed=5)
    usdc = np.ones(50)
    usdc[40:] = [0.97, 0.99, 1.0, 0.995, 1.0, 1.0, 0.998, 1.001, 1.0, 1.0]
    h["USDC"] = usdc
    h.to_csv(tmp_path / "hist.csv", index=False)
    scen = stress.load_scenarios(write(tmp_path, '[[replay]]\nname = "f"\nprices = "hist.csv"\nhorizon_days = 1\n'
                                                 'filtered = true\n'), linear_snap)
    m = scen.spot_mult[:, linear_snap.asset_index("USDC")]
    assert np.isfinite(m).all() and (m > 0).all()
    r = np.diff(np.log(usdc))
    floor = 0.1 * np.sqrt(np.mean(r**2))
    var = np.empty(50)
    var[0] = np.mean(r[:30] ** 2)
    for t in range(49):
        var[t + 1] = 0.94 * var[t] + 0.06 * r[t] ** 2
    want = np.where(r == 0, 0.0, r * np.sqrt(var[-1]) / np.maximum(np.sqrt(var[:-1]), floor))
    np.testing.assert_allclose(np.log(m), want, rtol=1e-12, atol=1e-15)
    assert m[39] < 1.0 and (m[40:] != 1.0).any()  # the depeg is a fall, and later moves still move


# --------------------------------------------------------------------------------------------
# Files: mixing forms, errors, the default set, the CLI


def test_a_file_mixes_forms_in_file_order(tmp_path, linear_snap):
    h = _history(10)
    h.to_csv(tmp_path / "hist.csv", index=False)
    scen = stress.load_scenarios(write(tmp_path, """
[[grid]]
name = "g"
underlyings = ["BTC"]
buckets = 1
vol_shifts = [0.0]
extended = []

[[scenario]]
name = "x"
moves = { BTC = -0.5 }

[[replay]]
name = "h"
prices = "hist.csv"
horizon_days = 2
"""), linear_snap)
    assert scen.kinds[:4] == ("grid", "grid", "grid", "explicit") and scen.kinds[4:] == ("replay",) * 8
    # one-step scenarios repeat their last step along the paths of the set
    np.testing.assert_array_equal(scen.path_spot_mult[3, 0], scen.spot_mult[3])


@pytest.mark.parametrize("text, field, message", [
    ('[[grid]]\nname = "g"\n', "underlyings", "non-empty list"),
    ('[[grid]]\nname = "g"\nunderlyings = ["BTC"]\nrange = 1.5\n', "range", "<= 1"),
    ('[[grid]]\nname = "g"\nunderlyings = ["DOGE"]\n', "underlyings[0]", "unknown asset"),
    ('[[grid]]\nname = "g"\nunderlyings = ["BTC"]\nstyle = "cme"\n', "style", "not one of"),
    ('[[grid]]\nname = "g"\nunderlyings = ["BTC"]\nextended = [-1.5]\n', "extended[0]", "> -1"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = 0.5, ETH = 0.5 }\ncorrelation = { "BTC/ETH" = 1.5 }\n', "correlation.BTC/ETH", "<= 1"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = 0.5, ETH = 0.5, USDC = 0.1 }\ncorrelation = { "BTC/ETH" = 0.9, "BTC/USDC" = -0.9, "ETH/USDC" = 0.9 }\n', "correlation", "not positive definite"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = 0.5 }\ndf = 2\n', "df", "Gaussian"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = -0.5 }\n', "vol.BTC", ">= 0"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = 0.5 }\npaths = 10.5\n', "paths", "whole number"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = 0.5 }\njumps = { intensity = -1 }\n', "jumps.intensity", ">= 0"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = 0.5 }\nvol_beta = { ETH = -1 }\n', "vol_beta.ETH", "no vol"),
    ('[[montecarlo]]\nname = "m"\nvol = { BTC = 0.5 }\nseeds = 3\n', "seeds", "unknown field"),
    ('[[event]]\nuse = "1987-10-19"\n', "use", "no shipped event"),
    ('[[event]]\nname = "mine"\nuse = "all"\n', "name", "unknown field"),
    ('[[replay]]\nname = "h"\nprices = "missing.csv"\n', "prices", "file not found"),
])
def test_bad_fields_name_the_file_scenario_and_field(tmp_path, linear_snap, text, field, message):
    with pytest.raises(stress.InputError) as err:
        stress.load_scenarios(write(tmp_path, text), linear_snap)
    assert err.value.file == "s.toml" and err.value.column == field and message in err.value.message, str(err.value)
    assert err.value.row is not None


@pytest.mark.parametrize("text", ["montecarlo = 5\n", "replay = 5\n[[scenario]]\nname = \"x\"\n",
                                  "[montecarlo]\nname = \"m\"\n", "[[scenario]]\nname = \"x\"\n[montecarlo]\nname = \"m\"\n",
                                  "[scenario]\nname = \"x\"\n"])
def test_a_form_that_is_not_an_array_of_tables_is_named(tmp_path, linear_snap, text):
    """``[montecarlo]`` (one bracket) or ``montecarlo = 5`` in place of ``[[montecarlo]]``: the
    scalar crashed (exit 3), the table was counted as random families or as no table at all."""
    with pytest.raises(stress.InputError) as err:
        stress.load_scenarios(write(tmp_path, text), linear_snap)
    key = "montecarlo" if "montecarlo" in text else ("replay" if "replay" in text else "scenario")
    assert err.value.column == key and f"array of tables: [[{key}]]" in err.value.message, str(err.value)


def test_monte_carlo_paths_of_an_asset_do_not_depend_on_the_other_assets_the_snapshot_has(tmp_path, linear_snap):
    """The default set names SOL; a book without SOL must see the same BTC paths as one with it
    (unknown assets are drawn, then dropped), so a listing does not reshuffle every path."""
    text = _mc_toml(50, 1, steps=2, extra='correlation = { "BTC/SOL" = 0.7 }').replace(
        "vol = { BTC = 0.6 }", "vol = { BTC = 0.6, SOL = 0.9 }")
    with_sol = write_snapshot(tmp_path / "sol", assets=ASSETS + [{"asset": "SOL", "price": 150.0, "haircut": 0.1}],
                              instruments=[{"instrument_id": "BTC-PERPETUAL", "mark_price": 50_000.0}],
                              balances=[{"account_id": "a", "asset": "USDC", "amount": 1.0}],
                              positions=[{"account_id": "a", "instrument_id": "BTC-PERPETUAL", "quantity": 1}],
                              exchange_toml=EXCHANGE_TOML)
    snap_sol = stress.load_snapshot(with_sol)
    a = stress.load_scenarios(write(tmp_path, text), snap_sol)
    b = stress.load_scenarios(tmp_path / "s.toml", linear_snap, skip_unknown_assets=True)
    for field in ("spot_mult", "path_spot_mult"):
        np.testing.assert_array_equal(getattr(a, field)[..., snap_sol.asset_index("BTC")],
                                      getattr(b, field)[..., linear_snap.asset_index("BTC")])
    assert (a.spot_mult[:, snap_sol.asset_index("SOL")] != 1.0).all()


def test_two_random_families_are_an_input_error(tmp_path, linear_snap):
    _history(10).to_csv(tmp_path / "hist.csv", index=False)
    text = _mc_toml(10, 1) + '\n[[replay]]\nname = "h"\nprices = "hist.csv"\n'
    with pytest.raises(stress.InputError, match="at most one random family"):
        stress.load_scenarios(write(tmp_path, text), linear_snap)


@pytest.mark.parametrize("csv, row, column, message", [
    ("date,BTC\n2024-01-01,1\n2024-01-01,2\n", "line 3", "date", "strictly increasing"),
    ("date,BTC\n2024-01-01,1\nnot-a-date,2\n", "line 3", "date", "not a date"),
    ("date,BTC\n2024-01-01,1\n2024-01-02,-2\n", "line 3", "BTC", "> 0"),
    ("date,BTC\n2024-01-01,1\n2024-01-02,abc\n", "line 3", "BTC", "not a number"),
])
def test_bad_price_history_names_the_line_and_column(tmp_path, linear_snap, csv, row, column, message):
    (tmp_path / "hist.csv").write_text(csv)
    with pytest.raises(stress.InputError) as err:
        stress.load_scenarios(write(tmp_path, '[[replay]]\nname = "h"\nprices = "hist.csv"\n'), linear_snap)
    assert (err.value.file, err.value.row, err.value.column) == ("hist.csv", row, column) and message in err.value.message


def test_default_set_holds_every_form(sample_dir):
    snap = stress.load_snapshot(sample_dir)
    scen = stress.load_scenarios(stress.scenarios.default_path(), snap)
    assert set(scen.kinds) == {"explicit", "grid", "event", "montecarlo"}
    assert scen.steps > 1 and scen.random.sum() >= 1000



def test_generated_monte_carlo_keeps_only_the_default_correlations_of_the_assets_it_simulates(tmp_path, linear_snap):
    # one --vol and no --corr: the default BTC/ETH and BTC/SOL pairs would need ETH's and SOL's vols
    from typer.testing import CliRunner

    out = tmp_path / "mc.toml"
    r = CliRunner().invoke(app, ["generate", "scenarios", "--out", str(out), "--paths", "20", "--vol", "BTC=0.5"])
    assert r.exit_code == 0, r.output
    with open(out, "rb") as f:
        assert tomllib.load(f)["montecarlo"][0].get("correlation", {}) == {}
    assert len(stress.load_scenarios(out, linear_snap)) == 20
    r = CliRunner().invoke(app, ["generate", "scenarios", "--out", str(out), "--paths", "20",
                                 "--vol", "BTC=0.5", "--vol", "ETH=0.6"])
    with open(out, "rb") as f:
        assert tomllib.load(f)["montecarlo"][0]["correlation"] == {"BTC/ETH": 0.8}

def test_generate_scenarios_writes_a_file_that_loads(tmp_path, linear_snap):
    from typer.testing import CliRunner

    runner = CliRunner()
    snap_dir = linear_snap.source
    out = tmp_path / "mc.toml"
    r = runner.invoke(app, ["generate", "scenarios", "--kind", "montecarlo", "--out", str(out), "--paths", "64",
                            "--steps", "2", "--vol", "BTC=0.5", "--vol", "ETH=0.6", "--corr", "BTC/ETH=0.7",
                            "--snapshot", snap_dir])
    assert r.exit_code == 0, r.output
    scen = stress.load_scenarios(out, linear_snap)
    assert len(scen) == 64 and scen.steps == 2 and set(scen.kinds) == {"montecarlo"}
    r = runner.invoke(app, ["generate", "scenarios", "--kind", "grid", "--out", str(tmp_path / "g.toml"),
                            "--underlying", "BTC", "--buckets", "2"])
    assert r.exit_code == 0, r.output
    assert len(stress.load_scenarios(tmp_path / "g.toml", linear_snap)) == 5 * 3 + 8
    _history(20).to_csv(tmp_path / "hist.csv", index=False)
    r = runner.invoke(app, ["generate", "scenarios", "--kind", "replay", "--prices", str(tmp_path / "hist.csv"),
                            "--out", str(tmp_path / "r.toml"), "--horizon-days", "5"])
    assert r.exit_code == 0, r.output
    assert len(stress.load_scenarios(tmp_path / "r.toml", linear_snap)) == 15
    # a file that does not fit the snapshot is not written
    bad = tmp_path / "bad.toml"
    r = runner.invoke(app, ["generate", "scenarios", "--out", str(bad), "--vol", "DOGE=1.0", "--corr", "BTC/ETH=0.5",
                            "--snapshot", snap_dir])
    assert r.exit_code == 2 and not bad.exists()


@pytest.mark.parametrize("args, field", [
    (["--kind", "montecarlo", "--paths", "10", "--df", "2"], "df"),
    (["--kind", "montecarlo", "--paths", "10", "--horizon-days", "-3"], "horizon_days"),
    (["--kind", "montecarlo", "--paths", "10", "--vol", "BTC=0.5", "--vol", "ETH=0.5", "--corr", "BTC/ETH=1.5"],
     "correlation.BTC/ETH"),
    (["--kind", "grid", "--range", "1.5"], "range"),
])
def test_generate_scenarios_without_a_snapshot_still_refuses_a_file_no_snapshot_could_load(tmp_path, args, field):
    from typer.testing import CliRunner

    out = tmp_path / "x.toml"
    r = CliRunner().invoke(app, ["generate", "scenarios", "--out", str(out), *args])
    assert r.exit_code == 2 and not out.exists() and not list(tmp_path.iterdir()), r.output
    assert f"x.toml" in r.stderr and f"column {field}:" in r.stderr, r.stderr


def test_one_off_flags_the_shocks_of_a_set_with_paths_and_not_its_paths(sample_dir, small_default_path):
    import dataclasses

    snap = stress.load_snapshot(sample_dir)
    scen = stress.load_scenarios(small_default_path, snap)
    assert scen.steps > 1
    # every step of a shock is the shock; a Monte Carlo path moves, at each of its K steps
    np.testing.assert_array_equal(scen.one_off, ~scen.random)
    np.testing.assert_array_equal(scen.length, np.where(scen.random, scen.steps, 1))
    # a path changed in Python (the loader's lengths dropped) that moves is not one-off, whatever its kind
    moved = scen.path_spot_mult.copy()
    moved[0, 0, :] *= 1.01
    assert not dataclasses.replace(scen, path_spot_mult=moved, path_length=None).one_off[0] and scen.one_off[0]


def test_a_paths_length_is_what_the_set_says_else_one_for_a_constant_path():
    # Four 4-step paths of one asset, time order (spot, horizon), built in Python: without
    # path_length a path whose every step is one state is a one-off shock (1) and any other
    # has all 4 steps, a flat stretch (real, or padding the builder did not declare) included.
    spot = np.array([[0.9, 0.8, 0.7, 0.6],
                     [0.9, 0.8, 0.8, 0.8],
                     [0.9, 0.9, 0.8, 0.8],
                     [0.9, 0.9, 0.9, 0.9]])
    hor = np.zeros((4, 4))  # paths of instantaneous shocks
    vol = np.zeros((4, 4, 1))
    scen = stress.Scenarios(names=tuple("abcd"), kinds=("replay",) * 4, spot_mult=spot[:, -1:], vol_shift=vol[:, -1],
                            horizon_days=hor[:, -1], path_spot_mult=spot[:, :-1, None], path_vol_shift=vol[:, :-1],
                            path_horizon_days=hor[:, :-1])
    np.testing.assert_array_equal(scen.length, [4, 4, 4, 1])
    np.testing.assert_array_equal(scen.one_off, [False, False, False, True])
    # a vol shift or a horizon that moves at one step is a path
    moved = vol.copy()
    moved[3, 1, 0] = 0.05
    np.testing.assert_array_equal(dataclasses.replace(scen, path_vol_shift=moved[:, :-1]).length, [4, 4, 4, 4])
    np.testing.assert_array_equal(dataclasses.replace(scen, horizon_days=hor[:, -1] + 1.0).length, [4, 4, 4, 4])
    # a builder that padded its short paths says so
    padded = dataclasses.replace(scen, path_length=np.array([4, 2, 4, 1]))
    np.testing.assert_array_equal(padded.length, [4, 2, 4, 1])
    np.testing.assert_array_equal(padded.one_off, [False, False, False, True])
