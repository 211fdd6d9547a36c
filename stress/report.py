"""The report folder (SPEC section 5): summary.json, accounts.parquet, scenarios.parquet,
report.md and report.html.

The folder is written to a temporary sibling and renamed into place, so a failed run leaves
no partial report. report.html is self-contained: charts are SVG images embedded as data URIs
(no network, no JavaScript), and every value passes through Jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FILES = ("summary.json", "accounts.parquet", "scenarios.parquet", "report.md", "report.html")


def _jsonable(x: Any) -> Any:
    """Plain JSON values: NaN and inf become null, numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def usd(x: Any) -> str:
    """USD with thousands separators, no cents (risk-officer reading)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.0f}"


def pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%"


def write(res: Any, out: str | Path, breaches: list[str] | None = None) -> Path:
    """Write the report folder ``out`` for a ``Result``; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = _jsonable({**res.summary, "limit_breaches": breaches or []})
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        res.accounts.to_parquet(tmp / "accounts.parquet", index=False)
        res.scenarios.to_parquet(tmp / "scenarios.parquet", index=False)
        ctx = _context(res, summary)
        (tmp / "report.md").write_text(_markdown(ctx))
        (tmp / "report.html").write_text(_html(ctx))
        if out.exists():
            for name in FILES:
                os.replace(tmp / name, out / name)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _context(res: Any, summary: dict) -> dict:
    acc, sc = res.accounts, res.scenarios
    top = acc.sort_values(["shortfall_worst", "account_id"], ascending=[False, True]).head(20)
    return {
        "summary": summary,
        "headline": [
            ("As of", summary["as_of"]),
            ("Accounts", f"{summary['accounts']:,}"),
            ("Positions", f"{summary['positions']:,}"),
            ("Scenarios", f"{summary['scenarios']:,}"),
            ("Insurance fund (USD)", usd(summary["insurance_fund"])),
            ("Worst scenario", summary["worst_scenario"]),
            ("Worst bad debt (USD)", usd(summary["worst_bad_debt"])),
            ("Worst bad debt / fund", pct(summary["worst_bad_debt"] / summary["insurance_fund"]) if summary["insurance_fund"] else "n/a"),
            ("P(fund depleted)", pct(summary["p_fund_depleted"])),
            ("Accounts liquidatable now", f"{summary['accounts_liquidatable']:,}"),
        ],
        "breaches": summary.get("limit_breaches", []),
        "scenario_rows": [
            [r.scenario, r.kind, usd(r.pnl_total), f"{r.accounts_liquidatable:,}", usd(r.shortfall_total),
             usd(r.bad_debt), usd(r.insurance_fund_after), usd(r.socialized_loss)]
            for r in sc.itertuples()
        ],
        "scenario_header": ["Scenario", "Kind", "Exchange P&L", "Liquidatable", "Shortfall", "Bad debt", "Fund after", "Socialised"],
        "account_rows": [
            [r.account_id, usd(r.equity), usd(r.maintenance_margin), usd(r.pnl_worst), r.scenario_worst,
             usd(r.shortfall_worst), usd(r.var_99), pct(r.p_liquidation)]
            for r in top.itertuples()
        ],
        "account_header": ["Account", "Equity", "Maint. margin", "Worst P&L", "Worst scenario", "Worst shortfall", "VaR 99%", "P(liq.)"],
        "charts": _charts(res, top),
    }


def _markdown(ctx: dict) -> str:
    def table(header, rows):
        esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
        return "\n".join(lines)

    parts = ["# Stress report", ""]
    if ctx["breaches"]:
        parts += ["**Limits breached:**", ""] + [f"- {b}" for b in ctx["breaches"]] + [""]
    parts += [table(["", ""], ctx["headline"]), "", "## Scenarios", "", table(ctx["scenario_header"], ctx["scenario_rows"])]
    parts += ["", "## Riskiest accounts (by worst shortfall)", "", table(ctx["account_header"], ctx["account_rows"]), ""]
    return "\n".join(parts)


def _html(ctx: dict) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("stress", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2").render(**ctx)


def _svg(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _charts(res: Any, top: pd.DataFrame) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "stress"  # stable ids: identical inputs give identical files
    plt.rcParams["svg.fonttype"] = "none"
    sc = res.scenarios
    charts = []
    order = sc.sort_values("bad_debt", ascending=False).head(40)

    fig, ax = plt.subplots(figsize=(8, 0.25 * len(order) + 1))
    ax.barh(order.scenario.astype(str)[::-1], order.bad_debt[::-1] / 1e6, color="#b03a2e")
    ax.set_xlabel("bad debt, USD millions")
    ax.set_title("Bad debt per scenario")
    charts.append({"title": "Bad debt per scenario", "src": _svg(fig)})

    fig, ax = plt.subplots(figsize=(8, 0.25 * len(order) + 1))
    ax.barh(order.scenario.astype(str)[::-1], order.insurance_fund_after[::-1] / 1e6, color="#1f618d")
    ax.set_xlabel("insurance fund after, USD millions")
    ax.set_title("Insurance fund after each scenario")
    charts.append({"title": "Insurance fund after", "src": _svg(fig)})

    if len(top):
        fig, ax = plt.subplots(figsize=(8, 0.25 * len(top) + 1))
        ax.barh(top.account_id.astype(str)[::-1], top.shortfall_worst[::-1] / 1e3, color="#7d3c98")
        ax.set_xlabel("worst margin shortfall, USD thousands")
        ax.set_title("Riskiest accounts")
        charts.append({"title": "Riskiest accounts", "src": _svg(fig)})

    rnd = sc[sc.kind.isin(["montecarlo", "replay"])]
    if len(rnd):
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.hist(rnd.pnl_total / 1e6, bins=50, color="#566573")
        ax.set_xlabel("exchange P&L, USD millions")
        ax.set_title("Exchange P&L over random scenarios")
        charts.append({"title": "Exchange P&L distribution", "src": _svg(fig)})
    return charts
