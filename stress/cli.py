"""The `stress` command line: a thin layer over the Python API.

Exit codes (SPEC section 4): 0 done; 1 done but a limit given on the command line (or in
``exchange.toml [limits]``) was breached; 2 bad input or usage, with one message naming the
file, row and column, and no report written. Beyond SPEC: 3 for an internal error (a bug),
with its traceback, so that a crash is never read as a breached limit.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import InputError

# Help is rich markup whatever typer's default: the help strings escape their square brackets for it
app = typer.Typer(
    help="GPU-batched stress testing for cross-margin derivatives exchanges.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
generate_app = typer.Typer(help="Write synthetic inputs.", no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(generate_app, name="generate")

# Markup off: account ids, scenario names and paths are printed as written ("[red]x" too);
# styled text is built as rich Text.
out = Console(markup=False)
err = Console(stderr=True, markup=False)

SAMPLE_ACCOUNTS = 10_000
DEFAULT_CORRELATIONS = ("BTC/ETH=0.80", "BTC/SOL=0.70", "ETH/SOL=0.75")  # stress generate scenarios


def _fail(exc: InputError) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


WARM_BYTES = 64 << 20  # the first copy to an accelerator: large enough to set up its staging


def _start_devices() -> threading.Thread:
    """Import JAX and start its devices on a thread while the main thread loads the inputs.

    In a new process the first copy to a GPU sets up the driver's context and staging buffers,
    about 2 s (docs/benchmarks.md), which would otherwise come after loading and the holdings
    layout, in series with them. Loading spends most of its time in Arrow and NumPy, which
    release the GIL. On CPU only the import of JAX moves earlier. Errors are left to the main
    thread, which meets them again when it needs the devices.
    """

    # Here, before the thread starts: JAX's import registers ml_dtypes' types (bfloat16, ...) in
    # NumPy's type dictionary, which the main thread's pandas -> numpy.ma import iterates; the
    # two overlapping raised "dictionary changed size during iteration" (exit 3) now and then.
    # With both imported first (4 and 6 ms) the threads share no import that writes.
    import ml_dtypes  # noqa: F401
    import numpy as np
    import numpy.ma  # noqa: F401

    def start() -> None:
        try:
            from . import _tree  # noqa: F401  (JAX, with the package's settings)

            import jax

            if jax.default_backend() != "cpu":
                jax.block_until_ready(jax.device_put(np.zeros(WARM_BYTES // 4, np.float32)))
        except Exception:  # noqa: BLE001 - reported by the main thread's own use of JAX
            pass

    thread = threading.Thread(target=start, name="stress-devices", daemon=True)
    thread.start()
    return thread


def _idle_margin_note(snap) -> None:
    """Say which ``[margin]`` keys the configured model leaves unused (``margin.idle_keys``)."""
    from . import margin

    idle = margin.idle_keys(snap.margin_config)
    if idle:
        model = snap.margin_config.get("model", "standard")
        err.print(Text(f"note: exchange.toml [margin] {', '.join(idle)}: not used by model = \"{model}\"", style="yellow"),
                  soft_wrap=True)


def _load(snapshot: Optional[Path], scenarios: Optional[Path], accounts: int, mark=lambda stage: None):
    from . import io, scenarios as scen_mod

    if snapshot is None:
        from . import sample

        tmp = Path(tempfile.mkdtemp(prefix="stress-sample-"))
        try:  # the sample is read whole into memory: its files are not needed after
            sample.write(tmp, accounts=accounts)
            snap = io.load_snapshot(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        snap = io.load_snapshot(snapshot)
    mark("load snapshot")
    if scenarios is None:  # the built-in set names common assets a snapshot may not have
        scen = scen_mod.load_scenarios(scen_mod.default_path(), snap, skip_unknown_assets=True)
    else:
        scen = scen_mod.load_scenarios(scenarios, snap)
    mark("build scenarios")
    return snap, scen


class _Stages:
    """Seconds of each stage of a command, printed to stderr at the end (``--timings``)."""

    def __init__(self, on: bool):
        self.on, self.rows, self.last = on, [], time.perf_counter()
        if on:  # what the process spent before the command: interpreter start and imports
            self.rows.append(("start python, import stress", _since_process_start()))

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.rows.append((stage, now - self.last))
        self.last = now

    def print(self) -> None:
        if not self.on:
            return
        t = Table(title="stages, seconds")
        t.add_column("stage")
        t.add_column("seconds", justify="right")
        for stage, sec in self.rows:
            t.add_row(stage, "?" if sec is None else f"{sec:.3f}")
        known = [sec for _, sec in self.rows if sec is not None]
        t.add_row("total", f"{sum(known):.3f}")
        err.print(t)


def _since_process_start() -> float | None:
    """Seconds since this process started (Linux ``/proc``), else None."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


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
    chunk_size: Optional[int] = typer.Option(
        None, min=1, help="Accounts per chunk (results do not depend on it). Default: 128 on CPU, 8192 on GPU."),
    max_bad_debt: Optional[float] = typer.Option(None, help="Exit 1 if the worst scenario's bad debt exceeds this (USD)."),
    max_p_fund_depleted: Optional[float] = typer.Option(None, help="Exit 1 if P(fund depleted) exceeds this."),
    accounts: int = typer.Option(SAMPLE_ACCOUNTS, help="Accounts in the built-in sample (when no SNAPSHOT is given)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the report path."),
    cluster: Optional[str] = typer.Option(None, "--cluster", metavar="ADDRESS",
                                          help="Sweep the accounts on a Dask cluster, e.g. tcp://host:8786 (needs stress\\[cluster])."),
    timings: bool = typer.Option(False, "--timings", help="Print the seconds of each stage to stderr at the end."),
) -> None:
    """Stress a snapshot under a scenario set and write a report folder."""
    started = time.perf_counter()
    mark = _Stages(timings)
    if dtype not in ("float64", "float32"):
        sys.stderr.write(f"error: --dtype {dtype!r}: expected float64 or float32\n")
        raise typer.Exit(2)
    target = out_dir or Path("reports") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    devices = None
    try:
        _check_out_dir(target)
        devices = _start_devices() if cluster is None else None
        snap, scen = _load(snapshot, scenarios, accounts, mark)
        limits = _limits(snap, max_bad_debt, max_p_fund_depleted, scen)
        _idle_margin_note(snap)
    except InputError as exc:
        if devices is not None:  # a process that exits while a thread is inside jaxlib's import can abort
            devices.join()
        _fail(exc)
    from . import _memory, engine, report

    client, cluster_error = None, ()  # except (): catches nothing
    if cluster is not None:  # Dask is imported only here: an optional extra
        from . import cluster as cluster_mod

        cluster_error = cluster_mod.ClusterError
        try:
            client = cluster_mod.connect(cluster)
        except cluster_mod.ClusterError as exc:
            sys.stderr.write(f"error: --cluster: {exc}\n")
            raise typer.Exit(2) from None
    if devices is not None:
        devices.join()  # before the bar: the wait is part of the first device work
    bar, progress = _progress_bar()
    try:
        if client is None:
            res = engine.run(snap, scen, chunk_size=chunk_size, dtype=dtype, progress=progress)
        else:
            res = cluster_mod.run(snap, scen, client, chunk_size=chunk_size, dtype=dtype, progress=progress)
    except cluster_error as exc:
        sys.stderr.write(f"error: --cluster {cluster}: {exc}\n")  # no workers, or workers without stress
        raise typer.Exit(2) from None
    except InputError as exc:  # what only the run finds, e.g. a margin model's tables too large here
        _fail(exc)
    finally:
        if bar is not None:
            bar.stop()
        if client is not None:
            client.close()
    try:
        _check_finite(res)
    except InputError as exc:
        _fail(exc)
    engine.forget_layout(snap)  # the run is over: its layout would only add to the report's peak
    _memory.trim()  # and what it held goes back to the system, not to a heap Arrow cannot use
    mark("run (compile, revalue, sweep)")
    from .greeks import exposure as greeks_exposure

    # exposure by underlying in the report: Greeks by autodiff, and the gross notional
    exposure = greeks_exposure(snap)
    # the process is done with JAX: its compiled kernels (about 300 MiB after the default set
    # at 1M accounts) go back before the report's tables and charts allocate
    import jax

    jax.clear_caches()
    _memory.trim()
    mark("exposure (Greeks)")
    res.summary["runtime_seconds"] = time.perf_counter() - started  # load and run, as a user waits
    breaches = _breaches(res.summary, limits)
    report.write(res, target, breaches, exposure=exposure)
    mark("write report")
    if quiet:
        out.print(str(target))
    else:
        _print_summary(res, target, breaches)
    mark.print()
    if breaches:
        raise typer.Exit(1)


