"""The report folder (SPEC section 5): summary.json, accounts.parquet, scenarios.parquet,
report.md and report.html; reading a folder back; the night-over-night diff.

Conventions:

- Money is USD, shown with thousands separators and no cents; shares are shown as percent with
  one decimal; missing values (absent keys or columns, NaN, None) are shown as ``n/a``.
- The run's *random* scenarios are its ``montecarlo`` or ``replay`` rows (SPEC section 5);
  exchange VaR and ES of ``pnl_total`` are taken over them, losses positive: with the ``m``
  losses sorted ascending ``L(1) <= ... <= L(m)`` and ``k = ceil(0.99 m)``, ``VaR = L(k)`` and
  ``ES = mean(L(k), ..., L(m))``, as the engine does per account.
- Optional columns (``var_99``, ``p_liquidation``, ``bad_debt_worst``, ``insurance_fund_before``
  ...) are shown when present and not entirely NaN; a report never fails for lack of them.

The folder is written to a temporary sibling and renamed into place, so a failed run leaves
no partial report. report.html is self-contained: charts are SVG images embedded as data URIs,
no URL points outside the file, every value passes through Jinja2's autoescaping, and the only
script is a constant table sorter allowed by its hash in the page's Content-Security-Policy
(the tables are complete HTML without it).

Reports are deterministic: identical inputs give byte-identical report.md and report.html
(``runtime_seconds`` is not shown in them; SVG ids are salted with a constant and carry no
date).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

FILES = ("summary.json", "accounts.parquet", "scenarios.parquet", "report.md", "report.html")
EXPOSURE_FILE = "exposure.parquet"  # written only when report.write is given exposures
DIFF_FILES = ("diff.md", "diff.html")
RANDOM_KINDS = ("montecarlo", "replay")
LEVEL = 0.99  # VaR / ES confidence
TOP = 20  # riskiest accounts shown
MAX_BARS = 40  # scenarios per bar chart: the worst ones, so a 10,000-path run stays readable
TOP_RANDOM_ROWS = 20  # random scenarios listed in the scenario table (the worst by bad debt)
MAX_FIXED_ROWS = 500  # explicit, grid and event scenarios listed; beyond it, the worst ones
CONCENTRATION_TOP = (1, 10, 100)
LABEL_CHARS = 40  # chart tick labels are cut to this many characters (tables show ids whole)

# Columns a report folder cannot be read without (SPEC section 5).
ACCOUNT_COLUMNS = ("account_id", "equity", "collateral_value", "initial_margin", "maintenance_margin",
                   "liquidatable", "pnl_worst", "scenario_worst", "var_99", "es_99", "p_liquidation",
                   "shortfall_worst")
COVERAGE_LABEL = "Fund coverage (fund at the worst scenario's prices, fees in / its bad debt)"
SCENARIO_COLUMNS = ("scenario", "kind", "pnl_total", "accounts_liquidatable", "bad_debt",
                    "insurance_fund_after", "socialized_loss")


# --------------------------------------------------------------------------------------------
# Formatting: what a risk officer expects to read


def _missing(x: Any) -> bool:
    if x is None or x is pd.NA:
        return True
    try:
        return not math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def usd(x: Any) -> str:
    """USD with thousands separators, no cents: ``-1,234,568``; ``n/a`` when missing."""
    if _missing(x):
        return "n/a"
    r = round(float(x))
    return f"{r + 0:,.0f}"  # + 0 turns -0 into 0: a loss that rounds to nothing is no loss


def pct(x: Any) -> str:
    """A share (0.125) as percent with one decimal (``12.5%``); ``n/a`` when missing."""
    if _missing(x):
        return "n/a"
    v = round(100 * float(x), 1)
    return f"{v + 0:,.1f}%"


def count(x: Any) -> str:
    """An integer count with thousands separators."""
    if _missing(x):
        return "n/a"
    return f"{int(x):,}"


def num(x: Any) -> str:
    """A quantity without a unit (delta in coins, gamma): 4 significant digits, separators."""
    if _missing(x):
        return "n/a"
    v = float(x)
    if v != 0 and abs(v) < 1:
        return f"{v:.4g}"
    return f"{v:,.2f}"


def text(x: Any) -> str:
    return "n/a" if _missing(x) and not isinstance(x, str) else str(x)


def yes_no(x: Any) -> str:
    return "n/a" if _missing(x) else ("yes" if bool(x) else "no")


# --------------------------------------------------------------------------------------------
# Numbers the report derives (pure functions of the Result's tables)


def tail_loss(pnl: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Empirical VaR and ES of a P&L sample, as positive losses (USD).

    With the ``m`` losses ``-pnl`` sorted ascending and ``k = ceil(level * m)``:
    ``VaR = L(k)`` (the lower empirical quantile) and ``ES = mean(L(k), ..., L(m))``.
    Missing (NaN) values are left out; NaN for an empty sample.
    """
    loss = -np.asarray(pnl, dtype=np.float64)
    loss = np.sort(loss[np.isfinite(loss)])
    m = len(loss)
    if m == 0:
        return math.nan, math.nan
    k = math.ceil(level * m - 1e-9)  # 0.99 * 100 must give 99, not 100 by rounding
    return float(loss[k - 1]), float(loss[k - 1 :].mean())


def random_rows(scenarios: pd.DataFrame) -> pd.DataFrame:
    """The run's random scenarios (Monte Carlo paths or replay windows), file order."""
    return scenarios[scenarios["kind"].astype(str).isin(RANDOM_KINDS)]


def _some_ids(ids: set, shown: int = 20) -> str:
    """How many ``ids``, and the first ``shown`` of them by id: an officer acts on names."""
    if not ids:
        return "0"
    first = sorted(map(str, ids))[:shown]
    return f"{count(len(ids))}: " + ", ".join(first) + (", ..." if len(ids) > shown else "")


def _worst_row(summary: dict, scenarios: pd.DataFrame) -> pd.Series | dict:
    """The row of ``summary``'s worst scenario in ``scenarios`` (``{}`` when it has none)."""
    worst = scenarios[scenarios["scenario"].astype(str) == str(summary.get("worst_scenario"))]
    return worst.iloc[0] if len(worst) else {}


def worst_coverage(summary: dict, scenarios: pd.DataFrame, w: pd.Series | dict | None = None) -> float:
    """``coverage`` in the worst scenario (its row ``w``, looked up when not given): the fund at
    that scenario's prices with the fees it received (``insurance_fund_before`` + ``fees``; a
    coin fund is worth less in a crash) over its bad debt. A report without those columns
    falls back to the fund at the snapshot."""
    w = _worst_row(summary, scenarios) if w is None else w
    fund = summary.get("insurance_fund")
    if not _missing(w.get("insurance_fund_before")):
        fund = float(w["insurance_fund_before"]) + (0.0 if _missing(w.get("fees")) else float(w["fees"]))
    return coverage(fund, summary.get("worst_bad_debt"))


def coverage(fund: Any, bad_debt: Any) -> float:
    """Insurance fund / worst bad debt (1.0 = the fund exactly covers it); NaN when there is
    no bad debt (nothing to cover) or either number is missing."""
    if _missing(fund) or _missing(bad_debt) or float(bad_debt) <= 0:
        return math.nan
    return float(fund) / float(bad_debt)


