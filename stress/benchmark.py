"""`stress bench`: time each stage of a run on a synthetic exchange.

The side-by-side comparison against a plain NumPy implementation lives in ``bench/`` (it
needs the reference code, which is not part of the package); this is the quick, installable
answer to "how fast is it on this machine": generate a sample exchange, then time loading,
scenario building, instrument revaluation, the holdings layout, compilation, the account work
stage by stage (the P&L gather, margin, liquidation and losses), a warm run and writing the
report, each once, in one process.

The engine does the whole per-scenario account work in one fused kernel, so its stages cannot
be timed inside a run. ``stage_kernel`` builds the first parts of it on their own, over the same
chunks, tiles and devices: the P&L gather-and-reduce, then that with collateral, margin and
shortfall. Each stage's time is the difference between consecutive parts, and liquidation and
losses are the warm run minus the margin part. On a GPU, where a run may take the fused Pallas
kernel (``engine.PALLAS``), the parts still run through XLA, so there the differences set two
different codes against each other.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _exported, engine, portfolio
from ._memory import forget_peak, peak_mib
from .errors import InputError
from .snapshot import account_id_column


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    note: str = ""


def random_shocks(snap, n: int, seed: int = 0):
    """``n`` explicit joint shocks: spot multipliers ``exp(0.05 z)`` and vol shifts
    ``N(0, 0.05)`` per non-stable asset (the shocks of ``bench/run.py``)."""
    from .scenarios import Scenarios

    rng = np.random.default_rng(seed)
    A = snap.n_assets
    spot = np.exp(0.05 * rng.standard_normal((n, A)))
    vol = rng.normal(0.0, 0.05, (n, A))
    return Scenarios(tuple(f"shock-{i}" for i in range(n)), ("explicit",) * n, spot, vol, np.zeros(n))


STAGES = ("pnl", "margin")  # stage_kernel's parts, each containing the one before


@functools.lru_cache(maxsize=None)
def stage_kernel(stage: str, n_devices: int) -> Callable:
    """The first part of ``engine.chunk_kernel`` over a group of chunks, as
    ``engine.sharded_kernel`` runs it (chunks in turn on each device, scenarios tile by tile).

    ``"pnl"``, the P&L gather-and-reduce: each account's equity in every scenario (its
    positions' values gathered from the tables, its balances revalued), reduced to its worst
    P&L ``pnl_worst`` ``[n]`` and the exchange's P&L per scenario (``sums`` row 0).
    ``"margin"``: that, and collateral (haircuts), maintenance margin and shortfall, reduced to
    the largest ``margin - collateral`` per account ``gap_max`` ``[n]`` and, per scenario, the
    accounts short of margin and their shortfall (``sums`` rows 1 and 2).
    Liquidation, closing costs, partial close-outs and bad debt are left out, so the worst P&L
    and the shortfall equal a run's where those are off (without fees, impact or
    ``partial_target``). The margin part follows ``engine.fusion``'s settings as
    ``chunk_kernel`` does. The run itself sums the exchange's P&L on the host
    (``engine.exchange_pnl``), not per chunk: that sum is work the P&L part adds. The tables must
    hold one-step scenarios (``t.value`` ``[T, I, W]``).
    """

    def one(h, t):
        eq0 = t.state0(h)[0]
        T, W = t.user.shape
        fuse = engine.fusion(eq0.dtype)
        total = engine.account_total(h.valid, fuse)

        def pnl_tile(carry, x):
            value, _, price, *_ = x
            # margin and collateral unused: XLA drops their work (checked in the compiled (8, 64) loop too)
            eq = portfolio.state(h, value, value, price, t.haircut)[0]
            worst, gap_max = carry
            pnl = eq - eq0[:, None]
            rows = [total(pnl)] + ([] if stage == "pnl" else [jnp.zeros(W, eq.dtype)] * 2)
            return (jnp.minimum(worst, jnp.min(pnl, axis=1)), gap_max), jnp.stack(rows)

        def margin_tile(carry, x):
            value, mm, price, notional, hc_base, pmx = x
            eq, coll, m, *_ = engine.tile_state(h, value, mm, price, t.haircut_of(hc_base),
                                                *(() if t.tiers is None else (notional,)), tiers=t.tiers, fuse=fuse)
            m = m if pmx is None else t.model_margin(h, pmx)
            if fuse["keep"]:  # as chunk_kernel keeps them
                eq, coll, m = jax.lax.optimization_barrier((eq, coll, m))
            worst, gap_max = carry
            # min(fl(eq - eq0)) == fl(min(eq) - eq0) (rounding is monotone), so both reductions
            # can read the P&L: one [n, W] array in memory on CPU instead of two
            pnl = eq - eq0[:, None]
            worst = jnp.minimum(worst, jnp.min(pnl, axis=1))
            gap = m - coll
            t_gap = jnp.max(gap, axis=1)
            gap_max = jnp.maximum(gap_max, t_gap)
            short = lambda: jnp.stack([total((gap > 0).astype(eq.dtype)), total(jnp.maximum(gap, 0.0))])  # noqa: E731
            # as chunk_kernel does, summed only in tiles where an account is short of margin
            rows = [total(pnl), *(engine._when(jnp.any(h.valid & (t_gap > 0)), short) if fuse.get("skip") else short())]
            return (worst, gap_max), jnp.stack(rows)

        n = eq0.shape[0]
        init = (jnp.full(n, jnp.inf, eq0.dtype), jnp.full(n, -jnp.inf, eq0.dtype))
        tables = (t.value, t.mm, t.price, t.notional, t.haircut_base, t.model_tiles())
        if stage == "pnl" or t.ranges is None:
            (worst, gap_max), sums = jax.lax.scan(pnl_tile if stage == "pnl" else margin_tile, init, tables)
        else:  # as chunk_kernel: a tile proved calm skips its margin work (each branch slices its tables)
            def tile(carry, x):
                k, proved = x
                return jax.lax.cond(proved, lambda c: pnl_tile(c, engine.tile_at(tables, k)),
                                    lambda c: margin_tile(c, engine.tile_at(tables, k)), carry)

            (worst, gap_max), sums = jax.lax.scan(tile, init, (jnp.arange(T), engine.calm_tiles(h, t.ranges)))
        out = {"pnl_worst": worst, "sums": sums.transpose(1, 0, 2).reshape(-1, T * W)}
        return out if stage == "pnl" else {**out, "gap_max": gap_max}

    def local(h, t, acc):  # as the run's kernel, each device adds its chunks' sums up as it goes
        def chunk(total, c):
            out = one(c, t)
            return engine.add_sums(total, out), out

        total, out = jax.lax.scan(chunk, {"sums": acc[0]}, h)
        return {**out, "sums": total["sums"][None]}

    return jax.jit(engine.on_devices(local, n_devices, (P("d"), P(), P("d"))))


def sweep_stage(snap, t, stage: str, dtype) -> tuple[dict, np.ndarray]:
    """``stage_kernel(stage)`` over every account of ``snap`` on tables ``t`` (``engine.tables``),
    chunked and dispatched as a run's sweep is. Returns the per-account rows (``[n_accounts]``
    each, snapshot order) and the per-scenario sums ``[rows, S]`` (float64)."""
    D = len(engine.devices())
    kernel = stage_kernel(stage, D)
    if t.value.shape[2] != t.user.shape[1]:
        raise ValueError("stage timing takes one-step scenarios only")
    S = int(np.asarray(t.user).sum())
    accounts = engine.LocalAccounts(snap, None, dtype)
    if stage != "pnl":  # tiles proved calm skip the margin work, in the accounts' order, as a run's
        t = engine.with_ranges(t, snap.n_accounts)
    t_dev = engine.replicated(t, D)
    per_acc: dict[str, np.ndarray] = {}
    rows = 1 if stage == "pnl" else 3
    sums = jax.device_put(np.zeros((D, rows, t.user.size)), NamedSharding(engine._mesh(D), P("d")))

    def call(h):
        nonlocal sums
        out = kernel(h, t_dev, sums)
        sums = out.pop("sums")  # stays on the devices, as the run's
        return out

    def drain(accs, out) -> None:
        out = jax.device_get(out)
        acc = np.concatenate(accs)
        for k, v in out.items():
            per_acc.setdefault(k, np.empty(snap.n_accounts))[acc] = engine.real_rows(accs, v)

    engine.pipelined(accounts.groups(D, t), call, drain, in_flight=2)
    return per_acc, np.asarray(sums).sum(axis=0)[:, :S]


def check_keep(folder: Path | None) -> None:
    """Refuse a ``--keep`` folder that holds anything but a sample ``run_stages`` wrote there
    (its ``.accounts`` marker): a sample of another size is written over, which must never
    be a user's snapshot."""
    if folder is None or not Path(folder).exists():
        return
    if not Path(folder).is_dir():
        raise InputError("--keep", None, None, f"{folder} is not a folder")
    if any(Path(folder).iterdir()) and not (Path(folder) / ".accounts").exists():
        raise InputError("--keep", None, None, f"{folder} holds files that stress bench did not write there; "
                         "give it an empty or new folder")


