"""The report folder (SPEC section 5) and `stress report`: files and columns, the summary's JSON
Schema, escaping, self-containment, numbers that match the Parquet files, determinism,
optional columns, the night-over-night diff and the command's exit codes.

Golden checks parse report.md and report.html back (a Markdown table splitter and an HTML
table parser written here) and compare every number with the Parquet files, recomputing the
expected values independently: the riskiest accounts by sorting accounts.parquet, VaR and ES
with integer arithmetic for ``k = ceil(0.99 m)``, concentration from the margins.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html as html_lib
import json
import math
import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import stress
from stress import report
from stress.cli import app

from .conftest import EXCHANGE_TOML, write_snapshot

EVIL = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
MARKUP = "[bold red]boss[/]"  # rich markup: must print as written
CLOSE = "[/]"  # a closing tag with nothing to close: a markup error if parsed
PIPE = "a|b $x^2$"  # a Markdown table separator and mathtext in a chart label
# Namespace and DTD identifiers inside SVG: names, never fetched.
SVG_IDENTIFIERS = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink",
                   "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd"}

EXPLICIT = """
[[scenario]]
name = "btc-down-30"
moves = { BTC = -0.30, ETH = -0.35, SOL = -0.40 }
vol_shift = { BTC = 0.20, ETH = 0.25 }

[[scenario]]
name = "btc-up-40"
moves = { BTC = 0.40, ETH = 0.45, SOL = 0.50 }

[[scenario]]
name = "crash-60"
moves = { BTC = -0.60, ETH = -0.65, SOL = -0.70 }
vol_shift = { BTC = 0.40, ETH = 0.40 }

[[scenario]]
name = "usdc-depeg-10"
moves = { USDC = -0.10 }

[[scenario]]
name = "calm"
"""

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# Inputs


def explicit_scenarios(folder: Path, snap):
    path = folder / "explicit.toml"
    path.write_text(EXPLICIT)
    return stress.load_scenarios(path, snap, skip_unknown_assets=True)


def with_random(scen, snap, m: int = 200, seed: int = 5):
    """``scen`` plus ``m`` Monte Carlo rows: fat-tailed one-step moves of the coins."""
    rng = np.random.default_rng(seed)
    A = snap.n_assets
    mult = np.ones((m, A))
    for a in ("BTC", "ETH", "SOL"):
        if a in snap.assets:
            mult[:, snap.asset_index(a)] = np.exp(0.07 * rng.standard_t(4, size=m))
    return dataclasses.replace(
        scen,
        names=tuple(scen.names) + tuple(f"mc:{i:03d}" for i in range(m)),
        kinds=tuple(scen.kinds) + ("montecarlo",) * m,
        spot_mult=np.vstack([scen.spot_mult, mult]),
        vol_shift=np.vstack([scen.vol_shift, np.zeros((m, A))]),
        horizon_days=np.concatenate([scen.horizon_days, np.zeros(m)]),
    )


def hostile_snapshot(folder: Path, ids=(EVIL, IMG, MARKUP, PIPE, CLOSE), extra_b: float = 0.0) -> Path:
    """Accounts with hostile ids, each a leveraged long BTC perpetual (they run short of
    margin when BTC falls), against a well-funded short ``b``."""
    accounts = list(ids)
    balances = [{"account_id": a, "asset": "USDC", "amount": 4_000.0 + 1_000 * i} for i, a in enumerate(accounts)]
    balances.append({"account_id": "b", "asset": "USDC", "amount": 5e6 + extra_b})
    positions = [{"account_id": a, "instrument_id": "BTC-PERPETUAL", "quantity": 3_000 + 500 * i}
                 for i, a in enumerate(accounts)]
    positions.append({"account_id": "b", "instrument_id": "BTC-PERPETUAL", "quantity": -sum(p["quantity"] for p in positions)})
    return write_snapshot(
        folder,
        assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 90_000.0, "haircut": 0.05}],
        instruments=[{"instrument_id": "BTC-PERPETUAL", "mark_price": 90_000.0}],
        balances=balances, positions=positions, exchange_toml=EXCHANGE_TOML,
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A run of the hostile snapshot under explicit scenarios only (no random ones)."""
    folder = tmp_path_factory.mktemp("hostile")
    snap = stress.load_snapshot(hostile_snapshot(folder / "snap"))
    scen = explicit_scenarios(folder, snap)
    return snap, scen, stress.run(snap, scen)


@pytest.fixture(scope="module")
def hostile_report(hostile, tmp_path_factory):
    return report.write(hostile[2], tmp_path_factory.mktemp("hostile_report") / "r")


@pytest.fixture(scope="module")
def mc(tmp_path_factory, sample_dir):
    """The 400-account sample under explicit scenarios and 200 Monte Carlo rows."""
    folder = tmp_path_factory.mktemp("mc")
    snap = stress.load_snapshot(sample_dir)
    scen = with_random(explicit_scenarios(folder, snap), snap)
    return snap, scen, stress.run(snap, scen)


@pytest.fixture(scope="module")
def mc_report(mc, tmp_path_factory):
    return report.write(mc[2], tmp_path_factory.mktemp("mc_report") / "r")


# --------------------------------------------------------------------------------------------
# Reading reports back, independently of the code under test