def riskiest(accounts: pd.DataFrame, n: int = TOP) -> pd.DataFrame:
    """The ``n`` accounts with the largest worst-case margin shortfall (ties: account id)."""
    s = pd.to_numeric(accounts["shortfall_worst"], errors="coerce").fillna(-np.inf).to_numpy(np.float64)
    rows = np.arange(len(s))
    if 0 < n < len(s) // 4:
        # sort only the rows that can make the table (a full sort of a million rows is most of
        # the report's time): those above the n-th largest value, and the first ids among the
        # rows tied with it
        cut = np.partition(s, len(s) - n)[len(s) - n]
        above, tied = np.flatnonzero(s > cut), np.flatnonzero(s == cut)
        ids = accounts["account_id"].to_numpy()[tied].astype(str)
        tied = tied[np.argsort(ids, kind="stable")[: n - len(above)]]
        rows = np.sort(np.concatenate([above, tied]))
    df = accounts.iloc[rows]
    df = df.assign(_s=s[rows], _id=df["account_id"].astype(str))
    df = df.sort_values(["_s", "_id"], ascending=[False, True], kind="mergesort")
    return df.drop(columns=["_s", "_id"]).head(n)


def concentration(margin: Sequence[float], tops: Sequence[int] = CONCENTRATION_TOP) -> dict:
    """Share of the total maintenance margin held by the largest accounts.

    Returns ``{"total": USD, "shares": [(k, share of the top k)], "curve": (k, share) arrays}``
    with the curve over every k (a Lorenz-style curve read from the top). Missing margins
    count as 0; shares are NaN when the total is 0.
    """
    mm = np.sort(np.nan_to_num(np.asarray(margin, dtype=np.float64), nan=0.0).clip(min=0))[::-1]
    total = float(mm.sum())
    cum = np.cumsum(mm) / total if total > 0 else np.full(len(mm), np.nan)
    shares = [(k, float(cum[min(k, len(mm)) - 1]) if len(mm) else math.nan) for k in tops]
    return {"total": total, "shares": shares, "curve": (np.arange(1, len(mm) + 1), cum)}


# A net Greek within this fraction of its accounts' gross (the sum of |value|) is reported as 0:
# summing a million accounts' values in float64 can leave rounding of up to about n * 2.2e-16
# of the gross (2e-10 at 1M rows) where longs and shorts cancel exactly, and any real net is
# far above a billionth of the gross.
NET_ZERO = 1e-9


def exposure_by_underlying(exposure: pd.DataFrame) -> pd.DataFrame:
    """Exchange-wide exposure per underlying from per-account Greeks (``stress.greeks``).

    Columns: ``underlying``; ``delta`` (net, units of the underlying); ``delta_usd`` (net USD
    delta); ``gross_delta_usd`` (sum of the accounts' |USD delta|: longs and shorts both
    counted, the gross directional exposure); ``gross_notional`` (sum of position notionals,
    when the input has it); ``gamma``; ``vega`` (USD per vol point); and ``accounts`` when the
    input has ``account_id``. Missing Greek columns are NaN. A net Greek within ``NET_ZERO`` of
    its gross is 0 (rounding of longs and shorts that cancel).
    """
    # Sums by integer codes (bincount), not a pandas groupby of the frame: at 1M accounts the
    # frame has 2.4M rows, and copying it to group it took about 1 s of the report.
    # factorized as given, then named as text: astype(str) first would make a missing underlying
    # the group "None" or "nan" under pandas 2 (pandas 3 keeps it missing)
    codes, names = pd.factorize(exposure["underlying"], sort=True)
    names = pd.Index(names).astype(str)
    keep = slice(None) if (codes >= 0).all() else codes >= 0  # a row with no underlying is in no group
    codes, U = codes[keep], len(names)  # every underlying named here has a row

    def total(values: np.ndarray | None) -> np.ndarray:
        """Per underlying, the sum of the values that are not NaN; NaN where all are."""
        if values is None:
            return np.full(U, np.nan)
        v = np.asarray(values, np.float64)[keep]
        nan = np.isnan(v)
        if not nan.any():  # the common case: no mask to apply
            return np.bincount(codes, weights=v, minlength=U).astype(np.float64)
        out = np.bincount(codes[~nan], weights=v[~nan], minlength=U).astype(np.float64)
        out[np.bincount(codes[~nan], minlength=U) == 0] = np.nan
        return out

    def net(values: np.ndarray | None) -> np.ndarray:
        """``total``, with 0 where it is within ``NET_ZERO`` of the sum of the magnitudes: a book
        of longs matched by shorts nets to rounding noise (about 1e-18 of gamma), whose sign and
        size change with the row order; the report shows it as 0, not as a position."""
        out = total(values)
        if values is None:
            return out
        return np.where(np.isfinite(out) & (np.abs(out) <= NET_ZERO * total(np.abs(values))), 0.0, out)

    col = lambda c: exposure[c].to_numpy(np.float64, na_value=np.nan) if c in exposure else None  # noqa: E731
    delta_usd = col("delta_usd")
    g = pd.DataFrame({"underlying": names, "delta": net(col("delta")), "delta_usd": net(delta_usd),
                      "gross_delta_usd": total(None if delta_usd is None else np.abs(delta_usd)),
                      "gamma": net(col("gamma")), "vega": net(col("vega"))})
    if "gross_notional" in exposure:
        g["gross_notional"] = total(col("gross_notional"))
    if "account_id" in exposure:
        acc = pd.factorize(exposure["account_id"])[0][keep]
        pairs = np.sort(acc[acc >= 0].astype(np.int64) * U + codes[acc >= 0])  # (account, underlying)
        first = np.r_[True, pairs[1:] != pairs[:-1]] if len(pairs) else np.zeros(0, bool)
        g["accounts"] = np.bincount(pairs[first] % U, minlength=U).astype(np.int64)  # np.unique: 40x slower
    return g.sort_values(["gross_delta_usd", "underlying"], ascending=[False, True], kind="mergesort")


# --------------------------------------------------------------------------------------------
# Tables: one description, rendered to Markdown, HTML and rich


@dataclasses.dataclass(frozen=True)
class Column:
    """How one column of a DataFrame is shown: its header, formatter and alignment."""

    key: str
    header: str
    fmt: Callable[[Any], str]
    numeric: bool = True
    optional: bool = False  # left out when absent or entirely NaN
    sort_digits: int = 2  # decimals of the sort value: cents for money (see _sort_key)


ACCOUNT_TABLE = (
    Column("account_id", "Account", text, numeric=False),
    Column("equity", "Equity (USD)", usd),
    Column("collateral_value", "Collateral value (USD)", usd),
    Column("maintenance_margin", "Maint. margin (USD)", usd),
    Column("liquidatable", "Liquidatable now", yes_no, numeric=False),
    Column("shortfall_worst", "Worst shortfall (USD)", usd),
    Column("pnl_worst", "Worst P&L (USD)", usd),
    Column("scenario_worst", "Worst scenario", text, numeric=False),
    Column("bad_debt_worst", "Worst bad debt (USD)", usd, optional=True),
    Column("var_99", "VaR 99% (USD)", usd, optional=True),
    Column("es_99", "ES 99% (USD)", usd, optional=True),
    Column("p_liquidation", "P(liquidation)", pct, optional=True, sort_digits=6),
    Column("adl_loss_worst", "ADL loss, worst (USD)", usd, optional=True),
)

