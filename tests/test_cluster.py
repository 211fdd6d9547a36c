"""A run on a Dask cluster (stress.cluster) gives the single-machine run's results.

A ``LocalCluster`` of two spawned worker processes (JAX is not fork-safe) sweeps the account
partitions; every per-account and per-scenario column must match ``engine.run`` in float64
to 1e-12 of the column's scale, and the summary must be equal, on the 400-account sample under
Monte Carlo paths and on hand-built books where the price impact and auto-deleveraging act
(their exchange-wide passes combine accounts held by different workers), for 1, 2 and 3
partitions, through the Python API and ``stress run --cluster``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

import stress  # noqa: E402
from stress import cluster, engine  # noqa: E402
from stress.cli import app  # noqa: E402

from .conftest import write_snapshot  # noqa: E402

ASSETS = [{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}]
IMPACT = """
[liquidation.impact.BTC]
spread = 0.001
k = 0.5
daily_vol = 0.04
daily_volume = 9.6e9
"""
# Explicit shocks and BTC paths volatile enough that some liquidate along the way.
BOOK_SCENARIOS = """
[[scenario]]
name = "down-1"
moves = { BTC = -0.01 }

[[scenario]]
name = "down-4"
moves = { BTC = -0.04 }

[[scenario]]
name = "flat"

[[montecarlo]]
name = "mc"
paths = 24
steps = 3
horizon_days = 3
seed = 3
vol = { BTC = 1.5 }
"""
SAMPLE_SCENARIOS = """
[[scenario]]
name = "down-30"
moves = { BTC = -0.30, ETH = -0.35 }
vol_shift = { BTC = 0.20, ETH = 0.25 }

[[scenario]]
name = "up-50"
moves = { BTC = 0.50, ETH = 0.60 }

[[montecarlo]]
name = "mc"
paths = 48
steps = 2
horizon_days = 2
seed = 5
vol = { BTC = 0.9, ETH = 1.1 }
correlation = { "BTC/ETH" = 0.8 }
"""


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each, started with ``spawn``; not the default client,
    so nothing in ``stress.cluster`` may rely on one (the CLI's client is not either)."""
    import dask

    with (dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}),
          distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc,
          distributed.Client(lc, set_as_default=False) as c):
        yield c


def _toml(fund: float, liquidation: str) -> str:
    return (f"as_of = 2026-11-23T08:00:00Z\nrate = 0.0\ninsurance_fund = {{ USDC = {fund} }}\n"
            f"[margin]\n[liquidation]\n{liquidation}\n")


def _perpetual_book(folder, balances: dict, quantities: dict, fund: float, liquidation: str):
    """One linear BTC perpetual (0.5 BTC a contract, mark 50,000), accounts on USDC."""
    return stress.load_snapshot(write_snapshot(
        folder, assets=ASSETS,
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 0.5, "mark_price": 50_000.0}],
        balances=[{"account_id": a, "asset": "USDC", "amount": b} for a, b in balances.items()],
        positions=[{"account_id": a, "instrument_id": "P", "quantity": q} for a, q in quantities.items()],
        exchange_toml=_toml(fund, liquidation)))


def _three(folder):
    """test_liquidation's impact book with a small fund: L long 1000 on 400,000 USDC, S short
    1200 on -50,000 (liquidatable already), W long 200 on 5M; both liquidated at down-1, so
    the impact is charged on their net; at down-4 L's bad debt exceeds fund and fee: ADL."""
    return _perpetual_book(folder, {"L": 400_000.0, "S": -50_000.0, "W": 5_000_000.0},
                           {"L": 1000, "S": -1200, "W": 200}, 100_000.0, "fee_rate = 0.002\n" + IMPACT)


def _adl_book(folder):
    """test_liquidation's ADL book: L long 1000 on 400,000; shorts S1 (1M) and S2 (4M) of 500
    each, ranked S1 first. At down-4 L's bad debt (600,000, and the impact of closing it) less
    the fund of 100,000 exceeds S1's profit of 500,000, so S2 is charged too. Same terms as
    ``_three``, so the two books share compiled kernels."""
    return _perpetual_book(folder, {"L": 400_000.0, "S1": 1_000_000.0, "S2": 4_000_000.0},
                           {"L": 1000, "S1": -500, "S2": -500}, 100_000.0, "fee_rate = 0.002\n" + IMPACT)