def _limits(snap, max_bad_debt, max_p, scen=None) -> dict:
    """The run's limits, ``exchange.toml [limits]`` overridden by the command line, checked
    (against the scenario set ``scen`` where given: P(fund depleted) needs random scenarios)."""
    cfg = dict(snap.limits)
    unknown = set(cfg) - {"max_bad_debt", "max_p_fund_depleted"}
    if unknown:
        raise InputError("exchange.toml", "[limits]", sorted(unknown)[0], "unknown key (known: max_bad_debt, max_p_fund_depleted)")
    for k, v in cfg.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError("exchange.toml", "[limits]", k, f"{v!r} is not a number")
        _check_limit(k, v, ("exchange.toml", "[limits]", k))
    for k, v in (("max_bad_debt", max_bad_debt), ("max_p_fund_depleted", max_p)):
        if v is not None:
            cfg[k] = _check_limit(k, v)
    if scen is not None and cfg.get("max_p_fund_depleted") is not None and not scen.random.any():
        given = "--max-p-fund-depleted" if max_p is not None else "exchange.toml [limits] max_p_fund_depleted"
        raise InputError(Path(scen.source).name, None, None,
                         f"the P(fund depleted) limit ({given}) needs random scenarios (Monte Carlo or replay) in the set")
    return cfg


def _check_limit(key: str, v: float, where: tuple | None = None) -> float:
    """Limit ``key`` (``max_bad_debt`` or ``max_p_fund_depleted``) as one a breach can be
    measured against: a NaN one is never breached (every comparison with it is false), so a
    nightly job would silently never fail; bad debt is finite USD >= 0 and a probability in
    [0, 1]. ``where``: ``(file, row, column)`` of the value, else its command-line option."""
    probability = key == "max_p_fund_depleted"
    if not (0.0 <= v <= 1.0 if probability else 0.0 <= v < float("inf")):
        allowed = "in [0, 1]" if probability else "a finite number >= 0 (USD)"
        raise InputError(*(where or ("--" + key.replace("_", "-"), None, None)), f"{v!r}: the limit must be {allowed}")
    return float(v)


def _check_out_dir(target: Path | None, option: str = "--out") -> None:
    """Fail before the work, not after it, where its output folder (None: none asked for)
    cannot be written: the path is a file, or its nearest existing parent is not a writable
    folder."""
    if target is None:
        return
    if target.exists() and not target.is_dir():
        raise InputError(option, None, None, f"{target} exists and is not a folder")
    _check_writable_parent(target, option)