# The riskiest accounts in a terminal: the columns that fit 80 characters.
ACCOUNT_BRIEF = tuple(c for c in ACCOUNT_TABLE if c.key in (
    "account_id", "maintenance_margin", "shortfall_worst", "pnl_worst", "scenario_worst", "p_liquidation"))

SCENARIO_TABLE = (
    Column("scenario", "Scenario", text, numeric=False),
    Column("kind", "Kind", text, numeric=False),
    Column("pnl_total", "Exchange P&L (USD)", usd),
    Column("accounts_liquidatable", "Liquidatable", count),
    Column("liquidated_notional", "Notional closed (USD)", usd, optional=True),
    Column("shortfall_total", "Shortfall (USD)", usd, optional=True),
    Column("bad_debt", "Bad debt (USD)", usd),
    Column("fees", "Fees (USD)", usd, optional=True),
    Column("impact_cost", "Impact (USD)", usd, optional=True),
    Column("insurance_fund_before", "Fund before (USD)", usd, optional=True),
    Column("insurance_fund_after", "Fund after (USD)", usd),
    Column("socialized_loss", "Socialised loss (USD)", usd),
    Column("adl_total", "ADL charged (USD)", usd, optional=True),
)

EXPOSURE_TABLE = (
    Column("underlying", "Underlying", text, numeric=False),
    Column("delta", "Net delta (coins)", num, sort_digits=6),
    Column("delta_usd", "Net delta (USD)", usd),
    Column("gross_delta_usd", "Gross delta (USD)", usd),
    Column("gross_notional", "Gross notional (USD)", usd, optional=True),
    Column("gamma", "Gamma (USD/coin²)", num, optional=True, sort_digits=12),
    Column("vega", "Vega (USD/vol pt)", usd, optional=True),
    Column("accounts", "Accounts", count, optional=True),
)


def _shown(df: pd.DataFrame, columns: Sequence[Column]) -> list[Column]:
    out = []
    for c in columns:
        if c.key not in df.columns:
            continue
        if c.optional and pd.to_numeric(df[c.key], errors="coerce").isna().all() and len(df):
            continue
        out.append(c)
    return out


def _sort_key(v: Any, digits: int = 2) -> str:
    """The value a sortable HTML cell carries (``data-v``), finer than what it shows.

    Rounded to ``digits`` decimals (cents for money) rather than written in full: exchange
    totals are sums whose last bit depends on summation order, and the report must not."""
    if isinstance(v, (bool, np.bool_)):
        return "1" if v else "0"
    if isinstance(v, (int, float, np.integer, np.floating)) and not _missing(v):
        return f"{round(float(v), digits) + 0:.{digits}f}"
    return ""


def table(df: pd.DataFrame, columns: Sequence[Column], title: str = "", note: str = "") -> dict:
    """A table as plain data: header, rows of ``(text, sort value)`` cells, alignment."""
    cols = _shown(df, columns)
    rows = [[(c.fmt(r[c.key]), _sort_key(r[c.key], c.sort_digits) if c.numeric else "") for c in cols]
            for r in df.to_dict("records")]
    return {"title": title, "note": note, "header": [c.header for c in cols],
            "numeric": [c.numeric for c in cols], "rows": rows}


def _pairs(title: str, pairs: Sequence[tuple[str, str]], header=("", ""), note: str = "") -> dict:
    """A two-column table of label/value pairs."""
    return {"title": title, "note": note, "header": list(header), "numeric": [False, True],
            "rows": [[(k, ""), (v, "")] for k, v in pairs]}


def _md_escape(v: str) -> str:
    """Backslash-escape what would end a table cell, become HTML, or turn an id into emphasis
    or strike-through (``_vip_``, ``~~gone~~``) in a merge request's viewer (CommonMark shows
    ``\\<`` as ``<``); line breaks become spaces."""
    return re.sub(r"([\\|<>&*_~`\[\]])", r"\\\1", str(v)).replace("\n", " ")


def _md_table(t: dict, escape: bool = True) -> str:
    cell = _md_escape if escape else str
    align = ["---:" if n else "---" for n in t["numeric"]]
    lines = ["| " + " | ".join(cell(h) for h in t["header"]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v, _ in row) + " |" for row in t["rows"]]
    return "\n".join(lines)


def _md_section(t: dict, level: str = "##") -> list[str]:
    out = [f"{level} {_md_escape(t['title'])}", ""] if t["title"] else []
    if t["note"]:
        out += [_md_escape(t["note"]), ""]
    if t["rows"]:
        out += [_md_table(t), ""]
    return out


# --------------------------------------------------------------------------------------------
# Writing the report folder


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