def _grouped_book(folder):
    """The ADL book with L and S2 in one account group (Cover 2): a group that the partitions
    split, so every part must keep the exchange's group numbering."""
    _adl_book(folder)
    bal = pd.read_csv(folder / "balances.csv")
    bal["group"] = bal.account_id.map({"L": "g", "S2": "g"})
    bal.to_csv(folder / "balances.csv", index=False)
    toml = (folder / "exchange.toml").read_text()
    (folder / "exchange.toml").write_text(toml.replace("[liquidation]\n", '[liquidation]\ngroup_column = "group"\n'))
    snap = stress.load_snapshot(folder)
    assert engine.group_rows(snap)[1] == 1
    return snap


BOOKS = {"impact": _three, "adl": _adl_book, "groups": _grouped_book}


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """Each book: (snapshot folder, snapshot, scenarios, the single-machine result)."""
    out = {}
    for name, build in BOOKS.items():
        folder = tmp_path_factory.mktemp(name)
        snap = build(folder / "snap")
        (folder / "scenarios.toml").write_text(BOOK_SCENARIOS)
        scen = stress.load_scenarios(folder / "scenarios.toml", snap)
        out[name] = (folder, snap, scen, engine.run(snap, scen))
    return out


def assert_same(got: engine.Result, want: engine.Result) -> None:
    """Every column to 1e-12 of its largest magnitude (exact for text, flags and counts) and the
    summary equal, its floats to 1e-12 relative; the runtime aside."""
    for name in ("accounts", "scenarios"):
        a, b = getattr(got, name), getattr(want, name)
        assert list(a.columns) == list(b.columns)
        for col in b.columns:
            x, y = a[col].to_numpy(), b[col].to_numpy()
            if y.dtype.kind == "f":
                scale = np.nanmax(np.abs(y), initial=0.0)
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * scale, err_msg=f"{name}.{col}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{name}.{col}")
    assert_same_summary(got.summary, want.summary)


def assert_same_summary(got: dict, want: dict) -> None:
    """Equal keys and values, floats to 1e-12 relative (exchange-wide sums over accounts are
    added in another order), the runtime aside."""
    g, w = _flat(got), _flat(want)
    g.pop("runtime_seconds"), w.pop("runtime_seconds")
    assert g.keys() == w.keys()
    for k, v in w.items():
        if isinstance(v, float):
            assert g[k] == pytest.approx(v, rel=1e-12, abs=0.0), k
        else:
            assert g[k] == v, k


