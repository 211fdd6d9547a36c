"""The `stress` command line: a thin layer over the Python API.

Exit codes (SPEC section 4): 0 done; 1 done but a limit given on the command line (or in
``exchange.toml [limits]``) was breached; 2 bad input or usage, with one message naming the
file, row and column, and no report written.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import InputError

app = typer.Typer(
    help="GPU-batched stress testing for cross-margin derivatives exchanges.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
generate_app = typer.Typer(help="Write synthetic inputs.", no_args_is_help=True)
app.add_typer(generate_app, name="generate")

out = Console()
err = Console(stderr=True)

SAMPLE_ACCOUNTS = 10_000


def _fail(exc: InputError) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


def _load(snapshot: Optional[Path], scenarios: Optional[Path], accounts: int):
    from . import io, scenarios as scen_mod

    if snapshot is None:
        from . import sample

        tmp = Path(tempfile.mkdtemp(prefix="stress-sample-"))
        sample.write(tmp, accounts=accounts)
        snapshot = tmp
    snap = io.load_snapshot(snapshot)
    if scenarios is None:  # the built-in set names common assets a snapshot may not have
        scen = scen_mod.load_scenarios(scen_mod.default_path(), snap, skip_unknown_assets=True)
    else:
        scen = scen_mod.load_scenarios(scenarios, snap)
    return snap, scen


def _progress_bar():
    """A rich progress callback when attached to a terminal, else None."""
    if not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("accounts"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                   TimeRemainingColumn(), console=err, transient=True)
    task = None
    started = time.perf_counter()

    def update(done: int, total: int) -> None:
        nonlocal task
        # Only runs longer than a second get a bar.
        if task is None and time.perf_counter() - started > 1.0:
            bar.start()
            task = bar.add_task("run", total=total)
        if task is not None:
            bar.update(task, completed=done)

    return bar, update


@app.command()
def run(
    snapshot: Optional[Path] = typer.Argument(None, help="Snapshot folder (default: the built-in sample exchange)."),
    scenarios: Optional[Path] = typer.Option(None, "--scenarios", "-s", help="Scenario TOML file (default: scenarios/default.toml)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: reports/<UTC timestamp>)."),
    dtype: str = typer.Option("float64", help="float64 (exact reports) or float32 (speed)."),
    chunk_size: int = typer.Option(128, min=1, help="Accounts per chunk (results do not depend on it)."),
    max_bad_debt: Optional[float] = typer.Option(None, help="Exit 1 if the worst scenario's bad debt exceeds this (USD)."),
    max_p_fund_depleted: Optional[float] = typer.Option(None, help="Exit 1 if P(fund depleted) exceeds this."),
    accounts: int = typer.Option(SAMPLE_ACCOUNTS, help="Accounts in the built-in sample (when no SNAPSHOT is given)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the report path."),
) -> None:
    """Stress a snapshot under a scenario set and write a report folder."""
    started = time.perf_counter()
    if dtype not in ("float64", "float32"):
        sys.stderr.write(f"error: --dtype {dtype!r}: expected float64 or float32\n")
        raise typer.Exit(2)
    try:
        snap, scen = _load(snapshot, scenarios, accounts)
        limits = _limits(snap, max_bad_debt, max_p_fund_depleted)
        if limits.get("max_p_fund_depleted") is not None and not scen.random.any():
            raise InputError(Path(scen.source).name, None, None,
                             "a P(fund depleted) limit needs random scenarios (Monte Carlo or replay) in the set")
    except InputError as exc:
        _fail(exc)
    from . import engine, report

    bar, progress = _progress_bar()
    try:
        res = engine.run(snap, scen, chunk_size=chunk_size, dtype=dtype, progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    res.summary["runtime_seconds"] = time.perf_counter() - started  # load and run, as a user waits
    breaches = _breaches(res.summary, limits)
    target = out_dir or Path("reports") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report.write(res, target, breaches)
    if quiet:
        out.print(str(target))
    else:
        _print_summary(res, target, breaches)
    if breaches:
        raise typer.Exit(1)


def _limits(snap, max_bad_debt, max_p) -> dict:
    cfg = dict(snap.limits)
    unknown = set(cfg) - {"max_bad_debt", "max_p_fund_depleted"}
    if unknown:
        raise InputError("exchange.toml", "[limits]", sorted(unknown)[0], "unknown key (known: max_bad_debt, max_p_fund_depleted)")
    for k, v in cfg.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError("exchange.toml", "[limits]", k, f"{v!r} is not a number")
    if max_bad_debt is not None:
        cfg["max_bad_debt"] = max_bad_debt
    if max_p is not None:
        cfg["max_p_fund_depleted"] = max_p
    return cfg


def _breaches(summary: dict, limits: dict) -> list[str]:
    out = []
    if "max_bad_debt" in limits and summary["worst_bad_debt"] > limits["max_bad_debt"]:
        out.append(f"worst bad debt {summary['worst_bad_debt']:,.0f} USD ({summary['worst_scenario']}) "
                   f"> max_bad_debt {limits['max_bad_debt']:,.0f}")
    p = summary.get("p_fund_depleted")
    if "max_p_fund_depleted" in limits and p is not None and p > limits["max_p_fund_depleted"]:
        out.append(f"p_fund_depleted {p:.4f} > max_p_fund_depleted {limits['max_p_fund_depleted']:.4f}")
    return out


def _print_summary(res, target: Path, breaches: list[str]) -> None:
    from .report import pct, usd

    s = res.summary
    t = Table(title=f"stress run — as of {s['as_of']}", show_header=False)
    t.add_row("accounts / positions / scenarios", f"{s['accounts']:,} / {s['positions']:,} / {s['scenarios']:,}")
    t.add_row("insurance fund (USD)", usd(s["insurance_fund"]))
    t.add_row("worst scenario", str(s["worst_scenario"]))
    t.add_row("worst bad debt (USD)", usd(s["worst_bad_debt"]))
    t.add_row("P(fund depleted)", pct(s["p_fund_depleted"]))
    t.add_row("accounts liquidatable now", f"{s['accounts_liquidatable']:,}")
    t.add_row("runtime", f"{s['runtime_seconds']:.2f} s")
    out.print(t)
    sc = res.scenarios.sort_values("bad_debt", ascending=False).head(10)
    st = Table(title="worst scenarios by bad debt")
    for c in ("scenario", "exchange P&L", "liquidatable", "bad debt", "fund after"):
        st.add_column(c, justify="left" if c == "scenario" else "right")
    for r in sc.itertuples():
        st.add_row(str(r.scenario), usd(r.pnl_total), f"{r.accounts_liquidatable:,}", usd(r.bad_debt), usd(r.insurance_fund_after))
    out.print(st)
    for b in breaches:
        out.print(f"[bold red]LIMIT BREACHED:[/] {b}", highlight=False)
    out.print(f"report written to {target}")


@app.command()
def validate(
    snapshot: Path = typer.Argument(..., help="Snapshot folder."),
    scenarios: Optional[Path] = typer.Option(None, "--scenarios", "-s", help="Scenario TOML file to check too."),
) -> None:
    """Check a snapshot (and a scenario file) without computing a run."""
    from . import io, scenarios as scen_mod

    try:
        snap = io.load_snapshot(snapshot)
        _limits(snap, None, None)
        msg = f"{snapshot}: ok — {snap.n_accounts:,} accounts, {snap.n_positions:,} positions, {len(snap.instrument_ids):,} instruments, {snap.n_assets} assets"
        if scenarios is not None:
            scen = scen_mod.load_scenarios(scenarios, snap)
            msg += f"; {scenarios}: ok — {len(scen):,} scenarios"
    except InputError as exc:
        _fail(exc)
    out.print(msg, highlight=False)


@generate_app.command("sample")
def generate_sample(
    folder: Path = typer.Argument(..., help="Folder to write the snapshot into."),
    accounts: int = typer.Option(SAMPLE_ACCOUNTS, min=20, help="Number of accounts."),
    seed: int = typer.Option(7, help="Random seed (same seed, same files)."),
    fmt: str = typer.Option("csv", "--format", help="csv or parquet."),
) -> None:
    """Write the built-in sample exchange as a snapshot folder."""
    if fmt not in ("csv", "parquet"):
        sys.stderr.write(f"error: --format {fmt!r}: expected csv or parquet\n")
        raise typer.Exit(2)
    from . import sample

    sample.write(folder, accounts=accounts, seed=seed, fmt=fmt)
    out.print(f"wrote sample exchange with {accounts:,} accounts to {folder}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