def write(res: Any, out: str | Path, breaches: list[str] | None = None,
          exposure: pd.DataFrame | None = None) -> Path:
    """Write the report folder ``out`` for a ``Result``; returns its path.

    Args:
      res: the run (``accounts``, ``scenarios``, ``summary``).
      out: the folder (created, or its report files replaced).
      breaches: limit breaches, one sentence each (shown in red, kept in summary.json).
      exposure: optional per-account Greeks (``stress.greeks(snap)``: ``underlying``,
        ``delta``, ``delta_usd``, ``gamma``, ``vega``); adds the exposure-by-underlying section
        and ``exposure.parquet``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = _jsonable({**res.summary, "limit_breaches": breaches or []})
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        frames = {"accounts.parquet": res.accounts, "scenarios.parquet": res.scenarios}
        names = list(FILES)
        if exposure is not None:
            frames[EXPOSURE_FILE] = exposure
            names.append(EXPOSURE_FILE)
        # Parquet encoding runs in Arrow's C++ with the GIL released, so the tables are written
        # on a thread while the charts (pure Python) are drawn: at 1M accounts, 0.7 s of 3 s.
        # Both only read the frames.
        with ThreadPoolExecutor(max_workers=1) as pool:
            written = pool.submit(lambda: [df.to_parquet(tmp / name, index=False) for name, df in frames.items()])
            ctx = context(summary, res.accounts, res.scenarios, exposure)
            (tmp / "report.md").write_text(markdown(ctx))
            (tmp / "report.html").write_text(html(ctx))
            written.result()
        if out.exists():
            for name in names:
                os.replace(tmp / name, out / name)
            # files of an earlier run here would describe another run: its exposure, and a
            # night-over-night diff of the report these files replace
            for stale in ((EXPOSURE_FILE,) if exposure is None else ()) + DIFF_FILES:
                if (out / stale).exists():
                    (out / stale).unlink()
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _breached(breaches: Sequence[str]) -> set[str]:
    """Which limits (``max_bad_debt``, ``max_p_fund_depleted``) the breach sentences name."""
    return {k for k in ("max_bad_debt", "max_p_fund_depleted") if any(k in b for b in breaches)}


def headline(summary: dict, scenarios: pd.DataFrame) -> list[tuple[str, str, bool]]:
    """The answers at a glance: ``(label, value, breached)`` rows."""
    breached = _breached(summary.get("limit_breaches") or [])
    fund, bad = summary.get("insurance_fund"), summary.get("worst_bad_debt")
    w = _worst_row(summary, scenarios)
    n_acc = summary.get("accounts")
    liq = summary.get("accounts_liquidatable")
    rnd = random_rows(scenarios)
    m = len(rnd)
    p = summary.get("p_fund_depleted")
    p_text = pct(p)
    if not _missing(p) and m:
        p_text += f" ({count(round(float(p) * m))} of {count(m)} random scenarios)"
    elif _missing(p):
        p_text = "n/a (no random scenarios)"
    cov = worst_coverage(summary, scenarios, w)
    rows = [
        ("As of", text(summary.get("as_of")), False),
        ("Accounts / positions / scenarios",
         f"{count(n_acc)} / {count(summary.get('positions'))} / {count(summary.get('scenarios'))}", False),
        ("Worst scenario", text(summary.get("worst_scenario")), False),
        ("Worst bad debt (USD)", usd(bad), "max_bad_debt" in breached),
        ("Insurance fund (USD)", usd(fund), False),
        (COVERAGE_LABEL, "n/a (no bad debt)" if _missing(cov) else pct(cov), False),
        ("Fund after worst scenario (USD)", usd(w.get("insurance_fund_after")) if len(w) else "n/a", False),
        ("Socialised loss in worst scenario (USD)", usd(w.get("socialized_loss")) if len(w) else "n/a", False),
        ("P(fund depleted)", p_text, "max_p_fund_depleted" in breached),
        ("Accounts liquidatable now",
         count(liq) + (f" ({pct(liq / n_acc)} of accounts)" if not _missing(liq) and not _missing(n_acc) and n_acc else ""),
         False),
    ]
    if m:
        var, es = tail_loss(rnd["pnl_total"])
        rows.append(("Exchange VaR 99% / ES 99% (USD, random scenarios)", f"{usd(var)} / {usd(es)}", False))
    else:  # shown as n/a, as P(fund depleted) is: a missing row reads as an oversight
        rows.append(("Exchange VaR 99% / ES 99% (USD, random scenarios)", "n/a (no random scenarios)", False))
    return rows


DETAIL_KEYS = {  # summary keys beyond the headline, and how to show them
    "random_scenarios": ("Random scenarios", count),
    "total_equity": ("Total equity (USD)", usd),
    "total_initial_margin": ("Total initial margin (USD)", usd),
    "total_maintenance_margin": ("Total maintenance margin (USD)", usd),
    "margin_model": ("Margin model", text),
    "haircut_model": ("Collateral haircuts", text),
    "risk_limit_tiers": ("Risk-limit tiers", yes_no),
    "liquidation_mode": ("Liquidation", text),
    "partial_target": ("Partial close-out target (collateral / MM)", lambda x: "n/a" if x is None else f"{x:g}"),
    "liquidation_fee_rate": ("Liquidation fee (of notional)", lambda x: f"{x:.4%}"),
    "price_impact": ("Price impact on", lambda x: ", ".join(x) if x else "none"),
    "oracle_lag_steps": ("Oracle lag (path steps)", count),
    "adl": ("Auto-deleveraging", yes_no),
    "dtype": ("Floating point", text),
}
# How a run was set up: keys whose difference between two reports is not the market's doing
SETUP_KEYS = ("margin_model", "haircut_model", "risk_limit_tiers", "liquidation_mode", "partial_target",
              "liquidation_fee_rate", "price_impact", "oracle_lag_steps", "adl")


HEADLINE_KEYS = {"as_of", "accounts", "positions", "scenarios", "worst_scenario", "worst_bad_debt", "insurance_fund",
                 "p_fund_depleted", "accounts_liquidatable", "limit_breaches",
                 "runtime_seconds"}  # not shown at all: it would make identical runs differ


def _summary_value(key: str, v: Any) -> str | None:
    """A summary value no one told the report about: shares for ``p_*`` keys, counts for
    integers, USD for other numbers (money is USD unless the name says otherwise); ``None``
    for lists and tables, which have no one-cell form."""
    if isinstance(v, (list, dict)):
        return None
    if isinstance(v, bool):
        return yes_no(v)
    if key.startswith("p_") and (v is None or isinstance(v, (int, float))):
        return pct(v)
    if isinstance(v, int):
        return count(v)
    if isinstance(v, float) or v is None:
        return usd(v)
    return text(v)


def _details(summary: dict) -> list[tuple[str, str]]:
    """Every summary value beyond the headline: the known ones first, then the rest by name."""
    out = [(label, fmt(summary[k])) for k, (label, fmt) in DETAIL_KEYS.items() if k in summary]
    for k in sorted(set(summary) - HEADLINE_KEYS - set(DETAIL_KEYS)):
        v = _summary_value(k, summary[k])
        if v is not None:
            out.append((k, v))
    return out


def worst(scenarios: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` scenarios of largest bad debt; ties by the largest total shortfall (where the
    table has it: SPEC section 5 requires it of no report), then file order: the order of
    ``worst_scenario``, so a table's first row is the headline's scenario."""
    keys = ["bad_debt"] + (["shortfall_total"] if "shortfall_total" in scenarios else [])
    return scenarios.sort_values(keys, ascending=False, kind="mergesort").head(k)