def _flat(d: dict) -> dict:
    """The summary with nested lists of dicts (``oracle_lags``) spelled out as flat keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, list) and all(isinstance(row, dict) for row in v):
            out.update({f"{k}.{i}.{kk}": vv for i, row in enumerate(v) for kk, vv in row.items()})
        else:
            out[k] = v
    return out


def test_take_accounts_keeps_the_accounts_rows_and_renumbers_their_positions(books):
    _, snap, _, _ = books["adl"]  # accounts L, S1, S2 in that order, one position each
    sub = cluster.take_accounts(snap, [1, 2])
    assert list(sub.account_ids) == ["S1", "S2"]
    np.testing.assert_array_equal(sub.balances, snap.balances[1:])
    np.testing.assert_array_equal(sub.pos_account, [0, 1])
    np.testing.assert_array_equal(sub.pos_quantity, [-500.0, -500.0])
    assert sub.n_positions == 2 and snap.n_positions == 3
    with pytest.raises(ValueError):
        cluster.take_accounts(snap, [2, 1])
    with pytest.raises(ValueError):
        cluster.take_accounts(snap, [3])


def test_split_accounts_covers_every_account_in_contiguous_ranges(sample_dir):
    snap = stress.load_snapshot(sample_dir)
    for parts in (1, 2, 3, 7):
        ranges = cluster.split_accounts(snap, parts)
        assert len(ranges) == parts
        np.testing.assert_array_equal(np.concatenate(ranges), np.arange(snap.n_accounts))
    assert len(cluster.split_accounts(cluster.take_accounts(snap, [0, 1]), 3)) == 2  # never empty


def test_sample_under_monte_carlo_paths_matches_the_local_run(client, sample_dir, tmp_path):
    snap = stress.load_snapshot(sample_dir)
    (tmp_path / "s.toml").write_text(SAMPLE_SCENARIOS)
    scen = stress.load_scenarios(tmp_path / "s.toml", snap)
    want = engine.run(snap, scen)  # first: the workers then find its kernels in the disk cache
    seen = []
    got = cluster.run(snap, scen, client, progress=lambda done, total: seen.append((done, total)))
    assert want.accounts.var_99.notna().all() and want.scenarios.accounts_liquidatable.max() > 0
    assert_same(got, want)
    assert seen[-1] == (snap.n_accounts, snap.n_accounts)


@pytest.mark.parametrize("book", sorted(BOOKS))
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_impact_and_adl_books_match_for_any_number_of_partitions(client, books, book, parts):
    _, snap, scen, want = books[book]
    # the books exercise the exchange-wide passes: impact, and ADL ranking winners that
    # different partitions hold
    assert want.scenarios.impact_cost.max() > 0 and want.scenarios.adl_total.max() > 0
    if book != "impact":
        assert (want.accounts.set_index("account_id").adl_loss_worst[["S1", "S2"]] > 0).all()
    got = cluster.run(snap, scen, client, partitions=parts)
    assert_same(got, want)


def test_a_liquidation_cascade_over_partitions_matches_the_local_run(client, tmp_path, monkeypatch):
    # test_cascade's chain under an oracle lag: A's forced sale moves the price that closes B
    # out two steps later; in four partitions, one account each on two workers, the feedback
    # crosses partitions and workers
    from stress import cascade

    from .test_cascade import _chain, _path_scenarios, assert_same_cascade

    snap = _chain(tmp_path / "snap", extra="oracle_lag_steps = 1")
    scen = _path_scenarios(tmp_path, snap)
    want = engine.run(snap, scen)
    assert want.summary["cascade"] and want.scenarios.amplification[0] > 1.0
    steps = cascade.run(snap, scen, accounts=True)

    def here(*args, **kwargs):
        raise AssertionError("the client ran the cascade's accounts itself")

    monkeypatch.setattr(cascade, "_kernel", here)  # the one-scan kernel: accounts in this process
    got = cluster.run(snap, scen, client, partitions=4)
    assert_same(got, want)
    # each account's close-out step, placed back from its partition
    with cluster.ClusterAccounts(snap, client, partitions=4) as sweeper:
        assert [len(i) for i in sweeper.index] == [1, 1, 1, 1]
        assert_same_cascade(cascade.run(snap, scen, accounts=True, parts=sweeper), steps)


def test_the_sweeper_rejects_a_run_of_another_dtype(client, books):
    _, snap, scen, _ = books["adl"]
    with cluster.ClusterAccounts(snap, client, dtype="float32") as sweeper:
        with pytest.raises(ValueError, match="same dtype"):
            engine.run(snap, scen, dtype="float64", sweeper=sweeper)


# --- the command line ----------------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_run_on_the_cluster_writes_the_same_summary(client, books, tmp_path):
    folder, *_ = books["impact"]
    args = ("run", folder / "snap", "--scenarios", folder / "scenarios.toml", "-q")
    on = _cli(*args, "--cluster", client.scheduler.address, "--out", tmp_path / "on")
    off = _cli(*args, "--out", tmp_path / "off")
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    s_on, s_off = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("on", "off"))
    assert_same_summary(s_on, s_off)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "on" / "accounts.parquet"),
                                  pd.read_parquet(tmp_path / "off" / "accounts.parquet"), rtol=1e-12)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9", "nonsense://x"])
def test_cli_with_an_unreachable_cluster_exits_2_without_a_report(books, tmp_path, monkeypatch, address):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1.0)
    folder, *_ = books["adl"]
    res = _cli("run", folder / "snap", "--scenarios", folder / "scenarios.toml", "--cluster", address,
               "--out", tmp_path / "out")
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and address in lines[0], res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("address, said", [("127.0.0.1", "missing port"), ("foo://x:1", "unknown address scheme")])
def test_a_malformed_address_is_refused_before_a_client_is_built(address, said):
    """A Client built on a malformed address raised from its constructor and left a half-built
    client that, at the process's exit, waited 20 s and printed a traceback after the error."""
    pytest.importorskip("distributed")
    started = time.perf_counter()
    with pytest.raises(cluster.ClusterError, match=said):
        cluster.connect(address)
    assert time.perf_counter() - started < 5.0


def test_cli_without_dask_says_how_to_install_it(books, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    folder, *_ = books["adl"]
    res = _cli("run", folder / "snap", "--scenarios", folder / "scenarios.toml", "--cluster", "tcp://127.0.0.1:9",
               "--out", tmp_path / "out")
    assert res.exit_code == 2 and "pip install 'stress[cluster]'" in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_workers_with_another_version_of_stress(client, books, tmp_path, monkeypatch):
    monkeypatch.setattr(stress, "__version__", "0.0.0-other")  # the client's; the workers keep theirs
    folder, *_ = books["adl"]
    res = _cli("run", folder / "snap", "--scenarios", folder / "scenarios.toml", "--cluster", client.scheduler.address,
               "--out", tmp_path / "out")
    assert res.exit_code == 2 and "0.0.0-other" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