class _Tables(HTMLParser):
    """Every <table> of a page: the heading above it, header cells, body rows (cell text)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables, self.heading, self._cell, self._row, self._in_heading = [], "", None, None, False

    def handle_starttag(self, tag, attrs):
        if tag in ("thead", "tbody"):
            self._is_header = tag == "thead"
        if tag in ("h2", "h3"):
            self.heading, self._in_heading = "", True
        elif tag == "table":
            self.tables.append({"heading": self.heading, "header": [], "rows": [], "attrs": dict(attrs)})
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self._in_heading = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            t = self.tables[-1]
            if not t["header"] and not t["rows"] and self._is_header:
                t["header"] = self._row
            else:
                t["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_heading:
            self.heading += data
        if self._cell is not None:
            self._cell.append(data)

    _is_header = False  # the row being read sits in <thead>


def html_tables(text: str) -> list[dict]:
    p = _Tables()
    p.feed(text)
    return p.tables


def md_tables(text: str) -> list[dict]:
    """Markdown tables with the ``##`` heading above them; cells unescaped."""
    out, heading, rows = [], "", None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            heading = re.sub(r"\\(.)", r"\1", line.lstrip("#").strip())
        if line.startswith("|"):
            cells = [re.sub(r"\\(.)", r"\1", c.strip()) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows = rows if rows is not None else []
            rows.append(cells)
        elif rows is not None:
            out.append({"heading": heading, "header": rows[0], "rows": rows[2:]})
            rows = None
    return out


def find(tables: list[dict], heading_start: str) -> dict:
    hits = [t for t in tables if t["heading"].startswith(heading_start)]
    assert len(hits) == 1, [t["heading"] for t in tables]
    return hits[0]


def number(s: str) -> float:
    """'1,234,567' -> 1234567.0; '12.5%' -> 0.125; 'n/a' -> nan."""
    s = s.strip()
    if s.startswith("n/a"):
        return math.nan
    if s.endswith("%"):
        return float(s[:-1].replace(",", "")) / 100
    return float(s.replace(",", ""))


def assert_usd(shown: str, value: float) -> None:
    """A USD cell shows ``value`` to the dollar."""
    if value is None or not math.isfinite(value):
        assert shown == "n/a", shown
    else:
        assert abs(number(shown) - value) <= 0.5 + 1e-9, (shown, value)


def headline_of(tables: list[dict], md: bool = False) -> dict:
    """The headline table (the first one) as label -> value."""
    t = tables[0]
    rows = t["rows"] if not md else [t["header"]] + t["rows"]
    return {r[0].replace(" **(limit breached)**", "").replace(" (limit breached)", ""): r[1] for r in rows if len(r) == 2}


def expected_var_es(pnl: np.ndarray) -> tuple[float, float]:
    """k = ceil(0.99 m) in integers; VaR = L(k), ES = mean(L(k..m)) of ascending losses."""
    loss = np.sort(-pnl)
    m = len(loss)
    k = -(-99 * m // 100)
    return loss[k - 1], loss[k - 1 :].mean()


def data_uris(text: str) -> list[str]:
    return re.findall(r'src="(data:[^"]*)"', text)


def svgs(text: str) -> list[str]:
    return [base64.b64decode(u.split(",", 1)[1]).decode() for u in data_uris(text) if u.startswith("data:image/svg+xml;base64,")]


# --------------------------------------------------------------------------------------------
# Formatting


def test_usd_has_thousands_separators_and_no_negative_zero():
    assert report.usd(1_234_567.4) == "1,234,567"
    assert report.usd(-1_234_567.6) == "-1,234,568"
    assert report.usd(-0.4) == "0"
    assert report.usd(float("nan")) == "n/a" and report.usd(None) == "n/a"


def test_pct_has_one_decimal():
    assert report.pct(0.1234) == "12.3%"
    assert report.pct(0.0) == "0.0%"
    assert report.pct(1) == "100.0%"
    assert report.pct(None) == "n/a"


def test_tail_loss_takes_the_ceil_099_m_order_statistic():
    # losses 1..100: k = 99, VaR = 99, ES = mean(99, 100)
    var, es = report.tail_loss(-np.arange(1.0, 101.0))
    assert (var, es) == (99.0, 99.5)
    # m = 250: k = ceil(247.5) = 248
    var, es = report.tail_loss(-np.arange(1.0, 251.0))
    assert (var, es) == (248.0, np.mean([248.0, 249.0, 250.0]))
    assert all(math.isnan(x) for x in report.tail_loss([]))


@pytest.mark.parametrize("levels", [3, 1000])
def test_riskiest_accounts_are_those_of_a_full_sort_with_ties_broken_by_id(levels):
    # many accounts tied at the cut (3 shortfall levels), or few; NaN as the least risky
    rng = np.random.default_rng(5)
    n = 2000
    short = rng.integers(0, levels, n).astype(float)
    short[rng.choice(n, 50, replace=False)] = np.nan
    acc = pd.DataFrame({"account_id": [f"acct-{i:05d}" for i in rng.permutation(n)], "shortfall_worst": short})
    expect = acc.assign(neg=-acc.shortfall_worst.fillna(-np.inf)).sort_values(["neg", "account_id"]).head(report.TOP)
    got = report.riskiest(acc)
    assert got.account_id.tolist() == expect.account_id.tolist()
    assert report.riskiest(acc, n=5).account_id.tolist() == expect.account_id.tolist()[:5]


def test_concentration_shares_of_the_largest_accounts():
    c = report.concentration([20.0, np.nan, 50.0, 30.0])
    assert c["total"] == 100.0
    assert c["shares"] == [(1, 0.5), (10, 1.0), (100, 1.0)]
    assert all(math.isnan(s) for _, s in report.concentration([0.0, 0.0])["shares"])


# --------------------------------------------------------------------------------------------
# The folder, the summary and its schema


def test_report_folder_has_every_spec_file_and_column(hostile_report):
    out = hostile_report
    assert sorted(p.name for p in out.iterdir()) == sorted(report.FILES)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("as_of", "accounts", "positions", "scenarios", "insurance_fund", "worst_scenario",
                "worst_bad_debt", "p_fund_depleted", "runtime_seconds"):
        assert key in summary
    assert summary["p_fund_depleted"] is None  # no random scenarios: null, valid JSON
    acc = pd.read_parquet(out / "accounts.parquet")
    for c in report.ACCOUNT_COLUMNS:
        assert c in acc.columns, c
    sc = pd.read_parquet(out / "scenarios.parquet")
    for c in report.SCENARIO_COLUMNS:
        assert c in sc.columns, c
    assert summary["worst_bad_debt"] == sc.bad_debt.max()


def test_schema_ships_inside_the_package_and_is_valid_draft_2020_12():
    path = resources.files("stress") / "schemas" / "summary.schema.json"
    assert path.is_file()
    sch = json.loads(path.read_text())
    assert sch["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(sch)
    assert set(sch["required"]) >= {"as_of", "accounts", "positions", "scenarios", "insurance_fund",
                                    "worst_scenario", "worst_bad_debt", "p_fund_depleted", "runtime_seconds"}


def test_real_summaries_validate_against_the_schema(hostile_report, mc_report):
    validator = jsonschema.Draft202012Validator(report.schema())
    without_random = json.loads((hostile_report / "summary.json").read_text())
    with_random_ = json.loads((mc_report / "summary.json").read_text())
    assert without_random["p_fund_depleted"] is None and with_random_["p_fund_depleted"] is not None
    for s in (without_random, with_random_):
        validator.validate(s)


@pytest.mark.parametrize("key, bad", [
    ("accounts", "400"), ("worst_bad_debt", None), ("p_fund_depleted", 1.5), ("p_fund_depleted", "0.1"),
    ("as_of", "yesterday"), ("worst_scenario", 3), ("runtime_seconds", -1.0), ("insurance_fund", -5.0),
])
def test_summary_with_a_wrong_value_fails_the_schema(mc_report, key, bad):
    s = json.loads((mc_report / "summary.json").read_text())
    s[key] = bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(s, report.schema(), cls=jsonschema.Draft202012Validator)


def test_summary_without_a_required_key_fails_the_schema(mc_report):
    s = json.loads((mc_report / "summary.json").read_text())
    del s["worst_scenario"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(s, report.schema(), cls=jsonschema.Draft202012Validator)


# --------------------------------------------------------------------------------------------
# Escaping and self-containment


def test_html_report_escapes_account_ids_and_is_self_contained(hostile, hostile_report):
    assert (hostile[2].accounts.shortfall_worst > 0).any()
    page = (hostile_report / "report.html").read_text()
    for raw in (EVIL, IMG):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # the ids are in the riskiest-accounts table as text
    ids = {r[0] for r in find(html_tables(page), "Riskiest")["rows"]}
    assert {EVIL, IMG, MARKUP, PIPE} <= ids
    # one script, the constant table sorter, allowed by its hash and nothing else
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.DOTALL | re.IGNORECASE)
    assert len(scripts) == 1 and page.lower().count("<script") == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert "alert" not in scripts[0]
    # every src/href is a data: URI, and nothing names a location outside the file
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert not re.search(r"https?://", page)
    for svg in svgs(page):
        assert set(re.findall(r"https?://[^\"'<> ]+", svg)) <= SVG_IDENTIFIERS
        assert "<script" not in svg and "<img" not in svg  # ids in chart labels are SVG text


def test_markdown_keeps_hostile_ids_inside_their_cell(hostile_report):
    md = (hostile_report / "report.md").read_text()
    assert IMG not in md and EVIL not in md  # no raw HTML for a merge request's viewer
    t = find(md_tables(md), "Riskiest")
    assert {EVIL, IMG, MARKUP, PIPE} <= {r[0] for r in t["rows"]}
    assert all(len(r) == len(t["header"]) for r in t["rows"])


# --------------------------------------------------------------------------------------------
# Golden: the numbers shown are the numbers in the Parquet files


def _check_scenarios(tables, sc: pd.DataFrame, md: bool) -> None:
    fixed = sc[~sc.kind.isin(["montecarlo", "replay"])]
    t = find(tables, "Scenarios")
    assert [r[0] for r in t["rows"]] == list(fixed.scenario)
    col = {h: i for i, h in enumerate(t["header"])}
    for row, (_, r) in zip(t["rows"], fixed.iterrows()):
        assert row[col["Kind"]] == r.kind
        assert_usd(row[col["Exchange P&L (USD)"]], r.pnl_total)
        assert number(row[col["Liquidatable"]]) == r.accounts_liquidatable
        assert_usd(row[col["Bad debt (USD)"]], r.bad_debt)
        assert_usd(row[col["Fund after (USD)"]], r.insurance_fund_after)
        assert_usd(row[col["Socialised loss (USD)"]], r.socialized_loss)
    rnd = sc[sc.kind == "montecarlo"]
    worst = find(tables, "Worst 20 of 200 random")
    expect = rnd.sort_values(["bad_debt", "pnl_total"], ascending=[False, True]).head(20)
    assert [r[0] for r in worst["rows"]] == list(expect.scenario)


def _check_accounts(tables, acc: pd.DataFrame) -> None:
    t = find(tables, "Riskiest 20 accounts")
    expect = acc.assign(neg=-acc.shortfall_worst).sort_values(["neg", "account_id"]).head(20)
    assert [r[0] for r in t["rows"]] == list(expect.account_id)
    col = {h: i for i, h in enumerate(t["header"])}
    for row, (_, r) in zip(t["rows"], expect.iterrows()):
        for header, key in (("Equity (USD)", "equity"), ("Collateral value (USD)", "collateral_value"),
                            ("Maint. margin (USD)", "maintenance_margin"), ("Worst shortfall (USD)", "shortfall_worst"),
                            ("Worst P&L (USD)", "pnl_worst"), ("VaR 99% (USD)", "var_99"), ("ES 99% (USD)", "es_99")):
            assert_usd(row[col[header]], r[key])
        assert row[col["Worst scenario"]] == r.scenario_worst
        assert row[col["Liquidatable now"]] == ("yes" if r.liquidatable else "no")
        assert abs(number(row[col["P(liquidation)"]]) - r.p_liquidation) <= 0.0005 + 1e-12


def _check_headline(tables, summary: dict, sc: pd.DataFrame, md: bool) -> None:
    h = headline_of(tables, md)
    worst = sc.assign(neg_b=-sc.bad_debt, neg_s=-sc.shortfall_total).sort_values(["neg_b", "neg_s"], kind="mergesort").iloc[0]
    assert h["Worst scenario"] == summary["worst_scenario"] == worst.scenario
    assert_usd(h["Worst bad debt (USD)"], sc.bad_debt.max())
    assert_usd(h["Insurance fund (USD)"], summary["insurance_fund"])
    assert_usd(h["Fund after worst scenario (USD)"], worst.insurance_fund_after)
    rnd = sc[sc.kind == "montecarlo"]
    depleted = ((rnd.bad_debt > 0) & (rnd.bad_debt >= rnd.insurance_fund_before)).mean()
    assert abs(number(h["P(fund depleted)"].split(" (")[0]) - depleted) <= 0.0005 + 1e-12
    var, es = expected_var_es(rnd.pnl_total.to_numpy())
    v, e = h["Exchange VaR 99% / ES 99% (USD, random scenarios)"].split(" / ")
    assert_usd(v, var)
    assert_usd(e, es)


def _check_random_stats(tables, sc: pd.DataFrame) -> None:
    t = find(tables, "Exchange P&L over random")
    stats = {r[0]: r[1] for r in t["rows"]}
    var, es = expected_var_es(sc[sc.kind == "montecarlo"].pnl_total.to_numpy())
    assert_usd(stats["VaR 99% (USD, loss)"], var)
    assert_usd(stats["ES 99% (USD, loss)"], es)
    assert number(stats["Random scenarios"]) == 200


def _check_concentration(tables, acc: pd.DataFrame) -> None:
    t = find(tables, "Concentration")
    mm = np.sort(acc.maintenance_margin.to_numpy())[::-1]
    shares = {r[0]: number(r[1]) for r in t["rows"]}
    for k in (1, 10, 100):
        label = f"Top {k} account" + ("s" if k > 1 else "")
        assert abs(shares[label] - mm[:k].sum() / mm.sum()) <= 0.0005 + 1e-12


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_numbers_shown_equal_the_parquet_files(mc_report, fmt):
    summary = json.loads((mc_report / "summary.json").read_text())
    acc = pd.read_parquet(mc_report / "accounts.parquet")
    sc = pd.read_parquet(mc_report / "scenarios.parquet")
    assert len(sc[sc.kind == "montecarlo"]) == 200 and sc.bad_debt.max() > 0
    text = (mc_report / f"report.{fmt}").read_text()
    tables = md_tables(text) if fmt == "md" else html_tables(text)
    _check_headline(tables, summary, sc, fmt == "md")
    _check_scenarios(tables, sc, fmt == "md")
    _check_accounts(tables, acc)
    _check_random_stats(tables, sc)
    _check_concentration(tables, acc)


def test_a_long_list_of_named_scenarios_shows_its_worst_and_points_to_the_parquet(mc, tmp_path, monkeypatch):
    res = mc[2]
    fixed = res.scenarios[~res.scenarios.kind.isin(["montecarlo", "replay"])]
    assert len(fixed) > 3 and (fixed.bad_debt > 0).sum() >= 2
    monkeypatch.setattr(report, "MAX_FIXED_ROWS", 3)
    out = report.write(res, tmp_path / "r")
    for fmt in ("md", "html"):
        text = (out / f"report.{fmt}").read_text()
        tables = md_tables(text) if fmt == "md" else html_tables(text)
        t = find(tables, f"Worst 3 of {len(fixed)} scenarios")
        expect = fixed.sort_values(["bad_debt", "pnl_total"], ascending=[False, True], kind="mergesort").head(3)
        assert [r[0] for r in t["rows"]] == list(expect.scenario)
        assert "Every scenario is in scenarios.parquet." in text
    assert len(pd.read_parquet(out / "scenarios.parquet")) == len(res.scenarios)  # the file keeps them all


def test_html_sort_keys_are_the_values_to_the_cent(mc_report):
    """Sortable cells carry the number to the cent, so sorting is finer than the display."""
    page = (mc_report / "report.html").read_text()
    acc = pd.read_parquet(mc_report / "accounts.parquet")
    t = find(html_tables(page), "Riskiest")
    col = t["header"].index("Worst shortfall (USD)")
    body = page[page.index("<h2 id=\"accounts\">"):page.index("<h2 id=\"concentration\">")]
    rows = [r for r in re.findall(r"<tr>(.*?)</tr>", body) if "<td" in r]
    assert len(rows) == len(t["rows"]) == 20
    for row, shown in zip(rows, t["rows"]):
        keys = re.findall(r'<td[^>]*?(?: data-v="([^"]*)")?>', row)
        value = acc.set_index("account_id").shortfall_worst[shown[0]]
        assert abs(float(keys[col]) - value) <= 0.005 + 1e-9


def test_every_chart_is_an_svg_image_with_its_own_content(mc_report):
    page = (mc_report / "report.html").read_text()
    ids = re.findall(r'<figure id="chart-([a-z-]+)">', page)
    assert ids == ["bad-debt", "fund-after", "pnl-distribution", "riskiest", "concentration"]
    images = svgs(page)
    assert len(images) == len(ids) and len(set(images)) == len(images)
    assert all(s.lstrip().startswith("<?xml") and "<svg" in s for s in images)
    assert not any("<dc:date>" in s for s in images)


def test_pnl_distribution_is_omitted_with_a_note_without_random_scenarios(hostile_report):
    out = hostile_report
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert 'id="chart-pnl-distribution"' not in page
    assert "no random scenarios" in page and "no random scenarios" in md
    assert headline_of(html_tables(page))["P(fund depleted)"].startswith("n/a")


def test_reports_are_identical_for_identical_inputs(mc, mc_report, tmp_path):
    snap, scen, _ = mc
    again = report.write(stress.run(snap, scen, chunk_size=17), tmp_path / "b")
    assert (mc_report / "report.html").read_bytes() == (again / "report.html").read_bytes()
    assert (mc_report / "report.md").read_bytes() == (again / "report.md").read_bytes()
    ja, jb = (json.loads((x / "summary.json").read_text()) for x in (mc_report, again))
    ja.pop("runtime_seconds"), jb.pop("runtime_seconds")
    assert ja.keys() == jb.keys()
    for k in ja:
        if isinstance(ja[k], float):
            np.testing.assert_allclose(ja[k], jb[k], rtol=1e-9)
        else:
            assert ja[k] == jb[k], k


def test_runtime_does_not_change_the_report(hostile, tmp_path):
    res = hostile[2]
    a = report.write(dataclasses.replace(res, summary={**res.summary, "runtime_seconds": 1.0}), tmp_path / "a")
    b = report.write(dataclasses.replace(res, summary={**res.summary, "runtime_seconds": 99.0}), tmp_path / "b")
    for name in ("report.md", "report.html"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


# --------------------------------------------------------------------------------------------
# What the run has: optional columns, NaN, exposure, breaches


def test_missing_optional_columns_and_nan_values_are_shown_as_absent(mc, tmp_path):
    res = mc[2]
    acc = res.accounts.drop(columns=["var_99", "es_99", "p_liquidation", "bad_debt_worst"])
    acc.loc[acc.shortfall_worst.idxmax(), "pnl_worst"] = np.nan
    sc = res.scenarios.drop(columns=["shortfall_total", "insurance_fund_before"])
    summary = {k: v for k, v in res.summary.items() if k not in ("accounts_liquidatable", "total_maintenance_margin")}
    out = report.write(dataclasses.replace(res, accounts=acc, scenarios=sc, summary=summary), tmp_path / "r")
    page = (out / "report.html").read_text()
    t = find(html_tables(page), "Riskiest")
    assert "VaR 99% (USD)" not in t["header"] and "P(liquidation)" not in t["header"]
    assert t["rows"][0][t["header"].index("Worst P&L (USD)")] == "n/a"
    assert headline_of(html_tables(page))["Accounts liquidatable now"] == "n/a"
    assert "Shortfall (USD)" not in find(html_tables(page), "Scenarios")["header"]


def test_all_nan_optional_columns_are_left_out(hostile_report):
    page = (hostile_report / "report.html").read_text()
    header = find(html_tables(page), "Riskiest")["header"]
    assert "VaR 99% (USD)" not in header and "P(liquidation)" not in header  # NaN: no random scenarios


def test_exposure_by_underlying_sums_the_accounts_greeks(hostile, tmp_path):
    exposure = pd.DataFrame({
        "account_id": ["x", "y", "x", "z"],
        "underlying": ["BTC", "BTC", "ETH", "BTC"],
        "delta": [2.0, -0.5, 10.0, 1.0],
        "delta_usd": [180_000.0, -45_000.0, 30_000.0, 90_000.0],
        "gamma": [0.0, 0.0, 0.0, 0.0],
        "vega": [120.0, -20.0, 5.0, 0.0],
    })
    out = report.write(hostile[2], tmp_path / "r", exposure=exposure)
    assert (out / report.EXPOSURE_FILE).is_file()
    for fmt in ("md", "html"):
        text = (out / f"report.{fmt}").read_text()
        t = find(md_tables(text) if fmt == "md" else html_tables(text), "Exposure by underlying")
        rows = {r[0]: dict(zip(t["header"], r)) for r in t["rows"]}
        assert list(rows) == ["BTC", "ETH"]  # largest gross exposure first
        btc = rows["BTC"]
        assert number(btc["Net delta (coins)"]) == 2.5
        assert number(btc["Net delta (USD)"]) == 225_000
        assert number(btc["Gross delta (USD)"]) == 315_000
        assert number(btc["Vega (USD/vol pt)"]) == 100
        assert number(btc["Accounts"]) == 3
    assert 'id="chart-exposure"' in (out / "report.html").read_text()
    # written again without exposure: the stale exposure file goes, and so does a diff
    # against the report these files replace
    for name in report.DIFF_FILES:
        (out / name).write_text("a diff of the earlier report")
    report.write(hostile[2], out)
    assert not (out / report.EXPOSURE_FILE).exists()
    assert not any((out / name).exists() for name in report.DIFF_FILES)


def test_worst_scenarios_come_in_the_order_of_worst_scenario():
    """Bad debt, then total shortfall, then file order (SPEC section 5), so the first row of a
    table of worst scenarios is the headline's worst scenario."""
    sc = pd.DataFrame({"scenario": ["a", "b", "c", "d", "e"], "bad_debt": [49_000.0, 49_000.0, 0.0, 60_000.0, 49_000.0],
                       "shortfall_total": [49_500.0, 59_700.0, 1e9, 0.0, 59_700.0], "pnl_total": [0.0, 5.0, -1e9, 0.0, -9.0]})
    assert list(report.worst(sc, 4).scenario) == ["d", "b", "e", "a"]
    assert list(report.worst(sc.drop(columns="shortfall_total"), 5).scenario) == ["d", "a", "b", "e", "c"]


def test_exposure_by_underlying_matches_a_pandas_groupby():
    """NaN Greeks are skipped (NaN where a whole group is NaN), an account is counted once per
    underlying however many rows it has there, and a row with no underlying is in no group:
    as pandas' own groupby of the same frame gives."""
    rng = np.random.default_rng(7)
    n = 400
    exposure = pd.DataFrame({
        "account_id": rng.choice(["a", "b", "c", "d", None], n),
        "underlying": rng.choice(["BTC", "ETH", "SOL", "XRP", None], n),
        "delta": np.where(rng.random(n) < 0.3, np.nan, rng.normal(size=n)),
        "delta_usd": rng.normal(size=n) * 1e5,
        "vega": rng.normal(size=n),
        "gross_notional": np.abs(rng.normal(size=n)) * 1e6,
    })
    exposure.loc[exposure["underlying"] == "SOL", "delta"] = np.nan
    exposure.loc[exposure["underlying"] == "XRP", "account_id"] = None
    got = report.exposure_by_underlying(exposure).set_index("underlying")
    df = exposure.assign(gross_delta_usd=exposure["delta_usd"].abs(), gamma=np.nan)
    g = df.groupby("underlying")
    for c in ("delta", "delta_usd", "gross_delta_usd", "gamma", "vega", "gross_notional"):
        np.testing.assert_allclose(got[c].to_numpy(float), g[c].sum(min_count=1).reindex(got.index).to_numpy(float),
                                   rtol=1e-12, atol=1e-9, err_msg=c)
    assert np.isnan(got.loc["SOL", "delta"]) and np.isnan(got["gamma"]).all()
    assert got["accounts"].to_dict() == g["account_id"].nunique().to_dict() and got.loc["XRP", "accounts"] == 0
    assert list(got.index) == sorted(got.index, key=lambda u: (-got.loc[u, "gross_delta_usd"], u))


def test_a_matched_book_nets_to_zero_exposure_in_any_row_order():
    """Every account's Greeks matched by an account holding the opposite: the exchange nets to
    0 exactly, whatever the order of the rows; summed as they come, the rounding of the
    cancelling values left a few 1e-18 of gamma whose sign followed the order. A real net,
    however small beside the gross, is kept."""
    rng = np.random.default_rng(3)
    n = 500
    one = pd.DataFrame({"account_id": [f"a{i}" for i in range(n)], "underlying": rng.choice(["BTC", "ETH"], n),
                        "delta": rng.normal(size=n), "delta_usd": rng.normal(size=n) * 1e5,
                        "gamma": rng.normal(size=n) * 1e-5, "vega": rng.normal(size=n) * 37.3})
    other = one.assign(account_id=[f"b{i}" for i in range(n)],
                       **{c: -one[c] for c in ("delta", "delta_usd", "gamma", "vega")})
    book = pd.concat([one, other], ignore_index=True)
    raw = []
    for seed in range(4):
        rows = book.sample(frac=1.0, random_state=seed)
        got = report.exposure_by_underlying(rows).set_index("underlying").sort_index()
        for c in ("delta", "delta_usd", "gamma", "vega"):
            np.testing.assert_array_equal(got[c].to_numpy(), 0.0, err_msg=c)
        assert (got["gross_delta_usd"] > 0).all()
        raw.append(rows.groupby("underlying").gamma.sum().sort_index().to_numpy())
    assert any(np.any(r != 0.0) for r in raw)  # the plain sums do leave noise: the rule is needed
    # a net of a millionth of the gross is a position, not noise
    tilted = book.copy()
    tilted.loc[0, "vega"] += 1e-6 * np.abs(book.vega[book.underlying == book.underlying[0]]).sum()
    got = report.exposure_by_underlying(tilted).set_index("underlying")
    assert got.loc[book.underlying[0], "vega"] != 0.0
    # an overflowed Greek is shown as it is, not netted away (inf <= 1e-9 * inf)
    tilted.loc[0, "gamma"] = np.inf
    assert report.exposure_by_underlying(tilted).set_index("underlying").loc[book.underlying[0], "gamma"] == np.inf


def test_breached_limits_are_shown_in_red(hostile, tmp_path):
    breach = "worst bad debt 1,234 USD (crash-60) > max_bad_debt 0"
    out = report.write(hostile[2], tmp_path / "r", [breach])
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert re.search(r'<div class="breach"[^>]*>.*?' + re.escape(html_lib.escape(breach)), page, re.DOTALL)
    assert re.search(r'<tr class="breached"><th scope="row">Worst bad debt \(USD\)', page)
    assert "tr.breached th, tr.breached td { color: #b03a2e; }" in page
    assert f"- **{breach}**" in re.sub(r"\\(.)", r"\1", md).splitlines()
    assert "Worst bad debt (USD) **(limit breached)**" in md
    assert json.loads((out / "summary.json").read_text())["limit_breaches"] == [breach]
    clean = (report.write(hostile[2], tmp_path / "c") / "report.html").read_text()
    assert 'class="breached"' not in clean and 'class="breach"' not in clean


def test_failed_write_leaves_no_partial_folder(hostile, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "html", lambda ctx: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        report.write(hostile[2], tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.")]


# --------------------------------------------------------------------------------------------
# stress report


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_report_command_prints_headline_and_riskiest_accounts(mc_report):
    result = invoke("report", mc_report, "--top", "3")
    assert result.exit_code == 0, result.output
    summary = json.loads((mc_report / "summary.json").read_text())
    acc = pd.read_parquet(mc_report / "accounts.parquet")
    top = acc.assign(neg=-acc.shortfall_worst).sort_values(["neg", "account_id"]).account_id.tolist()
    assert summary["worst_scenario"] in result.stdout
    assert f"{round(summary['worst_bad_debt']):,}" in result.stdout
    for a in top[:3]:
        assert a in result.stdout
    assert top[3] not in result.stdout


def test_report_command_prints_one_account(mc_report):
    acc = pd.read_parquet(mc_report / "accounts.parquet")
    r = acc.iloc[7]
    result = invoke("report", mc_report, "--account", r.account_id)
    assert result.exit_code == 0, result.output
    assert r.account_id in result.stdout and r.scenario_worst in result.stdout
    assert f"{round(r.shortfall_worst):,}" in result.stdout


@pytest.mark.parametrize("account", [MARKUP, CLOSE])
def test_report_command_prints_hostile_ids_as_written(hostile_report, account):
    result = invoke("report", hostile_report, "--account", account)
    assert result.exit_code == 0, result.output
    assert f"account {account}" in result.stdout  # the title too
    assert result.stdout.count(account) >= 2
    listing = invoke("report", hostile_report)
    assert listing.exit_code == 0, listing.output
    assert account in listing.stdout


def test_report_command_unknown_account_exits_2(mc_report):
    result = invoke("report", mc_report, "--account", "no-such-account")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "accounts.parquet" in line and "no-such-account" in line


def test_report_command_limits_exit_1_when_breached(mc_report):
    worst = json.loads((mc_report / "summary.json").read_text())["worst_bad_debt"]
    p = json.loads((mc_report / "summary.json").read_text())["p_fund_depleted"]
    breached = invoke("report", mc_report, "--max-bad-debt", worst / 2)
    assert breached.exit_code == 1, breached.output
    assert "LIMIT BREACHED" in breached.stdout
    assert invoke("report", mc_report, "--max-bad-debt", worst * 2).exit_code == 0
    assert invoke("report", mc_report, "--max-p-fund-depleted", p + 0.5).exit_code == 0
    if p > 0:
        assert invoke("report", mc_report, "--max-p-fund-depleted", p / 2).exit_code == 1


def test_report_command_p_limit_without_random_scenarios_exits_2(hostile_report):
    result = invoke("report", hostile_report, "--max-p-fund-depleted", "0.01")
    assert result.exit_code == 2
    assert "summary.json" in one_line(result.stderr)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "accounts.parquet").unlink(), "accounts.parquet"),
    (lambda d: (d / "summary.json").unlink(), "summary.json"),
    (lambda d: (d / "summary.json").write_text("{not json"), "summary.json"),
    # NaN is Python's, not JSON's: read as a number, no limit would ever be beyond it
    (lambda d: (d / "summary.json").write_text((d / "summary.json").read_text().replace(
        '"worst_bad_debt": ', '"worst_bad_debt": NaN, "_was": ', 1)), "summary.json"),
    (lambda d: (d / "scenarios.parquet").write_text("not parquet"), "scenarios.parquet"),
    (lambda d: (d / "summary.json").write_text(json.dumps({**json.loads((d / "summary.json").read_text()), "accounts": "many"})),
     "summary.json"),
    (lambda d: pd.read_parquet(d / "accounts.parquet").drop(columns=["shortfall_worst"]).to_parquet(d / "accounts.parquet"),
     "shortfall_worst"),
])
def test_report_command_bad_folder_exits_2_naming_the_file(mc_report, tmp_path, damage, named):
    folder = _copy(mc_report, tmp_path / "copy")
    damage(folder)
    result = invoke("report", folder)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert named in one_line(result.stderr)


def test_report_command_missing_folder_exits_2(tmp_path):
    result = invoke("report", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "nowhere" in one_line(result.stderr)


# --------------------------------------------------------------------------------------------
# Night over night


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """Yesterday: the hostile snapshot. Today: account ``b`` has less collateral (so it is
    liquidatable now), a new account ``n`` appears and the others' positions grow. Same
    explicit scenarios."""
    root = tmp_path_factory.mktemp("nights")
    old_snap = stress.load_snapshot(hostile_snapshot(root / "old_snap"))
    old = report.write(stress.run(old_snap, explicit_scenarios(root, old_snap)), root / "old")
    # "n" first: every other account's holdings shift by one step, so their worst P&L moves
    folder = hostile_snapshot(root / "new_snap", ids=("n", EVIL, IMG, MARKUP, PIPE), extra_b=-4_999_000.0)
    new_snap = stress.load_snapshot(folder)
    new = report.write(stress.run(new_snap, explicit_scenarios(root, new_snap)), root / "new")
    return old, new


def test_diff_reports_changes_new_liquidatable_accounts_and_movers(two_nights, tmp_path):
    old, new = two_nights
    result = invoke("report", new, "--against", old, "--out", tmp_path / "d")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["diff.html", "diff.md"]
    s0, s1 = (json.loads((x / "summary.json").read_text()) for x in (old, new))
    a0, a1 = (pd.read_parquet(x / "accounts.parquet") for x in (old, new))
    newly = set(a1[a1.liquidatable].account_id) - set(a0[a0.liquidatable].account_id)
    assert "b" in newly
    both = a1.merge(a0, on="account_id", suffixes=("_1", "_0"))
    both["move"] = (both.pnl_worst_1 - both.pnl_worst_0).abs()
    first_mover = both.assign(neg=-both.move).sort_values(["neg", "account_id"]).iloc[0]
    for fmt in ("md", "html"):
        text = (tmp_path / "d" / f"diff.{fmt}").read_text()
        tables = md_tables(text) if fmt == "md" else html_tables(text)
        head = {r[0]: r[1:] for r in (tables[0]["rows"])}
        old_v, new_v, change = head["Worst bad debt (USD)"]
        assert_usd(old_v, s0["worst_bad_debt"])
        assert_usd(new_v, s1["worst_bad_debt"])
        assert abs(number(change) - (round(s1["worst_bad_debt"]) - round(s0["worst_bad_debt"]))) <= 1
        cov = head[report.COVERAGE_LABEL]
        for shown, s, x in zip(cov[:2], (s0, s1), (old, new)):
            if s["worst_bad_debt"] > 0:  # the fund at the worst scenario's prices, fees in
                w = pd.read_parquet(x / "scenarios.parquet").set_index("scenario").loc[s["worst_scenario"]]
                assert abs(number(shown) - (w.insurance_fund_before + w.fees) / s["worst_bad_debt"]) <= 0.0005 + 1e-12
        assert {r[0] for r in find(tables, "Newly liquidatable")["rows"]} == newly
        movers = find(tables, "Accounts whose worst P&L moved most")
        assert {r[0] for r in movers["rows"]} == set(both[both.move >= 0.005].account_id)  # unchanged ones left out
        assert movers["rows"][0][0] == first_mover.account_id
        assert_usd(movers["rows"][0][3], first_mover.pnl_worst_1 - first_mover.pnl_worst_0)
    page = (tmp_path / "d" / "diff.html").read_text()
    assert IMG not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert len(svgs(page)) == 2 and not re.search(r"https?://", page)


def test_diff_says_when_the_two_runs_were_set_up_differently(two_nights, tmp_path):
    # The same book under another margin model and liquidation mode moves every number: the
    # diff must say the setups differ, not present the change as the night's
    old, new = two_nights
    assert not report.diff(report.load(new), report.load(old))["setup"]  # set up alike: nothing said
    other = _copy(old, tmp_path / "old")
    s = json.loads((other / "summary.json").read_text())
    assert s["margin_model"] == "standard" and s["liquidation_mode"] == "full" and s["partial_target"] is None
    s.update(margin_model="portfolio", liquidation_mode="partial", partial_target=1.25)
    (other / "summary.json").write_text(json.dumps(s))
    result = invoke("report", new, "--against", other, "--out", tmp_path / "d")
    assert result.exit_code == 0, result.output
    said = "set up differently (Margin model, Liquidation, Partial close-out target (collateral / MM))"
    assert said in " ".join(result.output.split())
    for fmt in ("md", "html"):
        text = (tmp_path / "d" / f"diff.{fmt}").read_text()
        assert said in " ".join(text.split())
        head = {r[0]: r[1:] for r in (md_tables(text) if fmt == "md" else html_tables(text))[0]["rows"]}
        assert head["Margin model (setup differs)"] == ["portfolio", "standard", "changed"]
        assert head["Liquidation (setup differs)"] == ["partial", "full", "changed"]


def test_diff_headline_shows_its_values_at_80_columns(two_nights, tmp_path):
    # A log or a pipe is 80 columns: the headline's long labels must wrap, not push the older
    # and newer values off the table
    from typer.testing import CliRunner

    old, new = two_nights
    r = CliRunner().invoke(app, ["report", str(new), "--against", str(old), "--out", str(tmp_path / "d")],
                           terminal_width=80)
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= 80
    s1 = json.loads((new / "summary.json").read_text())
    head = r.output.split("Newly liquidatable")[0]
    assert "Older" in head and "Change" in head and f"{round(s1['worst_bad_debt']):,}" in head


def test_diff_is_written_into_the_newer_report_by_default(two_nights, tmp_path):
    old, new = two_nights
    folder = _copy(new, tmp_path / "new")
    result = invoke("report", folder, "--against", old)
    assert result.exit_code == 0, result.output
    assert (folder / "diff.md").is_file() and (folder / "diff.html").is_file()


def test_diff_limits_and_bad_older_folder(two_nights, tmp_path):
    old, new = two_nights
    result = invoke("report", new, "--against", old, "--out", tmp_path / "d", "--max-bad-debt", "0")
    worst = json.loads((new / "summary.json").read_text())["worst_bad_debt"]
    assert result.exit_code == (1 if worst > 0 else 0)
    if worst > 0:
        assert "max_bad_debt" in (tmp_path / "d" / "diff.md").read_text().replace("\\_", "_")  # as rendered
    bad = invoke("report", new, "--against", tmp_path / "missing", "--out", tmp_path / "e")
    assert bad.exit_code == 2 and "missing" in one_line(bad.stderr)
    assert not (tmp_path / "e").exists()


def test_fund_coverage_values_the_fund_at_the_worst_scenarios_prices():
    """A fund of 30 BTC (2.7M USD now) in a -60% crash is worth 1.08M: against 2.47M of bad
    debt it covers 43.8%, not the 109.5% the snapshot value gave beside a socialised loss."""
    summary = {"as_of": "2026-11-23T08:00:00Z", "accounts": 10, "positions": 10, "scenarios": 2,
               "insurance_fund": 2_700_000.0, "worst_scenario": "crash-60", "worst_bad_debt": 2_466_409.0,
               "p_fund_depleted": None, "accounts_liquidatable": 0}
    sc = pd.DataFrame({"scenario": ["calm", "crash-60"], "kind": ["explicit"] * 2, "pnl_total": [0.0, -1.0],
                       "accounts_liquidatable": [0, 5], "bad_debt": [0.0, 2_466_409.0],
                       "insurance_fund_before": [2_700_000.0, 1_080_000.0], "fees": [0.0, 20_000.0],
                       "insurance_fund_after": [2_700_000.0, 0.0], "socialized_loss": [0.0, 1_366_409.0]})
    rows = {label: value for label, value, _ in report.headline(summary, sc)}
    assert number(rows[report.COVERAGE_LABEL]) == pytest.approx(1_100_000.0 / 2_466_409.0, abs=0.0005)
    assert report.worst_coverage(summary, sc.drop(columns=["insurance_fund_before"])) == pytest.approx(2_700_000.0 / 2_466_409.0)


def test_markdown_ids_with_underscores_and_tildes_render_as_written():
    """``_vip_`` and ``~~gone~~`` would render as emphasis and strike-through in a merge
    request's viewer: escaped, they show as written (CommonMark drops the backslashes)."""
    md = report._md_escape("_vip_ ~~gone~~ a|b")
    assert md == "\\_vip\\_ \\~\\~gone\\~\\~ a\\|b"
    assert re.sub(r"\\(.)", r"\1", md) == "_vip_ ~~gone~~ a|b"