def run_stages(accounts: int, scenarios: int, dtype: str = "float64", folder: Path | None = None,
               progress: Callable[[str], None] | None = None, positions: int | None = None) -> list[Stage]:
    """Time every stage once; returns them in order. ``folder`` keeps the sample (reused when
    it already holds one of the same size); ``positions``: about how many positions the sample
    holds (``sample.generate``; default: its usual mix)."""
    from . import io, report, sample

    stages: list[Stage] = []

    def seconds(fn: Callable, name: str) -> tuple[float, object]:
        if progress:
            progress(name)
        t = time.perf_counter()
        value = fn()
        jax.block_until_ready(value) if not isinstance(value, (engine.Result, Path, type(None))) else None
        return time.perf_counter() - t, value

    def timed(name: str, fn: Callable, note: Callable[[object], str] = lambda _: ""):
        took, value = seconds(fn, name)
        stages.append(Stage(name, took, note(value)))
        return value

    def difference(name: str, a: float, b: float, note: str) -> Stage:
        """A stage timed as ``a - b``; below 0 (noise on a tiny run) it shows as 0, and says so."""
        return Stage(name, max(a - b, 0.0), note + (f" (measured {a - b:.3f} s: noise)" if a < b else ""))

    check_keep(folder)
    with tempfile.TemporaryDirectory(prefix="stress-bench-") as tmp:
        where = Path(folder) if folder else Path(tmp) / "snapshot"
        marker = where / ".accounts"
        size = str(accounts) if positions is None else f"{accounts} accounts, {positions} positions"
        if not (marker.exists() and marker.read_text() == size):
            timed("generate sample", lambda: sample.write(where, accounts=accounts, fmt="parquet", positions=positions))
            marker.write_text(size)
            forget_peak()  # the peak reported is the stages', not the generator's (1.7 GB at 1M)
        snap = timed("load snapshot", lambda: io.load_snapshot(where),
                     lambda s: f"{s.n_accounts:,} accounts, {s.n_positions:,} positions")
        scen = timed("build scenarios", lambda: random_shocks(snap, scenarios), lambda s: f"{len(s):,} explicit shocks")
        dt = engine.DTYPES[dtype]
        t = timed("revalue instruments", lambda: engine.tables(snap, scen, dt)[0],
                  lambda _: f"{len(snap.instrument_ids):,} instruments x {scenarios:,} scenarios")
        # kept per snapshot (``engine.layout_of``, ``account_id_column``): built here, so the
        # first run below is the kernels' compilation (or loading from the caches) alone
        timed("holdings layout", lambda: (engine.LocalAccounts(snap, None, dt).layout(t), account_id_column(snap))[0],
              lambda lay: f"{len(lay[0])} holdings shapes; the account id column")
        cells = snap.n_accounts * scenarios
        rate = lambda took: f"{cells / took:.3g} account-scenarios/s"  # noqa: E731
        before = len(_exported.prepared)
        first, _ = seconds(lambda: engine.run(snap, scen, dtype=dtype), "first run")
        prepared = _exported.prepared[before:]
        whole, res = seconds(lambda: engine.run(snap, scen, dtype=dtype), "warm run")
        part = {}
        for stage in STAGES:
            sweep_stage(snap, t, stage, dt)  # compiles
            part[stage], _ = seconds(lambda: sweep_stage(snap, t, stage, dt), f"{stage} part")
        devices = jax.local_devices()
        kind, backend = devices[0].device_kind, jax.default_backend()
        kind = kind if kind == backend else f"{kind} ({backend})"  # "cpu", or "NVIDIA H200 (gpu)"
        where_run = (f"{len(devices)} x {kind}, chunks of {engine.default_chunk():,} accounts, "
                     f"tiles of up to {engine.max_tile(dt):,} scenarios")
        stages += [
            difference("compile", first, whole, "the first run minus the warm run: compiling the kernels, "
                       "or loading them from the caches" + (f" ({len(prepared)} kernels read, lowered and loaded: "
                       f"{sum(s for _, s in prepared):.2f} s, much of it in threads beside the run)" if prepared else "")),
            Stage("gather (P&L)", part["pnl"], f"{rate(part['pnl'])}: every account's equity in every "
                  "scenario, its worst P&L, the exchange's P&L per scenario"),
            difference("margin", part["margin"], part["pnl"], "collateral, maintenance margin, shortfall; "
                       f"with the gather {part['margin']:.3f} s, {rate(part['margin'])}"),
            difference("liquidation", whole, part["margin"], "the warm run minus the margin part: liquidation, "
                       "closing costs, bad debt, the tables, per-account results"),
            Stage("warm run", whole, f"{rate(whole)} on {where_run}"),
        ]
        timed("write report", lambda: report.write(res, Path(tmp) / "report"))
    stages.append(Stage("peak memory", float("nan"), f"{peak_mib():,.0f} MiB resident (the process's peak; generating the sample left out)"))
    return stages
