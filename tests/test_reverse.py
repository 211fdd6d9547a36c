"""Reverse stress test: the smallest fund-exhausting move, checked with the engine.

Every check of exhaustion here runs ``stress.run`` on the move independently of the search;
the percent-norm answers are bankruptcy moves computed by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import stress
from stress.cli import app
from stress.scenarios import Scenarios

from .conftest import write_snapshot

TOML = """as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = { USDC = 1000.0 }
[margin]
"""
MC = """[[montecarlo]]
name = "mc"
paths = 300
steps = 2
horizon_days = 2
seed = 3
vol = { BTC = 0.6, ETH = 0.8, SOL = 1.0 }
correlation = { "BTC/ETH" = 0.8, "BTC/SOL" = 0.7, "ETH/SOL" = 0.7 }
vol_beta = { BTC = -0.5, ETH = -0.5 }
"""


def one_account(folder, quantity: float, balance: float = 5_000.0):
    """One account with ``quantity`` linear BTC perpetuals (1 BTC each, mark 50,000) on
    ``balance`` USDC; a fund of 1,000 USDC."""
    return stress.load_snapshot(write_snapshot(
        folder,
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 50_000.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "P", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 50_000.0}],
        balances=[{"account_id": "acct", "asset": "USDC", "amount": balance}],
        positions=[{"account_id": "acct", "instrument_id": "P", "quantity": quantity}],
        exchange_toml=TOML))


def engine_exhausted(snap, mult: np.ndarray, dv: np.ndarray) -> bool:
    """Independent check: ``stress.run`` on the one-step scenario, fund exhausted or not."""
    scen = Scenarios(names=("m",), kinds=("explicit",), spot_mult=np.asarray(mult, float)[None],
                     vol_shift=np.asarray(dv, float)[None], horizon_days=np.zeros(1))
    row = stress.run(snap, scen).scenarios.iloc[0]
    return bool(row.bad_debt > 0 and row.bad_debt >= row.insurance_fund_before + row.fees)


@pytest.mark.parametrize("quantity, move", [(1.0, -0.12), (-1.0, 0.12)])
def test_percent_answer_is_the_hand_computed_bankruptcy_move(tmp_path, quantity, move):
    # Equity (1 + u) * (5,000 + q * 50,000 * x) with u the USDC move, fund 1,000 * (1 + u): the
    # fund is exhausted when -(5,000 + q * 50,000 * x) >= 1,000, i.e. q * x <= -0.12, whatever u.
    snap = one_account(tmp_path / "snap", quantity)
    r = stress.reverse(snap, norm="percent")
    assert r.found and r.norm == "percent"
    m = r.moves.set_index("asset")
    assert m.loc["BTC", "price_move"] == pytest.approx(move, abs=1e-4)
    assert m.loc["USDC", "price_move"] == pytest.approx(0.0, abs=1e-4)
    assert r.distance == pytest.approx(0.12, abs=1e-4)
    assert r.bad_debt == pytest.approx(1_000.0, rel=1e-4) and r.fund == pytest.approx(1_000.0, rel=1e-4)
    assert list(r.accounts.account_id) == ["acct"] and r.accounts.share.iloc[0] == pytest.approx(1.0)
    mult = 1.0 + m.price_move.to_numpy()
    assert r.exhausted and engine_exhausted(snap, mult, np.zeros(2))  # (a)
    assert not r.exhausted_at_98 and not engine_exhausted(snap, 1.0 + 0.98 * m.price_move.to_numpy(), np.zeros(2))  # (b)


@pytest.fixture(scope="module")
def sample_reverse(sample_dir, tmp_path_factory):
    snap = stress.load_snapshot(sample_dir)
    path = tmp_path_factory.mktemp("rev") / "mc.toml"
    path.write_text(MC)
    scen = stress.load_scenarios(path, snap)
    return snap, scen, path, stress.reverse(snap, scen)


def test_mahalanobis_move_exhausts_the_fund_and_098_of_it_does_not(sample_reverse):
    snap, scen, _, r = sample_reverse
    assert r.found and r.norm == "mahalanobis" and r.random_scenarios == 300
    mult = (r.moves.price_after / r.moves.price_before).to_numpy()
    dv = np.nan_to_num(r.moves.vol_shift.to_numpy())
    assert engine_exhausted(snap, mult, dv)  # (a)
    assert not engine_exhausted(snap, mult ** 0.98, 0.98 * dv)  # (b): the ray is in log prices
    # the reported distance is the Mahalanobis norm of (log price moves, vol shifts) under the
    # covariance of the random scenarios' horizon moves
    under = np.flatnonzero(r.moves.vol_shift.notna())
    F = np.hstack([np.log(scen.spot_mult), scen.vol_shift[:, under]])
    z = np.r_[np.log(mult), dv[under]]
    assert np.sqrt(z @ np.linalg.pinv(np.cov(F, rowvar=False), rcond=1e-10, hermitian=True) @ z) == pytest.approx(r.distance, rel=1e-6)
    # unmoved assets in the random scenarios (stablecoins here) are held fixed
    assert (r.moves.set_index("asset").loc[["USDC", "USDT"], "price_move"] == 0).all()
    shares = r.accounts.share.to_numpy()
    assert (np.diff(r.accounts.bad_debt) <= 0).all() and 0 < shares.sum() <= 1 + 1e-12


def test_no_move_within_the_bound_is_reported_not_an_error(tmp_path):
    # long 1 BTC on 60,000 USDC: even BTC x0.01 loses 49,500 < 60,000, and nothing is short
    snap = one_account(tmp_path / "snap", 1.0, balance=60_000.0)
    r = stress.reverse(snap, norm="percent")
    assert not r.found and "no move within the bound" in r.message and r.moves.empty
    res = CliRunner().invoke(app, ["reverse", str(tmp_path / "snap"), "--norm", "percent", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "no fund-exhausting move found" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["found"] is False


def test_reverse_command_writes_json_and_parquet(sample_reverse, sample_dir, tmp_path):
    _, _, mc, r = sample_reverse
    res = CliRunner().invoke(app, ["reverse", str(sample_dir), "--scenarios", str(mc), "--target", "fund-exhausted",
                                   "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["norm"] == "mahalanobis" and doc["distance"] == pytest.approx(r.distance, rel=1e-9)
    assert [m["asset"] for m in doc["moves"]] == list(snap_assets(sample_dir))
    assert doc["accounts"][0]["account_id"] == r.accounts.account_id.iloc[0]
    res = CliRunner().invoke(app, ["reverse", str(sample_dir), "--scenarios", str(mc), "--norm", "percent",
                                   "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(tmp_path / "r.parquet")
    meta = json.loads(pq.read_schema(tmp_path / "r.parquet").metadata[b"stress.reverse"])
    assert meta["norm"] == "percent" and meta["exhausted"] is True
    assert set(df.section) == {"move", "account"} and (df.section == "move").sum() == 5


def snap_assets(folder):
    return sorted(pd.read_csv(folder / "assets.csv").asset)  # a snapshot's assets are in name order


@pytest.mark.parametrize("args", [
    ["--target", "fund-depleted-twice"],
    ["--norm", "euclid"],
    ["--norm", "mahalanobis"],  # the explicit-only set below has no random scenarios
    ["--out", "r.txt"],
])
def test_bad_input_exits_2(tmp_path, args):
    one_account(tmp_path / "snap", 1.0)
    (tmp_path / "explicit.toml").write_text('[[scenario]]\nname = "down"\nmoves = { BTC = -0.1 }\n')
    res = CliRunner().invoke(app, ["reverse", str(tmp_path / "snap"), "--scenarios", str(tmp_path / "explicit.toml"), *args])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "Traceback" not in res.output


def test_missing_snapshot_exits_2(tmp_path):
    res = CliRunner().invoke(app, ["reverse", str(tmp_path / "nowhere"), "--norm", "percent"])
    assert res.exit_code == 2
