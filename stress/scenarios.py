"""Scenario sets (SPEC section 3): TOML files of joint market shocks, in five forms.

A file holds any of these arrays of tables, each documented with an example in
``scenarios/README.md``:

- ``[[scenario]]`` explicit joint shocks (``kind = explicit``);
- ``[[grid]]`` risk-matrix grids, Deribit portfolio-margin or SPAN style (``grid``);
- ``[[event]]`` named historical events shipped in ``scenarios/events.toml`` (``event``);
- ``[[replay]]`` one scenario per window of a price history, plain or filtered (``replay``);
- ``[[montecarlo]]`` correlated fat-tailed paths with jumps (``montecarlo``).

Rows come in file order (forms in the order they first appear). ``replay`` and
``montecarlo`` are the run's random scenarios; a set holds at most one such block. Paths
(Monte Carlo steps, replay rows inside a window) keep their intermediate steps so that an
account is closed out at the first step that breaches its margin (``liquidation``); other
scenarios are one step.
"""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import liquidation
from .errors import InputError
from .io import read_toml
from .snapshot import Snapshot

KINDS = ("explicit", "grid", "event", "replay", "montecarlo")
RANDOM_KINDS = ("replay", "montecarlo")
FORMS = {"scenario": "explicit", "grid": "grid", "event": "event", "replay": "replay", "montecarlo": "montecarlo"}


@dataclasses.dataclass(frozen=True)
class Scenarios:
    """A scenario set over the snapshot's assets. Rows are scenarios, in file order.

    A scenario is a path of ``K`` steps (``K = 1`` for a one-off shock); the fields without
    ``path_`` describe its last step; the steps before it are where an account may be closed
    out earlier (``liquidation.path_outcome``).
    """

    names: tuple[str, ...]  # [S]
    kinds: tuple[str, ...]  # [S], one of KINDS
    spot_mult: np.ndarray  # [S, A] scenario price / snapshot price, > 0
    vol_shift: np.ndarray  # [S, A] absolute implied-vol change of options on each underlying
    horizon_days: np.ndarray  # [S] days before revaluation, >= 0
    path_spot_mult: np.ndarray | None = None  # [S, K-1, A] at the steps before the last; None if K = 1
    path_vol_shift: np.ndarray | None = None  # [S, K-1, A]
    path_horizon_days: np.ndarray | None = None  # [S, K-1]
    # [S] int, 1 .. K: each path's own steps, the rest repeating its last state (a replay window
    # over a gap in the history, a one-off shock beside paths); None: ``length``'s default.
    # Set by the loader: a set whose paths are changed in Python gives it anew (or None)
    path_length: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def steps(self) -> int:
        """``K``: steps per path (1 when no scenario is a path)."""
        return 1 if self.path_spot_mult is None else self.path_spot_mult.shape[1] + 1

    @property
    def random(self) -> np.ndarray:
        """``[S]`` bool: the run's random scenarios (Monte Carlo paths or replay windows)."""
        return np.isin(np.array(self.kinds, dtype=object), RANDOM_KINDS)

    @property
    def length(self) -> np.ndarray:
        """``[S]`` int: the steps of each path before it only repeats its state, ``1 .. K``.

        A set's paths share ``K`` steps; a shorter one is padded with its last state: a one-off
        shock in a set with paths is a path whose every step is the shock (length 1), and a
        replay window over a gap in the history has fewer rows than the longest (``_replay``,
        ``replay.windows``). A repeated step is the same instant, not a later one: the
        liquidation engine acts at a path's first ``length`` steps only, and an oracle lag
        counts within them (``liquidation.acted``), so a scenario's results do not depend on
        the longer paths beside it. ``path_length`` where given (the loader sets it), else 1
        for a path whose every step is one state and ``K`` for the others (a set built in
        Python pads its short paths itself, and says so there).
        """
        S = len(self.names)
        if self.path_length is not None:
            return np.asarray(self.path_length, np.int32)
        if self.path_spot_mult is None:
            return np.ones(S, np.int32)

        def same(before: np.ndarray, last: np.ndarray) -> np.ndarray:  # [S, K-1, ...] against [S, ...]
            return np.all(before == last[:, None], axis=tuple(range(1, before.ndim)))

        still = (same(self.path_spot_mult, self.spot_mult) & same(self.path_vol_shift, self.vol_shift)
                 & same(self.path_horizon_days, self.horizon_days))
        return np.where(still, 1, self.steps).astype(np.int32)

    @property
    def one_off(self) -> np.ndarray:
        """``[S]`` bool: scenarios whose every step is one state (``length == 1``), such as a
        one-off shock in a set with paths; every scenario of a one-step set."""
        return self.length == 1