def context(summary: dict, accounts: pd.DataFrame, scenarios: pd.DataFrame,
            exposure: pd.DataFrame | None = None, top: int = TOP) -> dict:
    """Everything report.md and report.html show, as formatted text (no further arithmetic)."""
    rnd = random_rows(scenarios)
    fixed = scenarios.drop(index=rnd.index)
    top_acc = riskiest(accounts, top)
    notes = []
    if len(fixed) <= MAX_FIXED_ROWS:  # named scenarios: all of them, in file order
        sc_tables = [table(fixed, SCENARIO_TABLE, "Scenarios", "" if len(fixed) else "No explicit, grid or event scenarios.")]
    else:  # thousands of rows would make the page unreadable (and slow to write)
        sc_tables = [table(worst(fixed, MAX_FIXED_ROWS), SCENARIO_TABLE,
                           f"Worst {MAX_FIXED_ROWS:,} of {len(fixed):,} scenarios (by bad debt, then shortfall)",
                           "Every scenario is in scenarios.parquet.")]
    if len(rnd):
        worst_rnd = worst(rnd, TOP_RANDOM_ROWS)
        sc_tables.append(table(worst_rnd, SCENARIO_TABLE,
                               f"Worst {len(worst_rnd):,} of {len(rnd):,} random scenarios (by bad debt, then shortfall)"))
        var, es = tail_loss(rnd["pnl_total"])
        pnl_stats = _pairs("Exchange P&L over random scenarios", [
            ("Random scenarios", count(len(rnd))),
            ("Kind", ", ".join(sorted(set(rnd["kind"].astype(str))))),
            ("Mean P&L (USD)", usd(rnd["pnl_total"].mean())),
            ("Worst P&L (USD)", usd(rnd["pnl_total"].min())),
            ("VaR 99% (USD, loss)", usd(var)),
            ("ES 99% (USD, loss)", usd(es)),
        ], ("Statistic", "Value"), "Losses are positive; VaR is the ceil(0.99 m)-th smallest of the m losses, "
                                  "ES the mean of the losses from it up.")
    else:
        pnl_stats = _pairs("Exchange P&L over random scenarios", [],
                           note="This run has no random scenarios (Monte Carlo or replay): "
                                "the P&L distribution, VaR and ES are omitted.")
        notes.append("P&L distribution omitted: no random scenarios (Monte Carlo or replay) in this run.")
    conc = concentration(accounts["maintenance_margin"]) if "maintenance_margin" in accounts else None
    conc_table = _pairs("Concentration of maintenance margin", [
        (f"Top {k:,} account{'s' if k > 1 else ''}", pct(s)) for k, s in conc["shares"]
    ] + [("Total maintenance margin (USD)", usd(conc["total"]))], ("Largest accounts", "Share of total")) if conc else None
    exp = exposure_by_underlying(exposure) if exposure is not None and len(exposure) else None
    exp_table = table(exp, EXPOSURE_TABLE, "Exposure by underlying",
                      "Sums over accounts of their Greeks: net delta, gross delta (sum of |USD delta|), "
                      "gamma and vega (USD per vol point).") if exp is not None else None
    breaches = list(summary.get("limit_breaches") or [])
    return {
        "title": "Stress report",
        "as_of": text(summary.get("as_of")),
        "breaches": breaches,
        "headline": headline(summary, scenarios),
        "scenario_tables": sc_tables,
        "pnl_stats": pnl_stats,
        "accounts_table": table(top_acc, ACCOUNT_TABLE, f"Riskiest {len(top_acc):,} accounts (by worst margin shortfall)",
                                "Worst shortfall is the largest maintenance margin minus collateral value over all "
                                "scenarios; the worst scenario and worst P&L are the account's own."),
        "concentration": conc_table,
        "exposure": exp_table,
        "details": _pairs("Run details", _details(summary), ("", "")),
        "charts": charts(summary, accounts, scenarios, top_acc, conc, exp),
        "notes": notes,
    }


def markdown(ctx: dict) -> str:
    """report.md: the headline and every table of report.html, no charts."""
    parts = [f"# {ctx['title']} — as of {_md_escape(ctx['as_of'])}", ""]
    if ctx["breaches"]:
        parts += ["**LIMITS BREACHED:**", ""] + [f"- **{_md_escape(b)}**" for b in ctx["breaches"]] + [""]
    head = {"title": "", "note": "", "header": ["", ""], "numeric": [False, True],
            "rows": [[(_md_escape(k) + (" **(limit breached)**" if b else ""), ""), (_md_escape(v), "")]
                     for k, v, b in ctx["headline"]]}
    parts += [_md_table(head, escape=False), ""]
    for t in ctx["scenario_tables"]:
        parts += _md_section(t)
    parts += _md_section(ctx["pnl_stats"])
    parts += _md_section(ctx["accounts_table"])
    if ctx["concentration"]:
        parts += _md_section(ctx["concentration"])
    if ctx["exposure"]:
        parts += _md_section(ctx["exposure"])
    parts += _md_section(ctx["details"])
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# HTML


def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("stress", "templates"),
        autoescape=True,  # every value: account ids and scenario names are user data
        undefined=jinja2.StrictUndefined,
    )


def _render(template: str, ctx: dict) -> str:
    """Render an HTML template with the table sorter, allowed by its hash and nothing else.

    The sorter is a template of the package included verbatim (``{% include "sort.js" %}``),
    so no value is ever marked safe; its hash is taken over exactly what the include emits.
    """
    env = _env()
    script = env.get_template("sort.js").render()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode("ascii")
    return env.get_template(template).render(**ctx, script_hash=f"sha256-{digest}")


def html(ctx: dict) -> str:
    """report.html from a ``context``."""
    return _render("report.html.j2", {**ctx, "by_id": {c["id"]: c for c in ctx["charts"]}})


# --------------------------------------------------------------------------------------------
# Charts: matplotlib SVG, embedded as data URIs, byte-stable


