"""Engine invariants: conservation, and results independent of chunking, row order, format."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pandas as pd
import pytest

import stress
from stress import engine, sample
from stress.scenarios import Scenarios

ACCOUNT_COLS = ["equity", "collateral_value", "initial_margin", "maintenance_margin", "pnl_worst", "shortfall_worst"]
SCEN_COLS = ["pnl_total", "shortfall_total", "bad_debt", "insurance_fund_after", "socialized_loss"]


@pytest.fixture(scope="module")
def snap(sample_dir):
    return stress.load_snapshot(sample_dir)


@pytest.fixture(scope="module")
def scen(snap, small_default_path):
    return stress.load_scenarios(small_default_path, snap)


@pytest.fixture(scope="module")
def base_result(snap, scen):
    return stress.run(snap, scen)


def random_scenarios(snap, n, seed=0, kind="montecarlo", scale=0.5):
    rng = np.random.default_rng(seed)
    A = snap.n_assets
    vol = np.array([0.0 if a in ("USDC", "USDT") else 0.25 for a in snap.assets])
    spot = np.exp(rng.standard_t(4, size=(n, A)) * vol * scale)
    return Scenarios(tuple(f"mc-{i}" for i in range(n)), (kind,) * n, spot, rng.normal(0, 0.05, (n, A)), np.zeros(n))


def assert_same(a, b, rtol=1e-9):
    pd.testing.assert_series_equal(a.accounts.account_id, b.accounts.account_id)
    # the same columns in the same order (per-underlying ones by name, not the assets' row order)
    assert list(a.accounts.columns) == list(b.accounts.columns)
    assert list(a.scenarios.columns) == list(b.scenarios.columns)
    for c in ACCOUNT_COLS:
        np.testing.assert_allclose(a.accounts[c], b.accounts[c], rtol=rtol, atol=1e-9, err_msg=c)
    assert (a.accounts.scenario_worst == b.accounts.scenario_worst).all()
    gross = a.scenarios.pnl_gross.to_numpy() + 1.0
    for c in SCEN_COLS:
        np.testing.assert_allclose(a.scenarios[c], b.scenarios[c], rtol=0, atol=1e-9 * gross.max(), err_msg=c)
    assert (a.scenarios.accounts_liquidatable == b.scenarios.accounts_liquidatable).all()


def test_sample_book_is_matched(snap):
    net = np.bincount(snap.pos_instrument, weights=snap.pos_quantity, minlength=len(snap.instrument_ids))
    np.testing.assert_allclose(net, 0.0, atol=1e-9)


def test_exchange_pnl_is_zero_sum_with_stablecoin_collateral(sample_tables, tmp_path, scen, small_default_path):
    # Derivatives are zero-sum: with every long matched by a short and collateral only in a
    # stablecoin that does not move, exchange-wide P&L is 0 in every scenario.
    t = dict(sample_tables)
    price = t["assets"].set_index("asset").price
    b = t["balances"].copy()
    b["amount"] = b.amount * b.asset.map(price).to_numpy()
    b["asset"] = "USDC"
    t["balances"] = b.groupby(["account_id", "asset"], as_index=False).amount.sum()
    sample.write_snapshot(tmp_path, t)
    snap = stress.load_snapshot(tmp_path)
    sc = stress.load_scenarios(small_default_path, snap)
    keep = sc.spot_mult[:, snap.asset_index("USDC")] == 1.0
    res = stress.run(snap, sc)
    # not vacuous: many of those scenarios move the book (a grid's centre point moves nothing)
    assert (res.scenarios.pnl_gross[keep] > 0).sum() >= 8
    # Accounts closed out early along a path hand their positions' later P&L to the market:
    # accounts + closed-out positions are zero-sum, and one-step scenarios have nothing closed out.
    held = res.scenarios.pnl_total + res.scenarios.pnl_closed_out
    np.testing.assert_allclose(held[keep], 0.0, atol=1e-9 * res.scenarios.pnl_gross.max())
    one_step = ~sc.random
    assert np.abs(res.scenarios.pnl_closed_out[one_step]).max() <= 1e-9 * res.scenarios.pnl_gross.max()
    assert (res.scenarios.pnl_closed_out[sc.random] != 0).any()  # paths do close accounts out early


def test_exchange_pnl_equals_collateral_revaluation(snap, scen, base_result):
    # With a matched book, position P&L cancels in every asset, so exchange P&L is exactly the
    # revaluation of the accounts' balances: sum_a B_a * (P'_a - P_a).
    B = snap.balances.sum(axis=0)
    P = np.asarray(snap.market.price)
    expected = (scen.spot_mult * P - P) @ B
    gross = base_result.scenarios.pnl_gross.max()
    held = base_result.scenarios.pnl_total + base_result.scenarios.pnl_closed_out
    np.testing.assert_allclose(held, expected, rtol=0, atol=1e-9 * gross)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_results_do_not_depend_on_chunk_size(snap, scen, base_result, chunk):
    assert_same(base_result, stress.run(snap, scen, chunk_size=chunk))


def test_results_do_not_depend_on_scenario_tile_width_or_fusion(snap, scen, base_result, monkeypatch):
    # GPUs may use wider tiles and other fusion choices than CPUs (engine.TILE, engine.FUSION):
    # both are schedules, not results
    monkeypatch.setitem(engine.TILE, "cpu", 8)
    monkeypatch.setitem(engine.TILE, "cpu-float64", 8)
    monkeypatch.setitem(engine.FUSION, "cpu", {"keep": False, "matvec": False})
    assert len(scen) > 8
    assert_same(base_result, stress.run(snap, scen, chunk_size=64))


def test_paths_get_tiles_of_fewer_scenarios_and_the_same_results(snap, scen, base_result, monkeypatch):
    # A tile of W paths of K steps holds K * W states per account: on CPU W shrinks with K so
    # the tile stays in cache. It is a schedule, not a result.
    assert scen.steps == 4 and engine.max_tile() == 256
    assert engine.scenario_tile(len(scen), 1) == 256
    assert engine.scenario_tile(len(scen), 4) == 64
    assert engine.scenario_tile(len(scen), 3) == 64  # 256 / 3, down to a power of two
    assert engine.scenario_tile(len(scen), 64) == 8  # never below 8
    assert engine.scenario_tile(len(scen), 4, model_tiles=True) == engine.PM_TILE // 4
    # float64 tiles are half as wide on CPU: the same bytes per quantity as float32's
    assert engine.max_tile("float64") == 128 and engine.max_tile("float32") == 256
    assert engine.scenario_tile(len(scen), 4, dtype="float64") == 32
    t, _ = engine.tables(snap, scen)  # float64
    assert t.user.shape[1] == 32 and t.value.shape[2] == 4 * 32
    monkeypatch.setitem(engine.PATH_TILE_SHRINKS, "cpu", False)
    wide, _ = engine.tables(snap, scen)
    assert wide.user.shape[1] == 128
    assert_same(base_result, stress.run(snap, scen))


@pytest.fixture
def fresh_kernels():
    """Kernels traced anew (``FUSION`` is read while tracing), before and after the test."""
    engine.sharded_kernel.cache_clear()
    engine.sharded_closed.cache_clear()
    yield
    engine.sharded_kernel.cache_clear()
    engine.sharded_closed.cache_clear()


MC_PATHS = """
[[montecarlo]]
name = "mc"
paths = 48
steps = 3
horizon_days = 2
seed = 7
df = 4
vol = { BTC = 0.9, ETH = 1.1, SOL = 1.4 }
"""


def _tile_kinds(snap, scen, res, chunk_size):
    """Blocks of (a chunk's accounts, a tile's scenarios) as the kernel sees them, counted by
    whether some account of the block is liquidated, or ends below zero equity."""
    from collections import Counter

    t, _ = engine.tables(snap, scen)
    sweeper = engine.LocalAccounts(snap, chunk_size, np.float64)
    if t.n_impact:
        t = engine._impact_pass(snap, t, sweeper.closed(t), np.float64)
    mats = sweeper.sweep(t, 0, True).mats
    below = res.accounts.equity.to_numpy()[:, None] + mats["pnl"] < 0
    W, S = t.user.shape[1], len(scen)
    kinds = Counter()
    for accs, _ in sweeper.groups(len(engine.devices()), t):
        for acc in (a for a in accs if len(a)):
            for lo in range(0, S, W):
                liq, bad = mats["liquidated"][acc, lo : lo + W].any(), below[acc, lo : lo + W].any()
                kinds["defaulting" if bad else "liquidating, not defaulting" if liq else "neither"] += 1
    return kinds


def _tile_test_run(form, snap, sample_dir, tmp_path, monkeypatch):
    """``(snapshot, scenarios)`` for the tests of tiles that skip work, in tiles of 8 scenarios:
    moderate one-step shocks, or Monte Carlo paths of 3 steps under an oracle lag of 1 with
    lags 0 and 2 reported."""
    monkeypatch.setitem(engine.TILE, "cpu", 8)
    monkeypatch.setitem(engine.TILE, "cpu-float64", 8)
    if form == "one step":
        return snap, random_scenarios(snap, 40, seed=3, scale=0.1)
    import shutil

    folder = tmp_path / "lagged"
    shutil.copytree(sample_dir, folder)
    toml = (folder / "exchange.toml").read_text()
    assert toml.count("[liquidation]") == 1
    lagged = toml.replace("[liquidation]", "[liquidation]\noracle_lag_steps = 1\noracle_lags = [0, 2]")
    (folder / "exchange.toml").write_text(lagged)
    snap = stress.load_snapshot(folder)
    (tmp_path / "mc.toml").write_text(MC_PATHS)
    scen = stress.load_scenarios(tmp_path / "mc.toml", snap)
    assert scen.steps == 3
    return snap, scen


@pytest.mark.parametrize("form", ["one step", "paths under an oracle lag"])
def test_skipping_the_sums_of_tiles_that_liquidate_or_default_no_one_changes_no_result(
        form, snap, sample_dir, tmp_path, monkeypatch, fresh_kernels):
    # Narrow tiles of moderate shocks: some tiles of the riskiest chunks liquidate accounts,
    # fewer leave bad debt, the calm chunks' tiles do neither; the skipped sums must be
    # exactly the zeros they replace. Under an oracle lag an account can be liquidated with
    # its collateral above its margin where the lag has it closed out, and bad debt is also
    # reported under other lags: each test of the kernel must see that.
    snap, scen = _tile_test_run(form, snap, sample_dir, tmp_path, monkeypatch)
    monkeypatch.setitem(engine.FUSION, "cpu", {**engine.FUSION["cpu"], "skip": True})
    skipped = stress.run(snap, scen, chunk_size=64)
    kinds = _tile_kinds(snap, scen, skipped, chunk_size=64)
    assert kinds["liquidating, not defaulting"] > 0 and kinds["neither"] > 0 and kinds["defaulting"] > 0, kinds
    engine.sharded_kernel.cache_clear()
    engine.sharded_closed.cache_clear()
    monkeypatch.setitem(engine.FUSION, "cpu", {**engine.FUSION["cpu"], "skip": False})
    summed = stress.run(snap, scen, chunk_size=64)
    assert_same(summed, skipped, rtol=1e-12)
    for c in ("cover2", "liquidated_notional", "fees", "impact_cost", "pnl_closed_out"):
        np.testing.assert_allclose(skipped.scenarios[c], summed.scenarios[c], rtol=1e-12, atol=1e-6, err_msg=c)
    assert skipped.summary.get("oracle_lags") == summed.summary.get("oracle_lags")
    if form != "one step":
        assert len(summed.summary["oracle_lags"]) == 2


def test_a_tile_proved_calm_has_collateral_above_margin_and_positive_equity_in_every_state(snap):
    # portfolio.calm's bound against the states themselves: wherever it proves an account calm
    # in a tile, every state of the tile must have collateral above maintenance margin (no
    # liquidation, no shortfall) and equity above zero (no bad debt). Narrow tiles of large
    # shocks, so that it proves some tiles and not others.
    from stress import portfolio

    scen = random_scenarios(snap, 96, seed=5, scale=0.4)
    t = engine.tables(snap, dataclasses.replace(scen, kinds=("explicit",) * len(scen)))[0]
    ranges = engine.tile_ranges(t)
    T, W = t.user.shape
    proved = refuted = 0
    for _, h in engine.LocalAccounts(snap, 64, np.float64).groups(1):
        for g in range(h.valid.shape[0]):
            one = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x[g]), h)
            calm = np.asarray(portfolio.calm(one, ranges))  # [n, T]
            valid = np.asarray(one.valid)
            for k in range(T):
                eq, coll, m = (np.asarray(x) for x in portfolio.state(one, t.value[k], t.mm[k], t.price[k], t.haircut)[:3])
                safe = (coll > m).all(axis=1) & (eq > 0).all(axis=1)
                assert safe[calm[:, k] & valid].all()
                proved += (calm[:, k] & valid).sum()
                refuted += (~safe & valid).sum()
    assert proved > 0 and refuted > 0, (proved, refuted)


@pytest.mark.parametrize("form", ["one step", "paths under an oracle lag"])
def test_skipping_the_margin_work_of_tiles_proved_calm_changes_no_result(
        form, snap, sample_dir, tmp_path, monkeypatch, fresh_kernels):
    # On CPU a large sweep skips the margin work of the tiles where every account of the chunk
    # is proved calm, and chunks accounts calm in as many tiles together (engine.calm_orders):
    # a schedule, so the results must be the same but for the rounding of another order of
    # accounts (an account's row in its chunk can move a last bit).
    snap, scen = _tile_test_run(form, snap, sample_dir, tmp_path, monkeypatch)
    monkeypatch.setattr(engine, "CALM_MIN_STATES", 0)
    monkeypatch.setitem(engine.FUSION, "cpu", {**engine.FUSION["cpu"], "calm": True})
    calm = stress.run(snap, scen, chunk_size=64)
    # not vacuous: some (chunk, tile) blocks of the run are proved calm, and some are not
    from stress import portfolio

    t = engine.with_ranges(engine.tables(snap, scen)[0], snap.n_accounts)
    assert t.ranges is not None
    blocks = np.concatenate([np.asarray(jax.vmap(lambda one: (~one.valid[:, None] | portfolio.calm(one, t.ranges)).all(0))(h))
                             for _, h in engine.LocalAccounts(snap, 64, np.float64).groups(1, t)])
    assert 0 < blocks.mean() < 1, blocks.mean()
    engine.sharded_kernel.cache_clear()
    monkeypatch.setitem(engine.FUSION, "cpu", {**engine.FUSION["cpu"], "calm": False})
    plain = stress.run(snap, scen, chunk_size=64)
    pd.testing.assert_frame_equal(calm.accounts, plain.accounts, check_exact=False, rtol=1e-12)
    np.testing.assert_array_equal(calm.accounts.scenario_worst, plain.accounts.scenario_worst)
    pd.testing.assert_frame_equal(calm.scenarios, plain.scenarios, check_exact=False, rtol=1e-12, atol=1e-6)
    lags = calm.summary.get("oracle_lags") or []
    assert len(lags) == len(plain.summary.get("oracle_lags") or []) == (0 if form == "one step" else 2)
    for a, b in zip(lags, plain.summary.get("oracle_lags") or []):
        assert a == pytest.approx(b, rel=1e-12)


def test_cover2_is_the_sum_of_the_two_largest_bad_debts_of_each_scenario(snap):
    # The reference: every account's equity in every scenario (the P&L matrix plus equity at
    # the snapshot), its bad debt max(0, -equity), the two largest per scenario by a sort.
    # Small chunks and tiles: the kernel carries the two largest from chunk to chunk and group
    # to group, and merges a tile's only where it beats them.
    scen = random_scenarios(snap, 40, seed=5, kind="explicit", scale=3.0)
    res = stress.run(snap, scen, chunk_size=16)
    pnl = stress.pnl_matrix(snap, scen, chunk_size=16)
    equity0 = res.accounts.set_index("account_id").equity.reindex(pnl.index).to_numpy()
    bad = np.maximum(-(equity0[:, None] + pnl.to_numpy()), 0.0)
    assert ((bad > 0).sum(axis=0) >= 2).sum() >= 10  # most scenarios have two defaulters
    expected = np.sort(bad, axis=0)[-2:].sum(axis=0)
    np.testing.assert_allclose(res.scenarios.cover2, expected, rtol=1e-12, atol=1e-6)


def test_column_max_and_first_argmin_match_numpy():
    rng = np.random.default_rng(3)
    for n, w in ((128, 16), (7, 5), (1, 3), (33, 1)):
        x = rng.integers(-3, 4, size=(n, w)).astype(np.float64)  # small integers: many ties
        np.testing.assert_array_equal(np.asarray(engine.column_max(x)), x.max(axis=0))
        np.testing.assert_array_equal(np.asarray(engine.first_argmin(x)), np.argmin(x, axis=1))
    x = np.array([[np.inf, np.inf, 2.0, 2.0, -np.inf, -np.inf]])
    assert int(engine.first_argmin(x)[0]) == 4


def test_a_set_that_does_not_fill_its_last_tile_reports_only_its_own_scenarios(snap, monkeypatch):
    # The last tile's padding columns repeat the set's last scenario (engine.Tables), so the
    # kernel takes its per-account extremes over whole tiles. Five rallies on tiles of 8:
    # longs gain in every one, so their worst P&L is a gain (an unshocked padding column
    # would make it 0), and no extreme may come from anything but the five.
    monkeypatch.setitem(engine.TILE, "cpu", 8)
    monkeypatch.setitem(engine.TILE, "cpu-float64", 8)
    stable = np.isin(snap.assets, ["USDC", "USDT"])

    def rallies(moves):
        spot = np.where(stable[None, :], 1.0, np.asarray(moves)[:, None])
        n = len(moves)
        return Scenarios(tuple(f"up-{i}" for i in range(n)), ("explicit",) * n, spot, np.zeros((n, snap.n_assets)),
                         np.zeros(n))

    five = [1.05, 1.10, 1.15, 1.20, 1.25]
    res = stress.run(snap, rallies(five))
    assert engine.tables(snap, rallies(five))[0].user.shape == (1, 8)
    pnl = stress.pnl_matrix(snap, rallies(five)).to_numpy()
    assert (res.accounts.pnl_worst > 0).any()
    np.testing.assert_allclose(res.accounts.pnl_worst, pnl.min(axis=1), rtol=1e-12, atol=1e-9)  # another kernel
    np.testing.assert_array_equal(res.accounts.scenario_worst, np.array([f"up-{i}" for i in range(5)])[pnl.argmin(axis=1)])
    # the user's own copies filling the tile instead: the same extremes, to the bit
    full = stress.run(snap, rallies(five + [1.25] * 3))
    for c in ("pnl_worst", "shortfall_worst", "bad_debt_worst", "liquidation_cost_worst"):
        np.testing.assert_array_equal(res.accounts[c], full.accounts[c], err_msg=c)


def test_accounts_are_laid_out_riskiest_first_within_each_bucket(snap, base_result):
    # the order the layout uses, against the margin ratio the engine itself reports
    t, _ = engine.tables(snap, random_scenarios(snap, 1))
    rank = engine.risk_order(snap, t)
    assert sorted(rank) == list(range(snap.n_accounts))
    a = base_result.accounts
    coll, mm = a.collateral_value.to_numpy(), a.maintenance_margin.to_numpy()
    ratio = np.where(coll > 0, mm / np.where(coll > 0, coll, 1.0), np.inf)
    by_rank = ratio[np.argsort(rank)]
    finite = by_rank[np.isfinite(by_rank)]
    assert np.all(np.isinf(by_rank[: (~np.isfinite(by_rank)).sum()]))  # no positive collateral: first
    assert np.all(np.diff(finite) <= 1e-9 * np.abs(finite[:-1]) + 1e-15)
    for b in engine.buckets(snap, rank):
        assert np.all(np.diff(rank[b.accounts]) > 0)
    # the same holdings, row for row, as the layout by index
    plain = {(b.J, b.P, b.L): b for b in engine.buckets(snap)}
    for b in engine.buckets(snap, rank):
        p = plain[(b.J, b.P, b.L)]
        rows = np.searchsorted(p.accounts, b.accounts)
        np.testing.assert_array_equal(p.accounts[rows], b.accounts)
        for f in ("inst", "qty", "weight", "asset", "balance"):
            np.testing.assert_array_equal(getattr(p, f)[rows], getattr(b, f), err_msg=f)


def test_a_rung_holding_few_accounts_is_left_to_the_next_rung_that_holds_them(monkeypatch):
    # accounts 0-5: one position (1 slot x 1); 6-8: one position in each of two settlement
    # assets (2 position slots x 1); 9: two positions settled in one asset and one in the
    # other (2 x 2); 10-11: one position and a balance in another asset (a balance-only slot).
    # Instruments 0 and 2 settle in asset 0, instrument 1 in asset 1.
    from stress import portfolio

    acc = np.array([0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 9, 9, 10, 11])
    inst = np.array([0, 0, 2, 0, 2, 0, 0, 1, 2, 1, 0, 1, 0, 2, 1, 1, 0])
    qty = np.arange(1.0, len(acc) + 1)
    settlement, balances = np.array([0, 1, 0]), np.zeros((12, 2))
    balances[10, 0] = balances[11, 1] = 5.0

    def shapes(min_accounts, min_work=-1):  # -1: no rung is left out for its work alone
        monkeypatch.setattr(portfolio, "RUNG_MIN_ACCOUNTS", min_accounts)
        monkeypatch.setattr(portfolio, "RUNG_MIN_WORK", min_work)
        buckets = portfolio.layout(acc, inst, qty, np.ones_like(qty), settlement, balances)
        return {(b.J, b.P, b.L): sorted(b.accounts.tolist()) for b in buckets}

    assert shapes(0) == shapes(2) == {(1, 1, 1): [0, 1, 2, 3, 4, 5], (2, 1, 1): [10, 11], (4, 2, 1): [6, 7, 8],
                                      (4, 2, 2): [9]}
    # six accounts do not pay for the (1, 1, 1) kernel: (2, 1, 1), one more (balance-only)
    # slot, takes them; three do not pay for (4, 2, 1): (4, 2, 2), twice the positions, takes
    # them. The eight of (2, 1, 1) keep their rung below 100 no longer: (4, 2, 1) has twice
    # its slots and positions, and goes into (4, 2, 2) in turn. (4, 2, 2) stays however few
    # its accounts: the next rung that holds them, (4, 4, 4), has four times its positions.
    assert shapes(7) == {(2, 1, 1): [0, 1, 2, 3, 4, 5, 10, 11], (4, 2, 2): [6, 7, 8, 9]}
    assert shapes(100) == {(4, 2, 2): list(range(12))}
    # By the work moving them adds (slots and position gathers, J + P * L, per account): 6 x 1
    # for (1, 1, 1) and 3 x 2 for (4, 2, 1) are at most 12; 8 x 3 for (2, 1, 1) and 4 x 12
    # for (4, 2, 2) are not. At 144, (4, 2, 2)'s twelve accounts go up as well, measured
    # against (4, 4, 4); they land in the fine rung (4, 2, 4) on the way, which a bar of 0
    # accounts keeps (FINE_RUNGS), and in (4, 4, 4) when the fine rungs are not there.
    assert shapes(0, 12) == shapes(7)
    assert shapes(0, 143) == shapes(100)
    assert shapes(0, 144) == {(4, 2, 4): list(range(12))}
    monkeypatch.setattr(portfolio, "LADDER", tuple(r for r in portfolio.LADDER if r not in portfolio.FINE_RUNGS))
    assert shapes(0, 144) == {(4, 4, 4): list(range(12))}


def test_the_layout_is_the_same_whether_slots_are_marked_in_a_table_or_sorted(snap, monkeypatch):
    from stress import portfolio

    # the sample, and a small book with a negative balance (a debt) in an asset no position
    # settles in, which is a slot of its own
    small = (np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), np.array([1.0, -2.0, 3.0, 4.0]), np.ones(4),
             np.array([0, 1]), np.array([[5.0, 0.0, -7.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
    order = np.random.default_rng(3).permutation(snap.n_accounts)

    def layouts():
        return engine.buckets(snap, order), portfolio.layout(*small, np.array([3, 1, 0, 2]))

    table = layouts()
    monkeypatch.setattr(portfolio, "DENSE_SLOTS_MAX", 0)  # every snapshot takes the sort
    by_sort = layouts()
    for one, other in zip(table, by_sort):
        assert [(b.J, b.P, b.L) for b in one] == [(b.J, b.P, b.L) for b in other]
        for a, b in zip(one, other):
            for field in ("accounts", "inst", "qty", "weight", "asset", "balance"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    [debt] = [b for b in table[1] if 0 in b.accounts]
    assert -7.0 in debt.balance[list(debt.accounts).index(0)]


def test_fine_rungs_are_kept_only_for_enough_accounts_and_never_measured_against(monkeypatch):
    # Instruments 0-2 settle in asset 0, 3-4 in asset 1, 5-6 in asset 2. Account 0 holds
    # three settlement assets, two positions in one (P, L) = (3, 2); accounts 1 and 3 one or
    # two assets with three positions in one, (1, 3) and (2, 3); account 2 three assets, one
    # position each, (3, 1).
    from stress import portfolio

    acc = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
    inst = np.array([0, 1, 3, 5, 0, 1, 2, 0, 3, 5, 0, 1, 2, 3, 4])
    qty = np.arange(1.0, len(acc) + 1)
    settlement, balances = np.array([0, 0, 0, 1, 1, 2, 2]), np.zeros((4, 3))

    def shapes(min_accounts, ladder=portfolio.LADDER):
        monkeypatch.setattr(portfolio, "LADDER", ladder)
        monkeypatch.setattr(portfolio, "RUNG_MIN_ACCOUNTS", min_accounts)
        monkeypatch.setattr(portfolio, "RUNG_MIN_WORK", -1)
        buckets = portfolio.layout(acc, inst, qty, np.ones_like(qty), settlement, balances)
        return {(b.J, b.P, b.L): sorted(b.accounts.tolist()) for b in buckets}

    assert shapes(0) == {(4, 4, 1): [2], (4, 2, 4): [1, 3], (4, 4, 2): [0]}
    # (4, 4, 2) with one account is below the bar of 2: account 0 goes up to (4, 4, 4)
    assert shapes(2) == {(4, 4, 1): [2], (4, 2, 4): [1, 3], (4, 4, 4): [0]}
    # Below it for both, the layout is the one without fine rungs. (4, 4, 1)'s one account
    # stays: measured against (4, 4, 2), twice its positions, it would have gone up (and on
    # to (4, 4, 4), four times them); measured against (4, 4, 4), as before, it stays.
    coarse = tuple(r for r in portfolio.LADDER if r not in portfolio.FINE_RUNGS)
    assert shapes(3) == shapes(3, coarse) == {(4, 4, 1): [2], (4, 4, 4): [0, 1, 3]}


def test_buckets_come_in_shape_order_with_the_shape_beyond_the_ladder_among_the_rungs(monkeypatch):
    # account 2 holds six positions settled in one asset: beyond the ladder's four per slot,
    # its own power-of-two shape (1, 1, 8) sorts between the rungs of accounts 0-1 (1, 1, 1)
    # and account 3 (two settlement assets, (4, 2, 1)). Each bucket holds its accounts'
    # positions in file order, padding after them.
    from stress import portfolio

    monkeypatch.setattr(portfolio, "RUNG_MIN_ACCOUNTS", 0)
    monkeypatch.setattr(portfolio, "RUNG_MIN_WORK", -1)
    acc = np.array([0, 1, 2, 2, 2, 2, 2, 2, 3, 3])
    inst = np.array([0, 2, 2, 0, 2, 0, 0, 2, 0, 1])
    qty = np.arange(1.0, len(acc) + 1)
    settlement, balances = np.array([0, 1, 0]), np.zeros((4, 2))
    balances[3, 1] = 5.0
    buckets = portfolio.layout(acc, inst, qty, 2 * qty, settlement, balances)
    assert [(b.J, b.P, b.L) for b in buckets] == [(1, 1, 1), (1, 1, 8), (4, 2, 1)]
    assert [b.accounts.tolist() for b in buckets] == [[0, 1], [2], [3]]
    wide = buckets[1]
    np.testing.assert_array_equal(wide.inst[0, 0], [2, 0, 2, 0, 0, 2, 0, 0])
    np.testing.assert_array_equal(wide.qty[0, 0], [3, 4, 5, 6, 7, 8, 0, 0])
    np.testing.assert_array_equal(wide.weight[0, 0], [6, 8, 10, 12, 14, 16, 0, 0])
    two = buckets[2]
    np.testing.assert_array_equal(two.asset[0], [0, 1, 0, 0])
    np.testing.assert_array_equal(two.balance[0], [0.0, 5.0, 0.0, 0.0])
    np.testing.assert_array_equal(two.inst[0, :, 0], [0, 1])
    np.testing.assert_array_equal(two.qty[0, :, 0], [9.0, 10.0])


def test_a_balance_only_slot_comes_after_the_slots_with_positions(monkeypatch):
    # account 0: a balance in asset 0 and a position settled in asset 1; account 1: a position
    # settled in asset 0, balances in both. Slots with positions first, each kind by asset.
    # Every rung kept: two accounts would otherwise go up to (4, 4, 4).
    from stress import portfolio

    monkeypatch.setattr(portfolio, "RUNG_MIN_ACCOUNTS", 0)
    monkeypatch.setattr(portfolio, "RUNG_MIN_WORK", -1)
    buckets = portfolio.layout(np.array([0, 1]), np.array([1, 0]), np.array([3.0, -2.0]), np.ones(2),
                               np.array([0, 1]), np.array([[7.0, 0.0], [4.0, 9.0]]))
    [b] = buckets
    assert (b.J, b.P, b.L) == (2, 1, 1) and b.accounts.tolist() == [0, 1]
    np.testing.assert_array_equal(b.asset, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(b.balance, [[0.0, 7.0], [4.0, 9.0]])
    np.testing.assert_array_equal(b.inst[:, :, 0], [[1], [0]])
    np.testing.assert_array_equal(b.qty[:, :, 0], [[3.0], [-2.0]])


def test_a_balance_only_slot_values_as_a_slot_of_empty_positions():
    # The same accounts laid out with their second slot as balance-only (P = 1) and as a slot
    # of padding positions (P = 2, quantity 0): equity, collateral, margin, notional and the
    # per-slot pieces of partial liquidation agree, in float64, to rounding.
    import jax.numpy as jnp

    from stress import portfolio

    rng = np.random.default_rng(3)
    n, I, A, W = 16, 5, 3, 7
    value, mm, notional = rng.normal(size=(I, W)), rng.uniform(size=(I, W)), rng.uniform(1, 2, size=(I, W))
    price, haircut = rng.uniform(1, 3, size=(A, W)), np.array([0.0, 0.1, 0.2])
    inst = rng.integers(0, I, size=(n, 1, 2)).astype(np.int32)
    qty, w = rng.normal(size=(n, 1, 2)), rng.uniform(size=(n, 1, 2))
    asset = np.stack([rng.integers(0, A, n), rng.integers(0, A, n)], axis=1).astype(np.int32)
    bal = rng.normal(size=(n, 2))
    valid = np.ones(n, bool)
    apart = portfolio.Holdings(jnp.asarray(inst), jnp.asarray(qty), jnp.asarray(w), jnp.asarray(asset),
                               jnp.asarray(bal), jnp.asarray(valid))
    pad = lambda x: jnp.asarray(np.concatenate([x, np.zeros_like(x)], axis=1))  # noqa: E731
    padded = portfolio.Holdings(pad(inst), pad(qty), pad(w), jnp.asarray(asset), jnp.asarray(bal), jnp.asarray(valid))
    args = tuple(jnp.asarray(x) for x in (value, mm, price, haircut, notional))
    for a, b in zip(portfolio.state(apart, *args), portfolio.state(padded, *args)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    for a, b in zip(portfolio.slots(apart, *args), portfolio.slots(padded, *args)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    assert np.abs(np.asarray(portfolio.state(apart, *args)[1])).min() > 0  # not vacuous


def test_the_holdings_layout_is_built_once_per_snapshot_and_follows_a_changed_one(snap, scen, base_result):
    import dataclasses
    import gc

    first = engine.layout_of(snap)
    assert engine.layout_of(snap) is first  # a second run on the same snapshot reuses it
    doubled = dataclasses.replace(snap, pos_quantity=2 * snap.pos_quantity)
    mine = engine.layout_of(doubled)
    assert mine is not first
    b0, b1 = first[0][0], mine[0][0]
    # rows follow each snapshot's own risk order: compare account by account
    np.testing.assert_array_equal(np.sort(b1.accounts), np.sort(b0.accounts))
    np.testing.assert_array_equal(b1.qty[np.argsort(b1.accounts)], 2 * b0.qty[np.argsort(b0.accounts)])
    # a run on the changed snapshot sees its own holdings: twice the (untiered) margin
    res = stress.run(doubled, scen)
    np.testing.assert_allclose(res.accounts.maintenance_margin, 2 * base_result.accounts.maintenance_margin, rtol=1e-12)
    n = len(engine._LAYOUTS)
    del doubled, res, mine, b1
    gc.collect()
    assert len(engine._LAYOUTS) == n - 1  # dropped with its snapshot
    # dropped on request (the CLI, once its run is over) and built again, the same, when needed
    engine.forget_layout(snap)
    assert len(engine._LAYOUTS) == n - 2
    again = engine.layout_of(snap)
    assert again is not first and [(b.J, b.P, b.L) for b in again[0]] == [(b.J, b.P, b.L) for b in first[0]]
    for b0, b1 in zip(first[0], again[0]):  # the same accounts per bucket (here in index order: no run's tables)
        np.testing.assert_array_equal(np.sort(b1.accounts), np.sort(b0.accounts))


def test_liquidated_notional_per_underlying_adds_up_to_the_total(snap, base_result):
    # linear and inverse futures and options on three underlyings, one-step shocks and paths
    sc = base_result.scenarios
    cols = [f"liquidated_notional_{a}" for a in sorted({snap.assets[u] for u in np.asarray(snap.instruments.underlying)})]
    assert [c for c in sc if c.startswith("liquidated_notional_")] == cols and len(cols) == 3
    assert (sc.liquidated_notional > 0).sum() > 10 and (sc[cols] >= 0).all().all()
    np.testing.assert_allclose(sc[cols].sum(axis=1), sc.liquidated_notional, rtol=1e-9, atol=1e-6)


def test_liquidated_notional_is_the_same_gathered_per_position_as_from_the_underlyings(snap, scen, base_result):
    # Without closing costs the total is the sum over underlyings of each account's fixed
    # notional weights times prices; a fee makes the kernel gather every position's notional
    # in every scenario and step instead. A fee of 1e-9 decides no liquidation differently.
    feed = dataclasses.replace(snap, liquidation_config={**snap.liquidation_config, "fee_rate": 1e-9})
    res = stress.run(feed, scen)
    assert res.scenarios.fees.sum() > 0
    np.testing.assert_allclose(res.scenarios.liquidated_notional, base_result.scenarios.liquidated_notional,
                               rtol=1e-9, atol=1e-6)


def test_results_do_not_depend_on_row_order(sample_tables, tmp_path, base_result, small_default_path):
    rng = np.random.default_rng(3)
    t = {k: (v.sample(frac=1.0, random_state=rng) if isinstance(v, pd.DataFrame) else v) for k, v in sample_tables.items()}
    sample.write_snapshot(tmp_path, t)
    snap = stress.load_snapshot(tmp_path)
    assert_same(base_result, stress.run(snap, stress.load_scenarios(small_default_path, snap)))


def test_results_do_not_depend_on_file_format(sample_tables, tmp_path, base_result, small_default_path):
    sample.write_snapshot(tmp_path, sample_tables, "parquet")
    snap = stress.load_snapshot(tmp_path)
    assert_same(base_result, stress.run(snap, stress.load_scenarios(small_default_path, snap)))


def test_float32_agrees_with_float64(snap, scen, base_result):
    r32 = stress.run(snap, scen, dtype="float32")
    scale = np.abs(base_result.accounts.equity).max()
    for c in ACCOUNT_COLS:
        np.testing.assert_allclose(r32.accounts[c], base_result.accounts[c], rtol=1e-4, atol=1e-5 * scale, err_msg=c)
    gross = base_result.scenarios.pnl_gross.max()
    np.testing.assert_allclose(r32.scenarios.bad_debt, base_result.scenarios.bad_debt, rtol=1e-4, atol=1e-5 * gross)
    assert r32.summary["dtype"] == "float32"
    # a probability is a count of random scenarios over their number, in float64 whatever the
    # dtype (float32's 995 / 2000 is 0.4975000321865082)
    m = int(scen.random.sum())
    p = r32.accounts.p_liquidation.to_numpy()
    assert p.dtype == np.float64 and (np.rint(p * m) / m == p).all() and (p > 0).any()
    assert (r32.accounts.liquidatable == base_result.accounts.liquidatable).all()


def test_pnl_matrix_agrees_with_run(snap, scen, base_result):
    pnl = stress.pnl_matrix(snap, scen, chunk_size=50)
    assert list(pnl.columns) == list(scen.names) and list(pnl.index) == list(snap.account_ids)
    np.testing.assert_allclose(pnl.min(axis=1), base_result.accounts.pnl_worst, rtol=1e-12, atol=1e-9)
    assert (pnl.idxmin(axis=1).to_numpy() == base_result.accounts.scenario_worst.to_numpy()).all()
    np.testing.assert_allclose(pnl.sum(axis=0), base_result.scenarios.pnl_total, rtol=0, atol=1e-9 * base_result.scenarios.pnl_gross.max())


def test_random_tails_and_liquidation_odds_do_not_depend_on_chunks_per_call(snap, monkeypatch):
    # On CPU each call returns its chunks' random losses, read on the host device by device
    # (engine.host_rows); runs with many random scenarios take fewer chunks a call, down to one
    # a device with no loop over chunks at all. The liquidations counted per account are only
    # counted in tiles where someone is liquidated: the reference is the P&L pass's own flags.
    mc = random_scenarios(snap, 250, seed=2, scale=2.0)
    base = stress.run(snap, mc, chunk_size=32)
    assert engine.chunks_per_device(32, 250, np.float64) == engine.MAX_CHUNKS_PER_DEVICE
    monkeypatch.setattr(engine, "RANDOM_BYTES_PER_DEVICE", 1)
    assert engine.chunks_per_device(32, 250, np.float64) == 1
    one = stress.run(snap, mc, chunk_size=32)
    for c in ("var_99", "es_99", "p_liquidation", "pnl_worst", "shortfall_worst"):
        np.testing.assert_array_equal(one.accounts[c], base.accounts[c], err_msg=c)
    dt = engine.DTYPES["float64"]
    t, _ = engine.tables(snap, mc, dt)
    liquidated = engine.LocalAccounts(snap, 32, dt).sweep(t, 0, True).mats["liquidated"]
    assert 0 < liquidated.mean() < 0.5
    np.testing.assert_array_equal(np.rint(base.accounts.p_liquidation * 250), liquidated.sum(axis=1))


def test_random_scenario_statistics_use_documented_estimators(snap):
    mc = random_scenarios(snap, 250)
    res = stress.run(snap, mc, chunk_size=33)
    pnl = stress.pnl_matrix(snap, mc).to_numpy()
    loss = np.sort(-pnl, axis=1)
    k = int(np.ceil(0.99 * 250))  # VaR = L(k), ES = mean(L(k..m)), L ascending
    np.testing.assert_allclose(res.accounts.var_99, loss[:, k - 1], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(res.accounts.es_99, loss[:, k - 1:].mean(axis=1), rtol=1e-12, atol=1e-9)
    assert res.accounts.p_liquidation.between(0, 1).all() and res.accounts.p_liquidation.max() > 0
    fund = res.scenarios.insurance_fund_before.to_numpy()
    bad = res.scenarios.bad_debt.to_numpy()
    assert res.summary["p_fund_depleted"] == pytest.approx(np.mean((bad > 0) & (bad >= fund)))


def test_worst_scenario_ties_break_on_shortfall_then_file_order(snap):
    # No bad debt anywhere: the worst is the largest total shortfall; exact ties: file order.
    s = np.ones((3, snap.n_assets))
    s[1, snap.asset_index("BTC")] = 0.999
    sc = Scenarios(("flat-a", "dip", "flat-b"), ("explicit",) * 3, s, np.zeros((3, snap.n_assets)), np.zeros(3))
    res = stress.run(snap, sc)
    if (res.scenarios.bad_debt == 0).all():
        expect = "dip" if res.scenarios.shortfall_total[1] > res.scenarios.shortfall_total[0] else "flat-a"
        assert res.summary["worst_scenario"] == expect
    sc2 = Scenarios(("same-1", "same-2"), ("explicit",) * 2, np.ones((2, snap.n_assets)), np.zeros((2, snap.n_assets)), np.zeros(2))
    assert stress.run(snap, sc2).summary["worst_scenario"] == "same-1"


def test_kernel_compiles_once_per_bucket_shape(sample_tables, tmp_path, scen, small_default_path):
    # Two snapshots of different sizes whose chunks fall in the same buckets reuse the kernels.
    t = dict(sample_tables)
    sample.write_snapshot(tmp_path / "a", t)
    small = dict(t)
    drop = t["positions"].account_id.drop_duplicates().iloc[5:15]
    small["positions"] = t["positions"][~t["positions"].account_id.isin(drop)]
    small["balances"] = t["balances"][~t["balances"].account_id.isin(drop)]
    sample.write_snapshot(tmp_path / "b", small)
    a, b = stress.load_snapshot(tmp_path / "a"), stress.load_snapshot(tmp_path / "b")
    widths = lambda s: {(bk.J, bk.P, bk.L) for bk in engine.buckets(s)}
    assert widths(a) == widths(b) and a.n_accounts != b.n_accounts
    sa = stress.load_scenarios(small_default_path, a)
    stress.run(a, sa)
    kernel = engine.sharded_kernel(int(sa.random.sum()), False, len(engine.devices()), engine.VAR_LEVEL)
    before = kernel.cache_size()
    assert before > 0
    stress.run(b, stress.load_scenarios(small_default_path, b))
    assert kernel.cache_size() == before


def test_results_do_not_depend_on_device_count(sample_dir, tmp_path, small_default_path):
    # The CPU device count is fixed when JAX starts, so each count runs in its own process.
    import subprocess
    import sys

    code = (
        "import sys, stress, jax;"
        "snap = stress.load_snapshot(sys.argv[1]);"
        "res = stress.run(snap, stress.load_scenarios(sys.argv[3], snap), chunk_size=16);"
        "res.accounts.to_parquet(sys.argv[2] + '-acc.parquet'); res.scenarios.to_parquet(sys.argv[2] + '-sc.parquet');"
        "print(len(jax.local_devices()))"
    )
    results = {}
    for n in (1, 2, 8):  # the counts; 8 devices on 2 cores still shard the account axis 8 ways
        env = {**__import__("os").environ, "STRESS_CPU_DEVICES": str(n), "XLA_FLAGS": ""}
        out = subprocess.run([sys.executable, "-c", code, str(sample_dir), str(tmp_path / f"d{n}"), str(small_default_path)],
                             env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == str(n)
        results[n] = engine.Result(pd.read_parquet(tmp_path / f"d{n}-acc.parquet"),
                                   pd.read_parquet(tmp_path / f"d{n}-sc.parquet"), {})
    assert_same(results[1], results[2], rtol=1e-12)
    assert_same(results[1], results[8], rtol=1e-12)


@pytest.mark.parametrize("kwargs, said", [({"chunk_size": 0}, "chunk_size"), ({"chunk_size": -1}, "chunk_size"),
                                          ({"chunk_size": 2.5}, "chunk_size"), ({"dtype": "float16"}, "dtype")])
def test_the_api_refuses_a_chunk_size_or_dtype_the_cli_would(snap, scen, kwargs, said):
    """As the CLI's --chunk-size and --dtype (exit 2): 0 had fallen back to the default, -1
    failed with StopIteration deep in the chunk generator, float16 was a bare KeyError."""
    for f in (stress.run, stress.pnl_matrix):
        with pytest.raises(ValueError, match=said):
            f(snap, scen, **kwargs)