def _check_out_file(target: Path | None, suffixes: tuple[str, ...] | None, option: str = "--out") -> None:
    """Likewise for an output file (None: none asked for): its suffix is not one of
    ``suffixes`` (None: any), the path is a folder, or no file can be made there."""
    if target is None:
        return
    if suffixes is not None and target.suffix not in suffixes:
        raise InputError(str(target), None, None,
                         f"{option}: {target.suffix or 'no suffix'!r}: expected {' or '.join(suffixes)}")
    if target.is_dir():
        raise InputError(option, None, None, f"{target} is a folder, not a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(option, None, None, f"cannot write {target}: the file is read-only")
    _check_writable_parent(target.parent, option, target)


def _check_accounts(snap, ids) -> None:
    """Every account id asked for with ``--account`` is in the snapshot."""
    if not ids:  # nothing asked: no set of every id (0.5 s at 1M accounts)
        return
    unknown = sorted(set(ids) - set(snap.account_ids.astype(str)))
    if unknown:
        raise InputError("--account", None, None, f"unknown account {unknown[0]!r} (not in balances or positions)")


def _check_writable_parent(folder: Path, option: str, target: Path | None = None) -> None:
    """``folder`` exists as a writable folder or can be made: its nearest existing parent is one."""
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(option, None, None, f"cannot write {target or folder}: {parent} is not a writable folder")
    try:  # os.access says yes to root everywhere, /proc included: make (and remove) a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".stress-", dir=parent))
    except OSError as exc:
        raise InputError(option, None, None, f"cannot write {target or folder}: {parent}: {exc.strerror}") from None


# Results every run must give as finite numbers (NaN-free): the inputs' magnitudes put them out
# of float range otherwise, and a NaN would compare as within every limit
OVERFLOW = ("the inputs' magnitudes overflow (a price near 0, a balance or quantity near float64's largest, "
            "an extreme scenario move or vol?)")
FINITE = {"summary": ("worst_bad_debt", "total_equity", "total_maintenance_margin"),
          "scenarios": ("pnl_total", "pnl_closed_out", "fees", "shortfall_total", "bad_debt", "insurance_fund_after"),
          "accounts": ("equity", "collateral_value", "maintenance_margin", "pnl_worst", "bad_debt_worst")}


def _check_finite(res) -> None:
    """Refuse (exit 2, before any output) a run whose results are not finite: a price near 0,
    a balance near float64's largest or a Monte Carlo vol of 10^6 are accepted one by one but
    overflow together, and a report of NaN would pass every limit."""
    import math

    import numpy as np

    for key in FINITE["summary"]:
        v = res.summary.get(key)
        if v is not None and not math.isfinite(v):
            raise InputError("results", "summary", key, f"{v!r}: {OVERFLOW}")
    for table, ids in (("scenarios", "scenario"), ("accounts", "account_id")):
        df = getattr(res, table)
        for col in FINITE[table]:
            if col in df:
                bad = ~np.isfinite(df[col].to_numpy(np.float64))
                if bad.any():
                    raise InputError("results", f"{ids} {df[ids].iloc[int(np.flatnonzero(bad)[0])]}", col,
                                     f"not a finite number: {OVERFLOW}")


def _breaches(summary: dict, limits: dict) -> list[str]:
    """One line per limit the run breaches; a NaN result breaches (a limit fails closed)."""
    out = []
    if "max_bad_debt" in limits and not summary["worst_bad_debt"] <= limits["max_bad_debt"]:
        v, lim = _apart(summary["worst_bad_debt"], limits["max_bad_debt"], ",.{}f", 0)
        out.append(f"worst bad debt {v} USD ({summary['worst_scenario']}) > max_bad_debt {lim}")
    p = summary.get("p_fund_depleted")
    if "max_p_fund_depleted" in limits and p is not None and not p <= limits["max_p_fund_depleted"]:
        v, lim = _apart(p, limits["max_p_fund_depleted"], ".{}f", 4)
        out.append(f"p_fund_depleted {v} > max_p_fund_depleted {lim}")
    return out


def _apart(value: float, limit: float, fmt: str, digits: int) -> tuple[str, str]:
    """``value`` and ``limit`` formatted with ``digits`` decimals, or as many more as it takes to
    tell them apart: a breach must not read "49,000 > 49,000"."""
    for d in range(digits, 18):
        a, b = format(value, fmt.format(d)), format(limit, fmt.format(d))
        if a != b:
            return a, b
    return repr(value), repr(limit)


def _print_summary(res, target: Path, breaches: list[str]) -> None:
    from .report import pct, usd, worst

    s = res.summary
    t = Table(title=f"stress run — as of {s['as_of']}", show_header=False)
    t.add_row("accounts / positions / scenarios", f"{s['accounts']:,} / {s['positions']:,} / {s['scenarios']:,}")
    t.add_row("insurance fund (USD)", usd(s["insurance_fund"]))
    t.add_row("worst scenario", str(s["worst_scenario"]))
    t.add_row("worst bad debt (USD)", usd(s["worst_bad_debt"]))
    t.add_row("P(fund depleted)", pct(s["p_fund_depleted"]))
    if s.get("cover2_worst") is not None:
        verdict = "covered in every scenario" if s["cover2_covered"] else "NOT covered in some scenario"
        t.add_row("Cover 2, worst (USD)", f"{usd(s['cover2_worst'])} ({s['cover2_scenario']}); {verdict}")
    t.add_row("accounts liquidatable now", f"{s['accounts_liquidatable']:,}")
    t.add_row("runtime", f"{s['runtime_seconds']:.2f} s")
    out.print(t)
    sc = worst(res.scenarios, 10)
    st = Table(title="worst scenarios by bad debt")
    for c in ("scenario", "exchange P&L", "liquidatable", "bad debt", "fund after"):
        st.add_column(c, justify="left" if c == "scenario" else "right")
    for r in sc.itertuples():
        st.add_row(str(r.scenario), usd(r.pnl_total), f"{r.accounts_liquidatable:,}", usd(r.bad_debt), usd(r.insurance_fund_after))
    out.print(st)
    for b in breaches:
        out.print(Text.assemble(("LIMIT BREACHED: ", "bold red"), b), highlight=False)
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
        if scenarios is None:  # stress run's default set: what it checks against the snapshot too
            scen = scen_mod.load_scenarios(scen_mod.default_path(), snap, skip_unknown_assets=True)
        else:
            scen = scen_mod.load_scenarios(scenarios, snap)
            msg += f"; {scenarios}: ok — {len(scen):,} scenarios"
        _limits(snap, None, None, scen)  # what stress run checks of the two together
    except InputError as exc:
        _fail(exc)
    _idle_margin_note(snap)
    out.print(msg, highlight=False, soft_wrap=True)  # one line, for scripts that read it


@app.command()
def greeks(
    snapshot: Path = typer.Argument(..., help="Snapshot folder."),
    account: Optional[list[str]] = typer.Option(None, "--account", "-a", help="Only this account (repeatable)."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every row to FILE.parquet or FILE.csv."),
    top: int = typer.Option(20, min=1, help="Rows to print, largest |delta_usd| first, when there are more."),
) -> None:
    """Delta, gamma, vega, theta per account and underlying, by autodiff (SPEC section 5)."""
    import numpy as np

    from . import io
    from .greeks import account_greeks as compute

    try:
        _check_out_file(out_file, (".parquet", ".csv"))
        snap = io.load_snapshot(snapshot)
        _check_accounts(snap, account or ())
        g = compute(snap, accounts=account or None)
    except InputError as exc:
        _fail(exc)
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        g.to_parquet(out_file, index=False) if out_file.suffix == ".parquet" else g.to_csv(out_file, index=False)
    # largest |delta_usd| first, ties by account and underlying: a cut inside a tie is by name
    order = np.lexsort((g.underlying.to_numpy(str), g.account_id.to_numpy(str), -g.delta_usd.abs().to_numpy()))
    shown = g if len(g) <= top else g.iloc[order[:top]]
    P = dict(zip(snap.assets, np.asarray(snap.market.price, float)))
    title = f"greeks — as of {snap.as_of:%Y-%m-%d %H:%M}Z"
    if account is not None and len(set(account)) == 1:
        out.print(_greeks_table(shown, f"{title} — account {account[0]}", [], P))
    else:
        if len(shown) < len(g):
            title += f" — top {top} of {len(g):,} rows by |delta_usd|"
        out.print(_greeks_table(shown, title, ["account_id"], P))
    if account is None:
        totals = g.groupby("underlying", sort=False).agg(
            accounts=("account_id", "size"), delta=("delta", "sum"), gamma=("gamma", "sum"),
            vega=("vega", "sum"), theta=("theta", "sum"), delta_usd=("delta_usd", "sum"))
        totals = totals.reindex([a for a in snap.assets if a in totals.index]).reset_index()
        out.print(_greeks_table(totals, "exchange totals per underlying", ["accounts"], P))
    out.print("delta: units of the asset, collateral included · gamma: d(delta)/dS · "
              "vega: USD per +0.01 vol · theta: USD per day", highlight=False)
    if out_file is not None:
        out.print(f"wrote {len(g):,} rows to {out_file}", highlight=False)


def _greeks_table(df, title: str, extra: list[str], price: dict) -> Table:
    """Rows of ``stress.greeks`` (or totals) as a rich table; values below display precision
    (autodiff round-off of exactly linear instruments, ~1e-20) print as 0."""
    from .report import usd

    def small(x: float, unit: float) -> str:
        return "0" if abs(x) * unit < 1e-6 else f"{x:.4g}"

    t = Table(title=title)
    cols = ["account_id"] * ("account_id" in extra) + ["underlying"] + ["accounts"] * ("accounts" in extra)
    for c in cols:
        t.add_column(c, justify="right" if c == "accounts" else "left", no_wrap=True)
    for c in ("delta", "gamma", "vega", "theta", "delta_usd"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in df.itertuples(index=False):
        S = price[r.underlying]
        cells = [str(r.account_id)] if "account_id" in extra else []
        cells.append(str(r.underlying))
        if "accounts" in extra:
            cells.append(f"{r.accounts:,}")
        cells += [f"{r.delta:,.0f}" if abs(r.delta) >= 1e5 else f"{r.delta:,.6g}", small(r.gamma, S * S), f"{round(r.vega, 2) + 0.0:,.2f}",
                  f"{round(r.theta, 2) + 0.0:,.2f}", usd(r.delta_usd)]
        t.add_row(*cells)
    return t


@app.command()
def hedge(
    snapshot: Path = typer.Argument(..., help="Snapshot folder."),
    account: str = typer.Option(..., "--account", "-a", help="The account to hedge."),
    with_: Optional[str] = typer.Option(None, "--with", help="Instruments to trade, comma-separated (default: the perpetuals on the account's underlyings)."),
    scenarios: Optional[Path] = typer.Option(None, "--scenarios", "-s", help="Scenario TOML file (default: scenarios/default.toml)."),
) -> None:
    """The trade that most improves an account's worst-case margin excess, checked exactly."""
    import numpy as np

    from . import io, scenarios as scen_mod
    from .greeks import hedge as find_hedge
    from .report import usd

    try:
        snap = io.load_snapshot(snapshot)
        scen = scen_mod.load_scenarios(scenarios, snap) if scenarios is not None else None
        names = [s.strip() for s in with_.split(",") if s.strip()] if with_ is not None else None
        if names is not None and not names:
            raise InputError("--with", None, None, "no instrument given")
        h = find_hedge(snap, account, names, scen)
    except InputError as exc:
        _fail(exc)
    model = snap.margin_config.get("model", "standard")
    tiered = model == "standard" and bool(np.isfinite(np.asarray(snap.params.tier_bound)).any())
    t = Table(title=f"hedge for {account} — trading {', '.join(h['instruments'])} — {h['scenarios']} scenarios — "
                    f"{model} margin model{' with risk-limit tiers' * tiered}")
    t.add_column("instrument")
    t.add_column("trade (contracts)", justify="right")
    for iid, q in h["trade"].items():
        t.add_row(iid, f"{q:+,.6g}")
    if not h["trade"]:
        t.add_row("(none)", "no trade in these instruments improves the worst case")
    out.print(t)
    b, a = h["before"], h["after"]
    s = Table(title="before / after (USD; collateral - margin at the worst of now and each scenario)")
    for c in ("", "before", "after"):
        s.add_column(c, justify="left" if not c else "right")
    s.add_row("maintenance margin now", usd(b["maintenance_margin"]), usd(a["maintenance_margin"]))
    s.add_row("collateral value now", usd(b["collateral_value"]), usd(a["collateral_value"]))
    s.add_row("worst margin excess", usd(b["worst_excess"]), usd(a["worst_excess"]))
    s.add_row("  in", str(b["worst_state"]), str(a["worst_state"]))
    s.add_row("worst shortfall", usd(b["shortfall_worst"]), usd(a["shortfall_worst"]))
    s.add_row("worst P&L", usd(b["pnl_worst"]), usd(a["pnl_worst"]))
    price = dict(zip(snap.assets, np.asarray(snap.market.price, float)))
    shown = lambda x, S: "0" if abs(x) * S < 1e-6 else f"{x:,.6g}"  # autodiff round-off of 0
    for asset in dict.fromkeys([*b["delta"], *a["delta"]]):
        S = price[asset]
        s.add_row(f"delta {asset}", shown(b["delta"].get(asset, 0.0), S), shown(a["delta"].get(asset, 0.0), S))
    out.print(s)


@generate_app.command("sample")
def generate_sample(
    folder: Path = typer.Argument(..., help="Folder to write the snapshot into."),
    accounts: int = typer.Option(SAMPLE_ACCOUNTS, min=20, help="Number of accounts."),
    seed: int = typer.Option(7, help="Random seed (same seed, same files)."),
    fmt: str = typer.Option("csv", "--format", help="csv or parquet."),
    positions: Optional[int] = typer.Option(None, min=1, help="About how many positions in all: directional traders "
                                            "hold more (or fewer) instruments each (default: the usual mix, about 1.5 per account)."),
) -> None:
    """Write the built-in sample exchange as a snapshot folder."""
    if fmt not in ("csv", "parquet"):
        sys.stderr.write(f"error: --format {fmt!r}: expected csv or parquet\n")
        raise typer.Exit(2)
    from . import sample
    from .io import TABLES

    other = "parquet" if fmt == "csv" else "csv"
    clash = [f"{t}.{other}" for t in TABLES if (folder / f"{t}.{other}").exists()]
    try:
        _check_out_dir(folder, "FOLDER")
        if clash:  # the folder would hold both formats of a table, which no loader can read
            raise InputError(str(folder / clash[0]), None, None,
                             f"the folder holds {other.upper()} tables: write --format {other}, or into another folder")
    except InputError as exc:
        _fail(exc)
    sample.write(folder, accounts=accounts, seed=seed, fmt=fmt, positions=positions)
    out.print(f"wrote sample exchange with {accounts:,} accounts to {folder}", highlight=False)


def _pairs(values: list[str], option: str) -> dict[str, float]:
    """``["BTC=0.55", ...]`` as ``{"BTC": 0.55}``; a malformed pair is a usage error (exit 2)."""
    out_ = {}
    for item in values:
        key, sep, num = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out_[key.strip()] = float(num)
        except ValueError:
            sys.stderr.write(f"error: {option} {item!r}: expected NAME=NUMBER\n")
            raise typer.Exit(2) from None
    return out_



class _AssetsNamed:
    """Stands in for a snapshot that holds every asset a generated table names, so a file
    written without ``--snapshot`` is checked for all that needs no book: the assets it names
    are only checked against a snapshot when it runs."""

    liquidation_config: dict = {}  # no exchange: no oracle lag to check the paths against

    def __init__(self, assets):
        self.assets = tuple(dict.fromkeys(assets))
        self.n_assets = len(self.assets)

    def asset_index(self, name: str) -> int:
        return self.assets.index(name)


def _named_assets(table: dict, form: str, folder: Path) -> list[str]:
    """Every asset name a generated ``table`` of ``form`` refers to (a replay: its history's)."""
    if form == "grid":
        return list(table["underlyings"])
    if form == "replay":
        from .scenarios import read_history

        path = Path(table["prices"])
        _, cols = read_history(path if path.is_absolute() else folder / path)
        return [c[:-3] if c.endswith("_iv") else c for c in cols]
    pairs = [a for pair in (table.get("correlation") or {}) for a in str(pair).split("/")]
    return [*table["vol"], *pairs, *(table.get("vol_beta") or {})]

@generate_app.command("scenarios")
def generate_scenarios(
    out_file: Path = typer.Option(..., "--out", "-o", help="Scenario TOML file to write."),
    kind: str = typer.Option("montecarlo", help="montecarlo, grid or replay."),
    name: Optional[str] = typer.Option(None, help="Scenario name prefix (default: mc, grid or hist, after the kind)."),
    snapshot: Optional[Path] = typer.Option(None, help="Check the written file against this snapshot."),
    paths: int = typer.Option(10_000, min=1, help="montecarlo: number of paths."),
    steps: int = typer.Option(1, min=1, help="montecarlo: steps per path."),
    horizon_days: float = typer.Option(1.0, help="montecarlo, replay: horizon of a path or window, days."),
    seed: int = typer.Option(0, min=0, help="montecarlo: random seed."),
    df: int = typer.Option(4, min=0, help="montecarlo: Student-t degrees of freedom (0: Gaussian)."),
    vol: list[str] = typer.Option(["BTC=0.55", "ETH=0.70", "SOL=0.95"], help="montecarlo: ASSET=annual vol (repeat)."),
    corr: Optional[list[str]] = typer.Option(
        None, help="montecarlo: A/B=correlation (repeat). Default: BTC/ETH=0.80, BTC/SOL=0.70, ETH/SOL=0.75, "
                   "the pairs of those whose two assets have a --vol."),
    vol_beta: list[str] = typer.Option([], help="montecarlo: ASSET=implied-vol change per unit log return (repeat)."),
    jump_intensity: float = typer.Option(0.0, min=0.0, help="montecarlo: jumps per year."),
    jump_mean: float = typer.Option(0.0, help="montecarlo: mean log jump size."),
    jump_std: float = typer.Option(0.0, min=0.0, help="montecarlo: std of the log jump size."),
    underlying: list[str] = typer.Option(["BTC", "ETH"], help="grid: underlying to move (repeat)."),
    style: str = typer.Option("risk-matrix", help="grid: risk-matrix or span."),
    mode: str = typer.Option("each", help="grid: each (one underlying at a time) or joint."),
    range_: float = typer.Option(0.16, "--range", help="grid: price range, +/- fraction."),
    buckets: int = typer.Option(4, min=1, help="grid: buckets each side of 0 (risk-matrix)."),
    prices: Optional[Path] = typer.Option(None, help="replay: price history CSV or Parquet (date, one column per asset)."),
    filtered: bool = typer.Option(False, help="replay: filtered historical simulation (EWMA vol rescaling)."),
) -> None:
    """Write a scenario file: a Monte Carlo, grid or historical-replay table."""
    from . import scenarios as scen_mod

    try:
        _check_out_file(out_file, None)
    except InputError as exc:
        _fail(exc)
    if kind == "montecarlo":
        vols = _pairs(vol, "--vol")
        if corr is None:  # the default pairs only where both assets are simulated (a pair needs their vols)
            corr = [c for c in DEFAULT_CORRELATIONS if all(a in vols for a in c.split("=")[0].split("/"))]
        table = {"name": name or "mc", "paths": paths, "steps": steps, "horizon_days": horizon_days,
                 "seed": seed, "df": df, "vol": vols, "correlation": _pairs(corr, "--corr"),
                 "vol_beta": _pairs(vol_beta, "--vol-beta") or None,
                 "jumps": {"intensity": jump_intensity, "mean": jump_mean, "std": jump_std} if jump_intensity else None}
    elif kind == "grid":
        table = {"name": name or "grid", "style": style, "mode": mode, "underlyings": underlying,
                 "range": range_, "buckets": buckets if style == "risk-matrix" else None}
    elif kind == "replay":
        if prices is None:
            sys.stderr.write("error: --kind replay needs --prices FILE\n")
            raise typer.Exit(2)
        rel = Path(prices).resolve()
        try:  # the file refers to the history relative to itself where it can
            rel = rel.relative_to(out_file.resolve().parent)
        except ValueError:
            pass
        table = {"name": name or "hist", "prices": str(rel), "horizon_days": horizon_days, "filtered": filtered}
    else:
        sys.stderr.write(f"error: --kind {kind!r}: expected montecarlo, grid or replay\n")
        raise typer.Exit(2)
    form = "montecarlo" if kind == "montecarlo" else kind
    text = scen_mod.to_toml(form, table, "Written by `stress generate scenarios`; see scenarios/README.md.")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text(text)
    try:
        if snapshot is not None:
            from . import io

            n = len(scen_mod.load_scenarios(tmp, io.load_snapshot(snapshot)))
            msg = f"; {n:,} scenarios on {snapshot}"
        else:  # the checks that need no snapshot (df, horizon, range, correlations, the history)
            scen_mod.load_scenarios(tmp, _AssetsNamed(_named_assets(table, form, tmp.parent)))
            msg = ""
    except InputError as exc:
        tmp.unlink()
        if exc.file == tmp.name:  # name the file asked for, not the one it was checked as
            exc = InputError(out_file.name, exc.row, exc.column, exc.message)
        _fail(exc)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-checked file left beside the one asked for
        raise
    tmp.replace(out_file)
    out.print(f"wrote {out_file}{msg}", highlight=False)


def _check_model_and_out(model: Optional[str], out_file: Optional[Path]) -> None:
    """``--model`` names a margin model and ``--out`` a Parquet file, or it is a usage error."""
    from . import margin as margin_mod

    if model is not None and model not in margin_mod.MODELS:
        raise InputError("--model", None, None, f"{model!r} is not one of {', '.join(margin_mod.MODELS)}")
    _check_out_file(out_file, (".parquet",))


@app.command("margin")
def margin_cmd(
    snapshot: Path = typer.Argument(..., help="Snapshot folder."),
    account: Optional[str] = typer.Option(None, "--account", "-a", help="Only this account, with its per-underlying breakdown."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="standard, portfolio or var (default: exchange.toml \\[margin] model)."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write accounts to FILE.parquet and the breakdown to FILE.underlyings.parquet."),
    top: int = typer.Option(20, min=1, help="Accounts to print, largest maintenance margin first, when there are more."),
) -> None:
    """Initial and maintenance margin per account at the snapshot, with the driving grid point."""
    from . import io
    from . import margin as margin_mod

    try:
        _check_model_and_out(model, out_file)
        snap = io.load_snapshot(snapshot)
        _check_accounts(snap, [account] if account is not None else [])
        res = margin_mod.account_margin(snap, model)
    except InputError as exc:
        _fail(exc)
    acc, und = res["accounts"], res["underlyings"]
    if account is not None:
        acc, und = acc[acc.account_id == account], und[und.account_id == account]
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        acc.to_parquet(out_file, index=False)
        und.to_parquet(out_file.with_suffix(".underlyings.parquet"), index=False)
    shown = acc if len(acc) <= top else acc.loc[acc.maintenance_margin.sort_values(ascending=False, kind="stable").index[:top]]
    title = f"{res['model']} margin (USD) — as of {snap.as_of:%Y-%m-%d %H:%M}Z"
    if len(shown) < len(acc):
        title += f" — top {top} of {len(acc):,} accounts by maintenance margin"
    out.print(_margin_table(shown, title, ["account_id", "initial_margin", "maintenance_margin", "collateral_value", "liquidatable", "grid_point"]))
    detail = und[und.account_id.isin(set(shown.account_id))]
    detail = detail.set_index("account_id").loc[[a for a in shown.account_id if a in set(detail.account_id)]].reset_index()
    # the var model's requirement is a whole-portfolio number: its breakdown is its floor's
    per = "per underlying (standard model: the var floor's base, not the var margin)" if res["model"] == "var" else "per underlying"
    out.print(_margin_table(detail, per, ["account_id", "underlying", "initial_margin", "maintenance_margin",
                                          "risk_matrix_margin", "roll_shock", "delta_shock", "grid_point"]))
    if account is None:
        out.print(f"total: initial margin {acc.initial_margin.sum():,.0f} USD, maintenance margin "
                  f"{acc.maintenance_margin.sum():,.0f} USD, {int(acc.liquidatable.sum()):,} accounts liquidatable", highlight=False)
    if out_file is not None:
        out.print(f"wrote {len(acc):,} accounts to {out_file} and {len(und):,} rows to "
                  f"{out_file.with_suffix('.underlyings.parquet')}", highlight=False)


def _margin_table(df, title: str, cols: list[str]) -> Table:
    from .report import usd

    cols = [c for c in cols if c in df.columns]
    t = Table(title=title)
    head = {"account_id": "account", "initial_margin": "IM", "maintenance_margin": "MM", "collateral_value": "collateral",
            "liquidatable": "liq.", "risk_matrix_margin": "risk matrix", "roll_shock": "roll", "delta_shock": "delta",
            "grid_point": "driving grid point"}
    for c in cols:
        t.add_column(head.get(c, c), justify="left" if c in ("account_id", "underlying", "grid_point") else "right")
    text = {"account_id", "underlying", "grid_point"}
    for r in df[cols].itertuples(index=False):
        t.add_row(*("" if v is None else str(v) if c in text else ("yes" if v else "no") if c == "liquidatable" else usd(float(v))
                    for c, v in zip(cols, r)))
    return t


@app.command("report")
def report_cmd(
    report_dir: Path = typer.Argument(..., help="Report folder written by `stress run`."),
    top: int = typer.Option(20, "--top", min=1, help="How many riskiest accounts to list."),
    account: Optional[str] = typer.Option(None, "--account", help="Print this account's row instead."),
    against: Optional[Path] = typer.Option(None, "--against", help="An older report folder: night-over-night diff, written as diff.md and diff.html."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for diff.md and diff.html (default: REPORT_DIR)."),
    max_bad_debt: Optional[float] = typer.Option(None, help="Exit 1 if the worst scenario's bad debt exceeds this (USD)."),
    max_p_fund_depleted: Optional[float] = typer.Option(None, help="Exit 1 if P(fund depleted) exceeds this."),
) -> None:
    """Print a report folder's headline and riskiest accounts, or compare it with an older one."""
    from . import report as report_mod

    limits = {k: v for k, v in (("max_bad_debt", max_bad_debt), ("max_p_fund_depleted", max_p_fund_depleted)) if v is not None}
    try:
        for k, v in limits.items():
            _check_limit(k, v)
        rep = report_mod.load(report_dir)
        old = report_mod.load(against) if against is not None else None
        if old is not None:
            _check_out_dir(out_dir or report_dir)
        if "max_p_fund_depleted" in limits and rep.summary.get("p_fund_depleted") is None:
            raise InputError(str(report_dir / "summary.json"), None, "p_fund_depleted",
                             "null (the run has no random scenarios): a P(fund depleted) limit cannot be checked")
        rows = report_mod.account_rows(rep, account) if account is not None else None
    except InputError as exc:
        _fail(exc)
    breaches = _breaches(rep.summary, limits)
    recorded = [b for b in rep.summary.get("limit_breaches") or [] if b not in breaches]
    if rows is not None:
        t = Table(title=Text(f"account {account}"), show_header=False)  # Text: ids are not markup
        for k, v in rows:
            t.add_row(Text(k), Text(v))
        out.print(t)
    elif old is not None:
        d = report_mod.diff(rep, old, top, breaches + recorded)
        if d["setup"]:  # above the headline, as in diff.md and diff.html
            out.print(Text(report_mod.SETUP_WARNING.format(", ".join(d["setup"])), style="bold yellow"))
        out.print(_report_rich(d["headline"], f"night over night: {d['older_as_of']} -> {d['as_of']}"))
        for key in ("new_liquidatable", "movers"):
            out.print(_report_rich(d[key], d[key]["title"], limit=top))
        paths = report_mod.write_diff(d, out_dir or report_dir)
        out.print(Text("diff written to " + ", ".join(str(p) for p in paths)))
    else:
        head = Table(title=Text(f"stress report — {report_dir}"), show_header=False)
        for label, value, breached in report_mod.headline({**rep.summary, "limit_breaches": breaches + recorded}, rep.scenarios):
            style = "bold red" if breached else ""
            head.add_row(Text(label, style=style), Text(value, style=style))
        out.print(head)
        out.print(_report_rich(report_mod.table(report_mod.riskiest(rep.accounts, top), report_mod.ACCOUNT_BRIEF),
                               f"riskiest {min(top, len(rep.accounts)):,} accounts (by worst margin shortfall)"))
    for b in recorded:
        out.print(Text.assemble(("limit breached at run time: ", "red"), b))
    for b in breaches:
        out.print(Text.assemble(("LIMIT BREACHED: ", "bold red"), b))
    if breaches:
        raise typer.Exit(1)


def _report_rich(t: dict, title: str, limit: int | None = None) -> Table:
    """A report table (``stress.report.table``) as a rich Table; cells are Text, so an
    account id such as ``[red]x`` prints as written, not as markup."""
    rt = Table(title=Text(title), show_header=any(t["header"]))
    first = max((len(row[0][0]) for row in t["rows"]), default=0)
    for i, (h, numeric) in enumerate(zip(t["header"], t["numeric"])):
        # the first column (account, scenario) is shown whole up to 40 characters; longer
        # labels (the headline's) wrap there, or they would leave no room for the values;
        # other columns fold rather than cut
        whole = i == 0 and first <= 40
        rt.add_column(h, justify="right" if numeric else "left", overflow="fold", no_wrap=whole,
                      min_width=first if whole else None, max_width=None if whole or i else 40)
    for row in t["rows"][:limit]:
        rt.add_row(*(Text(v) for v, _ in row))
    if not t["rows"] and t.get("note"):
        rt.caption = Text(t["note"])
    elif limit is not None and len(t["rows"]) > limit:  # say so: a title's count would not match the rows
        rt.caption = Text(f"the first {limit:,} of {len(t['rows']):,}; --top sets how many; all are in diff.md")
    return rt


@app.command("backtest")
def backtest_cmd(
    snapshot: Path = typer.Argument(..., help="Snapshot folder (today's portfolios, held fixed)."),
    prices: Path = typer.Option(..., "--prices", "-p", help="Price history CSV or Parquet: a date column and one USD price column per asset."),
    horizon_days: float = typer.Option(..., "--horizon-days", help="Window length in days (the liquidation horizon the margin should cover)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="standard, portfolio or var (default: exchange.toml \\[margin] model)."),
    confidence: Optional[float] = typer.Option(None, "--confidence", help="Confidence level of the tests (default 0.99)."),
    basis: str = typer.Option("maintenance", "--basis", help="maintenance or initial margin as the coverage."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the per-account results to FILE.parquet."),
    top: int = typer.Option(20, min=1, help="Accounts to print, most exceedances first."),
) -> None:
    """Backtest the margin model: today's margin against realised losses over non-overlapping historical windows."""
    from . import io
    from .backtest import backtest as run_backtest
    from .report import usd

    try:
        _check_model_and_out(model, out_file)
        snap = io.load_snapshot(snapshot)
        res = run_backtest(snap, prices, horizon_days, model, confidence, basis=basis)
    except InputError as exc:
        _fail(exc)
    acc, ex, win = res["accounts"], res["exchange"], res["windows"]
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        acc.to_parquet(out_file, index=False)
    colour = {"green": "green", "yellow": "yellow", "red": "bold red"}
    p = lambda v: "n/a" if v != v else f"{v:.4f}"  # NaN: the test does not apply
    zone = lambda z: Text(z, style=colour[z]) if isinstance(z, str) else Text("n/a")
    title = (f"margin backtest — {res['model']} {res['basis']} margin, confidence {res['confidence']:.2%}, "
             f"{len(win):,} non-overlapping windows of {res['horizon_days']:g} days")
    t = Table(title=Text(title))
    for c in ("exchange-wide", "obs.", "exceed.", "expected", "Kupiec p", "Christ. p", "CC p", "zone"):
        t.add_column(c, justify="left" if c in ("exchange-wide", "zone") else "right", no_wrap=True)
    for r in ex.itertuples(index=False):
        t.add_row(r.test, f"{r.observations:,}", f"{r.exceedances:,}", f"{r.expected:,.2f}", p(r.kupiec_p),
                  p(r.christoffersen_p), p(r.cc_p), zone(r.zone))
    t.caption = Text("pooled: every account-window; aggregate: losing accounts' total loss vs total coverage, per window")
    out.print(t)
    shown = acc.sort_values(["exceedances", "worst_loss"], ascending=False, kind="stable").head(top)
    at = Table(title=Text(f"accounts with most exceedances — {min(top, len(acc)):,} of {len(acc):,} accounts with a margin requirement"))
    for c in ("account", "exceed.", "coverage", "worst loss", "worst window", "Kupiec p", "zone"):
        at.add_column(c, justify="left" if c in ("account", "worst window", "zone") else "right")
    if res["untested"]:
        at.caption = Text(f"{len(res['untested']):,} accounts with positions but no margin requirement are not tested")
    for r in shown.itertuples(index=False):
        at.add_row(Text(r.account_id), f"{r.exceedances:,} / {r.windows:,}", usd(r.coverage), usd(r.worst_loss),
                   Text(r.worst_window), p(r.kupiec_p), zone(r.zone))
    out.print(at)
    by_zone = acc.zone.value_counts()
    out.print(Text("accounts by zone: " + ", ".join(f"{z} {int(by_zone.get(z, 0)):,}" for z in colour)))
    if res["unmoved"]:
        out.print(Text(f"no price history for {', '.join(res['unmoved'])}: held at today's price"))
    if out_file is not None:
        out.print(Text(f"wrote {len(acc):,} accounts to {out_file}"))


@app.command()
def bench(
    accounts: int = typer.Option(100_000, min=1, help="Accounts in the synthetic exchange."),
    scenarios: int = typer.Option(1_000, min=1, help="Explicit random shocks."),
    dtype: str = typer.Option("float64", help="float64 or float32."),
    keep: Optional[Path] = typer.Option(None, help="Folder to keep (and reuse) the synthetic snapshot in."),
    positions: Optional[int] = typer.Option(None, min=1, help="About how many positions in all "
                                            "(default: the sample's usual mix, about 1.5 per account)."),
) -> None:
    """Time each stage of a run on a synthetic exchange (load, revalue, holdings layout, compile,
    P&L gather, margin, liquidation, report)."""
    if dtype not in ("float64", "float32"):
        sys.stderr.write(f"error: --dtype {dtype!r}: expected float64 or float32\n")
        raise typer.Exit(2)
    from .benchmark import check_keep, run_stages

    try:
        check_keep(keep)
    except InputError as exc:
        _fail(exc)
    with err.status("benchmarking") as status:
        stages = run_stages(accounts, scenarios, dtype, keep, lambda name: status.update(name), positions)
    t = Table(title=f"stress bench — {accounts:,} accounts x {scenarios:,} scenarios, {dtype}")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    t.add_column("")
    for st in stages:
        t.add_row(st.name, "" if st.seconds != st.seconds else f"{st.seconds:.3f}", st.note)
    out.print(t)


@app.command("sensitivities")
def sensitivities_cmd(
    snapshot: Path = typer.Argument(..., help="Snapshot folder."),
    scenarios: Optional[Path] = typer.Option(None, "--scenarios", "-s", help="Scenario TOML file (default: scenarios/default.toml)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write totals, scenarios, market, params and accounts .parquet into DIR."),
    top: int = typer.Option(10, min=1, help="Rows to print per table, largest first."),
    temperature: Optional[float] = typer.Option(None, help="Smoothing of p_fund_depleted, USD (default: 1% of the fund now)."),
) -> None:
    """Gradients of exchange totals (margin, shortfall, bad debt, fund) to prices, vols and risk parameters."""
    from .report import usd
    from .sensitivities import sensitivities as compute

    try:
        _check_out_dir(out_dir)
        snap, scen = _load(snapshot, scenarios, SAMPLE_ACCOUNTS)
        r = compute(snap, scen, temperature=temperature)
    except InputError as exc:
        _fail(exc)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("totals", "scenarios", "market", "params", "accounts"):
            r[name].to_parquet(out_dir / f"{name}.parquet", index=False)
    num = lambda v: "n/a" if v != v else (f"{v:.4g}" if abs(v) < 1 else usd(v))
    head = Table(title=Text(f"exchange totals — {len(scen):,} scenarios, worst scenario {r['worst_scenario']}"))
    for c in ("total", "scope", "value", "exact"):
        head.add_column(c, justify="left" if c in ("total", "scope") else "right")
    for row in r["totals"].itertuples(index=False):
        head.add_row(Text(row.total), Text(row.scope), num(row.value), num(row.exact))
    head.caption = Text(f"p_fund_depleted_smooth: sigmoid((bad debt - fund) / {r['temperature']:,.0f} USD), "
                        "mean over random scenarios; exact: the unsmoothed share")
    out.print(head)
    keys = [("bad_debt", "worst"), ("shortfall", "worst"), ("insurance_fund_after", "worst"),
            ("maintenance_margin", "now"), ("shortfall", "sum")]
    if r["p_fund_depleted_smooth"] is not None:
        keys.append(("p_fund_depleted_smooth", "random"))

    def wide(df, index):
        w = df.pivot_table(index=index, columns=["total", "scope"], values="sensitivity", aggfunc="sum", sort=False)
        return w.reindex(columns=keys).fillna(0.0)

    def print_wide(w, title, labels):
        w = w.loc[w.abs().max(axis=1).sort_values(ascending=False, kind="stable").index[:top]]
        t = Table(title=Text(title))
        for c in labels:
            t.add_column(c)
        short = {"bad_debt": "bad debt", "insurance_fund_after": "fund after", "maintenance_margin": "MM",
                 "p_fund_depleted_smooth": "P(depleted) smooth"}
        for total, scope in keys:
            t.add_column(f"{short.get(total, total)} ({scope})", justify="right")
        for idx, vals in w.iterrows():
            t.add_row(*(Text(str(v)) for v in (idx if isinstance(idx, tuple) else (idx,))),
                      *(num(float(v)) for v in vals))
        out.print(t)

    print_wide(wide(r["market"], ["factor", "asset", "bump"]), "market sensitivities (USD per bump)",
               ["factor", "asset", "bump"])
    print_wide(wide(r["params"], ["parameter", "group", "bump"]), "risk-parameter sensitivities (USD per bump)",
               ["parameter", "group", "bump"])
    acc = r["accounts"]
    shown = acc.sort_values(["bad_debt_worst", "shortfall_sum"], ascending=False, kind="stable").head(top)
    total_bad = float(r["totals"].set_index(["total", "scope"]).value["bad_debt", "worst"])
    summed = acc.bad_debt_worst.sum()
    # Bad debt is homogeneous in each book's size, so that the allocations add up to it,
    # unless the margin of a smaller book is not smaller in proportion: partial close-outs
    # under risk-limit tiers or an active delta shock. The columns are then marginal rates.
    adds_up = abs(summed - total_bad) <= 1e-6 * max(abs(total_bad), 1.0)
    said = ("allocations sum to it" if adds_up else
            f"allocations sum to {usd(summed)} USD: not homogeneous in book size here (partial close-outs "
            f"under tiers or delta shocks), so each is the marginal bad debt of its book, not a share")
    at = Table(title=Text(f"Euler allocation of the worst scenario's bad debt ({r['worst_scenario']}, "
                          f"{usd(total_bad)} USD; {said})"))
    for c in ("account", "bad debt (worst)", "share", "shortfall (worst)", "shortfall (sum)"):
        at.add_column(c, justify="left" if c == "account" else "right")
    for row in shown.itertuples(index=False):
        share = f"{row.bad_debt_worst / total_bad:.1%}" if total_bad > 0 and adds_up else "n/a"
        at.add_row(Text(row.account_id), usd(row.bad_debt_worst), share, usd(row.shortfall_worst), usd(row.shortfall_sum))
    out.print(at)
    if out_dir is not None:
        out.print(Text(f"wrote totals, scenarios, market, params and accounts .parquet to {out_dir}"))


@app.command()
def calibrate(
    snapshot: Path = typer.Argument(..., help="Snapshot folder."),
    target: str = typer.Option(..., help='The condition to meet, e.g. "p_fund_depleted<=0.001".'),
    scenarios: Optional[Path] = typer.Option(None, "--scenarios", "-s", help="Scenario TOML with multi-step paths (default: scenarios/default.toml)."),
    vary: Optional[str] = typer.Option(None, help="What to scale. Standard model: mm_rate (every maintenance-margin rate; the default) or mm_rate.BTC (those on one underlying); portfolio model: mm_factor (the default), price_range, volatility_range_up, volatility_range_down, max_delta_shock, annualised_move_risk or min_annualised_move, each whole or of one underlying (price_range.BTC); var model: mm_factor. Several comma-separated (mm_rate.BTC,mm_rate.ETH) are a gradient search, then exact."),
    hi: float = typer.Option(64.0, min=1.0, help="Largest scale tried (less where \\[margin] accepts less: mm_factor <= 1, price_range <= 0.99)."),
    tolerance: float = typer.Option(1e-3, min=1e-6, help="Resolution of the scale."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write calibration.json and tradeoff.svg here."),
) -> None:
    """The lowest maintenance margin (one scale on the margin model's parameters, or one per underlying) that meets a loss target."""
    import json

    from . import calibrate as cal

    try:
        goal = cal.parse_target(target)
        _check_out_dir(out_dir)
        snap, scen = _load(snapshot, scenarios, SAMPLE_ACCOUNTS)
    except InputError as exc:
        _fail(exc)
    vary = cal.default_vary(snap) if vary is None else vary
    with err.status("calibrating") as status:
        def seen(r: dict) -> None:
            status.update(f"scale {r['factor']:.3f}: {goal.metric} = {r['value']:.6g}")

        try:
            res = cal.calibrate(snap, scen, goal, parameter=vary, hi=hi, tolerance=tolerance, progress=seen)
        except InputError as exc:
            status.stop()
            _fail(exc)
    vector = "direction" in res
    t = Table(title=f"calibration of {vary} for {goal.metric} <= {goal.limit:g}")
    for c in ("", "scale", goal.metric, "total MM (USD)"):
        t.add_column(c, justify="left" if not c else "right")
    rows = [("current", res["before"]), ("calibrated" if res["factor"] is not None else "largest tried", res["after"])]
    if res["below"] is not None:
        rows.append(("one step below (fails)", res["below"]))
    notes = []
    if vector:
        rows.insert(1, ("smooth solution, exact", res["smooth"]["check"]))
    for label, r in rows:
        t.add_row(label, f"{r['factor']:.3f}", f"{r['value']:.6g}", f"{r['maintenance_margin']:,.0f}")
    if vector:
        along = "every lever to its top" if res["fallback"] else "the smooth solution's direction"
        notes.append(f"scale: along {along} (scales per parameter below); "
                     f"the smooth stage's relaxed {goal.metric} was {res['smooth']['value']:.6g}")
    one_step = int((~scen.random).sum())
    if goal.metric == "worst_bad_debt" and one_step:
        notes.append(f"worst_bad_debt over the set's {int(scen.random.sum())} paths: no margin moves the bad debt "
                     f"of its {one_step} one-step scenario(s)")
    t.caption = "; ".join(notes) or None
    out.print(t)
    if res["idle"]:
        out.print(Text(f"left as they are: {', '.join(res['idle'])} (no effect on this book's margin or on "
                       f"{goal.metric} at today's values)", style="yellow"))
    if vector:
        pt = Table(title="recommended parameters (scales of today's values)")
        for c in ("parameter", "smooth solution", "recommended"):
            pt.add_column(c, justify="left" if c == "parameter" else "right")
        for k, name in enumerate(res["parameters"]):
            rec = "n/a" if res["scales"] is None else f"{res['scales'][k]:.4f}"
            pt.add_row(name, f"{res['smooth']['scales'][k]:.4f}", rec)
        out.print(pt)
        verdict = "meets" if res["smooth"]["met"] else "misses"
        scale = "n/a" if res["factor"] is None else format(res["factor"], ".3f")
        if res["fallback"]:
            out.print(f"the smooth solution {verdict} the target in the exact run, and no scale along its direction "
                      f"meets it; along the ray to every lever's top (every lever alike where the tops are {hi:g}) "
                      f"the scale is {scale}", highlight=False)
        else:
            out.print(f"the smooth solution {verdict} the target in the exact run; the exact bisection along its "
                      f"direction gives scale {scale}", highlight=False)
    if res["factor"] is None:
        tops = ", ".join(f"{n} x {t:g}" for n, t in zip(res["parameters"], res["tops"]))
        out.print(Text(f"the target is not met even at the largest scales tried ({tops})", style="bold red"))
    else:
        cost = res["after"]["maintenance_margin"] - res["before"]["maintenance_margin"]
        what = (", ".join(f"{n} x {v:.3f}" for n, v in zip(res["parameters"], res["scales"])) if vector or vary != "mm_rate"
                else f"every maintenance-margin rate x {res['factor']:.3f}")
        out.print(f"recommended: {what} (margin cost {cost:+,.0f} USD at the snapshot)", highlight=False)
        if res["margin"]:  # one key a line, never wrapped: what is printed pastes as valid TOML
            out.print("in exchange.toml [margin]:", highlight=False)
            for k, v in res["margin"].items():
                out.print(f"{k} = {_toml_value(v)}", highlight=False, soft_wrap=True)
        if res["above_initial"]:
            over = res["above_initial"]
            out.print(Text(f"the maintenance rate passes the initial rate of {len(over)} instrument(s) there "
                           f"({', '.join(over[:5])}{', ...' if len(over) > 5 else ''}): [margin] and the instruments "
                           "table accept that only with the initial rates raised to at least it", style="yellow"))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tradeoff.svg").write_text(cal.tradeoff_svg(res))
        doc = {k: res[k] for k in ("factor", "before", "after", "below", "curve", "scales", "tops", "margin",
                                   "above_initial", "idle")}
        doc["target"] = {"metric": goal.metric, "limit": goal.limit}
        doc["parameter"] = vary
        doc["parameters"] = list(res["parameters"])
        if vector:
            doc["direction"] = res["direction"]
            doc["fallback"] = res["fallback"]
            doc["smooth"] = res["smooth"]
        (out_dir / "calibration.json").write_text(json.dumps(doc, indent=2, allow_nan=False, default=str))
        out.print(f"wrote {out_dir / 'calibration.json'} and {out_dir / 'tradeoff.svg'}", highlight=False)
    if res["factor"] is None:
        raise typer.Exit(1)


def _toml_value(v: float | dict[str, float]) -> str:
    """A number, or a table of asset -> number, as written in ``exchange.toml``."""
    import json
    import re

    if isinstance(v, dict):
        key = lambda k: k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)
        return "{ " + ", ".join(f"{key(k)} = {x:.10g}" for k, x in v.items()) + " }"
    return f"{v:.10g}"


@app.command("reverse")
def reverse_cmd(
    snapshot: Optional[Path] = typer.Argument(None, help="Snapshot folder (default: the built-in sample exchange)."),
    scenarios: Optional[Path] = typer.Option(None, "--scenarios", "-s", help="Scenario TOML whose random scenarios give the covariance (default: scenarios/default.toml)."),
    target: str = typer.Option("fund-exhausted", help="What the move must do: fund-exhausted (bad debt >= the insurance fund)."),
    norm: Optional[str] = typer.Option(None, help="mahalanobis (covariance of the set's random scenarios) or percent (default: mahalanobis when the set has random scenarios)."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result to FILE.json or FILE.parquet."),
    top: int = typer.Option(10, min=1, help="Accounts to show, largest bad debt at the move first."),
    accounts: int = typer.Option(SAMPLE_ACCOUNTS, help="Accounts in the built-in sample (when no SNAPSHOT is given)."),
) -> None:
    """The smallest joint move of prices and vols that exhausts the insurance fund, checked exactly."""
    from .report import usd
    from .reverse import reverse as find

    try:
        _check_out_file(out_file, (".json", ".parquet"))
        snap, scen = _load(snapshot, scenarios, accounts)
        with err.status("searching for the smallest fund-exhausting move"):
            r = find(snap, scen, target, norm=norm, top=top)
    except InputError as exc:
        _fail(exc)
    unit = "standard deviations of the set's horizon move" if r.norm == "mahalanobis" else "Euclidean norm of % moves and vol shifts"
    basis = (f"{r.norm} norm ({unit}; covariance from {r.random_scenarios:,} random scenarios)" if r.norm == "mahalanobis"
             else f"{r.norm} norm ({unit})")
    if not r.found:
        out.print(Text(f"reverse stress test — {basis}"))
        out.print(Text(f"no fund-exhausting move found: {r.message}", style="bold"))
    else:
        mt = Table(title=Text(f"smallest move that exhausts the insurance fund — {basis}: {r.distance:.4g}"))
        for c in ("asset", "price before", "price after", "price move", "vol shift"):
            mt.add_column(c, justify="left" if c == "asset" else "right")
        for m in r.moves.itertuples(index=False):
            vol = "" if m.vol_shift != m.vol_shift else f"{m.vol_shift * 100:+.2f} pts"
            mt.add_row(Text(m.asset), f"{m.price_before:,.6g}", f"{m.price_after:,.6g}", f"{m.price_move:+.2%}", vol)
        out.print(mt)
        ht = Table(title=Text("at the move (engine, exact)"), show_header=False)
        ht.add_row("bad debt (USD)", usd(r.bad_debt))
        ht.add_row("insurance fund at the moved prices (USD)", usd(r.fund))
        if r.fees:
            ht.add_row("liquidation fees to the fund (USD)", usd(r.fees))
        ht.add_row("fund exhausted", "yes" if r.exhausted else "no")
        ht.add_row("exhausted at 0.98 x the move", "yes" if r.exhausted_at_98 else "no")
        out.print(ht)
        at = Table(title=Text(f"accounts driving it — top {len(r.accounts):,} by bad debt at the move"))
        for c in ("account", "bad debt (USD)", "share"):
            at.add_column(c, justify="left" if c == "account" else "right")
        for a in r.accounts.itertuples(index=False):
            at.add_row(Text(a.account_id), usd(a.bad_debt), f"{a.share:.1%}")
        out.print(at)
        out.print(Text(r.message))
    out.print(Text(f"searched: {r.bound}"))
    if out_file is not None:
        _write_reverse(r, out_file)
        out.print(Text(f"wrote {out_file}"))


def _write_reverse(r, path: Path) -> None:
    """The reverse stress result as JSON, or as one Parquet table (``section`` ``move`` rows
    per asset, ``account`` rows for the top accounts) with the scalars in its metadata under
    ``stress.reverse``."""
    import json

    import pandas as pd

    doc = r.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(doc, indent=2, allow_nan=False))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    moves = r.moves.assign(section="move")
    accs = r.accounts.assign(section="account")
    df = pd.concat([moves, accs], ignore_index=True)
    cols = ["section", "asset", "price_before", "price_after", "price_move", "vol_shift", "account_id", "bad_debt", "share"]
    df = df.reindex(columns=cols)
    for c in ("section", "asset", "account_id"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    table = pa.Table.from_pandas(df, preserve_index=False)
    scalars = {k: v for k, v in doc.items() if k not in ("moves", "accounts")}
    meta = {**(table.schema.metadata or {}), b"stress.reverse": json.dumps(scalars).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)


INTERNAL_ERROR = 3  # not in SPEC's 0/1/2: a crash must not read as "a limit was breached" (1)


def _said(exc: Exception, kinds: set[str]) -> int:
    """Say a command-line framework's error (``kinds``: the names of its classes) on stderr,
    in one line; returns the exit code (2 for usage)."""
    if "Abort" in kinds:  # Ctrl-C at a prompt
        sys.stderr.write("aborted\n")
        return 1
    if "NoArgsIsHelpError" in kinds:  # a group called bare: its help, as a bare `stress` shows it
        exc.show()
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if "UsageError" in kinds and ctx is not None else ""
    sys.stderr.write(f"error: {exc.format_message()}{where}\n")
    return exc.exit_code


def main() -> None:
    """The console script: ``app``, with any exception that escapes a command (a bug, not bad
    input, which exits 2) reported with its traceback and exit code ``INTERNAL_ERROR``."""
    import warnings

    # NumPy's overflow and invalid-value warnings say nothing the run does not: a result that is
    # not finite stops it with exit 2 and one message naming where (``_check_finite``)
    warnings.filterwarnings("ignore", message=r".* encountered in ", category=RuntimeWarning)
    try:
        # not standalone: a usage error (an unknown option, a value out of range) comes back
        # here to be said in one line, as every other input error is, not in a framed box
        code = app(standalone_mode=False)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        kinds = {c.__name__ for c in type(exc).__mro__}  # click's classes, or the copy newer typer vendors
        if "ClickException" not in kinds and "Abort" not in kinds:
            import traceback

            traceback.print_exc()
            sys.stderr.write("stress: internal error (exit 3): please report it with the traceback above\n")
            raise SystemExit(INTERNAL_ERROR) from None
        raise SystemExit(_said(exc, kinds)) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
