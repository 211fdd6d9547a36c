"""The report folder: files and columns of SPEC section 5, escaping, determinism."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

import stress
from stress import report
from stress.scenarios import default_path

from .conftest import EXCHANGE_TOML, write_snapshot

EVIL = "<script>alert(1)</script>"


def _evil_snapshot(tmp_path):
    return write_snapshot(
        tmp_path / "snap",
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 90_000.0, "haircut": 0.05}],
        instruments=[{"instrument_id": "BTC-PERPETUAL", "mark_price": 90_000.0}],
        balances=[{"account_id": EVIL, "asset": "BTC", "amount": 0.001}, {"account_id": "b", "asset": "USDC", "amount": 1e5}],
        positions=[{"account_id": EVIL, "instrument_id": "BTC-PERPETUAL", "quantity": 1000},
                   {"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -1000}],
        exchange_toml=EXCHANGE_TOML,
    )


def test_report_folder_has_every_spec_file_and_column(tmp_path):
    snap = stress.load_snapshot(_evil_snapshot(tmp_path))
    res = stress.run(snap, stress.load_scenarios(default_path(), snap, skip_unknown_assets=True))
    out = report.write(res, tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == sorted(report.FILES)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("as_of", "accounts", "positions", "scenarios", "insurance_fund", "worst_scenario",
                "worst_bad_debt", "p_fund_depleted", "runtime_seconds"):
        assert key in summary
    assert summary["p_fund_depleted"] is None  # no random scenarios: null, valid JSON
    acc = pd.read_parquet(out / "accounts.parquet")
    for c in ("account_id", "equity", "collateral_value", "initial_margin", "maintenance_margin", "liquidatable",
              "pnl_worst", "scenario_worst", "var_99", "es_99", "p_liquidation", "shortfall_worst"):
        assert c in acc.columns, c
    sc = pd.read_parquet(out / "scenarios.parquet")
    for c in ("scenario", "kind", "pnl_total", "accounts_liquidatable", "bad_debt", "insurance_fund_after", "socialized_loss"):
        assert c in sc.columns, c
    assert summary["worst_bad_debt"] == sc.bad_debt.max()


def test_html_report_escapes_account_ids_and_is_self_contained(tmp_path):
    snap = stress.load_snapshot(_evil_snapshot(tmp_path))
    res = stress.run(snap, stress.load_scenarios(default_path(), snap, skip_unknown_assets=True))
    assert (res.accounts.shortfall_worst > 0).any()
    html = (report.write(res, tmp_path / "r") / "report.html").read_text()
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html.replace("http://www.w3.org", "")
    assert html.count("data:image/svg+xml;base64,") >= 3


def test_markdown_numbers_match_parquet(tmp_path, sample_dir):
    snap = stress.load_snapshot(sample_dir)
    res = stress.run(snap, stress.load_scenarios(default_path(), snap))
    out = report.write(res, tmp_path / "r")
    md = (out / "report.md").read_text()
    sc = pd.read_parquet(out / "scenarios.parquet")
    for r in sc.itertuples():
        assert f"| {r.scenario} | {r.kind} | {report.usd(r.pnl_total)} |" in md
    assert report.usd(sc.bad_debt.max()) in md


def test_reports_are_identical_for_identical_inputs(tmp_path, sample_dir):
    snap = stress.load_snapshot(sample_dir)
    scen = stress.load_scenarios(default_path(), snap)
    a = report.write(stress.run(snap, scen), tmp_path / "a")
    b = report.write(stress.run(snap, scen, chunk_size=17), tmp_path / "b")
    assert (a / "report.html").read_bytes() == (b / "report.html").read_bytes()
    assert (a / "report.md").read_bytes() == (b / "report.md").read_bytes()
    ja, jb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    ja.pop("runtime_seconds"), jb.pop("runtime_seconds")
    assert ja.keys() == jb.keys()
    for k in ja:
        if isinstance(ja[k], float):
            np.testing.assert_allclose(ja[k], jb[k], rtol=1e-9)
        else:
            assert ja[k] == jb[k], k


def test_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    snap = stress.load_snapshot(_evil_snapshot(tmp_path))
    res = stress.run(snap, stress.load_scenarios(default_path(), snap, skip_unknown_assets=True))
    monkeypatch.setattr(report, "_html", lambda ctx: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        report.write(res, tmp_path / "r")
    except RuntimeError:
        pass
    assert not (tmp_path / "r").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.")]