RC = {
    "svg.hashsalt": "stress",  # stable element ids: identical inputs give identical files
    "svg.fonttype": "none",  # text stays text: small files, no glyph paths
    "text.parse_math": False,  # a '$' in an account id is text, not mathtext
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
RED, BLUE, GREY, PURPLE, GREEN = "#b03a2e", "#1f618d", "#566573", "#7d3c98", "#1e8449"


def _label(s: Any) -> str:
    s = str(s)
    return s if len(s) <= LABEL_CHARS else s[: LABEL_CHARS - 1] + "…"


def _figure(height: float, width: float = 8.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def svg_data_uri(fig: Any) -> str:
    """A figure as an SVG data URI, with no date or random ids inside."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        # no date (determinism) and no creator or type URLs (nothing outside the file is named)
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _usd_axis(ax, label: str, axis: str = "x") -> None:
    """Label a USD axis in one unit chosen from its final range (USD, thousands or millions),
    so that every tick reads the same way. Call after everything is plotted."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    top = max(abs(lo), abs(hi))
    div, unit = (1e6, "USD millions") if top >= 2e6 else (1e3, "USD thousands") if top >= 2e4 else (1.0, "USD")
    digits = 1 if div == 1e6 else 0 if top >= 10 else 2  # a range of a few dollars needs cents
    fmt = FuncFormatter(lambda v, _: f"{round(v / div, digits) + 0:,.{digits}f}")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(fmt)
    target.set_label_text(f"{label}, {unit}")


def _barh(labels: Sequence[Any], values: np.ndarray, color: str, xlabel: str, title: str,
          extra: Callable[[Any, np.ndarray], None] | None = None) -> str:
    """A horizontal bar chart, first item on top."""
    import matplotlib

    with matplotlib.rc_context(RC):
        n = len(labels)
        fig = _figure(0.22 * n + 1.2)
        ax = fig.subplots()
        y = np.arange(n)[::-1]
        ax.barh(y, np.nan_to_num(values), color=color)
        ax.set_yticks(y, [_label(v) for v in labels])
        ax.set_title(title, loc="left")
        if extra:
            extra(ax, y)
        _usd_axis(ax, xlabel)
        return svg_data_uri(fig)


def charts(summary: dict, accounts: pd.DataFrame, scenarios: pd.DataFrame, top_acc: pd.DataFrame,
           conc: dict | None, exp: pd.DataFrame | None) -> list[dict]:
    """The report's charts: ``{"id", "title", "src" (data URI), "caption"}``."""
    out = []
    top = worst(scenarios, MAX_BARS)  # the order of worst_scenario: its bar comes first
    more = f" (worst {len(top)} of {len(scenarios):,})" if len(scenarios) > len(top) else ""
    fund = summary.get("insurance_fund")

    def fund_line(ax, _y):
        if not _missing(fund):
            ax.axvline(float(fund), color=GREY, ls="--", lw=1, label="insurance fund at the snapshot")
            ax.legend(loc="lower right", frameon=False)

    out.append({"id": "bad-debt", "title": "Bad debt per scenario" + more,
                "caption": "Scenarios sorted by bad debt, largest first (ties: total shortfall, then file order); "
                           "the dashed line is the insurance fund.",
                "src": _barh(top["scenario"], top["bad_debt"].to_numpy(float), RED, "bad debt",
                             "Bad debt per scenario" + more, fund_line)})

    def before(ax, y):
        if "insurance_fund_before" in top and not top["insurance_fund_before"].isna().all():
            ax.scatter(top["insurance_fund_before"].to_numpy(float), y, marker="|", s=120, color="black",
                       label="fund before", zorder=3)
            ax.legend(loc="lower right", frameon=False)

    out.append({"id": "fund-after", "title": "Insurance fund after each scenario" + more,
                "caption": "Same scenarios and order as the bad-debt chart; a bar at 0 means the fund is exhausted.",
                "src": _barh(top["scenario"], top["insurance_fund_after"].to_numpy(float), BLUE,
                             "insurance fund after", "Insurance fund after each scenario" + more, before)})

    rnd = random_rows(scenarios)
    if len(rnd):
        out.append({"id": "pnl-distribution", "title": "Exchange P&L over random scenarios",
                    "caption": "Histogram of the exchange's P&L; VaR and ES 99% marked as P&L (= -loss).",
                    "src": _pnl_histogram(rnd["pnl_total"].to_numpy(float))})
    if len(top_acc):
        out.append({"id": "riskiest", "title": f"Riskiest {len(top_acc)} accounts",
                    "caption": "Worst maintenance-margin shortfall over all scenarios; the grey bar is the shortfall now.",
                    "src": _riskiest_chart(top_acc)})
    if conc is not None and conc["total"] > 0:
        out.append({"id": "concentration", "title": "Concentration of maintenance margin",
                    "caption": "Share of the total maintenance margin held by the k largest accounts.",
                    "src": _concentration_chart(conc)})
    if exp is not None and len(exp):
        out.append({"id": "exposure", "title": "Exposure by underlying",
                    "caption": "Net and gross USD delta per underlying, and vega (USD per vol point).",
                    "src": _exposure_chart(exp)})
    return out


def _pnl_histogram(pnl: np.ndarray) -> str:
    import matplotlib

    var, es = tail_loss(pnl)
    pnl = pnl[np.isfinite(pnl)]
    with matplotlib.rc_context(RC):
        fig = _figure(3.2)
        ax = fig.subplots()
        ax.hist(pnl, bins=min(60, max(10, len(pnl) // 20)), color=GREY)
        ax.axvline(-var, color=RED, lw=1.5, label=f"VaR 99%: loss {usd(var)}")
        ax.axvline(-es, color=RED, lw=1.5, ls="--", label=f"ES 99%: loss {usd(es)}")
        ax.legend(frameon=False)
        ax.set_ylabel("scenarios")
        ax.set_title("Exchange P&L over random scenarios", loc="left")
        _usd_axis(ax, "exchange P&L")
        return svg_data_uri(fig)


def _riskiest_chart(top: pd.DataFrame) -> str:
    now = None
    if {"maintenance_margin", "collateral_value"} <= set(top.columns):
        now = (top["maintenance_margin"] - top["collateral_value"]).clip(lower=0).to_numpy(float)

    def current(ax, y):
        if now is not None:
            ax.barh(y, np.nan_to_num(now), color=GREY, height=0.4, label="shortfall now")
            ax.legend(loc="lower right", frameon=False)

    return _barh(top["account_id"], top["shortfall_worst"].to_numpy(float), PURPLE,
                 "worst margin shortfall", "Riskiest accounts", current)


def _concentration_chart(conc: dict) -> str:
    import matplotlib
    from matplotlib.ticker import FuncFormatter, NullFormatter

    k, share = conc["curve"]
    if len(k) > 400:  # log-spaced points: a million accounts must not make a million-point SVG
        pick = np.unique(np.geomspace(1, len(k), 400).round().astype(int)) - 1
        k, share = k[pick], share[pick]
    with matplotlib.rc_context(RC):
        fig = _figure(3.2)
        ax = fig.subplots()
        ax.plot(k, 100 * share, color=BLUE, lw=1.5)
        for top, s in conc["shares"]:
            if top <= len(k) and not _missing(s):
                ax.plot([top], [100 * s], "o", color=RED)
                ax.annotate(f"top {top:,}: {pct(s)}", (top, 100 * s), textcoords="offset points", xytext=(6, -12))
        ax.set_xscale("log")
        # plain tick labels: with mathtext off, log ticks would print their TeX source
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 105)
        ax.set_xlabel("largest accounts, k (log scale)")
        ax.set_ylabel("share of maintenance margin (%)")
        ax.set_title("Concentration of maintenance margin", loc="left")
        return svg_data_uri(fig)


def _exposure_chart(exp: pd.DataFrame) -> str:
    import matplotlib

    names = [_label(u) for u in exp["underlying"]]
    y = np.arange(len(names))[::-1]
    with matplotlib.rc_context(RC):
        fig = _figure(0.35 * len(names) + 1.4, 9.0)
        ax, av = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [2, 1]})
        ax.barh(y + 0.2, np.nan_to_num(exp["delta_usd"].to_numpy(float)), height=0.4, color=BLUE, label="net delta")
        ax.barh(y - 0.2, np.nan_to_num(exp["gross_delta_usd"].to_numpy(float)), height=0.4, color=GREY,
                label="gross delta")
        ax.set_yticks(y, names)
        ax.legend(frameon=False)
        ax.set_title("Exposure by underlying", loc="left")
        _usd_axis(ax, "delta")
        av.barh(y, np.nan_to_num(exp["vega"].to_numpy(float)), color=GREEN)
        _usd_axis(av, "vega per vol point")
        return svg_data_uri(fig)


# --------------------------------------------------------------------------------------------
# Reading a report folder back (``stress report``)


@dataclasses.dataclass(frozen=True)
class Report:
    """A report folder read back: no recomputation, only what the run wrote."""

    folder: Path
    summary: dict
    accounts: pd.DataFrame
    scenarios: pd.DataFrame
    exposure: pd.DataFrame | None = None


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of summary.json, shipped with the package."""
    return json.loads((resources.files("stress") / "schemas" / "summary.schema.json").read_text())


_JSON_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


class _NotJSON(ValueError):
    pass


def _not_json(constant: str) -> None:
    raise _NotJSON(f"{constant} is not a JSON value")


def check_summary(summary: Any, file: str = "summary.json") -> None:
    """The schema's required keys and top-level types, enough to read the folder safely.

    (Full validation against the schema, ranges included, is the ``jsonschema`` package's job
    in the tests; the tool itself needs no extra dependency.)

    Raises:
      InputError: naming the file and the key at fault.
    """
    sch = schema()
    if not isinstance(summary, dict):
        raise InputError(file, None, None, "expected a JSON object")
    for key in sch["required"]:
        if key not in summary:
            raise InputError(file, None, key, "missing key")
    for key, prop in sch["properties"].items():
        if key not in summary or "type" not in prop:
            continue
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        if not any(_JSON_TYPES[t](summary[key]) for t in types):
            raise InputError(file, None, key, f"{summary[key]!r} is not of type {' or '.join(types)}")


def _read_parquet(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(str(path), None, None, "missing: not a report folder written by `stress run`")
    try:
        df = pd.read_parquet(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(str(path), None, None, f"not a readable Parquet file ({type(exc).__name__})") from None
    for c in required:
        if c not in df.columns:
            raise InputError(str(path), None, c, "missing column")
    return df


def load(folder: str | Path) -> Report:
    """Read a report folder (summary.json, accounts.parquet, scenarios.parquet, and
    exposure.parquet when there is one).

    Raises:
      InputError: a missing folder or file, invalid JSON, a summary that breaks the schema's
        required keys or types, or a table without a required column.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(str(folder), None, None, "a file, not a report folder" if folder.exists() else "no such report folder")
    path = folder / "summary.json"
    if not path.is_file():
        raise InputError(str(path), None, None, "missing: not a report folder written by `stress run`")
    try:
        summary = json.loads(path.read_text(), parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f"line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else None
        raise InputError(str(path), line, None, f"invalid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    except _NotJSON as exc:  # Python's json reads NaN, which no limit is ever beyond: a limit would never fire
        raise InputError(str(path), None, None, f"invalid JSON ({exc}; a missing value is null)") from None
    check_summary(summary, str(path))
    accounts = _read_parquet(folder / "accounts.parquet", ACCOUNT_COLUMNS)
    scenarios = _read_parquet(folder / "scenarios.parquet", SCENARIO_COLUMNS)
    exp_path = folder / EXPOSURE_FILE
    exposure = _read_parquet(exp_path, ("underlying",)) if exp_path.is_file() else None
    return Report(folder, summary, accounts, scenarios, exposure)


def account_rows(rep: Report, account_id: str) -> list[tuple[str, str]]:
    """Every column of one account as ``(column, formatted value)``, plus its shortfall rank.

    Raises:
      InputError: no such account in accounts.parquet.
    """
    acc = rep.accounts
    hit = acc[acc["account_id"].astype(str) == account_id]
    if not len(hit):
        raise InputError(str(rep.folder / "accounts.parquet"), None, "account_id", f"no account {account_id!r}")
    row = hit.iloc[0]
    fmts = {c.key: c.fmt for c in ACCOUNT_TABLE} | {"initial_margin": usd}
    out = [(k, fmts.get(k, _generic)(row[k])) for k in acc.columns]
    order = riskiest(acc, len(acc))["account_id"].astype(str).tolist()
    out.append(("rank by worst shortfall", f"{order.index(account_id) + 1:,} of {len(acc):,}"))
    return out


def _generic(v: Any) -> str:
    """An unknown column: USD for money-like floats, counts for integers, text otherwise."""
    if isinstance(v, (bool, np.bool_)):
        return yes_no(v)
    if isinstance(v, (int, np.integer)):
        return count(v)
    if isinstance(v, (float, np.floating)):
        return usd(v) if _missing(v) or abs(v) >= 1 else num(v)
    return text(v)


# --------------------------------------------------------------------------------------------
# Night over night


def _signed(s: str) -> str:
    """A change reads with its sign: ``+1,234``, ``-1,234``, ``0``."""
    return s if s.startswith("-") or s in ("0", "0.0%", "n/a") else "+" + s


def signed_usd(x: Any) -> str:
    return _signed(usd(x))


def _change(new: Any, old: Any, fmt: Callable[[Any], str]) -> str:
    if _missing(new) or _missing(old):
        return "n/a"
    return _signed(fmt(float(new) - float(old)))


def diff(new: Report, old: Report, top: int = TOP, breaches: Sequence[str] | None = None) -> dict:
    """Night over night: what changed from ``old`` (the earlier report) to ``new``.

    - headline: worst scenario, worst bad debt, insurance fund, fund coverage
      (fund / worst bad debt), P(fund depleted), accounts liquidatable, total maintenance margin;
      each with the older and newer value and the change (newer - older);
    - ``new_liquidatable``: accounts liquidatable now that were not (or did not exist) before,
      largest shortfall now first;
    - ``movers``: the ``top`` accounts present in both whose worst P&L changed most (by
      |change|; a negative change is a larger worst-case loss);
    - ``scenarios``: bad debt per scenario present in both reports (non-random scenarios; random
      ones are redrawn each night and do not pair up).

    ``breaches`` (default: those the newer run recorded) are shown in red.
    """
    s1, s0 = new.summary, old.summary
    cov1 = worst_coverage(s1, new.scenarios)
    cov0 = worst_coverage(s0, old.scenarios)
    rows = [
        ("As of", text(s0.get("as_of")), text(s1.get("as_of")), ""),
        ("Worst scenario", text(s0.get("worst_scenario")), text(s1.get("worst_scenario")), ""),
        ("Worst bad debt (USD)", usd(s0.get("worst_bad_debt")), usd(s1.get("worst_bad_debt")),
         _change(s1.get("worst_bad_debt"), s0.get("worst_bad_debt"), usd)),
        ("Insurance fund (USD)", usd(s0.get("insurance_fund")), usd(s1.get("insurance_fund")),
         _change(s1.get("insurance_fund"), s0.get("insurance_fund"), usd)),
        (COVERAGE_LABEL, pct(cov0) if not _missing(cov0) else "n/a (no bad debt)",
         pct(cov1) if not _missing(cov1) else "n/a (no bad debt)", _change(cov1, cov0, pct)),
        ("P(fund depleted)", pct(s0.get("p_fund_depleted")), pct(s1.get("p_fund_depleted")),
         _change(s1.get("p_fund_depleted"), s0.get("p_fund_depleted"), pct)),
        ("Accounts", count(s0.get("accounts")), count(s1.get("accounts")),
         _change(s1.get("accounts"), s0.get("accounts"), count)),
        ("Accounts liquidatable now", count(s0.get("accounts_liquidatable")), count(s1.get("accounts_liquidatable")),
         _change(s1.get("accounts_liquidatable"), s0.get("accounts_liquidatable"), count)),
        ("Total maintenance margin (USD)", usd(s0.get("total_maintenance_margin")),
         usd(s1.get("total_maintenance_margin")),
         _change(s1.get("total_maintenance_margin"), s0.get("total_maintenance_margin"), usd)),
    ]
    # A setup that differs (model, liquidation) moves every number below: say which, as rows
    setup = [k for k in SETUP_KEYS if k in s0 and k in s1 and s0[k] != s1[k]]
    for k in setup:
        label, fmt = DETAIL_KEYS.get(k, (k, text))
        rows.append((f"{label} (setup differs)", fmt(s0[k]), fmt(s1[k]), "changed"))
    head = {"title": "", "note": "", "header": ["", "Older", "Newer", "Change"], "numeric": [False, True, True, True],
            "rows": [[(a, ""), (b, ""), (c, ""), (d, "")] for a, b, c, d in rows]}

    a1 = new.accounts.assign(account_id=new.accounts["account_id"].astype(str))
    a0 = old.accounts.assign(account_id=old.accounts["account_id"].astype(str))
    liq0 = set(a0.loc[a0["liquidatable"].astype(bool), "account_id"])
    fresh = a1[a1["liquidatable"].astype(bool) & ~a1["account_id"].isin(liq0)]
    fresh = fresh.assign(shortfall_now=(fresh["maintenance_margin"] - fresh["collateral_value"]).clip(lower=0),
                         was_present=fresh["account_id"].isin(set(a0["account_id"])))
    fresh = fresh.sort_values(["shortfall_now", "account_id"], ascending=[False, True], kind="mergesort")
    new_liq = table(fresh, (
        Column("account_id", "Account", text, numeric=False),
        Column("shortfall_now", "Shortfall now (USD)", usd),
        Column("equity", "Equity (USD)", usd),
        Column("maintenance_margin", "Maint. margin (USD)", usd),
        Column("was_present", "In older report", yes_no, numeric=False),
    ), f"Newly liquidatable accounts ({len(fresh):,})",
        "" if len(fresh) else "No account became liquidatable.")

    both = a1[["account_id", "pnl_worst", "scenario_worst"]].merge(
        a0[["account_id", "pnl_worst", "scenario_worst"]], on="account_id", suffixes=("_new", "_old"))
    both["change"] = both["pnl_worst_new"] - both["pnl_worst_old"]
    both["_abs"] = both["change"].abs().fillna(-1)
    moved = both[both["_abs"] >= 0.005]  # a change below a cent is summation noise, not news
    movers = moved.sort_values(["_abs", "account_id"], ascending=[False, True], kind="mergesort").head(top)
    movers_table = table(movers, (
        Column("account_id", "Account", text, numeric=False),
        Column("pnl_worst_old", "Worst P&L older (USD)", usd),
        Column("pnl_worst_new", "Worst P&L newer (USD)", usd),
        Column("change", "Change (USD)", signed_usd),
        Column("scenario_worst_new", "Worst scenario now", text, numeric=False),
    ), f"Accounts whose worst P&L moved most (top {len(movers):,} of {len(moved):,} that moved; {len(both):,} in both)",
        "A negative change is a larger worst-case loss." if len(movers) else "No account's worst P&L changed.")

    f1, f0 = (r.scenarios[~r.scenarios["kind"].astype(str).isin(RANDOM_KINDS)] for r in (new, old))
    sc = f1[["scenario", "bad_debt"]].merge(f0[["scenario", "bad_debt"]], on="scenario", suffixes=("_new", "_old"))
    sc["change"] = sc["bad_debt_new"] - sc["bad_debt_old"]
    sc_table = table(sc, (
        Column("scenario", "Scenario", text, numeric=False),
        Column("bad_debt_old", "Bad debt older (USD)", usd),
        Column("bad_debt_new", "Bad debt newer (USD)", usd),
        Column("change", "Change (USD)", signed_usd),
    ), "Bad debt per scenario", "" if len(sc) else "No scenario name appears in both reports.")

    counts = [(f"Accounts only in the {which} report", _some_ids(set(a) - set(b)))
              for which, a, b in (("newer", a1["account_id"], a0["account_id"]), ("older", a0["account_id"], a1["account_id"]))]
    return {
        "title": "Night over night",
        "as_of": text(s1.get("as_of")),
        "older_as_of": text(s0.get("as_of")),
        "breaches": list(s1.get("limit_breaches") or []) if breaches is None else list(breaches),
        "headline": head,
        "setup": [DETAIL_KEYS.get(k, (k, text))[0] for k in setup],
        "new_liquidatable": new_liq,
        "movers": movers_table,
        "scenarios": sc_table,
        "counts": _pairs("Accounts", counts),
        "charts": _diff_charts(movers, sc),
        "data": {"movers": movers, "new_liquidatable": fresh, "scenarios": sc},
    }


def _diff_charts(movers: pd.DataFrame, sc: pd.DataFrame) -> list[dict]:
    import matplotlib

    out = []
    if len(movers):
        ch = movers["change"].to_numpy(float)

        def colour(ax, y):
            for bar, v in zip(ax.patches, ch):
                bar.set_color(RED if v < 0 else GREEN)

        out.append({"id": "movers", "title": "Change in worst P&L",
                    "caption": "Newer minus older worst P&L per account; red bars are larger worst-case losses.",
                    "src": _barh(movers["account_id"], ch, GREY, "change in worst P&L",
                                 "Accounts whose worst P&L moved most", colour)})
    if len(sc):
        top = sc.assign(_m=np.maximum(sc["bad_debt_new"].fillna(0), sc["bad_debt_old"].fillna(0)),
                        _i=np.arange(len(sc)))
        top = top.sort_values(["_m", "_i"], ascending=[False, True], kind="mergesort").head(MAX_BARS)
        with matplotlib.rc_context(RC):
            fig = _figure(0.3 * len(top) + 1.2)
            ax = fig.subplots()
            y = np.arange(len(top))[::-1]
            ax.barh(y + 0.2, np.nan_to_num(top["bad_debt_old"].to_numpy(float)), height=0.4, color=GREY, label="older")
            ax.barh(y - 0.2, np.nan_to_num(top["bad_debt_new"].to_numpy(float)), height=0.4, color=RED, label="newer")
            ax.set_yticks(y, [_label(s) for s in top["scenario"]])
            ax.set_title("Bad debt per scenario, older and newer", loc="left")
            ax.legend(frameon=False, loc="lower right")
            _usd_axis(ax, "bad debt")
            src = svg_data_uri(fig)
        out.append({"id": "bad-debt-change", "title": "Bad debt per scenario, older and newer",
                    "caption": "Scenarios present in both reports, largest bad debt first.", "src": src})
    return out


SETUP_WARNING = ("The two runs were set up differently ({}): the changes below mix that with what the market "
                 "and the book did.")


def diff_markdown(d: dict) -> str:
    parts = [f"# {d['title']}: {_md_escape(d['older_as_of'])} → {_md_escape(d['as_of'])}", ""]
    if d["breaches"]:
        parts += ["**LIMITS BREACHED (newer report):**", ""] + [f"- **{_md_escape(b)}**" for b in d["breaches"]] + [""]
    if d["setup"]:
        parts += [f"**{_md_escape(SETUP_WARNING.format(', '.join(d['setup'])))}**", ""]
    parts += [_md_table(d["headline"]), ""]
    for key in ("new_liquidatable", "movers", "scenarios", "counts"):
        parts += _md_section(d[key])
    return "\n".join(parts).rstrip() + "\n"


def write_diff(d: dict, out: str | Path) -> list[Path]:
    """Write diff.md and diff.html of a ``diff`` into the folder ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    warning = SETUP_WARNING.format(", ".join(d["setup"])) if d["setup"] else ""
    for name, body in (("diff.md", diff_markdown(d)), ("diff.html", _render("diff.html.j2", {**d, "setup_warning": warning}))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(body)
        os.replace(tmp, out / name)  # a reader never sees half a file
        paths.append(out / name)
    return paths