@dataclasses.dataclass
class _Block:
    """Scenarios of one table of the file, as ``[s, K, A]`` paths (``K = 1``: one step)."""

    names: list[str]
    kind: str
    spot: np.ndarray  # [s, K, A]
    vol: np.ndarray  # [s, K, A]
    horizon: np.ndarray  # [s, K]
    length: np.ndarray | None = None  # [s] each scenario's own steps; None: all K (1 for one-step blocks)


def _packaged(name: str) -> Path:
    """A file of the scenario library: packaged with a wheel, or the repository's ``scenarios/``."""
    packaged = resources.files("stress") / "_scenarios" / name
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "scenarios" / name


def default_path() -> Path:
    """The default scenario set (``scenarios/default.toml``)."""
    return _packaged("default.toml")


def events_path() -> Path:
    """The named historical events shipped with the package (``scenarios/events.toml``)."""
    return _packaged("events.toml")


# --------------------------------------------------------------------------------------------
# Field checks: every message names the file, the scenario (or table) and the field.


@dataclasses.dataclass(frozen=True)
class _Ctx:
    file: str
    label: str
    snap: Snapshot
    skip_unknown: bool
    folder: Path

    def error(self, field: str | None, message: str) -> InputError:
        return InputError(self.file, self.label, field, message)

    def number(self, row: dict, key: str, default: Any = None, **bounds: Any) -> Any:
        """``row[key]`` (or ``default``) checked by ``value``."""
        return self.value(row.get(key, default), key, **bounds)

    def value(self, v: Any, field: str, *, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False, integer: bool = False) -> Any:
        """A finite number within bounds (``lo < v`` when ``lo_open``), else an error on ``field``."""
        if v is None:
            raise self.error(field, "missing value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(field, f"{v!r} is not a finite number")
        if integer and v != int(v):
            raise self.error(field, f"{v!r} is not a whole number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.error(field, f"{v!r} must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and v > hi:
            raise self.error(field, f"{v!r} must be <= {hi:g}")
        return int(v) if integer else float(v)

    def text(self, row: dict, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
        v = row.get(key, default)
        if not isinstance(v, str) or not v.strip():
            raise self.error(key, "missing value" if v is None else f"{v!r} is not a non-empty string")
        if choices is not None and v not in choices:
            raise self.error(key, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def asset(self, name: Any, field: str) -> int | None:
        """Snapshot index of an asset; None when unknown and unknown assets are skipped."""
        if not isinstance(name, str) or name not in self.snap.assets:
            if self.skip_unknown and isinstance(name, str):
                return None
            raise self.error(field, f"unknown asset {name!r}")
        return self.snap.asset_index(name)

    def asset_table(self, row: dict, key: str, *, lo: float | None = None, lo_open: bool = False,
                    hi: float | None = None) -> dict[int, float]:
        """A table of ``asset = number``, keyed by snapshot asset index (unknown assets, where
        skipped, left out)."""
        named = self.named_table(row, key, lo=lo, lo_open=lo_open, hi=hi)
        return {self.snap.asset_index(a): v for a, v in named.items() if a in self.snap.assets}

    def named_table(self, row: dict, key: str, *, lo: float | None = None, lo_open: bool = False,
                    hi: float | None = None) -> dict[str, float]:
        """A table of ``asset = number`` keyed by asset name, keeping the names the snapshot
        lacks where unknown assets are skipped (Monte Carlo still draws them: ``_montecarlo``)."""
        table = row.get(key, {})
        if not isinstance(table, dict):
            raise self.error(key, "must be a table of asset = number")
        out = {}
        for name, v in table.items():
            field = f"{key}.{name}"
            self.asset(name, field)  # an error unless known, or unknown and skipped
            out[name] = self.value(v, field, lo=lo, lo_open=lo_open, hi=hi)
        return out

    def keys(self, row: dict, known: set[str]) -> None:
        bad = set(row) - known
        if bad:
            raise self.error(sorted(bad)[0], f"unknown field (known: {', '.join(sorted(known))})")


def _moves(ctx: _Ctx, row: dict, key: str = "moves") -> dict[int, float]:
    moves = ctx.asset_table(row, key)
    for a, v in moves.items():
        if v <= -1:
            raise ctx.error(f"{key}.{ctx.snap.assets[a]}", f"move {v:g} puts the price at or below zero")
    return moves


def _shifts(ctx: _Ctx, row: dict, key: str = "vol_shift") -> dict[int, float]:
    return ctx.asset_table(row, key)


def _one_step(names: list[str], kind: str, A: int, rows: list[tuple[dict, dict, float]]) -> _Block:
    """A block of one-step scenarios from ``(moves, vol shifts, horizon)`` per scenario."""
    spot, vol = np.ones((len(rows), 1, A)), np.zeros((len(rows), 1, A))
    for s, (moves, shifts, _) in enumerate(rows):
        for a, v in moves.items():
            spot[s, 0, a] = 1.0 + v
        for a, v in shifts.items():
            vol[s, 0, a] = v
    horizon = np.array([[h] for *_, h in rows], np.float64).reshape(len(rows), 1)
    return _Block(names, kind, spot, vol, horizon)


# --------------------------------------------------------------------------------------------
# The forms


def _explicit(ctx: _Ctx, row: dict) -> _Block:
    ctx.keys(row, {"name", "moves", "vol_shift", "horizon_days"})
    name = ctx.text(row, "name")
    h = ctx.number(row, "horizon_days", 0, lo=0)
    return _one_step([name], "explicit", ctx.snap.n_assets, [(_moves(ctx, row), _shifts(ctx, row), h)])


GRID_DEFAULTS = {
    "style": "risk-matrix",
    "mode": "each",
    "range": 0.16,
    "buckets": 4,
    "vol_shifts": [0.30, 0.0, -0.30],
    "extended": [-0.66, -0.33, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0],
    "vol_range": 0.30,
    "extreme": 2.0,
    "horizon_days": 0,
}


def grid_points(style: str, *, buckets: int = 4, vol_shifts=(0.30, 0.0, -0.30), extended=(),
                vol_range: float = 0.30, extreme: float = 2.0) -> list[tuple[float, float | None, float]]:
    """The grid as ``(fraction of range, absolute move or None, vol shift)`` points.

    ``risk-matrix``: ``2 * buckets + 1`` evenly spaced moves over ``[-range, +range]`` (0
    included) crossed with every vol shift, then each ``extended`` move (absolute, not scaled
    by the range) with the largest vol shift, as Deribit's portfolio margin extends its matrix.
    ``span``: SPAN's 16 risk-array scenarios in CME order: price unchanged, up and down 1/3,
    2/3 and 3/3 of the range, each with vol up then vol down by ``vol_range``, then up and
    down ``extreme`` times the range with vol unchanged (SPAN counts those two at 35% for
    margin; a stress run reports them at their full move).
    """
    if style == "span":
        pts = []
        for frac in (0.0, 1 / 3, -1 / 3, 2 / 3, -2 / 3, 1.0, -1.0):
            pts += [(frac, None, vol_range), (frac, None, -vol_range)]
        return pts + [(extreme, None, 0.0), (-extreme, None, 0.0)]
    fracs = np.linspace(-1.0, 1.0, 2 * buckets + 1)
    pts = [(float(f), None, float(v)) for v in vol_shifts for f in fracs]
    up = max(vol_shifts) if len(vol_shifts) else 0.0
    return pts + [(0.0, float(m), up) for m in extended]


def _grid(ctx: _Ctx, row: dict) -> _Block:
    ctx.keys(row, {"name", "underlyings", "mode", "style", "range", "buckets", "vol_shifts",
                   "extended", "vol_range", "extreme", "horizon_days"})
    name = ctx.text(row, "name")
    style = ctx.text(row, "style", GRID_DEFAULTS["style"], ("risk-matrix", "span"))
    mode = ctx.text(row, "mode", GRID_DEFAULTS["mode"], ("each", "joint"))
    unders = row.get("underlyings")
    if not isinstance(unders, list) or not unders:
        raise ctx.error("underlyings", "must be a non-empty list of assets")
    assets = [a for i, u in enumerate(unders) if (a := ctx.asset(u, f"underlyings[{i}]")) is not None]
    rng = row.get("range", GRID_DEFAULTS["range"])
    if isinstance(rng, dict):
        ranges = ctx.asset_table(row, "range", lo=0, lo_open=True, hi=1)
        missing = [ctx.snap.assets[a] for a in assets if a not in ranges]
        if missing:
            raise ctx.error(f"range.{missing[0]}", "missing range for an underlying of the grid")
    else:
        r = ctx.number(row, "range", GRID_DEFAULTS["range"], lo=0, lo_open=True, hi=1)
        ranges = {a: r for a in assets}
    buckets = ctx.number(row, "buckets", GRID_DEFAULTS["buckets"], lo=1, hi=50, integer=True)
    lists = {}
    for key in ("vol_shifts", "extended"):
        v = row.get(key, GRID_DEFAULTS[key])
        if not isinstance(v, list) or (key == "vol_shifts" and not v):
            raise ctx.error(key, "must be a list of numbers" + (" (at least one)" if key == "vol_shifts" else ""))
        lo = -1 if key == "extended" else None
        lists[key] = [ctx.value(x, f"{key}[{i}]", lo=lo, lo_open=True) for i, x in enumerate(v)]
    vol_range = ctx.number(row, "vol_range", GRID_DEFAULTS["vol_range"], lo=0)
    extreme = ctx.number(row, "extreme", GRID_DEFAULTS["extreme"], lo=0, lo_open=True)
    h = ctx.number(row, "horizon_days", GRID_DEFAULTS["horizon_days"], lo=0)
    pts = grid_points(style, buckets=buckets, vol_shifts=lists["vol_shifts"], extended=lists["extended"],
                      vol_range=vol_range, extreme=extreme)
    groups = [[a] for a in assets] if mode == "each" else ([assets] if assets else [])
    shown, rows = [], []
    for group in groups:
        label = ctx.snap.assets[group[0]] if mode == "each" else "all"
        for frac, absolute, dv in pts:
            moves = {a: (absolute if absolute is not None else frac * ranges[a]) for a in group}
            if any(m <= -1 for m in moves.values()):
                raise ctx.error("range" if absolute is None else "extended", "a grid move puts a price at or below zero")
            shown.append((label, next(iter(moves.values())), dv, ":ext" if absolute is not None else ""))
            rows.append((moves, {a: dv for a in group}, h))
    # moves to 0.1% and vol shifts to 0.01, or as many more digits as a fine grid needs for
    # its names to be unique (a range of 1% in 20 buckets has moves 0.05% apart)
    distinct = len(set(shown)) == len(shown)  # a point given twice stays a duplicate name at any precision
    for d in range(1, 9 if distinct else 2):
        names = [f"{name}:{label}{m:+.{d}%}:vol{dv:+.{d + 1}f}{ext}" for label, m, dv, ext in shown]
        if len(set(names)) == len(names):
            break
    return _one_step(names, "grid", ctx.snap.n_assets, rows)


_LIBRARY: dict[str, list[dict]] = {}


def event_library(path: Path | None = None) -> list[dict]:
    """The named historical events (``scenarios/events.toml``), as their TOML tables."""
    path = path or events_path()
    key = str(path)
    if key not in _LIBRARY:
        cfg = read_toml(path)
        events = cfg.get("event", [])
        if not isinstance(events, list):
            raise InputError(path.name, None, "event", "must be an array of [[event]] tables")
        _LIBRARY[key] = events
    return _LIBRARY[key]


def _event(ctx: _Ctx, row: dict) -> _Block:
    ctx.keys(row, {"use", "variant", "proxy"})  # scenarios take the library's names: a name here would do nothing
    library = event_library()
    names_known = [e.get("name") for e in library]
    use = row.get("use", "all")
    variant = ctx.text(row, "variant", "both", ("close", "trough", "both"))
    if use == "all":
        chosen = [e for e in library if variant == "both" or e.get("variant") == variant]
    else:
        wanted = [use] if isinstance(use, str) else use
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            raise ctx.error("use", "must be \"all\", an event name or a list of event names")
        chosen = []
        for w in wanted:
            hits = [e for e in library if e.get("name") == w or e.get("event") == w]
            if variant != "both":
                hits = [e for e in hits if e.get("variant") == variant]
            if not hits:
                raise ctx.error("use", f"no shipped event named {w!r} (known: {', '.join(map(str, names_known))})")
            chosen += hits
    proxy = row.get("proxy", {})
    if not isinstance(proxy, dict) or not all(isinstance(v, str) for v in proxy.values()):
        raise ctx.error("proxy", "must be a table of asset = asset it moves like where an event does not list it")
    listed = sorted({k for e in library for key in ("moves", "vol_shift") if isinstance(e.get(key), dict) for k in e[key]})
    proxies = {}
    for a_name, like in proxy.items():
        if like not in listed:  # a typo would otherwise leave the asset silently unmoved
            raise ctx.error(f"proxy.{a_name}", f"{like!r} is not an asset the shipped events list (known: {', '.join(listed)})")
        a = ctx.asset(a_name, f"proxy.{a_name}")
        if a is not None:
            proxies[a] = like
    # The library names assets a snapshot may not have: those are skipped, not errors.
    lib_ctx = dataclasses.replace(ctx, file=events_path().name, skip_unknown=True)
    names, rows = [], []
    for e in chosen:
        ectx = dataclasses.replace(lib_ctx, label=f"event {e.get('name')!r}")
        moves, shifts = _moves(ectx, e), _shifts(ectx, e)
        for a, like in proxies.items():  # only for assets the event does not list itself
            for table, out in ((e.get("moves", {}), moves), (e.get("vol_shift", {}), shifts)):
                if isinstance(table, dict) and like in table and ctx.snap.assets[a] not in table:
                    out[a] = float(table[like])
        names.append(str(e.get("name")))
        rows.append((moves, shifts, ectx.number(e, "horizon_days", 0, lo=0)))
    return _one_step(names, "event", ctx.snap.n_assets, rows)


def read_history(path: Path, assets: Any = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A price history: a ``date`` column and one USD price column per asset (CSV or Parquet),
    optional ``<ASSET>_iv`` implied-vol columns. Returns ``([R] datetime64[ms], {column: [R]})``.
    With ``assets`` (names), only their columns are read and checked: a history broader than
    the book (an asset listed mid-history, blank before) is not an error for a book without it.

    Raises:
      InputError: naming the file, the line (CSV) or row and the column at fault.
    """
    import pandas as pd
    import pyarrow as pa

    from .io import _check_file, _first_line, _read_csv, _repeated_column, _Table

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        _check_file(path)
        try:
            _repeated_column(path, pq.read_schema(path).names)
            data = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(path.name, None, None, f"not a readable Parquet file: {_first_line(exc)}") from None
    else:
        data = _read_csv(path)
    t = _Table(path, data)
    if not t.has("date"):
        raise InputError(path.name, None, "date", "missing column")
    raw = t.strings("date") if t.is_csv or pa.types.is_string(t.raw("date").type) else None
    if raw is not None:
        times = pd.to_datetime(pd.Series(raw), utc=True, errors="coerce")
        bad = times.isna().to_numpy()
        t.check(bad, "date", "not a date")
    else:
        times = pd.to_datetime(pd.Series(t.raw("date").to_numpy(zero_copy_only=False)), utc=True)
    times = times.dt.tz_convert(None).to_numpy().astype("datetime64[ms]")
    t.check(np.r_[False, np.diff(times) <= np.timedelta64(0, "ms")], "date", "dates must be strictly increasing")
    cols = {}
    for c in data.column_names:
        if c == "date" or (assets is not None and (c[:-3] if c.endswith("_iv") else c) not in assets):
            continue
        v = t.numbers(c)
        t.check(v <= 0 if not c.endswith("_iv") else v < 0, c, "prices must be > 0" if not c.endswith("_iv") else "implied vol must be >= 0")
        cols[c] = v
    return times, cols


def _read_history(ctx: _Ctx, path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``read_history``, with a missing file reported against the table's ``prices`` field."""
    if not path.exists():
        raise ctx.error("prices", f"file not found: {path}")
    return read_history(path, ctx.snap.assets)


def _replay(ctx: _Ctx, row: dict) -> _Block:
    from . import replay

    ctx.keys(row, {"name", "prices", "horizon_days", "filtered", "ewma_lambda"})
    name = ctx.text(row, "name")
    file = ctx.text(row, "prices")
    h = ctx.number(row, "horizon_days", 1, lo=0, lo_open=True)
    filtered = row.get("filtered", False)
    if not isinstance(filtered, bool):
        raise ctx.error("filtered", "must be true or false")
    lam = ctx.number(row, "ewma_lambda", 0.94, lo=0, lo_open=True, hi=0.9999)
    path = Path(file) if Path(file).is_absolute() else ctx.folder / file
    times, cols = _read_history(ctx, path)
    A = ctx.snap.n_assets
    # Columns for assets the snapshot lacks are ignored: a history is broader than one book.
    price_cols = [(ctx.snap.asset_index(c), c) for c in cols if not c.endswith("_iv") and c in ctx.snap.assets]
    if not price_cols:
        raise InputError(path.name, None, None, f"no column names an asset of the snapshot ({', '.join(ctx.snap.assets)})")
    prices = np.stack([cols[c] for _, c in price_cols], axis=1)
    starts, mult = replay.windows(times, prices, h, filtered=filtered, lam=lam)
    if not len(starts):
        raise ctx.error("horizon_days", f"the history ({len(times)} rows) is shorter than one window of {h:g} days")
    W, K = mult.shape[:2]
    spot, vol = np.ones((W, K, A)), np.zeros((W, K, A))
    spot[:, :, [a for a, _ in price_cols]] = mult
    ends = replay.window_ends(times, h)
    step = np.minimum(starts[:, None] + np.arange(1, K + 1)[None, :], ends[starts][:, None])
    for c, v in cols.items():  # implied-vol levels: the shift is the change since the start
        if c.endswith("_iv") and c[:-3] in ctx.snap.assets:
            vol[:, :, ctx.snap.asset_index(c[:-3])] = v[step] - v[starts][:, None]
    elapsed = (times[step] - times[starts][:, None]) / np.timedelta64(1, "D")
    stamps = np.datetime_as_string(times[starts], unit="m")
    labels = [s[:10] if s.endswith("T00:00") else s.replace("T", " ") for s in stamps]
    # a window over a gap in the history has fewer rows than the longest, and repeats its last
    return _Block([f"{name}:{lab}" for lab in labels], "replay", spot, vol, elapsed.astype(np.float64),
                  (ends[starts] - starts).astype(np.int32))


def _montecarlo(ctx: _Ctx, row: dict) -> _Block:
    from . import montecarlo

    ctx.keys(row, {"name", "paths", "steps", "horizon_days", "seed", "vol", "drift", "correlation",
                   "df", "jumps", "jump_beta", "vol_beta", "min_vol_shift"})
    name = ctx.text(row, "name")
    paths = ctx.number(row, "paths", 1000, lo=1, hi=10_000_000, integer=True)
    steps = ctx.number(row, "steps", 1, lo=1, hi=1000, integer=True)
    h = ctx.number(row, "horizon_days", 1, lo=0, lo_open=True)
    seed = ctx.number(row, "seed", 0, lo=0, hi=2**32 - 1, integer=True)
    df = ctx.number(row, "df", 0, lo=0, hi=60, integer=True)
    if 0 < df < 3:
        raise ctx.error("df", f"{df} must be 0 (Gaussian) or 3..60 (Student-t with finite variance)")
    vol = ctx.named_table(row, "vol", lo=0)
    if not vol:
        raise ctx.error("vol", "must name at least one asset: vol = { BTC = 0.55, ... }")
    # Every asset the table names is drawn, in name order, and those the snapshot lacks are
    # dropped after: so an asset's paths depend neither on the row order of the assets table
    # nor on which of the file's other assets the snapshot has (the default set on a book
    # without SOL drew other normals for BTC when SOL was left out before drawing)
    assets = sorted(vol)
    M = len(assets)
    pos = {a: i for i, a in enumerate(assets)}
    corr = np.eye(M)
    table = row.get("correlation", {})
    if not isinstance(table, dict):
        raise ctx.error("correlation", 'must be a table of "A/B" = correlation')
    for pair, rho in table.items():
        field = f"correlation.{pair}"
        parts = pair.split("/") if isinstance(pair, str) else []
        if len(parts) != 2:
            raise ctx.error(field, 'a pair is written "A/B", e.g. "BTC/ETH" = 0.8')
        for p in parts:
            ctx.asset(p, field)  # an error unless known, or unknown and skipped
        ia, ib = parts
        rho = ctx.value(rho, field, lo=-1, hi=1)
        if ia not in pos or ib not in pos:
            raise ctx.error(field, "both assets of a pair need a vol")
        if ia == ib:
            raise ctx.error(field, "a pair needs two different assets")
        corr[pos[ia], pos[ib]] = corr[pos[ib], pos[ia]] = rho
    jumps = row.get("jumps", {})
    if not isinstance(jumps, dict) or set(jumps) - {"intensity", "mean", "std"}:
        raise ctx.error("jumps", "must be a table { intensity = per year, mean = log size, std = log size }")
    j_int = ctx.value(jumps.get("intensity", 0.0), "jumps.intensity", lo=0)
    j_mean = ctx.value(jumps.get("mean", 0.0), "jumps.mean")
    j_std = ctx.value(jumps.get("std", 0.0), "jumps.std", lo=0)
    per_asset = {k: ctx.named_table(row, k) for k in ("drift", "jump_beta", "vol_beta")}
    for k, table in per_asset.items():
        extra = set(table) - set(assets)
        if extra:
            raise ctx.error(f"{k}.{min(extra)}", "asset has no vol in this Monte Carlo block")

    def vec(k: str, default: float) -> np.ndarray:
        return np.array([per_asset[k].get(a, default) for a in assets], np.float64)

    min_shift = ctx.number(row, "min_vol_shift", -0.25, hi=0)
    A = ctx.snap.n_assets
    spot = np.ones((paths, steps, A))
    vols = np.zeros((paths, steps, A))
    kept = [i for i, a in enumerate(assets) if a in ctx.snap.assets]
    if kept:
        try:
            model = montecarlo.model(np.array([vol[a] for a in assets]), corr, drift=vec("drift", 0.0),
                                     jump_intensity=j_int, jump_mean=j_mean, jump_std=j_std,
                                     jump_beta=vec("jump_beta", 1.0), vol_beta=vec("vol_beta", 0.0),
                                     min_vol_shift=min_shift)
        except np.linalg.LinAlgError:
            raise ctx.error("correlation", "the correlation matrix is not positive definite") from None
        logret, dvol = montecarlo.simulate(seed, model, paths=paths, steps=steps, dt=h / steps / 365.0, df=df)
        into = [ctx.snap.asset_index(assets[i]) for i in kept]
        spot[:, :, into] = np.exp(np.asarray(logret, np.float64)[:, :, kept])
        vols[:, :, into] = np.asarray(dvol, np.float64)[:, :, kept]
    horizon = np.broadcast_to(h * np.arange(1, steps + 1) / steps, (paths, steps)).copy()
    width = len(str(paths))
    return _Block([f"{name}:{i + 1:0{width}d}" for i in range(paths)], "montecarlo", spot, vols, horizon)


_READERS: dict[str, Callable[[_Ctx, dict], _Block]] = {
    "scenario": _explicit, "grid": _grid, "event": _event, "replay": _replay, "montecarlo": _montecarlo,
}


def load_scenarios(path: str | Path, snap: Snapshot, *, skip_unknown_assets: bool = False) -> Scenarios:
    """Read and validate a scenario file against the snapshot's assets.

    Args:
      path: the TOML file. snap: the snapshot whose assets the scenarios move.
      skip_unknown_assets: drop moves of assets the snapshot does not have instead of failing
        (used for the built-in default set, which names the common crypto assets).

    Raises:
      InputError: naming the file, the scenario and the field at fault.
    """
    path = Path(path)
    cfg = read_toml(path)
    file = path.name
    unknown = set(cfg) - set(FORMS)
    if unknown:
        raise InputError(file, None, sorted(unknown)[0], f"unknown top-level key (expected [[{']], [['.join(FORMS)}]] tables)")
    for key, rows in cfg.items():  # [montecarlo] or montecarlo = 5 in place of [[montecarlo]]
        if not isinstance(rows, list):
            raise InputError(file, None, key, f"must be an array of tables: [[{key}]]")
    if not any(cfg.values()):
        raise InputError(file, None, "scenario", "no scenario tables ([[scenario]], [[grid]], [[event]], [[replay]] or [[montecarlo]])")
    random_blocks = [k for k in ("replay", "montecarlo") for _ in cfg.get(k, [])]
    if len(random_blocks) > 1:
        raise InputError(file, f"[[{random_blocks[1]}]]", None,
                         "a scenario set holds at most one random family (one [[montecarlo]] or one [[replay]] table)")
    blocks: list[_Block] = []
    for key, rows in cfg.items():
        for s, row in enumerate(rows):
            label = f"{'scenario' if key == 'scenario' else key} #{s + 1}"
            if not isinstance(row, dict):
                raise InputError(file, label, None, "must be a table")
            if isinstance(row.get("name"), str) and row["name"].strip():
                label = f"{'scenario' if key == 'scenario' else key} {row['name']!r}"
            elif key == "event" and isinstance(row.get("use"), str):
                label = f"event {row['use']!r}"
            ctx = _Ctx(file, label, snap, skip_unknown_assets, path.parent)
            blocks.append(_READERS[key](ctx, row))
    scen = _combine(file, blocks, snap.n_assets, str(path))
    liquidation.check_lag(liquidation.config(snap.liquidation_config), scen)
    return scen


def _combine(file: str, blocks: list[_Block], A: int, source: str) -> Scenarios:
    """Stack blocks into one set; one-step scenarios and short paths repeat their last step."""
    blocks = [b for b in blocks if b.names]
    if not blocks:
        raise InputError(file, None, None, "no scenario of the file moves an asset of the snapshot")
    names = [n for b in blocks for n in b.names]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise InputError(file, f"scenario {n!r}", "name", "duplicate scenario name")
        seen.add(n)
    K = max(b.spot.shape[1] for b in blocks)

    def pad(x: np.ndarray) -> np.ndarray:
        return x if x.shape[1] == K else np.concatenate([x, np.repeat(x[:, -1:], K - x.shape[1], axis=1)], axis=1)

    spot = np.concatenate([pad(b.spot) for b in blocks])
    vol = np.concatenate([pad(b.vol) for b in blocks])
    hor = np.concatenate([pad(b.horizon) for b in blocks])
    length = np.concatenate([np.full(len(b.names), b.spot.shape[1], np.int32) if b.length is None else b.length
                             for b in blocks])
    paths = K > 1
    return Scenarios(
        names=tuple(names),
        kinds=tuple(b.kind for b in blocks for _ in b.names),
        spot_mult=spot[:, -1],
        vol_shift=vol[:, -1],
        horizon_days=hor[:, -1],
        path_spot_mult=spot[:, :-1] if paths else None,
        path_vol_shift=vol[:, :-1] if paths else None,
        path_horizon_days=hor[:, :-1] if paths else None,
        path_length=length if paths else None,
        source=source,
    )


# --------------------------------------------------------------------------------------------
# Writing scenario files (``stress generate scenarios``)


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are valid TOML escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def to_toml(form: str, table: dict, comment: str = "") -> str:
    """One ``[[form]]`` table as TOML text (numbers, strings, lists and flat tables only)."""
    if form not in FORMS:
        raise ValueError(f"unknown scenario form {form!r}")
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    body = "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in table.items() if v is not None)
    return f"{head}[[{form}]]\n{body}"
