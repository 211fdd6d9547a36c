"""The run loop: revalue once, then stream chunks of accounts through one jitted kernel.

Every instrument is valued once per scenario (``pricing.revalue`` → ``[I, S]``); accounts
gather from those matrices in fixed-shape chunks; each chunk reduces at once to per-account
rows and per-scenario sums, so no ``accounts x scenarios`` matrix of the whole exchange is ever
held. Inside a chunk the scenario axis is walked in tiles (``lax.scan``) so the working set
stays in cache; the snapshot state and the P&L reference come from the same ``portfolio.state``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

try:
    from jax import shard_map
except ImportError:  # jax < 0.6
    from jax.experimental.shard_map import shard_map

from . import _exported, insurance, liquidation, margin, portfolio, pricing
from ._tree import pytree_dataclass
from .errors import InputError
from .portfolio import Holdings
from .scenarios import Scenarios
from .snapshot import OPTION, Snapshot, account_id_column, kept_for, names_at

DTYPES = {"float64": jnp.float64, "float32": jnp.float32}
PM_TILE = 32  # scenarios per tile under the portfolio margin model
PM_GRID_BATCH = 256  # states revalued at a time for the risk matrices: bounds the transient memory
# Accounts per chunk and scenarios per tile, by backend (and dtype where it differs). On CPU,
# [128, 256] float32 and [128, 128] float64 tiles (128 KiB per quantity) keep a chunk's working
# set in L2 (docs/benchmarks.md); a GPU needs far more independent work per kernel launch than
# that (bench/gpu.py measured the values used there).
CHUNK = {"cpu": 128, "gpu": 8192}
TILE = {"cpu": 256, "cpu-float64": 128, "gpu": 2048}
# Whether a path of K steps gets 1/K of the tile's scenarios, by backend. A tile's state is
# [chunk, K * W] per quantity: on CPU, the 100,000-account sample under the default set (paths
# of 4 steps) swept in 6.2-7.0 s at W = 64 against 11.2-12.9 s at 256 (docs/benchmarks.md). On a
# GPU it has not been measured, so W stays.
PATH_TILE_SHRINKS = {"cpu": True, "gpu": False}
DEFAULT_CHUNK = CHUNK["cpu"]
# How the chunk kernel is fused, by backend (and dtype where it differs). ``keep``: each tile's
# account state (equity, collateral, margin) is materialised once (``optimization_barrier``), as
# XLA:CPU would otherwise recompute it inside every reduction. ``matvec``: per-scenario sums over
# accounts as ``[n] @ [n, W]`` products rather than masked reductions. ``skip``: a tile in which
# no account is liquidated in any scenario skips its per-scenario sums (``lax.cond``: on CPU a real
# branch), and accounts are laid out riskiest first (``risk_order``) so that calm ones share
# chunks; on a GPU chunk of 8,192 accounts a tile is never calm. ``regather``: collateral is
# computed from gathers of its own rather than from those of equity (``tile_state``; on CPU
# they were otherwise written to memory and read back). ``calm``: in a large sweep
# (``CALM_MIN_STATES``) a tile in which every account of the chunk is proved to keep collateral
# above margin (``portfolio.calm``, from each table's range over the tile) computes equity
# alone, and accounts calm in as many tiles share chunks (``calm_orders``). None of them
# changes a result.
# On an H200 (docs/benchmarks.md), float32 ran 21% faster recomputing the state inside fused
# reductions; float64, whose arithmetic is slower there, 49% slower.
FUSION = {
    "cpu": {"keep": True, "matvec": True, "skip": True, "regather": True, "calm": True},
    "gpu": {"keep": True, "matvec": True},
    "gpu-float32": {"keep": False, "matvec": False},
}
# The plain run's chunks through one fused Pallas kernel (``fused.py``), by backend. On CPU it
# would run only interpreted. On an H100 (docs/benchmarks.md) it takes the gather-and-reduce
# at 1M accounts x 10,000 scenarios from 0.228 s (XLA) to 0.108 s in float32, with less
# device memory; STRESS_PALLAS=0 keeps the XLA kernel there.
PALLAS = {"cpu": False, "gpu": os.environ.get("STRESS_PALLAS", "1") != "0"}
VAR_LEVEL = 0.99
# Per-scenario sums over accounts; ``closed_out``: what positions closed out before a path's end
# gain after their liquidation (exactly 0 for one-step scenarios); ``fees``: liquidation fees;
# ``impact``: price impact paid to the market; ``liquidated_notional``: gross notional closed, USD.
SUM_NAMES = ("liquidatable", "shortfall", "bad_debt", "closed_out", "fees", "impact", "liquidated_notional")
ADL_BYTES = 256e6  # host memory for one batch of the auto-deleveraging pass's [accounts, scenarios]
# Deficit scenarios ranked at once by ``adl_candidates``: the ranking holds about eight
# ``[accounts, columns]`` arrays, 0.8 GB for a whole batch of 15 at 1M accounts
ADL_COLUMNS = 4


@pytree_dataclass
class Tables:
    """Per-run matrices every chunk reads, the scenario axis split into ``T`` tiles of ``W``.

    Scenario ``s`` of the set sits at tile ``s // W``, column ``s % W``; columns past the end
    of the set are padding (``user`` False), copies of the set's last scenario, so that a
    maximum or minimum over a whole tile is one over the set (``chunk_kernel`` takes them
    unmasked). The unshocked market is kept apart (``*0``).
    For paths of ``K`` steps a tile holds ``K`` blocks of ``W`` columns: the last step first,
    then the steps before it, so one state evaluation covers every step; each account is then
    taken at its first breaching step, or the last (``liquidation.path_outcome``).
    """

    value: Any  # [T, I, K*W] value per contract, settlement-asset units
    mm: Any  # [T, I, K*W] maintenance margin per contract of weight, USD
    price: Any  # [T, A, K*W] asset prices, USD
    user: Any  # [T, W] bool: a scenario of the set (not padding)
    random: Any  # [T, W] bool: a random (Monte Carlo / replay) scenario
    random_index: Any  # [m] int32: flat column (tile * W + column) of each random scenario
    value0: Any  # [I, 1] at the snapshot
    mm0: Any  # [I, 1]
    price0: Any  # [A, 1]
    haircut: Any  # [A] static haircuts, or a portfolio.Haircut at the snapshot (base [A, 1])
    notional0: Any  # [I, 1] notional per contract at the snapshot, USD
    notional: Any  # [T, I, K*W] notional per contract, USD (SPEC section 2); 0 where settled
    fee_rate: Any = None  # [] liquidation fee, of the notional closed out; None: no fee
    impact: Any = None  # [T, I, K*W] price impact charged per contract closed, USD; None: free
    impact_row: Any = None  # [I] int32: row of each instrument in the impact pass (n_impact: none)
    n_impact: int = dataclasses.field(default=0, metadata={"static": True})  # instruments with impact
    partial_target: Any = None  # [] partial liquidation back to this collateral / margin; None: full
    n_groups: int = dataclasses.field(default=0, metadata={"static": True})  # account groups (Cover 2)
    tiers: Any = None  # (bound, step), each [I, K-1]: risk-limit tiers of maintenance margin; None: untiered
    # Portfolio margin model (None: standard): the risk matrix around every state, "pnl" [T, I,
    # K*W, G] USD per contract, "delta"/"roll" [T, I, K*W], "*0" at the snapshot, and its
    # parameters (portfolio.portfolio_margin).
    pm: Any = None
    lag: int = dataclasses.field(default=0, metadata={"static": True})  # oracle lag, steps
    lags: tuple = dataclasses.field(default=(), metadata={"static": True})  # lags reported side by side
    # Notional closed per underlying: an instrument's notional per contract is ``und_lin`` times
    # its underlying's price (linear contracts, options) plus ``und_fix`` USD (inverse futures),
    # or 0 in a state where it has settled. Instruments that settle in some state of the run
    # are summed apart, one class per set of states they settle in (in effect, per expiry),
    # and left out where settled (``closed_by_underlying``)
    und_row: Any = None  # [I] int32: column class * U + row of each instrument's underlying among ``und_asset``
    und_lin: Any = None  # [I] contracts' notional per unit of the underlying's USD price
    und_fix: Any = None  # [I] contracts' fixed notional, USD
    und_asset: Any = None  # [U] int32: the asset of each underlying row
    und_rep: Any = None  # [E] int32: an instrument of each settling class 1..E; None: nothing settles
    haircut_base: Any = None  # [T, A, K*W] vol-scaled haircuts of dynamic haircuts; None: static
    # Var margin model (None: another model): the windows around every state, "pnl" [T, I, K*W,
    # H] USD per contract and "dp" [T, A, K*W, H] USD per unit of each asset, "im" [T, I, K*W]
    # standard IM per contract of weight (the floor), "*0" at the snapshot, "floor", "factor",
    # "tiers" (risk-limit tiers of IM, ``_tiers``; None: untiered).
    var: Any = None
    var_tail: int = dataclasses.field(default=0, metadata={"static": True})  # windows in the ES tail
    # Each table's range over each tile's states (``tile_ranges``), for ``portfolio.calm``; set
    # by a sweep where ``FUSION`` says "calm" and the run allows it (``with_ranges``), else None
    ranges: Any = None
    # [T, W] int32: each path's own steps before it only repeats its last state
    # (``Scenarios.length``; padding as the scenario it repeats): where close-outs act
    # (``liquidation.acted``, ``liquidation.partial_path``)
    length: Any = None

    def state0(self, h: Holdings) -> tuple:
        """``(equity, collateral, maintenance margin, gross notional)`` of a chunk of accounts
        at the snapshot, USD, ``[n]`` each (the standard model's margin, tiers applied)."""
        x = portfolio.state(h, self.value0, self.mm0, self.price0, self.haircut, self.notional0, tiers=self.tiers)
        return tuple(v[:, 0] for v in x)

    def model_tiles(self) -> tuple | None:
        """The per-tile tables of the portfolio or var margin model (``model_margin``)."""
        if self.pm is not None:
            return self.pm["pnl"], self.pm["delta"], self.pm["roll"]
        if self.var is not None:  # the notional tiers the floor, where IM has tiers
            return self.var["pnl"], self.var["dp"], self.var["im"], self.notional if self.var["tiers"] else None
        return None

    def model_margin(self, h: Holdings, x: tuple | None) -> Any:
        """``[n, W]`` maintenance margin under the portfolio or var model from tiles ``x``
        (``model_tiles``, or rows of them), or None under the standard model."""
        if x is None:
            return None
        if self.pm is not None:
            return portfolio.portfolio_margin(h, *x, self.pm)
        return portfolio.var_margin(h, *x, self.var, self.var_tail)

    def model_margin0(self, h: Holdings) -> Any:
        """``[n]`` the same at the snapshot, or None under the standard model."""
        tables = self.pm or self.var
        if tables is None:
            return None
        if self.pm is not None:
            x = tuple(tables[k] for k in ("pnl0", "delta0", "roll0"))
        else:
            x = tuple(tables[k] for k in ("pnl0", "dp0", "im0")) + (self.notional0 if tables["tiers"] else None,)
        return self.model_margin(h, x)[:, 0]

    def haircut_of(self, base: Any) -> Any:
        """The haircut of a tile whose vol-scaled haircuts are ``base`` (``[A, K*W]``, a
        function of rows, or None when static)."""
        return self.haircut if base is None else dataclasses.replace(self.haircut, base=base)


@jax.jit
def tile_ranges(t: Tables) -> dict:
    """The smallest and largest value per contract, margin per contract and asset price over
    each tile's states, ``[I, T]`` and ``[A, T]``, and ``keep`` ``[A]``, the smallest share of
    a positive amount counted as collateral (``1 - haircut``; under dynamic haircuts ``1 - cap``):
    what ``portfolio.calm`` bounds an account's state in a tile with."""
    lo, hi = (lambda x: jnp.min(x, axis=2).T), (lambda x: jnp.max(x, axis=2).T)
    if isinstance(t.haircut, portfolio.Haircut):
        keep = jnp.broadcast_to(1.0 - t.haircut.cap, t.price.shape[1:2]).astype(t.price.dtype)
    else:
        keep = (1.0 - t.haircut).astype(t.price.dtype)
    return {"v_lo": lo(t.value), "v_hi": hi(t.value), "mm_lo": lo(t.mm), "mm_hi": hi(t.mm),
            "p_lo": lo(t.price), "p_hi": hi(t.price), "keep": keep}


# Account-states (accounts x scenarios x steps) from which a sweep proves tiles calm: below, the
# compilation it adds (about 1 s a holdings shape, 5.8 s in all at 100,000 accounts on CPU) is
# not won back. At 1M accounts x 5,000 shocks it took a warm run from 9.5 to 6.6 s (in one
# process); in a new process with the compilation cache filled it adds about 0.5 s of loading
# (docs/benchmarks.md).
CALM_MIN_STATES = 2e9


def with_ranges(t: Tables, n_accounts: int) -> Tables:
    """``t`` with ``ranges`` (``tile_ranges``) where the chunk kernel skips the margin work of
    tiles it proves calm (``FUSION`` "calm", a sweep of at least ``CALM_MIN_STATES``; the
    standard margin model, untiered, with full close-outs: the cases ``portfolio.calm``
    bounds), else with none. Always computed anew: a re-tiled ``t`` (``_subset``) must not
    keep the ranges of its source."""
    applies = (fusion(t.value.dtype).get("calm") and n_accounts * t.value.shape[0] * t.value.shape[2] >= CALM_MIN_STATES
               and t.partial_target is None and t.tiers is None and t.model_tiles() is None)
    return dataclasses.replace(t, ranges=tile_ranges(dataclasses.replace(t, ranges=None)) if applies else None)


def calm_tiles(h: Holdings, ranges: dict) -> Any:
    """``[T]`` the tiles in which ``portfolio.calm`` proves every real account of chunk ``h``
    calm: the ones whose margin work a kernel skips."""
    return jnp.all(~h.valid[:, None] | portfolio.calm(h, ranges), axis=0)


def tile_at(tables: tuple, k: Any) -> tuple:
    """Tile ``k`` of each of ``tables`` (``[T, ...]`` arrays, pytrees of them, or None), taken
    inside a conditional's branch: slices passed into a conditional are copied out first (100 KB
    a table and tile on CPU), taken inside they stay fused into the branch's gathers."""
    return tuple(None if a is None else jax.tree_util.tree_map(lambda y: y[k], a) for a in tables)


def _tiers(params: Any, rates: Any, dtype: Any = jnp.float64) -> tuple | None:
    """``(bound, step)`` ``[I, K-1]`` of risk-limit tiers (``portfolio.tier_extra``) for the
    tier ``rates`` ``[I, K]`` (maintenance or initial), or None when no tier changes a rate."""
    step = np.diff(np.asarray(rates, np.float64), axis=1)
    if not step.size or not step.any():
        return None
    return jnp.asarray(np.asarray(params.tier_bound)[:, :-1], dtype), jnp.asarray(step, dtype)


def _backend() -> str:
    return "cpu" if jax.default_backend() == "cpu" else "gpu"  # accelerators share the GPU sizes


def default_chunk() -> int:
    """Accounts per chunk on the default backend (``CHUNK``)."""
    return CHUNK[_backend()]


def max_tile(dtype: Any = None) -> int:
    """The widest scenario tile on the default backend for ``dtype`` (``TILE``)."""
    b = _backend()
    return TILE.get(f"{b}-{jnp.dtype(dtype).name}", TILE[b]) if dtype is not None else TILE[b]


def fusion(dtype: Any) -> dict:
    """The chunk kernel's fusion choices (``FUSION``) on the default backend for ``dtype``."""
    b = _backend()
    return FUSION.get(f"{b}-{jnp.dtype(dtype).name}", FUSION[b])


def tile_width(n_scenarios: int, max_tile: int = 256) -> int:
    """Scenario tile: a power of two up to ``max_tile``, so chunk working sets stay in cache."""
    return min(max_tile, 1 << max(3, math.ceil(math.log2(max(n_scenarios, 1)))))


def scenario_tile(n_scenarios: int, steps: int = 1, model_tiles: bool = False, dtype: Any = None) -> int:
    """``W``, the scenarios of one tile, for ``n_scenarios`` paths of ``steps`` steps each:
    ``tile_width`` up to ``PM_TILE`` under the portfolio and var models (``model_tiles``), else
    ``max_tile(dtype)``; where ``PATH_TILE_SHRINKS`` says so, that widest tile divided by the
    steps (rounded down to a power of two, at least 8), so a tile holds about as many states as
    a one-step tile would."""
    widest = PM_TILE if model_tiles else max_tile(dtype)
    if PATH_TILE_SHRINKS[_backend()] and steps > 1:
        widest = max(8, 1 << ((widest // steps).bit_length() - 1))
    return tile_width(n_scenarios, widest)


@jax.jit
def _revalue_and_margin(inst, market, params, spot, vol, horizon):
    """Instrument values and margin per contract under every scenario, in one compilation."""
    rv = pricing.revalue(inst, market, spot, vol, horizon)
    im, mm = margin.per_contract(inst, params, rv["spot"], rv["option"], rv["live"])
    rv["notional"] = margin.contract_notional(inst, rv["spot"], rv["live"])
    return rv, im, mm


def _tiles(x: Any, T: int, W: int, dtype: Any) -> Any:
    """``[X, 1 + T*W]`` (the snapshot, then the scenarios) -> ``[T, X, W]`` scenario tiles."""
    return x[:, 1:].reshape(x.shape[0], T, W).transpose(1, 0, 2).astype(dtype)


@functools.partial(jax.jit, static_argnames=("T", "W", "dtype"))
def _tiled_tables(inst, market, params, spot, vol, horizon, *, T: int, W: int, dtype: Any):
    """``_revalue_and_margin`` under the snapshot (column 0) and ``T * W`` scenarios, with its
    tables cut into tiles ``[T, X, W]`` and the snapshot columns ``[X, 1]`` in ``dtype``, in
    the same compilation: done eagerly, each slice and transpose was one more small
    executable to compile (or load from the disk cache) in every new process."""
    rv, im, mm = _revalue_and_margin(inst, market, params, spot, vol, horizon)
    tiled = functools.partial(_tiles, T=T, W=W, dtype=dtype)
    tiles = {"value": tiled(rv["value"]), "mm": tiled(mm), "price": tiled(rv["price"]),
             "notional": tiled(rv["notional"]), "im": tiled(im)}
    first = {"value0": rv["value"][:, :1], "mm0": mm[:, :1], "price0": rv["price"][:, :1],
             "notional0": rv["notional"][:, :1]}
    return rv, im, tiles, {k: v.astype(dtype) for k, v in first.items()}


@functools.lru_cache(maxsize=None)
def _kept_tables(T: int, W: int, dtype: Any) -> Callable:
    """``_tiled_tables`` for these static sizes, kept traced on disk (``_exported``)."""
    fn = jax.jit(functools.partial(_tiled_tables, T=T, W=W, dtype=dtype))
    return _exported.Kept(fn, ("tiled_tables", T, W, dtype.name))


@functools.partial(jax.jit, static_argnames=("K1", "dtype"))
def _with_steps(last: dict, before: dict, K1: int, dtype: str) -> dict:
    """Each table of ``last`` ``[T, X, W]`` (the paths' last step) followed, in every tile, by
    the same of ``before`` ``[X, K1 * T * W]`` (the steps before it, step-major): ``[T, X,
    (1 + K1) * W]``. One compiled call: as eager operations they were eight executables, each
    a read from the compilation cache in a new process (about 0.1 s apiece on a GPU)."""

    def steps(x):
        T, X, W = last["value"].shape[0], x.shape[0], last["value"].shape[2]
        return x.reshape(X, K1, T, W).transpose(2, 0, 1, 3).reshape(T, X, K1 * W).astype(dtype)

    return {k: jnp.concatenate([last[k], steps(before[k])], axis=2) for k in last}


def tables(snap: Snapshot, scen: Scenarios, dtype: Any = jnp.float64) -> tuple[Tables, dict]:
    """Revalue every instrument under the snapshot and every scenario, tiled and padded."""
    liq_cfg = liquidation.config(snap.liquidation_config)
    fee_rate = liq_cfg["fee_rate"]
    S = len(scen)
    model = snap.margin_config.get("model", "standard")
    liquidation.check_partial(liq_cfg, model)  # a snapshot or a set built or changed in Python
    liquidation.check_lag(liq_cfg, scen)
    portfolio_model = model == "portfolio"
    # a portfolio-margin tile holds [accounts, underlyings, W, grid] blocks (a var tile [accounts,
    # W, windows]): keep it narrow
    W = scenario_tile(S, scen.steps, model in ("portfolio", "var"), dtype)
    T = math.ceil(S / W)
    A = snap.n_assets
    spot = np.ones((1 + T * W, A))
    vol = np.zeros((1 + T * W, A))
    hor = np.zeros(1 + T * W)
    spot[1 : 1 + S], vol[1 : 1 + S], hor[1 : 1 + S] = scen.spot_mult, scen.vol_shift, scen.horizon_days
    spot[1 + S :], vol[1 + S :], hor[1 + S :] = spot[S], vol[S], hor[S]  # padding: the last scenario again
    rv, im, tiles, first = _kept_tables(T, W, jnp.dtype(dtype))(snap.instruments, snap.market, snap.params,
                                                                spot, vol, hor)

    value, mm_t, price, notional = tiles["value"], tiles["mm"], tiles["price"], tiles["notional"]
    params = snap.params
    haircut = margin.snapshot_haircut(params, np.asarray(snap.market.price), dtype)
    dynamic = isinstance(haircut, portfolio.Haircut)
    hc_base = _tiles(np.asarray(margin.scaled_haircut(params, vol)).T, T, W, dtype) if dynamic else None
    live = np.asarray(rv["live"])  # [I, 1 + T*W]: which contracts are live in which states
    if scen.steps > 1:  # every earlier step of every path, revalued in one call
        K1 = scen.steps - 1
        p_spot, p_vol, p_hor = np.ones((K1, T * W, A)), np.zeros((K1, T * W, A)), np.zeros((K1, T * W))
        p_spot[:, :S] = scen.path_spot_mult.transpose(1, 0, 2)
        p_vol[:, :S] = scen.path_vol_shift.transpose(1, 0, 2)
        p_hor[:, :S] = scen.path_horizon_days.T
        p_spot[:, S:], p_vol[:, S:], p_hor[:, S:] = p_spot[:, S - 1 : S], p_vol[:, S - 1 : S], p_hor[:, S - 1 : S]
        prv, p_im, pmm = _revalue_and_margin(snap.instruments, snap.market, snap.params, p_spot.reshape(-1, A),
                                          p_vol.reshape(-1, A), p_hor.reshape(-1))
        live = np.concatenate([live, np.asarray(prv["live"])], axis=1)  # and every earlier step's
        if not live.all():  # contracts expire along the paths
            rv, prv, value = _settle_paths(rv, prv, T, W, dtype)

        last = {"value": value, "mm": mm_t, "price": price, "notional": notional}
        before = {"value": prv["value"], "mm": pmm, "price": prv["price"], "notional": prv["notional"]}
        if dynamic:
            last["hc"] = hc_base
            before["hc"] = np.asarray(margin.scaled_haircut(params, p_vol.reshape(-1, A))).T
        if model == "var":  # its floor, the standard IM, at every step too
            last["im"], before["im"] = tiles["im"], p_im
        both = _with_steps(last, before, K1=K1, dtype=jnp.dtype(dtype).name)
        value, mm_t, price, notional = both["value"], both["mm"], both["price"], both["notional"]
        hc_base = both.get("hc")

    def cols(x, first=1):  # [X, I, ...] -> [T, I, W, ...]
        x = np.asarray(x)[first:]
        return x.reshape((T, W) + x.shape[1:]).swapaxes(1, 2)

    def path_cols(x):  # [K1 * T * W, I, ...] -> [T, I, K1 * W, ...]
        x = np.asarray(x).reshape((K1, T, W) + x.shape[1:])
        x = np.moveaxis(x, 3, 1)  # [K1, I, T, W, ...]
        x = np.moveaxis(x, 2, 0)  # [T, K1, I, W, ...]
        x = np.swapaxes(x, 1, 2)  # [T, I, K1, W, ...]
        return x.reshape(x.shape[:2] + (K1 * W,) + x.shape[4:])

    pm = None
    if portfolio_model:  # a risk matrix around every scenario state (and every step of a path)
        params = snap.params
        extended = margin.grid_moves(params)[2]
        _check_model_table(scen, len(snap.instrument_ids), model, len(extended))
        g = margin.scenario_grids(snap.instruments, snap.market, params, spot, vol, hor, batch=PM_GRID_BATCH)

        pnl, delta, roll = (cols(g[k]) for k in ("pnl", "delta", "roll"))
        if scen.steps > 1:
            pg = margin.scenario_grids(snap.instruments, snap.market, params, p_spot.reshape(-1, A),
                                       p_vol.reshape(-1, A), p_hor.reshape(-1), batch=PM_GRID_BATCH)

            pnl, delta, roll = (np.concatenate([a, path_cols(pg[k])], axis=2)
                                for a, k in ((pnl, "pnl"), (delta, "delta"), (roll, "roll")))
        u = np.asarray(snap.instruments.underlying)
        pm = {"pnl": jnp.asarray(pnl, dtype), "delta": jnp.asarray(delta, dtype), "roll": jnp.asarray(roll, dtype),
              "pnl0": jnp.asarray(np.asarray(g["pnl"])[0][:, None, :], dtype),
              "delta0": jnp.asarray(np.asarray(g["delta"])[0][:, None], dtype),
              "roll0": jnp.asarray(np.asarray(g["roll"])[0][:, None], dtype),
              "und": jax.device_put(u.astype(np.int32)),
              "offset": jnp.asarray(params.pm_pnl_offset, dtype), "frac": jnp.asarray(params.pm_extended_fraction, dtype),
              "mds": jnp.asarray(params.pm_max_delta_shock, dtype), "thr": jnp.asarray(params.pm_delta_threshold, dtype),
              "factor": jnp.asarray(params.pm_mm_factor, dtype),
              "extended": jax.device_put(extended)}

    var, var_tail = None, 0
    if model == "var":  # the var model's windows around every scenario state (and step)
        vc, windows = margin.var_windows(snap)
        _check_model_table(scen, len(snap.instrument_ids), model, len(windows))
        grids = functools.partial(margin.var_grids, snap.instruments, snap.market, window_mult=windows,
                                  window_days=vc["var_horizon_days"], batch=PM_GRID_BATCH)
        g = grids(spot, vol, hor)
        pnl, dp, im_t = cols(g["pnl"]), cols(g["dp"]), np.asarray(tiles["im"])
        if scen.steps > 1:
            pg = grids(p_spot.reshape(-1, A), p_vol.reshape(-1, A), p_hor.reshape(-1))
            pnl = np.concatenate([pnl, path_cols(pg["pnl"])], axis=2)
            dp = np.concatenate([dp, path_cols(pg["dp"])], axis=2)
            im_t = np.asarray(both["im"])
        var = {"pnl": jnp.asarray(pnl, dtype), "dp": jnp.asarray(dp, dtype), "im": jnp.asarray(im_t, dtype),
               "pnl0": jnp.asarray(np.asarray(g["pnl"])[0][:, None, :], dtype),
               "dp0": jnp.asarray(np.asarray(g["dp"])[0][:, None, :], dtype),
               "im0": jnp.asarray(np.asarray(im)[:, :1], dtype),
               "floor": jnp.asarray(vc["var_floor"], dtype), "factor": jnp.asarray(snap.params.pm_mm_factor, dtype),
               "tiers": _tiers(snap.params, snap.params.tier_im, dtype)}
        var_tail = _tail_size(windows.shape[0], vc["confidence"])

    user = np.arange(T * W) < S
    random = np.zeros(T * W, bool)
    random[:S] = scen.random
    length = np.pad(scen.length, (0, T * W - S), mode="edge")  # padding repeats the last scenario
    # instruments whose underlying has [liquidation.impact] parameters, numbered for pass 1
    has_impact = np.isin(np.asarray(snap.instruments.underlying),
                         [snap.assets.index(a) for a in liq_cfg["impact"]])
    impact_row = np.where(has_impact, np.cumsum(has_impact) - 1, has_impact.sum()).astype(np.int32)
    t = Tables(
        value=value,
        mm=mm_t,
        price=price,
        # device_put, not jnp.asarray: on jax 0.10 that stages each host array through an
        # identity executable per shape, each a compilation-cache read in a new process (about
        # 0.1 s apiece on a GPU)
        user=jax.device_put(user.reshape(T, W)),
        random=jax.device_put(random.reshape(T, W)),
        random_index=jax.device_put(np.flatnonzero(random).astype(np.int32)),
        length=jax.device_put(length.reshape(T, W)),
        value0=first["value0"],
        mm0=first["mm0"],
        price0=first["price0"],
        haircut=haircut,
        haircut_base=hc_base,
        notional0=first["notional0"],
        notional=notional,
        fee_rate=jnp.asarray(fee_rate, dtype) if fee_rate > 0 else None,
        impact_row=jax.device_put(impact_row),
        n_impact=int(has_impact.sum()),
        partial_target=jnp.asarray(liq_cfg["partial_target"], dtype) if liq_cfg["mode"] == "partial" else None,
        n_groups=group_rows(snap)[1],
        # the portfolio and var models' margin has no tiers of its own (the var floor's are in var)
        tiers=_tiers(snap.params, snap.params.tier_mm, dtype) if model == "standard" else None,
        pm=pm,
        var=var,
        var_tail=var_tail,
        lag=liq_cfg["oracle_lag_steps"],
        lags=liq_cfg["oracle_lags"],
        **_underlying_rows(snap, dtype, live),
    )
    # Host copies at float64 for exchange-level numbers.
    price_all = np.asarray(rv["price"])[:, : 1 + S]
    host = {"price_all": price_all, "value": np.asarray(rv["value"])[:, : 1 + S], "im0": np.asarray(im)[:, 0],
            "notional0": np.asarray(rv["notional"])[:, 0]}
    return t, host


def _settle_paths(rv: dict, prv: dict, T: int, W: int, dtype: Any) -> tuple[dict, dict, Any]:
    """The paths' values with each contract held, from the first step past its expiry, at what
    it settled into there (``pricing.hold_settled_paths``): ``rv`` (the snapshot, then the last
    step of each path, ``[I, 1 + T*W]``) and ``prv`` (the steps before, step-major) with their
    ``value`` replaced, and the last step's value tiles ``[T, I, W]``. On the host: ``[I, K,
    T*W]`` values, small beside the accounts."""
    last, before = pricing.hold_settled_paths(rv["value"], rv["live"], prv["value"], prv["live"])
    return {**rv, "value": last}, {**prv, "value": before}, jax.device_put(_tiles(last, T, W, dtype))


def _memory_bytes() -> float:
    """This machine's physical memory, bytes (infinite where the OS does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


MODEL_TABLE_SHARE = 0.5  # of physical memory that the portfolio or var model's tables may take


def _check_model_table(scen: Scenarios, n_instruments: int, model: str, points: int) -> None:
    """Refuse, with what it would take, a run whose portfolio- or var-model table (``[states,
    instruments, grid points or windows]``, built whole, about twice over while it is built)
    would not fit in ``MODEL_TABLE_SHARE`` of this machine's memory, rather than run out of it."""
    states = len(scen) * scen.steps + 1
    need = 2 * 8.0 * states * n_instruments * points
    have = MODEL_TABLE_SHARE * _memory_bytes()
    if need > have:
        what = "risk-matrix points" if model == "portfolio" else "history windows"
        raise InputError(scen.source or "scenarios", None, None,
                         f"the {model} margin model revalues every instrument at {points} {what} around each of "
                         f"{states:,} scenario states: {need / 1e9:.1f} GB of tables, over the {have / 1e9:.1f} GB "
                         f"it may use here; use fewer scenarios, paths or steps, or [margin] model = \"standard\"")


def _share(p: np.ndarray, m: int) -> np.ndarray:
    """A share ``k / m`` of ``m`` random scenarios, as float64, from ``p`` computed in the run's
    dtype: float32's ``k / m`` is not float64's (0.4975000321865082 for 995 / 2000), so a
    report would differ by dtype where the count does not."""
    return np.rint(np.asarray(p, np.float64) * m) / m


def _underlying_rows(snap: Snapshot, dtype: Any, live: np.ndarray) -> dict:
    """``Tables``' ``und_*`` fields: the underlyings of the snapshot's instruments, in asset order,
    each instrument's notional per contract split into a price-linear and a fixed part, and
    the instruments that settle in some state (``live`` ``[I, X]`` False there, the states of
    every table), in one class per set of states they settle in."""
    und = np.asarray(snap.instruments.underlying)
    assets, row = np.unique(und, return_inverse=True)
    c = np.asarray(snap.instruments.contract_size, np.float64)
    fixed = margin.face_valued(snap.instruments, np)
    # instruments that settle in the same states (one expiry, or expiries no state's horizon
    # falls between) make one class: its first one stands for them all
    settles = ~np.all(live, axis=1)
    patterns, first, klass = np.unique(live[settles], axis=0, return_index=True, return_inverse=True)
    cls = np.zeros(len(und), np.int64)
    cls[settles] = klass.reshape(-1) + 1
    rep = np.flatnonzero(settles)[first].astype(np.int32)
    on = lambda x: jax.device_put(np.asarray(x, dtype))  # converted here, not on the device
    return {"und_row": jax.device_put((cls * len(assets) + row).astype(np.int32)), "und_lin": on(np.where(fixed, 0.0, c)),
            "und_fix": on(np.where(fixed, c, 0.0)), "und_asset": jax.device_put(assets.astype(np.int32)),
            "und_rep": jax.device_put(rep) if len(patterns) else None}


def underlying_notional(h: Holdings, t: Tables) -> Any:
    """``[n, 2C]``: each account's gross contracts on each underlying weighted by the notional
    per contract's price-linear part (``lin``, first ``C`` columns), then its fixed USD notional
    there (``fix``), per settling class (``C = (1 + E) * U`` columns, class-major; ``C = U``
    where nothing settles). The notional of what it holds of class ``k`` on underlying ``u``
    at asset prices ``P``, where that class is live, is ``lin[:, k*U + u] * P[u] + fix[:, k*U + u]``."""
    n = h.inst.shape[0]
    inst = h.inst.reshape(n, -1)
    q = jnp.abs(h.qty.reshape(n, -1))  # padding holds 0 contracts
    C = t.und_asset.shape[0] * (1 + (0 if t.und_rep is None else t.und_rep.shape[0]))  # (class, underlying) columns
    onehot = (t.und_row[inst][..., None] == jnp.arange(C)).astype(q.dtype)  # [n, PL, C]
    per_contract = jnp.stack([t.und_lin[inst], t.und_fix[inst]], axis=-1) * q[..., None]  # [n, PL, 2]
    return jnp.einsum("npk,npu->nku", per_contract, onehot).reshape(n, -1)


def closed_by_underlying(t: Tables, r: Any, price: Any, notional: Any) -> Any:
    """``[U, X]`` USD notional closed per underlying in ``X`` states, from ``r`` ``[2C, X]``
    (``underlying_notional``'s columns, transposed, times what each account closed) and the
    states' asset ``price`` ``[A, X]``; a class of instruments that has settled in a state
    (its ``notional`` ``[I, X]`` per contract is 0 there: ``margin.contract_notional``) closes
    nothing there."""
    U, X = t.und_asset.shape[0], r.shape[-1]
    half = r.shape[0] // 2
    closed = r[:half].reshape(-1, U, X) * price[t.und_asset] + r[half:].reshape(-1, U, X)  # [1 + E, U, X]
    if t.und_rep is None:
        return closed[0]
    live = notional[t.und_rep] > 0  # [E, X]
    return closed[0] + jnp.sum(jnp.where(live[:, None, :], closed[1:], 0.0), axis=0)


def share_margin(h: Holdings, t: Tables, margin: Any, notional: Any, pmx: tuple | None) -> tuple[Any, dict]:
    """``portfolio.slots``' ``margin`` as ``liquidation.partial_path`` takes it, ``(mm,
    kwargs)``: the margin untiered, and no more; under risk-limit tiers the first tier's
    margin and ``tiers``, a ``liquidation.Tiered`` of the chunk's positions (``notional``
    ``[I, K * W]`` per contract); under the portfolio model (``pmx``, ``Tables.model_tiles``
    rows) the whole book's portfolio margin and ``blocks``, a ``liquidation.Blocks``."""
    if t.pm is not None:
        m, lin, delta = portfolio.portfolio_margin(h, *pmx, t.pm, parts=True)
        return m, {"blocks": liquidation.Blocks.per_asset(lin, delta, t.pm["mds"], t.pm["thr"], t.pm["factor"])}
    if t.tiers is None:
        return margin, {}
    n, P, L = h.inst.shape
    first, whole = margin
    return first, {"tiers": liquidation.Tiered(whole=whole, qty=jnp.abs(h.qty.reshape(n, P * L)),
                                               inst=h.inst.reshape(n, P * L), per_contract=notional,
                                               bound=t.tiers[0], step=t.tiers[1])}


def path_outcome(h: Holdings, t: Tables, fuse: dict) -> Callable:
    """The per-tile outcome of a chunk ``h`` under tables ``t``, as ``outcome(value, mm, price,
    notional, impact, pmx, hc_base, length)`` of one tile of each table (``tile_at``; ``length``:
    the tile's ``Tables.length``, ``[W]`` or ``[n, W]``, where close-outs act): the work the
    sweep (``chunk_kernel``) and the auto-deleveraging pass (``adl_kernel``) share, so both
    charge the same closing costs and liquidate the same accounts."""
    W = t.user.shape[1]
    # Closing costs (and tiers, and partial close-outs) need each account's notional in every
    # scenario. Without them it is not gathered: the notional closed is then the sum of the
    # per-underlying notional closed, from each account's fixed weights (``und_weights``).
    charged = t.fee_rate is not None or t.impact is not None
    gather_notional = charged or t.tiers is not None or t.partial_target is not None

    def outcome(value, mm, price, notional, impact, pmx, hc_base, length=None, gone=False):
        """Per account and scenario: equity at the path's end after closing costs; collateral
        and margin at the step that decides the path; liquidated or not (``gone``: closed out
        in full, which a partial close-out may not be); the fee, the impact paid, the notional
        closed, what closed positions gained after their close; and the bad debt under each
        reported oracle lag."""
        per_contract = ((notional,) if impact is None else (notional, impact)) if gather_notional else ()
        hc = t.haircut_of(hc_base)
        if t.partial_target is not None:
            pos, bal, px, keep, m, g, *imp = portfolio.slots(h, value, mm, price, hc, *per_contract, tiers=t.tiers)
            m, share = share_margin(h, t, m, notional, pmx)
            r = liquidation.partial_path(W, pos, bal, px, keep, m, g, t.partial_target, t.fee_rate,
                                         imp[0] if imp else None, **share, length=length)
            return (r["equity"], r["collateral"], r["margin"], r["gone"] if gone else r["liquidated"], r["fee"],
                    r["impact"], r["closed_notional"], r["closed_out"], [], r["closed"])
        m_pm = t.model_margin(h, pmx)
        eq, coll, m, *g = tile_state(h, value, mm, price, hc, *per_contract, tiers=t.tiers, fuse=fuse)
        m = m if m_pm is None else m_pm
        if fuse["keep"]:
            eq, coll, m, *g = jax.lax.optimization_barrier((eq, coll, m, *g))
        eq_end = eq[:, :W]  # as if every position were held to the last step
        # bad debt under other oracle lags, before closing costs (the impact of pass 1 is the
        # configured lag's)
        lagged = [liquidation.path_outcome(W, eq, coll, m, lag=k, length=length)[0] for k in t.lags]
        eq, coll, m, *g, liq, at = liquidation.path_outcome(W, eq, coll, m, *g, lag=t.lag, length=length, at=True)
        closed = jnp.where(liq, g[0], 0.0) if g else None
        cost = jnp.where(liq, g[1], 0.0) if impact is not None else jnp.zeros_like(eq)
        # the impact first, then the fee out of what remains (so a fee never creates bad debt)
        f = liquidation.fee(eq - cost, g[0], liq, t.fee_rate) if t.fee_rate is not None else jnp.zeros_like(eq)
        return eq - cost - f, coll, m, liq, f, cost, closed, eq_end - eq, lagged, at

    return outcome


def chunk_kernel(h: Holdings, t: Tables, n_random: int, with_pnl: bool = False, level: float = VAR_LEVEL,
                 top: Any = None) -> dict:
    """All per-scenario account work for one chunk, reduced at once, tile by tile.

    Per tile, the accounts' state (equity, collateral, margin, notional) is computed once and,
    where ``FUSION`` says so, kept (``optimization_barrier``: XLA:CPU would otherwise recompute
    it inside every reduction; a GPU in float32 is faster recomputing it),
    each account is taken at the step that decides its path (``liquidation.path_outcome``),
    charged its closing costs if liquidated there (price impact ``t.impact``, then the fee out
    of what remains), and reduced: per account, the tile's worst P&L and largest ``margin -
    collateral``; per scenario, the sums of ``SUM_NAMES``. The scenario of the worst P&L is
    found after the scan, by revaluing each account on its worst tile only. Where ``t.ranges``
    is set (``with_ranges``), tiles proved calm for every account of the chunk compute equity
    alone (``calm_tile``): what they skip would only add zeros.

    ``top``, optional ``[T, 2, W]``: the two largest bad debts per scenario of the chunks run
    before this one (zeros for none). The chunk's own are then merged into it, only in the tiles
    where one of them is larger than the second of ``top`` (``column_top2``, ``merge_top2``),
    and ``top2`` is the result, in the same layout. Without it ``top2`` is the chunk's own.
    Either way ``top2`` holds the same values the host would merge them into (``two_largest``
    of the union).

    Returns:
      Per-account ``[n]`` rows and ``sums``, ``[len(SUM_NAMES), T * W]`` per-scenario sums
      over the chunk's valid accounts, ``top2`` ``[2, T * W]`` (or ``[T, 2, W]``, see ``top``),
      ``und_closed`` ``[U, T * W]`` the notional closed per underlying (and ``pnl``,
      ``liquidated`` ``[n, T * W]`` with ``with_pnl``).
    """
    eq0, coll0, mm0, g0 = t.state0(h)
    mm0 = mm0 if t.model_tiles() is None else t.model_margin0(h)
    n = eq0.shape[0]
    T, W = t.user.shape
    dt = eq0.dtype
    validf = h.valid.astype(dt)
    keep_pnl = with_pnl or n_random > 0
    paths = t.value.shape[2] > W  # K > 1 steps per scenario
    partial = t.partial_target is not None  # close-outs of a share of the book
    fuse = fusion(dt)
    charged = t.fee_rate is not None or t.impact is not None
    outcome = path_outcome(h, t, fuse)
    total = account_total(h.valid, fuse)
    # [n] 1 for the real accounts that default alone, else 0: Cover 2 counts a group's defaults
    # together (``group_bad``), and its accounts not alone
    alone = validf if not t.n_groups else validf * (h.group == t.n_groups).astype(dt)

    def calm_tile(carry, x):
        """A tile where ``portfolio.calm`` proves every account's collateral above its margin
        in every state: no one is liquidated or short of margin, and none ends below zero.
        Only equity at the paths' end is computed (the last step's block, the first), for the
        worst P&L (and ``pnl``); the other extremes keep their carry, and the sums are the
        zeros ``full_tile`` would add up (``calm_sums``)."""
        value, _, price, *_, k, _ = x
        # The select keeps the arithmetic out of the library reduction (XLA:CPU hands it only
        # pure arithmetic): equity is computed by the same kind of fusion as in ``full_tile``,
        # with the same contractions into FMAs, so the same bits (padding rows are 0 anyway)
        eq = jnp.where(h.valid[:, None], portfolio.state(h, value[:, :W], value[:, :W], price[:, :W], t.haircut)[0], 0.0)
        best, best_tile, *rest = carry
        t_min = jnp.min(eq, axis=1) - eq0
        better = t_min < best
        carry = (jnp.where(better, t_min, best), jnp.where(better, k, best_tile), *rest)
        return carry, eq - eq0[:, None] if keep_pnl else None

    def calm_sums(pnl, top_k, *lead):
        """``full_tile``'s outputs for calm tiles, given their ``pnl`` (``lead``: ``(T,)`` for all
        at once)."""
        zeros = lambda *shape: jnp.zeros(lead + shape, dt)  # noqa: E731
        return (zeros(len(SUM_NAMES), W), top_k if top is not None else zeros(2, W),
                zeros(len(t.lags), W) if t.lags else None, zeros(t.n_groups, W) if t.n_groups else None,
                zeros(t.und_asset.shape[0], W), pnl, jnp.zeros(lead + (n, W), bool) if with_pnl else None)

    def at(k):
        """Tile ``k`` of the tables, with its number and ``top``'s: a tile's ``x``."""
        return *tile_at(tables, k), k, top_k_at(k)

    def calm_or_full(carry, x):
        """``calm_tile`` or ``full_tile`` of tile ``k``, each branch taking its tile of the
        tables itself (``tile_at``)."""
        k, proved = x

        def calm_branch(c):
            c, pnl = calm_tile(c, at(k))
            return c, calm_sums(pnl, top_k_at(k))

        return jax.lax.cond(proved, calm_branch, lambda c: full_tile(c, at(k)), carry)

    def full_tile(carry, x):
        value, mm, price, notional, impact, pmx, hc_base, rnd, length, k, top_k = x
        eq, coll, m, liq, f, cost, closed, closed_out, lagged, at = outcome(value, mm, price, notional, impact, pmx, hc_base,
                                                                           length)
        pnl = eq - eq0[:, None] if keep_pnl else None
        gap = m - coll  # > 0: liquidated (at that step), and the shortfall there
        best, best_tile, gap_max, n_liq, cost_max = carry
        # Over whole tiles: padding repeats a scenario of the set. min(eq) - eq0 is exactly
        # the minimum of pnl (rounding is monotone), without a pass to form pnl.
        t_min = jnp.min(eq, axis=1) - eq0
        t_gap = jnp.max(gap, axis=1)
        better = t_min < best  # strict: ties keep the earlier tile (file order)
        carry = (
            jnp.where(better, t_min, best),
            jnp.where(better, k, best_tile),
            jnp.maximum(gap_max, t_gap),
            n_liq,  # the tile's random liquidations are added below, where it has any
            jnp.maximum(cost_max, jnp.max(f + cost, axis=1)) if charged else cost_max,
        )
        def closeouts():
            """Per-scenario sums of what liquidation does (accounts liquidated, shortfall,
            gains of positions closed early, fees, impact, notional closed, also per
            underlying), and each account's liquidations in the random scenarios: all
            exactly zero when no account of the tile is liquidated or short of margin at the
            step that decides its path in any of its scenarios. Liquidated
            alone is not enough: under an oracle lag a breach in a path's last steps is never
            acted on, and leaves a shortfall at the path's end."""
            # notional closed per underlying: the share closed at each step times the account's
            # notional there, summed over accounts (one [1 + 2C, n] @ [n, K*W] product) and steps
            # In one step, liquidated is margin above collateral: formed from the shortfall
            # here rather than on every tile (paths need the flags to pick their step anyway)
            liquidated = liq if paths or partial else gap > 0
            U = t.und_asset.shape[0]
            # The product's first row is the chunk's real accounts: it counts those liquidated
            # (``at`` marks one step of each path at most; exact sums of 0s and 1s), one pass
            # over the tile fewer. (Other sums side by side in the same product were slower:
            # the operand they make is written out first.) A partial close-out's ``at`` is the
            # share of the book closed at each step, which weighs the notional, not the count.
            r = und_weights @ (at if paths or partial else liquidated).astype(dt)  # [1 + 2C, K*W]
            und_closed = closed_by_underlying(t, r[1:], price, notional).reshape(U, -1, W).sum(axis=1)
            zero = jnp.zeros(W, dt)
            count = total(liq.astype(dt)) if partial else r[0].reshape(-1, W).sum(axis=0)
            sums = jnp.stack([count, total(jnp.maximum(gap, 0.0)),
                              total(closed_out) if paths else zero,  # nothing closes early in one step
                              total(f) if t.fee_rate is not None else zero, total(cost) if impact is not None else zero,
                              total(closed) if closed is not None else und_closed.sum(axis=0)])
            # per account, its liquidations in the random scenarios, summed in the run's dtype
            # (a bool sum is an int64 array XLA:CPU writes out, in every tile)
            liq_random = jnp.sum((liquidated & rnd[None, :]).astype(dt), axis=1) if n_random else None
            return sums, und_closed, liq_random

        def defaults():
            """Per-scenario bad debt: its sum, the two largest accounts' (Cover 2; with ``top``,
            only the largest, ``first``), per group of accounts, and under each reported oracle
            lag: all exactly zero when no account of the tile has equity below zero (under any
            reported lag) in any of its scenarios."""
            bad = liquidation.bad_debt(eq)
            lag_bad = jnp.stack([total(liquidation.bad_debt(e)) for e in lagged]) if lagged else None
            bad_total = total(bad)
            group_bad = None
            if t.n_groups:
                group_bad = jnp.zeros((t.n_groups + 1, W), dt).at[h.group].add(bad * validf[:, None])[: t.n_groups]
            if top is None:
                return bad_total, largest_two(bad * alone[:, None]), lag_bad, group_bad
            # the largest: max(0, -eq) over the accounts counted, straight from eq (on CPU a
            # select or a shared bad-debt array would be written to memory first)
            first = jnp.maximum(column_max(-(eq * alone[:, None])), 0.0)
            return bad_total, first[None], lag_bad, group_bad

        if fuse.get("skip") and t.partial_target is None:
            # On CPU most tiles of a calm book liquidate no one, and more of them leave no bad
            # debt: skip the reductions that would only add up zeros, each group on its own.
            # A partial close-out is not covered by the arguments above, so it always
            # reduces. Both tests come from the per-account reductions above, not from more
            # passes over the tile; they cover the set's scenarios only, which is all that is
            # kept of the sums. Without an oracle lag an account is liquidated iff its margin
            # exceeds its collateral at the step that decides its path (gap > 0); under a lag
            # it may not be. Equity below zero shows as pnl = fl(eq - eq0) <= -eq0 (rounding
            # is monotone), and equality with eq0 == 0 means eq == 0 exactly.
            liquidating = jnp.any(h.valid & (t_gap > 0))
            if paths and t.lag:
                liquidating = liquidating | jnp.any(liq)
            below = (t_min < -eq0) | ((t_min <= -eq0) & (eq0 != 0))
            defaulting = jnp.any(h.valid & below)
            for e in lagged:
                defaulting = defaulting | jnp.any(e < 0)
            sums, und_closed, liq_random = _when(liquidating, closeouts)
            bad_total, top2, lag_bad, group_bad = _when(defaulting, defaults)
        else:
            sums, und_closed, liq_random = closeouts()
            bad_total, top2, lag_bad, group_bad = defaults()
        if n_random:
            carry = (*carry[:3], carry[3] + liq_random, carry[4])
        if top is not None:
            # Most tiles hold no bad debt above the second largest of the chunks before: the
            # union's two largest are then those of before, and are kept without a pass over
            # the tile for its two largest. max(0, .) is monotone: taken of the two only.
            top2 = jax.lax.cond(jnp.any(top2[0] > top_k[1]),
                                lambda: merge_top2(jnp.maximum(column_top2(-(eq * alone[:, None])), 0.0), top_k),
                                lambda: top_k)
        sums = jnp.concatenate([sums[:2], bad_total[None], sums[2:]])  # SUM_NAMES order
        return carry, (sums, top2, lag_bad, group_bad, und_closed,
                       pnl if keep_pnl else None, liq if with_pnl else None)

    inf = jnp.full(n, jnp.inf, dt)
    init = (inf, jnp.zeros(n, jnp.int32), -inf, jnp.zeros(n, dt), jnp.zeros(n, dt))
    pm_tiles = t.model_tiles()
    tables = (t.value, t.mm, t.price, t.notional, t.impact, pm_tiles, t.haircut_base, t.random, t.length)
    top_k_at = lambda k: None if top is None else top[k]  # noqa: E731
    und_weights = jnp.concatenate([validf[None], underlying_notional(h, t).T * validf])  # [1 + 2C, n]
    tiles = jnp.arange(T, dtype=jnp.int32)
    if t.ranges is None:
        carry, ys = jax.lax.scan(full_tile, init, (*tables, tiles, top))
    else:
        # [T] the tiles proved calm for every real account of the chunk skip their margin work;
        # a chunk calm in every tile (most, once calm_orders has grouped the accounts) is then
        # its P&L alone, with no test per tile
        calm = calm_tiles(h, t.ranges)

        def all_calm():
            c, pnl = jax.lax.scan(lambda c, k: calm_tile(c, at(k)), init, tiles)
            return c, calm_sums(pnl, top, T)

        carry, ys = jax.lax.cond(jnp.all(calm), all_calm, lambda: jax.lax.scan(calm_or_full, init, (tiles, calm)))
    (best, best_tile, gap_max, n_liq, cost_max), (sums, top2, lag_bad, group_bad, und_closed, pnl, liq) = carry, ys

    # The worst scenario: revalue each account on its own worst tile, take the first minimum.
    def at_best(x):  # rows i ([n] or [n, J]) of each account's worst tile
        return None if x is None else (lambda i: x[best_tile.reshape((-1,) + (1,) * (i.ndim - 1)), i])

    pm_b = None if pm_tiles is None else tuple(at_best(x) for x in pm_tiles)
    eq_b = outcome(at_best(t.value), at_best(t.mm), at_best(t.price), at_best(t.notional), at_best(t.impact), pm_b,
                   at_best(t.haircut_base), t.length[best_tile])[0]
    masked = jnp.where(t.user[best_tile], eq_b - eq0[:, None], jnp.inf)
    arg = best_tile * W + first_argmin(masked)
    out = {
        **account_rows(eq0, coll0, mm0, g0, best, arg, gap_max, cost_max),
        "sums": sums.transpose(1, 0, 2).reshape(len(SUM_NAMES), T * W),
        # the chunk's two largest bad debts (with ``top``: of it and the chunks before, [T, 2, W])
        "top2": top2 if top is not None else top2.transpose(1, 0, 2).reshape(2, T * W),
    }
    if group_bad is not None:  # bad debt per group of accounts and scenario
        out["group_bad"] = group_bad.transpose(1, 0, 2).reshape(t.n_groups, T * W)
    if lag_bad is not None:  # bad debt per scenario under each reported oracle lag
        out["lag_bad"] = lag_bad.transpose(1, 0, 2).reshape(len(t.lags), T * W)
    out["und_closed"] = und_closed.transpose(1, 0, 2).reshape(-1, T * W)  # [U, T * W]
    if keep_pnl:
        pnl = pnl.transpose(1, 0, 2).reshape(n, T * W)  # [n, S_pad]
    if n_random:
        out["p_liquidation"] = n_liq / n_random
        loss = -pnl[:, t.random_index]  # [n, m]
        if returns_losses():  # selected on the host: see tail_loss_host
            out["random_loss"] = loss
        else:
            out["var_99"], out["es_99"] = tail_loss(loss, level)
    if with_pnl:
        out["pnl"] = pnl
        out["liquidated"] = liq.transpose(1, 0, 2).reshape(n, T * W)
    return out


def adl_kernel(h: Holdings, t: Tables) -> dict:
    """Each account's P&L and closed-out flag in every scenario of ``t``, for the
    auto-deleveraging pass: ``path_outcome`` tile by tile, nothing reduced. The values
    ``chunk_kernel`` returns ``with_pnl`` (but for partial close-outs' flags, below), in a
    module a fraction of its size (it compiles once per holdings shape; the pass's scenarios
    are another shape than the sweep's).

    Returns:
      ``pnl`` ``[n, T * W]`` (equity after closing costs less equity at the snapshot) and
      ``liquidated`` ``[n, T * W]``: closed out in full, so not charged. After a partial
      close-out an account still holding part of its book is open, and may be.
    """
    eq0 = t.state0(h)[0]
    n, (T, W) = eq0.shape[0], t.user.shape
    outcome = path_outcome(h, t, fusion(eq0.dtype))
    tables = (t.value, t.mm, t.price, t.notional, t.impact, t.model_tiles(), t.haircut_base, t.length)

    def tile(_, k):
        # winners still holding part of their book after a partial close-out can be charged
        eq, _, _, liq, *_ = outcome(*tile_at(tables, k), gone=True)
        return None, (eq - eq0[:, None], liq)

    _, (pnl, liq) = jax.lax.scan(tile, None, jnp.arange(T, dtype=jnp.int32))
    return {"pnl": pnl.transpose(1, 0, 2).reshape(n, T * W), "liquidated": liq.transpose(1, 0, 2).reshape(n, T * W)}


def tile_state(h: Holdings, value: Any, mm: Any, price: Any, haircut: Any, *gross: Any, tiers: Any,
               fuse: dict) -> tuple[Any, ...]:
    """``portfolio.state`` of a chunk on one tile of tables, as the backend computes it fastest.

    Where ``fuse["regather"]`` says so (and the tables are arrays), collateral is computed from
    gathers of its own. Otherwise XLA:CPU writes every gathered row (a position's value, a
    slot's price) to memory once and reads it back in both the equity and the collateral
    fusions; gathering twice from the small tables is cheaper (at 100k accounts x 5,000
    scenarios it took about 0.6 s off the 1.1 s that collateral and margin added to the P&L,
    docs/benchmarks.md). The barrier only makes the second gathers distinct operations, so
    that XLA does not merge them with the first; the values are the same.
    """
    out = portfolio.state(h, value, mm, price, haircut, *gross, tiers=tiers)
    if not fuse.get("regather") or callable(value) or callable(price):
        return out
    value2, price2 = jax.lax.optimization_barrier((value, price))
    coll = portfolio.state(h, value2, mm, price2, haircut)[1]  # its margin is unused: dropped
    return (out[0], coll, *out[2:])


def account_total(valid: Any, fuse: dict) -> Callable:
    """``x`` ``[n, W]`` -> ``[W]``: the sum over a chunk's real accounts (``valid`` ``[n]``), as
    a product with the mask where ``fuse["matvec"]`` says it is faster."""
    if fuse["matvec"]:
        return lambda x: valid.astype(x.dtype) @ x
    return lambda x: jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0)


def _when(flag: Any, fn: Callable) -> Any:
    """``fn()``, or zeros of the same shapes without computing it where ``flag`` is False."""
    return jax.lax.cond(flag, fn, lambda: jax.tree_util.tree_map(jnp.zeros_like, fn()))


def account_rows(eq0, coll0, mm0, g0, best, arg, gap_max, cost_max) -> dict:
    """A chunk kernel's per-account ``[n]`` outputs from the snapshot state and the extremes
    over scenarios (worst P&L and its scenario, largest ``margin - collateral`` and cost)."""
    return {
        "equity": eq0,
        "collateral_value": coll0,
        "maintenance_margin": mm0,
        "gross_notional": g0,
        "pnl_worst": best,
        "scenario_worst": arg,
        "shortfall_worst": jnp.maximum(gap_max, 0.0),
        # bad debt falls as equity rises, so its worst is at the worst P&L
        "bad_debt_worst": liquidation.bad_debt(eq0 + best),
        "liquidation_cost_worst": cost_max,
    }


def closed_contracts(h: Holdings, t: Tables) -> Any:
    """Pass 1 of the price impact: contracts each instrument has closed out, per step and scenario.

    Who is liquidated, and at which step of a path, does not depend on closing costs, so one
    pass over every account finds the exchange-wide quantities the impact is charged on.

    Returns:
      ``[T, 2, n_impact, K * W]``: the chunk's net (signed: longs closed are sold, > 0) and
      gross contracts closed of each instrument with impact parameters, in the tile layout.
    """
    n, P, L = h.inst.shape
    T, W = t.user.shape
    KW = t.value.shape[2]
    dt = t.value.dtype
    qty = h.qty.reshape(n, P * L)
    row = t.impact_row[h.inst.reshape(n, P * L)]  # rows past n_impact collect the rest

    def tile(_, x):
        value, mm, price, notional, pmx, hc_base, length = x
        hc = t.haircut_of(hc_base)
        if t.partial_target is None:
            m_pm = t.model_margin(h, pmx)
            eq, coll, m, _ = tile_state(h, value, mm, price, hc, notional, tiers=t.tiers, fuse=fusion(dt))
            m = m if m_pm is None else m_pm
            *_, at = liquidation.path_outcome(W, eq, coll, m, lag=t.lag, length=length, at=True)
        else:  # the share of the book closed at each step, before the impact is known
            pos, bal, px, keep, m, g = portfolio.slots(h, value, mm, price, hc, notional, tiers=t.tiers)
            m, share = share_margin(h, t, m, notional, pmx)
            at = liquidation.partial_path(W, pos, bal, px, keep, m, g, t.partial_target, t.fee_rate, **share,
                                          length=length)["closed"]
        closed = at * h.valid[:, None].astype(dt)

        def add(p, acc):
            q = qty[:, p, None] * closed
            return acc.at[0, row[:, p]].add(q).at[1, row[:, p]].add(jnp.abs(q))

        acc = jax.lax.fori_loop(0, P * L, add, jnp.zeros((2, t.n_impact + 1, KW), dt))
        return None, acc[:, : t.n_impact]

    pm_tiles = t.model_tiles()
    return jax.lax.scan(tile, None, (t.value, t.mm, t.price, t.notional, pm_tiles, t.haircut_base, t.length))[1]


def column_max(x: Any) -> Any:
    """``jnp.max(x, axis=0)`` of ``x`` ``[n, W]`` as a tree of elementwise maxima of halves.

    XLA:CPU fuses the tree into one pass over ``x``, with no copy of it; its column reduction
    (a library call) took 46 us a ``[128, 256]`` float64 tile, more than the gathers that
    form ``x``. The result is the same: a maximum does not round.
    """
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        top = jnp.maximum(x[:half], x[half : 2 * half])
        x = top if x.shape[0] % 2 == 0 else jnp.concatenate([top, x[2 * half :]])
    return x[0]


def merge_top2(a: Any, b: Any) -> Any:
    """The two largest of the union of two multisets, elementwise: ``a`` and ``b`` ``[2, ...]``
    each hold a set's largest and second largest."""
    return jnp.stack([jnp.maximum(a[0], b[0]), jnp.maximum(jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1]))])


def column_top2(x: Any) -> Any:
    """``[2, W]``: the largest and second largest entry of each column of ``x`` ``[n, W]``
    (``n >= 2``; the largest twice where it occurs twice, as ``two_largest``), as a tree of
    elementwise ``merge_top2`` of halves.

    XLA:CPU computes the tree in four small elementwise fusions. ``two_largest`` takes three
    passes and three library reductions: on the ``(2, 1, 1)`` accounts of the benchmark's
    shocks, where a tile's largest bad debt often tops the second largest of the chunks before,
    they were a fifth of the kernel, and the tree half of that (docs/benchmarks.md). A maximum
    does not round: the values are the same.
    """
    half = x.shape[0] // 2
    pair = jnp.stack([jnp.maximum(x[:half], x[half : 2 * half]), jnp.minimum(x[:half], x[half : 2 * half])])
    if x.shape[0] % 2:
        pair = jnp.concatenate([pair, jnp.stack([x[2 * half :], jnp.full_like(x[2 * half :], -jnp.inf)])], axis=1)
    while pair.shape[1] > 1:
        half = pair.shape[1] // 2
        top = merge_top2(pair[:, :half], pair[:, half : 2 * half])
        pair = top if pair.shape[1] % 2 == 0 else jnp.concatenate([top, pair[:, 2 * half :]], axis=1)
    return pair[:, 0]


def first_argmin(x: Any) -> Any:
    """``jnp.argmin(x, axis=1)`` (int32) of ``x`` ``[n, W]``, no NaN: the first column holding
    each row's minimum, found by a minimum and then a minimum of column numbers. XLA:CPU
    compiled the argmin to a variadic reduction that took 132 us a ``[128, 256]`` tile."""
    lowest = jnp.min(x, axis=1, keepdims=True)
    column = jnp.arange(x.shape[1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == lowest, column, x.shape[1]), axis=1)


def largest_two(x: Any) -> Any:
    """``[2, W]``: ``two_largest`` stacked."""
    return jnp.stack(two_largest(x))


def two_largest(x: Any, xp: Any = jnp) -> tuple[Any, Any]:
    """The largest and second-largest entry of each column of ``x`` ``[n, W]``, ``x >= 0``, each
    ``[W]``: the maximum, then the maximum below it, or the maximum again when it occurs twice
    (plain fused reductions: a variadic (first, second) reduce doubled the kernel's time).
    ``xp``: ``jnp``, or ``np`` on the host."""
    first = xp.max(x, axis=0)
    below = xp.max(xp.where(x < first[None, :], x, 0.0), axis=0)
    twice = xp.sum((x == first[None, :]).astype(x.dtype), axis=0) > 1
    return first, xp.where(twice, first, below)


def _tail_size(m: int, level: float) -> int:
    """``r = m - k + 1`` with ``k = ceil(level * m)``: how many of ``m`` losses make the tail."""
    return m - math.ceil(level * m - 1e-9) + 1


def tail_loss(loss: Any, level: float = VAR_LEVEL) -> tuple[Any, Any]:
    """Empirical VaR and ES of each row of ``loss`` ``[n, m]``, on the device (``top_k``).

    With the ``m`` losses sorted ascending ``L(1) <= ... <= L(m)`` and ``k = ceil(level * m)``:
    ``VaR = L(k)`` (the lower empirical quantile) and ``ES = mean(L(k), ..., L(m))``, the
    mean of the ``r = m - k + 1`` largest losses: only those are selected, never a full sort.
    """
    tail, _ = jax.lax.top_k(loss, _tail_size(loss.shape[1], level))  # descending
    return tail[:, -1], jnp.mean(tail, axis=1)


def returns_losses() -> bool:
    """Whether the kernels return each account's random losses for ``tail_loss_host`` (CPU),
    rather than their VaR and ES (``tail_loss``)."""
    return jax.default_backend() == "cpu"


def tail_loss_host(loss: np.ndarray, level: float = VAR_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """``tail_loss`` on the host by NumPy's introselect (``np.partition``): on CPU, XLA's sort
    and ``top_k`` select at a few million elements per second, 30x slower, and a host callback
    inside the multi-device kernel can deadlock, so CPU runs return the random losses per
    chunk and select here, while the devices work on the next chunks."""
    m = loss.shape[1]
    r = _tail_size(m, level)
    top = np.partition(loss, m - r, axis=1)[:, m - r :]
    return top.min(axis=1), top.mean(axis=1)


def devices() -> list:
    """The local devices chunks are spread over (every CPU device, or every GPU)."""
    return jax.local_devices()


def _mesh(n_devices: int) -> Mesh:
    return Mesh(np.array(devices()[:n_devices]), ("d",))


def replicated(t: Any, n_devices: int) -> Any:
    """``t`` (a pytree of arrays: the tables) copied to every device of the mesh once, as the
    sharded kernels take it (``P()``). Passing a one-device array instead makes every call
    copy it again: at 1M accounts on 2 CPU devices, about 500 calls a run and a second of it."""
    return jax.device_put(t, NamedSharding(_mesh(n_devices), P()))


@functools.lru_cache(maxsize=None)
def sharded_kernel(n_random: int, with_pnl: bool, n_devices: int, level: float = VAR_LEVEL) -> Callable:
    """``chunk_kernel`` over a group of chunks ``[n_devices * B, ...]``: each device runs its
    ``B`` chunks in turn, all devices at once (``shard_map``); compiled once per holdings shape
    for the whole device mesh. Where ``PALLAS`` says so and the chunk ``fused.applies``, the
    fused kernel takes its place.

    Called as ``kernel(h, t, top, acc)``: ``top`` ``[n_devices, 2, S_pad]`` (``no_top``) holds
    each device's two largest bad debts per scenario over the groups before, and ``top2`` in the
    result the same with this group's merged in; ``acc`` (``no_sums``) each device's sums of
    ``SCENARIO_SUMS`` over the groups before, and ``acc`` in the result the same with this
    group's added. The other outputs are the group's own, the per-account ones in one array
    ``rows`` (``packed``). Carried from call to call on the devices, ``top2`` and ``acc`` are
    read once, after the last group.
    """
    pallas = PALLAS[_backend()]

    def local(h: Holdings, t: Tables, top: Any, acc: dict) -> dict:
        if pallas:
            from . import fused

            if fused.applies(h, t, n_random, with_pnl):  # shapes and settings are static
                return packed(added(merged(fused.group_kernel(h, t), top), acc))  # the device's chunks in one launch
        kernel = functools.partial(chunk_kernel, n_random=n_random, with_pnl=with_pnl, level=level)
        if not fusion(t.value.dtype).get("skip"):
            return packed(added(merged(jax.lax.map(lambda one: kernel(one, t), h), top), acc))
        # Where tiles can skip work (CPU), the chunks carry the two largest so far, in the
        # tile layout: most tiles then hold no bad debt above the second of them, and skip.
        # They carry the per-scenario sums too: stacked per chunk they were written out, read
        # back to the host and added up there, group by group (at 1M accounts x 5,000
        # scenarios, 3.5 GB of them)
        T, W = t.user.shape

        def chunk(carry, one):
            two, sums = carry
            out = kernel(one, t, top=two)
            return (out.pop("top2"), add_sums(sums, out)), out

        two = top.reshape(2, T, W).transpose(1, 0, 2)
        sums = {k: v[0] for k, v in acc.items()}
        if h.valid.shape[0] == 1:  # no loop: its outputs would be stacked by a copy
            (two, sums), out = chunk((two, sums), jax.tree_util.tree_map(lambda x: x[0], h))
            out = jax.tree_util.tree_map(lambda x: x[None], out)
        else:
            (two, sums), out = jax.lax.scan(chunk, (two, sums), h)
        out = {**out, "top2": two.transpose(1, 0, 2).reshape(top.shape), "acc": {k: v[None] for k, v in sums.items()}}
        return packed(out)

    mapped = on_devices(local, n_devices, (P("d"), P(), P("d"), P("d")))
    # kept traced on disk: a new process loads each holdings shape's module instead of tracing
    return _exported.Kept(jax.jit(mapped), ("sharded_kernel", n_random, with_pnl, n_devices, level))


# The chunk kernel's per-scenario outputs, each ``[rows, S_pad]``, that a sweep only adds up
# over accounts: ``sharded_kernel`` adds them up on the devices
SCENARIO_SUMS = ("sums", "lag_bad", "group_bad", "und_closed")


# The chunk kernel's per-account ``[n]`` outputs, in the columns of ``sharded_kernel``'s ``rows``
ROWS = ("equity", "collateral_value", "maintenance_margin", "gross_notional", "pnl_worst", "scenario_worst",
        "shortfall_worst", "bad_debt_worst", "liquidation_cost_worst", "p_liquidation", "var_99", "es_99")


def packed(out: dict) -> dict:
    """``out`` (a group's outputs) with its per-account ``ROWS`` ``[G, n]`` in one float64
    array ``rows`` ``[G, n, len(ROWS)]``, NaN for those the run has not (``scenario_worst``, an
    int32, is exact in it). One array to read back per group, not a dozen: on CPU each read and
    each placement on the host costs about the same whatever its size."""
    out = dict(out)
    like = out["pnl_worst"]
    cols = [out.pop(k).astype(jnp.float64) if k in out else jnp.full(like.shape, jnp.nan) for k in ROWS]
    return {**out, "rows": jnp.stack(cols, axis=-1)}


RANDOM_ROWS = ("p_liquidation", "var_99", "es_99")  # of ``ROWS``, those only a run with random scenarios has


def unpacked(rows: np.ndarray, n_random: int) -> dict:
    """``packed``'s ``rows`` ``[..., len(ROWS)]`` back to a column per name, without
    ``RANDOM_ROWS`` where the run has no random scenarios (``n_random`` 0)."""
    cols = {k: rows[..., i] for i, k in enumerate(ROWS) if n_random or k not in RANDOM_ROWS}
    cols["scenario_worst"] = cols["scenario_worst"].astype(np.int32)
    return cols


def add_sums(acc: dict, out: dict) -> dict:
    """``acc`` with ``out``'s ``SCENARIO_SUMS`` (popped from it) added, in ``acc``'s dtype."""
    return {k: v + out.pop(k).astype(v.dtype) for k, v in acc.items()}


def added(out: dict, acc: dict) -> dict:
    """``out`` (a group's outputs, its per-scenario sums ``[G, rows, S]``) with those sums added
    into ``acc`` ``[1, rows, S]`` as ``out["acc"]``."""
    out = dict(out)
    # in the accumulator's dtype before adding over chunks, as the host added them before
    group = {k: out.pop(k).astype(v.dtype).sum(axis=0, keepdims=True) for k, v in acc.items()}
    return {**out, "acc": add_sums(acc, group)}


def merged(out: dict, top: Any) -> dict:
    """``out`` with its ``top2`` ``[G, 2, S]`` (per chunk, or once for the group) merged into
    ``top`` ``[1, 2, S]``: the two largest of their union."""
    both = jnp.concatenate([top[0], out["top2"].reshape(-1, top.shape[-1]).astype(top.dtype)])
    return {**out, "top2": largest_two(both)[None]}


def no_top(t: Tables, n_devices: int) -> Any:
    """``sharded_kernel``'s ``top`` before the first group: zeros (bad debt is >= 0), on the
    devices."""
    zeros = np.zeros((n_devices, 2, t.user.size), np.dtype(t.value.dtype))
    return jax.device_put(zeros, NamedSharding(_mesh(n_devices), P("d")))


def no_sums(t: Tables, n_devices: int) -> dict:
    """``sharded_kernel``'s ``acc`` before the first group: zeros ``[n_devices, rows, S_pad]``
    for each of ``SCENARIO_SUMS`` the chunk kernel returns under ``t``, on the devices. Float64
    whatever the run's dtype, as the host added them before: a float32 run's sums over a
    million accounts would otherwise lose digits the reports show."""
    rows = dict(zip(SCENARIO_SUMS, (len(SUM_NAMES), len(t.lags), t.n_groups, t.und_asset.shape[0])))
    # chunk_kernel returns bad debt per lag and per group only where the run has lags or groups
    kept = {k: r for k, r in rows.items() if r or k not in ("lag_bad", "group_bad")}
    zeros = {k: np.zeros((n_devices, r, t.user.size)) for k, r in kept.items()}
    return jax.device_put(zeros, NamedSharding(_mesh(n_devices), P("d")))


def on_devices(local: Callable, n_devices: int, in_specs: tuple) -> Callable:
    """``local`` (one device's share of a group of chunks) run on every device of the mesh at
    once (``shard_map``); ``in_specs``: ``P("d")`` for arguments split over the devices, ``P()``
    for the ones each device holds whole. Outputs are split over the devices."""
    specs = dict(mesh=_mesh(n_devices), in_specs=in_specs, out_specs=P("d"))
    try:  # every device runs the same per-chunk code; no cross-device values to check
        return shard_map(local, check_vma=False, **specs)
    except TypeError:  # jax < 0.6 calls it check_rep
        return shard_map(local, check_rep=False, **specs)


@functools.lru_cache(maxsize=None)
def sharded_adl(n_devices: int) -> Callable:
    """``adl_kernel`` over a group of chunks ``[n_devices * B, ...]``, each device its ``B``
    chunks in turn; kept traced on disk as the sweep's kernels are."""
    def local(h: Holdings, t: Tables) -> dict:
        return jax.lax.map(lambda one: adl_kernel(one, t), h)

    return _exported.Kept(jax.jit(on_devices(local, n_devices, (P("d"), P()))), ("sharded_adl", n_devices))


@functools.lru_cache(maxsize=None)
def sharded_closed(n_devices: int) -> Callable:
    """``closed_contracts`` over a group of chunks, added into a per-device accumulator
    ``[n_devices, T, 2, n_impact, K * W]`` that stays on the devices between calls."""
    def local(h: Holdings, t: Tables, acc: Any) -> Any:
        body = lambda a, one: (a + closed_contracts(one, t).astype(a.dtype), None)  # noqa: E731
        return jax.lax.scan(body, acc[0], h)[0][None]

    # kept traced on disk as the sweep's kernels are (the accumulator, a few hundred KB, is not
    # donated: an exported call keeps no donation)
    kernel = jax.jit(on_devices(local, n_devices, (P("d"), P(), P("d"))))
    return _exported.Kept(kernel, ("sharded_closed", n_devices))


def position_weights(snap: Snapshot) -> np.ndarray:
    """``[N]`` contracts of each position that carry its instrument's margin."""
    kind = np.asarray(snap.instruments.kind)
    return margin.position_weight(kind[snap.pos_instrument], np.asarray(snap.pos_quantity, np.float64), xp=np)


def buckets(snap: Snapshot, order: np.ndarray | None = None) -> list[portfolio.Bucket]:
    """The snapshot's accounts grouped by padded holdings shape ``(J, P, L)``; ``order``: the
    rank of each account within its bucket (``risk_order``; default: by index)."""
    return portfolio.layout(
        snap.pos_account, snap.pos_instrument, snap.pos_quantity, position_weights(snap),
        np.asarray(snap.instruments.settlement), snap.balances, order,
    )


def risk_order(snap: Snapshot, t: Tables) -> np.ndarray:
    """``[n]`` rank of each account, riskiest first: maintenance margin over collateral value
    at the snapshot (``t``'s snapshot columns, static haircuts; accounts with no positive
    collateral first), ties by index.

    Only a schedule: laid out in this order, the accounts that a scenario set liquidates share
    chunks, and on CPU the tiles that liquidate no one skip their per-scenario sums (``FUSION``
    ``skip``). Values do not depend on it; sums over accounts only round differently.
    """
    n = snap.n_accounts
    value0, mm0, price0 = (np.asarray(x, np.float64)[:, 0] for x in (t.value0, t.mm0, t.price0))
    amount = margin.net_amounts(snap, value0)
    # static haircuts only (margin._collateral prices dynamic ones with eager JAX: a second of
    # compilation in a new process, for an order that needs no such precision)
    haircut = 0.0 if isinstance(t.haircut, portfolio.Haircut) else np.asarray(t.haircut, np.float64)
    coll = (amount * price0 * np.where(amount > 0, 1.0 - haircut, 1.0)).sum(axis=1)
    mm = np.bincount(snap.pos_account, weights=position_weights(snap) * mm0[snap.pos_instrument], minlength=n)
    risk = np.where(coll > 0, mm / np.where(coll > 0, coll, 1.0), np.inf)
    rank = np.empty(n, np.int64)
    rank[np.argsort(-risk, kind="stable")] = np.arange(n)  # ties keep index order
    return rank


def group_rows(snap: Snapshot) -> tuple[np.ndarray, int]:
    """``([n] int32 row of each account's group, n_groups)`` for Cover 2: groups of two or more
    accounts are numbered in name order; an account alone (no group, or the only one in its
    group) gets ``n_groups``. ``n_groups`` is 0 when the snapshot has no such group."""
    n = snap.n_accounts
    if snap.group_index is not None:  # a part of an exchange: the whole exchange's numbering
        return snap.group_index
    if snap.account_group is None:
        return np.zeros(n, np.int32), 0
    given = np.not_equal(snap.account_group, None).astype(bool)
    names, inverse, counts = np.unique(snap.account_group[given].astype(str), return_inverse=True, return_counts=True)
    shared = counts >= 2
    new_row = np.where(shared, np.cumsum(shared) - 1, shared.sum()).astype(np.int32)  # by name order
    rows = np.full(n, shared.sum(), np.int32)
    rows[given] = new_row[inverse]
    return rows, int(shared.sum())


_LAYOUTS: dict[int, tuple] = {}


def layout_of(snap: Snapshot, t: Tables | None = None) -> tuple:
    """``(buckets(snap, order), group_rows(snap))``, built once per snapshot object and kept
    while it lives: every pass of a run, and every later run on the same loaded snapshot, reuses
    it (at 1M accounts it costs about a second of host time). A snapshot is frozen; a changed
    one (``dataclasses.replace``) is a new object with a layout of its own. ``t``: tables of a
    run on it, to lay accounts out in ``risk_order`` (the first call builds what is kept)."""
    order = lambda: None if t is None else risk_order(snap, t)  # noqa: E731
    return kept_for(_LAYOUTS, snap, lambda: (buckets(snap, order()), group_rows(snap)))


def forget_layout(snap: Snapshot) -> None:
    """Drop the holdings layout kept for ``snap`` (``layout_of``) before the snapshot itself
    goes: about 300 MiB at 1M accounts that a caller done running on it (the CLI, once the
    run is over, before the report) has no more use for. A later run builds it again."""
    _LAYOUTS.pop(id(snap), None)


MAX_CHUNKS_PER_DEVICE = 8  # per call: enough to hide dispatch, few enough to pad little
# On CPU a run with random scenarios returns each chunk's losses ``[chunk, m]`` (``tail_loss_host``),
# stacked per call into a buffer XLA first fills with zeros, then copies every chunk's into:
# memory traffic as large as the chunk's work at 10,000 paths. Fewer chunks a call then pay:
# at 200k accounts, 10,000 paths in float32 (5 MB a chunk) 4 chunks took 6.62 s against 8.51 s
# for 8 (2: 6.95 s); in float64 2 chunks 11.71 s against 13.90 s for 4 and 14.89 s for 8; at
# 3,000 paths in float32, 8 stayed best (2.02 s against 2.21 s for 4): dispatch dominates.
RANDOM_BYTES_PER_DEVICE = 24 << 20


# A sweep of few scenarios does little work a call, and its calls' dispatch (and the transfer
# of each group's holdings) is then most of it: on CPU, under this many scenario slots (all
# tiles) a device runs more chunks per call, up to FEW_SCENARIOS_MAX_CHUNKS. At 1M accounts
# with 3M positions, three shocks: a warm run 0.40-0.58 s with 8 chunks a call, 0.32-0.34 s
# with 32 (docs/benchmarks.md).
FEW_SCENARIOS = 1024
FEW_SCENARIOS_MAX_CHUNKS = 32


def chunks_per_device(chunk_size: int, n_random: int, dtype: Any, n_scenarios: int | None = None) -> int:
    """The most chunks a device runs per call (a power of two): ``MAX_CHUNKS_PER_DEVICE``;
    on CPU up to ``FEW_SCENARIOS_MAX_CHUNKS`` for a sweep of fewer than ``FEW_SCENARIOS``
    scenario slots (``n_scenarios``: the tables' ``user.size``); fewer where the call returns
    random losses of more than ``RANDOM_BYTES_PER_DEVICE`` a device."""
    if not n_random or not returns_losses():
        if n_scenarios is None or n_scenarios >= FEW_SCENARIOS or _backend() != "cpu":
            return MAX_CHUNKS_PER_DEVICE
        more = 1 << int(math.log2(FEW_SCENARIOS // max(n_scenarios, 1)))
        return min(FEW_SCENARIOS_MAX_CHUNKS, MAX_CHUNKS_PER_DEVICE * more)
    per_chunk = chunk_size * n_random * np.dtype(dtype).itemsize
    return min(MAX_CHUNKS_PER_DEVICE, 1 << max(0, int(math.log2(max(RANDOM_BYTES_PER_DEVICE // per_chunk, 1)))))


def _groups(snap: Snapshot, chunk_size: int, dtype: Any, n_devices: int, layout: tuple | None = None,
            max_b: int = MAX_CHUNKS_PER_DEVICE, orders: list | None = None):
    """Yield ``(account indices per chunk, Holdings [G, chunk, ...])``, bucket by bucket.

    A group holds ``G = n_devices * B`` chunks, ``B`` per device, with ``B`` a power of two
    up to ``max_b`` sized to the bucket (so a bucket of 30 market makers is not padded to 8
    chunks a device). The last group of a bucket is padded with empty chunks and the last
    chunk with empty rows (``valid`` False), so shapes stay fixed. ``layout``:
    ``(buckets(snap), group_rows(snap))`` when the caller has them already. ``orders``: for
    each bucket, its rows in the order to chunk them (``calm_orders``; default: as laid out).
    """
    bs, (rows, n_groups) = layout or (buckets(snap), group_rows(snap))
    for k, b in enumerate(bs):
        order = None if orders is None else orders[k]
        m = len(b.accounts)
        # a small bucket (the few wide accounts) is not padded to a GPU-sized chunk; never
        # below DEFAULT_CHUNK, so CPU shapes (and their compiled kernels) do not vary with it
        chunk = min(chunk_size, max(DEFAULT_CHUNK, 1 << math.ceil(math.log2(max(m, 1)))))
        per_device = math.ceil(m / (chunk * n_devices))
        B = min(max_b, 1 << max(0, math.ceil(math.log2(max(per_device, 1)))))
        group = n_devices * B
        step = chunk * group
        for lo in range(0, m, step):
            hi = min(lo + step, m)
            pad = step - (hi - lo)
            sel = slice(lo, hi) if order is None else order[lo:hi]  # the group's rows of the bucket

            def take(x, dt=None):
                if pad:
                    x = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
                x = x.reshape((group, chunk) + x.shape[1:])
                return x if dt is None else x.astype(dt)

            acc = b.accounts[sel]
            accs = [acc[g * chunk : (g + 1) * chunk] for g in range(group)]
            yield accs, Holdings(
                inst=take(b.inst[sel]), qty=take(b.qty[sel], dtype), weight=take(b.weight[sel], dtype),
                asset=take(b.asset[sel]), balance=take(b.balance[sel], dtype),
                valid=(np.arange(step) < hi - lo).reshape(group, chunk), group=take(rows[acc]) if n_groups else None,
            )


CALM_COUNT_CHUNK = 8192  # accounts per device and call of calm_counts: few calls, bounded memory


@functools.lru_cache(maxsize=None)
def calm_counts(n_devices: int) -> Callable:
    """``(h [G, chunk, ...], ranges) -> [G, chunk]`` int32: in how many tiles
    ``portfolio.calm`` proves each account calm."""
    def local(h: Holdings, ranges: dict) -> Any:
        return jax.lax.map(lambda one: jnp.sum(portfolio.calm(one, ranges), axis=1, dtype=jnp.int32), h)

    # kept traced on disk, as the sweep's kernels are: one per holdings shape, tracing them
    # anew was about half a second of a new process's first run at 1M accounts
    return _exported.Kept(jax.jit(on_devices(local, n_devices, (P("d"), P()))),
                          ("calm_counts", n_devices))


def calm_orders(snap: Snapshot, t: Tables, dt: Any, n_devices: int, layout: tuple) -> list[np.ndarray]:
    """For each bucket of ``layout``, its rows with the accounts proved calm in the most tiles
    of ``t`` first (``portfolio.calm``; ties keep the layout's order).

    A tile's margin work is skipped only where every account of the chunk is proved calm in
    it. Laid out by snapshot risk (``risk_order``), chunks mix accounts calm in different
    tiles: at 100,000 accounts x 5,000 shocks, 75% of (account, tile) pairs were proved calm but
    only 49% of (chunk, tile) pairs; grouped by their count of calm tiles, 68%, and 62% of the
    accounts were in chunks calm in every tile (docs/benchmarks.md). The counts come from one
    pass of a small kernel over every account's holdings (NumPy on the host took 8 to 12 times
    as long).
    """
    kernel = calm_counts(n_devices)
    ranges = replicated(t.ranges, n_devices)
    per_bucket = [[(sum(len(a) for a in accs), kernel(h, ranges)) for accs, h in
                   _groups(snap, CALM_COUNT_CHUNK, dt, n_devices, ([b], layout[1]), max_b=1)] for b in layout[0]]
    counts = [np.concatenate([np.asarray(c).reshape(-1)[:m] for m, c in cs] or [np.zeros(0, np.int32)])
              for cs in per_bucket]
    return [np.argsort(-c, kind="stable") for c in counts]


def host_rows(x: Any, k: int) -> list[np.ndarray]:
    """``real_rows`` of a group's output ``x`` ``[G, chunk, ...]`` (sharded along ``G``) with
    ``k`` real accounts, as NumPy arrays ``[rows, ...]``, one per device's part, in order. On
    CPU they are views of the devices' buffers: ``jax.device_get`` would first copy the parts
    into one array, at 1M accounts x 10,000 paths in float32 40 GB, about 20 s of a 75 s run on
    this machine (docs/benchmarks.md)."""
    chunk = x.shape[1]
    parts = []
    for s in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
        start = (s.index[0].start or 0) * chunk
        if start < k:
            part = np.asarray(s.data)
            parts.append(part.reshape((-1,) + part.shape[2:])[: k - start])
    return parts


def real_rows(accs: list[np.ndarray], v: np.ndarray) -> np.ndarray:
    """A group's output ``[G, chunk, ...]`` (``accs``: its chunks' accounts, from ``_groups``)
    -> ``[m, ...]``, the rows of its ``m`` real accounts in the order of ``np.concatenate(accs)``:
    ``_groups`` pads only at a group's end, so they are the first rows, a view."""
    return v.reshape((-1,) + v.shape[2:])[: sum(len(a) for a in accs)]


@dataclasses.dataclass(frozen=True)
class Result:
    """A stress run: per-account rows, per-scenario rows and the summary (SPEC section 5)."""

    accounts: Any  # pandas DataFrame, one row per account
    scenarios: Any  # pandas DataFrame, one row per scenario
    summary: dict


def exchange_pnl(snap: Snapshot, host: dict) -> tuple[np.ndarray, np.ndarray]:
    """Exchange-wide P&L per scenario and its gross scale, USD, at the instrument level.

    Equity is linear in holdings, so the sum over accounts of their P&L is the open interest
    of each instrument times its USD value change, plus the balances' revaluation; no
    per-account work is needed. ``gross`` sums the same terms in absolute value per
    position and balance (the scale against which a net total of ~0 is judged).
    """
    settle = np.asarray(snap.instruments.settlement)
    usd = host["value"] * host["price_all"][settle]  # [I, 1 + S] USD value per contract
    d_usd = usd[:, 1:] - usd[:, :1]
    d_price = host["price_all"][:, 1:] - host["price_all"][:, :1]  # [A, S]
    I = len(snap.instrument_ids)
    oi = np.bincount(snap.pos_instrument, weights=snap.pos_quantity, minlength=I)
    gross_q = np.bincount(snap.pos_instrument, weights=np.abs(snap.pos_quantity), minlength=I)
    total = oi @ d_usd + snap.balances.sum(axis=0) @ d_price
    gross = gross_q @ np.abs(d_usd) + np.abs(snap.balances).sum(axis=0) @ np.abs(d_price)
    return total, gross


def _initial_margin(snap: Snapshot, im0: np.ndarray, notional0: np.ndarray) -> np.ndarray:
    """Initial margin per account at the snapshot, USD (``[n]``), risk-limit tiers applied."""
    i = snap.pos_instrument
    w = position_weights(snap) * im0[i]
    tiers = _tiers(snap.params, snap.params.tier_im)
    if tiers is not None:
        pn = np.abs(snap.pos_quantity) * notional0[i]
        bound, step = (np.asarray(x)[i] for x in tiers)
        w = w + pn * np.sum(step * (pn[:, None] > bound), axis=1)
    return np.bincount(snap.pos_account, weights=w, minlength=snap.n_accounts)


def _stream(snap, scen, chunk_size, dtype, progress, with_pnl, level=VAR_LEVEL, sweeper=None):
    """Revalue once, charge price impact (pass 1) if configured, stream every chunk through
    the kernel (pass 2); returns ``(host tables, per-account columns, per-scenario sums,
    [n, S] P&L or None)``. ``level``: the confidence of ``var_99``/``es_99`` (0.99 for
    reports; the ``var`` margin model sets its own). ``sweeper``: who sweeps the accounts
    (``LocalAccounts`` by default; ``stress.cluster`` spreads them over machines).
    ``host["tables"]`` keeps the tables for later passes (auto-deleveraging)."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    sweeper = sweeper or LocalAccounts(snap, chunk_size, dt, progress)
    t, host = tables(snap, scen, dt)
    if t.n_impact:
        t = _impact_pass(snap, t, sweeper.closed(t), dt)
    part = sweeper.sweep(t, int(scen.random.sum()), with_pnl, level)
    per_acc, sums, mats = part.finish(len(scen))
    host["tables"] = t
    return host, per_acc, sums, mats.get("pnl")


@dataclasses.dataclass
class Partial:
    """One pass of ``chunk_kernel`` over a set of accounts. Partials of disjoint account sets
    merge exactly (``merge``): per-account columns are placed, per-scenario sums added, the two
    largest bad debts per scenario merged; nothing depends on how accounts were split."""

    per_acc: dict  # name -> [n] per account, in the order of the snapshot swept
    total: np.ndarray  # [len(SUM_NAMES), S_pad] per-scenario sums
    largest: np.ndarray  # [2, S_pad] the two largest account bad debts per scenario
    lag_total: np.ndarray  # [len(lags), S_pad] bad debt under each reported oracle lag
    mats: dict  # "pnl", "liquidated": [n, S] with with_pnl; else empty
    lags: tuple = ()  # the oracle lags of lag_total's rows
    group_bad: Any = 0.0  # [n_groups, S_pad] bad debt of each group of accounts (0.0: no groups)
    und_total: Any = 0.0  # [U, S_pad] gross notional closed per underlying (Tables.und_asset), USD

    def finish(self, S: int) -> tuple[dict, dict, dict]:
        """``(per-account columns, per-scenario sums [S], matrices)``."""
        sums = {name: self.total[i, :S] for i, name in enumerate(SUM_NAMES)}
        # CPMI-IOSCO Cover 2: the two largest defaults, a group of accounts counting as one
        groups = self.group_bad if np.ndim(self.group_bad) else np.zeros((0, self.largest.shape[1]))
        both = np.concatenate([self.largest, groups])
        sums["cover2"] = np.sort(both[:, :S], axis=0)[-2:].sum(axis=0)
        sums["lag_bad_debt"] = dict(zip(self.lags, self.lag_total[:, :S]))
        sums["liquidated_notional_by"] = np.asarray(self.und_total)[..., :S]  # [U, S] (or 0.0: no accounts)
        return self.per_acc, sums, self.mats


def merge(parts: list[Partial], index: list[np.ndarray], n: int) -> Partial:
    """Partials of account sets ``index[k]`` (indices into an exchange of ``n`` accounts)."""
    per_acc: dict = {}
    mats: dict = {}
    for part, idx in zip(parts, index):
        for name, v in part.per_acc.items():
            per_acc.setdefault(name, np.empty(n, v.dtype))[idx] = v
        for name, v in part.mats.items():
            mats.setdefault(name, np.empty((n,) + v.shape[1:], v.dtype))[idx] = v
    largest = np.sort(np.concatenate([p.largest for p in parts]), axis=0)[::-1][:2]
    return Partial(per_acc, sum(p.total for p in parts), largest, sum(p.lag_total for p in parts), mats, parts[0].lags,
                   sum(p.group_bad for p in parts), sum(p.und_total for p in parts))


class LocalAccounts:
    """Sweeps every account of ``snap`` on this machine's devices, chunk group by group."""

    def __init__(self, snap: Snapshot, chunk_size: int | None, dt: Any, progress: Callable | None = None):
        self.snap, self.chunk_size, self.dt, self.progress = snap, chunk_size or default_chunk(), dt, progress

    def layout(self, t: Tables | None = None) -> tuple:
        """The snapshot's holdings layout (``layout_of``), in risk order by tables ``t`` where
        the kernels skip work (``FUSION`` "skip"): the order only pays there."""
        return layout_of(self.snap, t if fusion(self.dt).get("skip") else None)

    @contextlib.contextmanager
    def prefetching(self, kernel: Any, n_devices: int, t: Tables, max_b: int, *rest: Any):
        """Start preparing ``kernel(h, *rest)`` (an ``_exported.Kept``) for each holdings
        shape of ``groups(n_devices, t, max_b)``, and the calm counts' kernels before them
        where ``t`` has ranges, in background threads: a new process then loads them in
        parallel, and while the devices run the shapes before. A pass that stops early (an
        error, Ctrl-C) drops the ones not started, so the process need not compile them
        before it exits."""
        bs, rows = self.layout(t)

        def first(b: portfolio.Bucket, chunk: int, max_b: int) -> Holdings:  # the bucket's shape
            return next(_groups(self.snap, chunk, self.dt, n_devices, ([b], rows), max_b))[1]

        started = []
        try:
            if t.ranges is not None:
                count, ranges = calm_counts(n_devices), replicated(t.ranges, n_devices)
                started.append(count)
                for b in bs:
                    count.prefetch(first(b, CALM_COUNT_CHUNK, 1), ranges)
            started.append(kernel)
            for b in bs:
                kernel.prefetch(first(b, self.chunk_size, max_b), *rest)
            yield
        except BaseException:
            for k in started:
                k.cancel()
            raise

    def groups(self, n_devices: int, t: Tables | None = None, max_b: int = MAX_CHUNKS_PER_DEVICE):
        """``_groups`` of the snapshot, from its holdings layout (``layout_of``; ``t`` the
        run's tables)."""
        layout = self.layout(t)
        # where tiles proved calm skip their margin work, accounts calm in as many tiles share chunks
        orders = None if t is None or t.ranges is None else calm_orders(self.snap, t, self.dt, n_devices, layout)
        return _groups(self.snap, self.chunk_size, self.dt, n_devices, layout, max_b, orders)

    def closed(self, t: Tables) -> np.ndarray:
        """Pass 1 of the price impact: ``[T, 2, n_impact, K * W]`` net and gross contracts closed."""
        D = len(devices())
        T, W = t.user.shape
        # float64 whatever the run's dtype: net contracts are small differences of large sums
        # placed as the kernel returns it, so every call has one signature
        acc = np.zeros((D, T, 2, t.n_impact, t.value.shape[2]))
        acc = jax.device_put(acc, NamedSharding(_mesh(D), P("d")))
        kernel = sharded_closed(D)
        t_dev = replicated(t, D)
        with self.prefetching(kernel, D, t, MAX_CHUNKS_PER_DEVICE, t_dev, acc):
            for _, h in self.groups(D, t):
                acc = kernel(h, t_dev, acc)  # the accumulator stays on the devices
        return np.asarray(acc, np.float64).sum(axis=0)

    def adl(self, t: Tables, deficit: np.ndarray, unrealised: np.ndarray, base: np.ndarray,
            leverage: np.ndarray, tie: np.ndarray) -> tuple[np.ndarray, ...]:
        """``adl_candidates`` of every account in the deficit scenarios of ``t`` (``[n]`` terms)."""
        return adl_candidates(*self.adl_mats(t), deficit, unrealised, base, leverage, tie)

    def adl_mats(self, t: Tables) -> tuple[np.ndarray, np.ndarray]:
        """Every account's P&L and liquidated flag ``[n, S]`` in the ``S`` scenarios of ``t``
        (``adl_kernel``; padding scenarios dropped)."""
        n, S, D = self.snap.n_accounts, int(np.asarray(t.user).sum()), len(devices())
        # What the kernel does not read leaves the tables: the random paths' index, whose
        # length (how many deficit scenarios are random) would otherwise make a new signature,
        # so a new compilation, for every count; and the calm ranges, which order nothing here
        t = dataclasses.replace(t, random_index=np.zeros(0, np.int32), ranges=None)
        kernel, t_dev = sharded_adl(D), replicated(t, D)
        pnl, liquidated = np.empty((n, S)), np.empty((n, S), bool)

        def drain(accs, out) -> None:
            acc = np.concatenate(accs)
            pnl[acc] = real_rows(accs, np.asarray(out["pnl"]))[:, :S]
            liquidated[acc] = real_rows(accs, np.asarray(out["liquidated"]))[:, :S]

        per_group = self.chunk_size * D * MAX_CHUNKS_PER_DEVICE * t.user.size * 9  # P&L 8 bytes, flag 1
        with self.prefetching(kernel, D, t, MAX_CHUNKS_PER_DEVICE, t_dev):
            pipelined(self.groups(D, t), lambda h: kernel(h, t_dev), drain, in_flight(per_group))
        return pnl, liquidated

    def sweep(self, t: Tables, n_random: int, with_pnl: bool, level: float = VAR_LEVEL) -> Partial:
        """One pass of every account through ``chunk_kernel`` on tables ``t``."""
        snap, progress = self.snap, self.progress
        S = int(np.asarray(t.user).sum())
        D = len(devices())
        kernel = sharded_kernel(n_random, with_pnl, D, level)
        t_snap = with_ranges(t, snap.n_accounts)
        t = replicated(t_snap, D)
        top = no_top(t, D)  # each device's two largest bad debts so far: stays on the devices
        acc = no_sums(t, D)  # and its per-scenario sums
        table = np.empty((snap.n_accounts, len(ROWS)))  # per-account columns (``packed``)
        mats = {"pnl": np.empty((snap.n_accounts, S)), "liquidated": np.empty((snap.n_accounts, S), bool)} if with_pnl else {}
        done = 0

        def drain_one(accs, out) -> None:
            nonlocal done
            losses = out.pop("random_loss", None)  # [G * chunk, m], read in place below
            out = jax.device_get(out)
            # On CPU this host work shares the cores with the kernels, so it is kept to a few
            # whole-array operations per group: each output's real-account rows taken at once,
            # not chunk by chunk (at 1M accounts x 5,000 scenarios it took 1.2 s that way)
            acc = np.concatenate(accs)
            table[acc] = real_rows(accs, out.pop("rows"))
            for k, v in out.items():
                mats[k][acc] = real_rows(accs, v)[:, :S]
            if losses is not None:
                tails = [tail_loss_host(part, level) for part in host_rows(losses, len(acc))]
                table[acc, ROWS.index("var_99")] = np.concatenate([var for var, _ in tails])
                table[acc, ROWS.index("es_99")] = np.concatenate([es for _, es in tails])
            done += len(acc)
            if progress:
                progress(done, snap.n_accounts)

        # Dispatch is asynchronous: the devices compute while Python prepares the next group
        # and finishes the ones before. Groups in flight are bounded by the bytes they return
        # (the random losses of a Monte Carlo run are [chunk, paths] per chunk).
        max_b = chunks_per_device(self.chunk_size, n_random, self.dt, int(t.user.size))
        per_group = self.chunk_size * D * max_b * max(n_random, S if with_pnl else 0) * 8

        def call(h: Holdings) -> dict:
            nonlocal top, acc
            out = kernel(h, t, top, acc)
            top, acc = out.pop("top2"), out.pop("acc")  # the next group's, not drained
            return out

        with self.prefetching(kernel, D, t_snap, max_b, t, top, acc):
            pipelined(self.groups(D, t_snap, max_b), call, drain_one, in_flight(per_group))
        largest = np.stack(two_largest(np.asarray(top, np.float64).reshape(-1, t.user.size), xp=np))  # of all devices
        sums = {k: np.asarray(v).sum(axis=0) for k, v in acc.items()}  # of all devices
        lag_total = sums.get("lag_bad", np.zeros((0, t.user.size)))
        per_acc = unpacked(table, n_random) if done else {}  # none: no account drained
        return Partial(per_acc, sums["sums"], largest, lag_total, mats, t.lags, sums.get("group_bad", 0.0),
                       sums["und_closed"])


IN_FLIGHT_BYTES = 256e6  # what the groups dispatched ahead may return, at most, before drained


def in_flight(group_bytes: float) -> int:
    """How many groups ``pipelined`` keeps dispatched ahead when each returns ``group_bytes``
    to the host: 1 to 4, within ``IN_FLIGHT_BYTES``."""
    return max(1, min(4, int(IN_FLIGHT_BYTES // max(group_bytes, 1))))


def pipelined(groups: Any, call: Callable, drain: Callable, in_flight: int) -> None:
    """``drain(accs, call(h))`` for each ``(accs, h)`` of ``groups``, with up to ``in_flight``
    calls dispatched ahead: JAX dispatches asynchronously, so the devices compute the next
    groups while Python prepares more and reads back the ones before."""
    pending: list = []
    for accs, h in groups:
        pending.append((accs, call(h)))
        while len(pending) > in_flight:
            drain(*pending.pop(0))
    while pending:
        drain(*pending.pop(0))


def _impact_pass(snap: Snapshot, t: Tables, closed: np.ndarray, dt: Any) -> Tables:
    """Pass 1 of the price impact, exchange-wide: from ``closed`` (``LocalAccounts.closed``:
    the net and gross contracts each instrument closes out at each step of each scenario),
    its cost ``liquidation.impact_cost`` and the charge per contract closed that shares the
    cost pro rata to the contracts each liquidated account closes (``t.impact``, read by
    pass 2).

    Returns:
      ``t`` with ``impact``. (What each scenario paid, and the notional closed, are summed
      over the accounts by pass 2, which charges it.)
    """
    Ic = t.n_impact
    acc = closed  # [T, 2, Ic, KW] contracts: net, gross
    idx = np.flatnonzero(np.asarray(t.impact_row) < Ic)  # instruments of rows 0 .. Ic - 1
    notional = np.asarray(t.notional, np.float64)[:, idx, :]  # [T, Ic, KW] USD per contract
    und = np.asarray(snap.instruments.underlying)[idx]
    imp = liquidation.impact_params(snap)
    par = {k: np.asarray(getattr(imp, k))[und][None, :, None] for k in liquidation.IMPACT_KEYS}
    gross = acc[:, 1]
    cost = liquidation.impact_cost(acc[:, 0] * notional, par["spread"], par["k"], par["daily_vol"], par["daily_volume"])
    charge = np.zeros(t.notional.shape)
    charge[:, idx, :] = np.divide(cost, gross, out=np.zeros_like(cost), where=gross > 0)
    return dataclasses.replace(t, impact=jnp.asarray(charge, dt))


def _subset(t: Tables, cols: np.ndarray, width: int = 0) -> Tables:
    """The tables of scenarios ``cols`` only (flat indices into the set), re-tiled, with room
    for at least ``width`` scenarios (the rest padding, ``user`` 0), so that subsets of
    different sizes can share one shape."""
    W = t.user.shape[1]
    K = t.value.shape[2] // W
    n_cols = len(cols)
    S2 = max(n_cols, width)
    W2 = scenario_tile(S2, K, t.model_tiles() is not None, t.value.dtype)
    T2 = math.ceil(S2 / W2)
    cols = np.asarray(cols)
    padded = np.pad(cols, (0, T2 * W2 - n_cols), mode="edge")  # padding repeats the last (Tables)
    flat = lambda x: np.pad(np.asarray(x).reshape(-1)[cols], (0, T2 * W2 - n_cols)).reshape(T2, W2)  # noqa: E731
    random = flat(t.random)
    pm_keys, var_keys = ("pnl", "delta", "roll"), ("pnl", "dp", "im")
    xs = {"value": t.value, "mm": t.mm, "price": t.price, "notional": t.notional, "impact": t.impact,
          "haircut_base": t.haircut_base,
          "pm": None if t.pm is None else {k: t.pm[k] for k in pm_keys},
          "var": None if t.var is None else {k: t.var[k] for k in var_keys}}
    ys = _retile(xs, jax.device_put(padded), K=K, W2=W2)
    return dataclasses.replace(
        t, value=ys["value"], mm=ys["mm"], price=ys["price"], notional=ys["notional"], impact=ys["impact"],
        haircut_base=ys["haircut_base"],
        user=jax.device_put(flat(t.user)), random=jax.device_put(random),
        random_index=jax.device_put(np.flatnonzero(random.reshape(-1)).astype(np.int32)),
        length=jax.device_put(np.asarray(t.length).reshape(-1)[padded].reshape(T2, W2)),
        pm=None if t.pm is None else {**t.pm, **ys["pm"]},
        var=None if t.var is None else {**t.var, **ys["var"]},
    )


@functools.partial(jax.jit, static_argnames=("K", "W2"))
def _retile(xs: dict, cols: Any, K: int, W2: int) -> dict:
    """Every table of ``xs`` ``[T, X, K*W, ...]`` (None: absent) at the flat scenario indices
    ``cols`` ``[T2 * W2]``, re-tiled to ``[T2, X, K*W2, ...]``: one compiled call (as eager
    operations, about 25 executables to read from the compilation cache in a new process)."""
    T2 = cols.shape[0] // W2

    def sub(x):
        T, X, KW, rest = x.shape[0], x.shape[1], x.shape[2], x.shape[3:]
        W = KW // K
        x = jnp.moveaxis(x.reshape((T, X, K, W) + rest), 0, 2).reshape((X, K, T * W) + rest)[:, :, cols]
        x = jnp.moveaxis(x.reshape((X, K, T2, W2) + rest), 2, 0)
        return x.reshape((T2, X, K * W2) + rest)

    return jax.tree_util.tree_map(sub, xs)


def adl_basis(snap: Snapshot, coll0: np.ndarray, gross0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What auto-deleveraging ranks by, per account ``[n]``: ``(unrealised, base, leverage)``.

    The rank of an account in a scenario is its P&L % times its effective leverage, as BitMEX
    and Binance rank: ``(unrealised + scenario P&L) / base * leverage``. Where positions give
    an ``entry_price`` (futures and perpetuals), ``unrealised`` is their P&L from entry to the
    snapshot's mark, USD (inverse: in coins at the mark, valued at the underlying's price), and
    ``base`` their entry notional; otherwise ``unrealised`` is 0 and ``base`` the collateral
    value (the P&L % of the account). ``leverage`` = gross notional / collateral value at the
    snapshot (0 for an account with no positive collateral).
    """
    inst = snap.instruments
    i = snap.pos_instrument
    q, entry = snap.pos_quantity, snap.pos_entry_price
    kind, inverse = np.asarray(inst.kind)[i], np.asarray(inst.inverse)[i]
    cs, mark = np.asarray(inst.contract_size)[i], np.asarray(inst.mark)[i]
    spot = np.asarray(snap.market.price)[np.asarray(inst.underlying)[i]]
    given = np.isfinite(entry) & (kind != OPTION)
    e = np.where(given, entry, 1.0)
    upnl = np.where(inverse, q * cs * (1.0 / e - 1.0 / np.where(given, mark, 1.0)) * spot, q * cs * (mark - e))
    base = np.where(inverse, np.abs(q) * cs, np.abs(q) * cs * e)
    n = snap.n_accounts
    unrealised = np.bincount(snap.pos_account, weights=np.where(given, upnl, 0.0), minlength=n)
    entry_base = np.bincount(snap.pos_account, weights=np.where(given, base, 0.0), minlength=n)
    positive = coll0 > 0
    base = np.where(entry_base > 0, entry_base, np.where(positive, coll0, 1.0))
    leverage = np.where(positive, gross0 / np.where(positive, coll0, 1.0), 0.0)
    return unrealised, base, leverage


def auto_deleverage(snap: Snapshot, t: Tables, deficit: np.ndarray, random: np.ndarray, per_acc: dict,
                    sweeper: Any) -> dict:
    """Socialise each scenario's deficit (bad debt the fund could not pay) by auto-deleveraging.

    In a scenario with a deficit, the accounts still open at its end with a profit are ranked
    by ``adl_basis`` (highest first; ties by account id) and each is charged, in that order, up
    to its whole profit, until the deficit is covered. Ranks are exchange-wide, so this is one
    more pass over every account, on the deficit scenarios only (in batches that keep
    ``[accounts, scenarios]`` within ``ADL_BYTES``); the charges are then exact.

    Returns:
      ``{"adl_loss_worst": [n], "adl_loss_expected": [n] (mean over random scenarios, NaN
      without), "adl_total": [S]}``, USD.
    """
    n, S = snap.n_accounts, len(deficit)
    worst, on_random, total = np.zeros(n), np.zeros(n), np.zeros(S)
    cols = np.flatnonzero(deficit > 0)
    basis = adl_basis(snap, per_acc["collateral_value"], per_acc["gross_notional"])
    tie = np.empty(n, np.int64)
    tie[np.argsort(snap.account_ids, kind="stable")] = np.arange(n)  # ties go by account id
    batch = max(1, int(ADL_BYTES // (17 * max(n, 1))))
    width = adl_width(len(cols), batch)
    for lo in range(0, len(cols), batch):  # batches of scenarios, each a full pass over accounts
        c = cols[lo : lo + batch]
        col, row, charge = adl_charges(sweeper.adl(_subset(t, c, width), deficit[c], *basis, tie), deficit[c])
        np.maximum.at(worst, row, charge)
        on = random[c][col]
        np.add.at(on_random, row[on], charge[on])
        total[c] = np.bincount(col, weights=charge, minlength=len(c))
    n_random = int(random.sum())
    expected = on_random / n_random if n_random else np.full(n, np.nan)
    return {"adl_loss_worst": worst, "adl_loss_expected": expected, "adl_total": total}


def adl_width(n_deficit: int, batch: int) -> int:
    """The scenarios each batch of the auto-deleveraging pass is padded to: the next power of
    two of ``n_deficit`` (at least 8), at most ``batch`` (the most one batch holds). How many
    scenarios leave a deficit changes from one snapshot to the next; padded, the pass's
    kernels keep a few shapes and a nightly run finds them compiled (each is one compilation
    per holdings shape, 1-1.5 s on CPU)."""
    return min(batch, 1 << max(3, math.ceil(math.log2(max(n_deficit, 1)))))


def adl_candidates(pnl: np.ndarray, liquidated: np.ndarray, deficit: np.ndarray, unrealised: np.ndarray,
                   base: np.ndarray, leverage: np.ndarray, tie: np.ndarray) -> tuple[np.ndarray, ...]:
    """The accounts of a set that auto-deleveraging may charge in each of ``C`` deficit
    scenarios, from their ``[n, C]`` P&L and liquidated flags there (``adl_basis`` terms and
    the exchange-wide ``tie`` rank of their ids ``[n]``).

    Ranked within the set (rank highest first, then id), an account can be charged only if the
    profit ranked before it *in the set* is below the deficit: the profit ranked before it
    exchange-wide is at least that. So each part of the exchange sends only these candidates,
    a prefix of its winners, and ``adl_charges`` of all parts' candidates is exact.

    Returns:
      Flat arrays over the candidates: ``(column, row, rank, tie, profit)``, in no particular
      order (``adl_charges`` orders them).
    """
    k, terms = ADL_COLUMNS, (unrealised, base, leverage, tie)
    parts = [_candidates(pnl[:, lo : lo + k], liquidated[:, lo : lo + k], deficit[lo : lo + k], *terms, lo)
             for lo in range(0, pnl.shape[1], k)] or [_candidates(pnl, liquidated, deficit, *terms, 0)]
    return tuple(np.concatenate(x) for x in zip(*parts))


def _candidates(pnl, liquidated, deficit, unrealised, base, leverage, tie, first: int) -> tuple[np.ndarray, ...]:
    """``adl_candidates`` of columns ``first, first + 1, ...``, given as ``[n, c]`` blocks."""
    profit = np.where(liquidated, 0.0, np.maximum(pnl, 0.0))
    rank = (unrealised[:, None] + pnl) / base[:, None] * leverage[:, None]
    order = np.lexsort((np.broadcast_to(tie[:, None], rank.shape), -rank), axis=0)
    p = np.take_along_axis(profit, order, axis=0)
    take = (np.cumsum(p, axis=0) - p < deficit[None, :]) & (p > 0)
    at, col = np.nonzero(take)
    row = order[at, col]
    return col + first, row, rank[row, col], tie[row], profit[row, col]


def adl_charges(cand: tuple[np.ndarray, ...], deficit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(column, row, charge)`` of every candidate (``adl_candidates``, of one or several sets
    of accounts): in each column, the winners in rank order (ties by id) are charged up to their
    whole profit until ``deficit[column]`` is covered."""
    col, row, rank, tie, profit = cand
    order = np.lexsort((tie, -rank, col))
    col, row, profit = col[order], row[order], profit[order]
    charge = np.empty_like(profit)
    starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]]) if len(col) else np.zeros(0, np.int64)
    for lo, hi in zip(starts, np.r_[starts[1:], len(col)]):
        p = profit[lo:hi]
        charge[lo:hi] = np.clip(deficit[col[lo]] - (np.cumsum(p) - p), 0.0, p)
    return col, row, charge


def _check_options(chunk_size: Any, dtype: Any) -> None:
    """A ``ValueError`` naming the argument, as the CLI's exit 2 does: a chunk size of 0 fell
    back to the default, a negative one failed deep in the generator, a float16 as a KeyError."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a whole number >= 1, or None for the default")
    if (dtype if isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))) not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected 'float64' or 'float32'")


def run(
    snap: Snapshot,
    scen: Scenarios,
    *,
    chunk_size: int | None = None,
    dtype: str = "float64",
    progress: Callable[[int, int], None] | None = None,
    sweeper: Any = None,
) -> Result:
    """Stress the exchange under every scenario (SPEC sections 2 and 5).

    Args:
      snap: the snapshot. scen: the scenario set.
      chunk_size: accounts per chunk (results do not depend on it); ``None``: the backend's
        (``CHUNK``: 128 on CPU, 8192 on GPU).
      dtype: ``"float64"`` (default, exact reports) or ``"float32"`` (speed).
      progress: called as ``progress(accounts_done, accounts_total)``.
      sweeper: what sweeps the accounts in each pass: ``LocalAccounts`` (the default, this
        machine's devices) or ``stress.cluster.ClusterAccounts`` (a Dask cluster).

    Returns:
      ``Result`` with ``accounts`` and ``scenarios`` DataFrames and the ``summary`` dict.
    """
    import pandas as pd

    t0 = time.perf_counter()
    _check_options(chunk_size, dtype)
    chunk_size = chunk_size or default_chunk()
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    sweeper = sweeper or LocalAccounts(snap, chunk_size, dt, progress)
    host, acc, sums, _ = _stream(snap, scen, chunk_size, dtype, progress, False, sweeper=sweeper)
    liq_cfg = liquidation.config(snap.liquidation_config)
    n_random = int(scen.random.sum())
    S = len(scen)
    nan = np.full(snap.n_accounts, np.nan)

    tab = host["tables"]
    if tab.pm is not None or tab.var is not None:  # portfolio and var models: MM = mm_factor x IM
        im = acc["maintenance_margin"] / float((tab.pm or tab.var)["factor"])
    else:
        im = _initial_margin(snap, host["im0"], host["notional0"])
    worst_idx = np.clip(acc["scenario_worst"], 0, S - 1)
    accounts = pd.DataFrame(
        {
            "account_id": account_id_column(snap),
            "equity": acc["equity"],
            "collateral_value": acc["collateral_value"],
            "initial_margin": im,
            "maintenance_margin": acc["maintenance_margin"],
            "liquidatable": acc["collateral_value"] < acc["maintenance_margin"],
            "pnl_worst": acc["pnl_worst"],
            "scenario_worst": names_at(scen.names, worst_idx),
            "var_99": acc.get("var_99", nan),
            "es_99": acc.get("es_99", nan),
            "p_liquidation": _share(acc["p_liquidation"], n_random) if n_random else nan,
            "shortfall_worst": acc["shortfall_worst"],
            "bad_debt_worst": acc["bad_debt_worst"],
            "liquidation_cost_worst": acc["liquidation_cost_worst"],
        },
        # the columns as they are, not copied into one block: at 1M accounts a 0.35 s copy of
        # 110 MB in a new process's first run (0.03 s after), and that much more peak memory
        copy=False,
    )

    pnl_held, pnl_gross = exchange_pnl(snap, host)
    closed_out, fees, impact = sums["closed_out"], sums["fees"], sums["impact"]
    fund = insurance.fund_value(snap.insurance_fund, host["price_all"][:, 1:])
    bad = sums["bad_debt"]
    fund_after, social = insurance.waterfall(bad, fund + fees)  # fees in, bad debt out
    if liq_cfg["adl"] and (social > 0).any():
        adl = auto_deleverage(snap, host["tables"], social, np.asarray(scen.random), acc, sweeper)
    else:
        adl = {"adl_loss_worst": np.zeros(snap.n_accounts), "adl_total": np.zeros(S),
               "adl_loss_expected": np.zeros(snap.n_accounts) if n_random else nan}
    accounts["adl_loss_worst"] = adl["adl_loss_worst"]
    accounts["adl_loss_expected"] = adl["adl_loss_expected"]
    und_names = [snap.assets[a] for a in np.asarray(host["tables"].und_asset)]
    # by name, not asset order: the file's row order must not reorder the report's columns
    by_underlying = {f"liquidated_notional_{u}": v for u, v in sorted(zip(und_names, sums["liquidated_notional_by"]),
                                                                      key=lambda uv: uv[0])}
    scenarios = pd.DataFrame(
        {
            "scenario": list(scen.names),
            "kind": list(scen.kinds),
            # the accounts' P&L: positions held to the end, less what positions closed out
            # earlier along a path went on to gain (which the market, not the accounts, has)
            "pnl_total": pnl_held - closed_out - fees - impact,
            "pnl_closed_out": closed_out,
            "fees": fees,
            "impact_cost": impact,
            "liquidated_notional": sums["liquidated_notional"],
            **by_underlying,
            "pnl_gross": pnl_gross,
            "accounts_liquidatable": np.rint(sums["liquidatable"]).astype(np.int64),
            "shortfall_total": sums["shortfall"],
            "bad_debt": bad,
            "insurance_fund_before": fund,
            "insurance_fund_after": fund_after,
            "socialized_loss": social,
            "adl_total": adl["adl_total"],
            "cover2": sums["cover2"],
            "cover2_covered": sums["cover2"] <= fund + fees,
        }
    )

    cascade_summary = _cascade_columns(snap, scen, scenarios, fund, rnd=np.asarray(scen.random), on=liq_cfg["cascade"],
                                       chunk_size=chunk_size, dtype=dtype,
                                       parts=sweeper if hasattr(sweeper, "cascade_step") else None)
    order = np.lexsort((np.arange(S), -scenarios["shortfall_total"].to_numpy(), -bad))
    worst = int(order[0])
    rnd = scen.random
    depleted = (bad > 0) & (bad >= fund + fees)
    summary = {
        "as_of": snap.as_of.isoformat().replace("+00:00", "Z"),
        "accounts": int(snap.n_accounts),
        "positions": int(snap.n_positions),
        "scenarios": int(S),
        "random_scenarios": int(n_random),
        "insurance_fund": float(insurance.fund_value(snap.insurance_fund, host["price_all"][:, 0])),
        "worst_scenario": scen.names[worst],
        "worst_bad_debt": float(bad[worst]),
        "p_fund_depleted": float(depleted[rnd].mean()) if n_random else None,
        **_bad_debt_distribution(bad[rnd]),
        "accounts_liquidatable": int(accounts["liquidatable"].sum()),
        "oracle_lag_steps": int(liq_cfg["oracle_lag_steps"]),
        "impact_cost_worst": float(impact.max(initial=0.0)),
        "socialized_loss_worst": float(social.max(initial=0.0)),
        "adl": bool(liq_cfg["adl"]),
        **cascade_summary,
        "oracle_lags": _by_lag(sums["lag_bad_debt"], fund, rnd),
        "cover2_worst": float(sums["cover2"].max()),
        "cover2_scenario": scen.names[int(np.argmax(sums["cover2"]))],
        "cover2_covered": bool((sums["cover2"] <= fund + fees).all()),
        "total_equity": float(accounts["equity"].sum()),
        "total_initial_margin": float(im.sum()),
        "total_maintenance_margin": float(accounts["maintenance_margin"].sum()),
        "margin_model": "portfolio" if tab.pm is not None else "var" if tab.var is not None else "standard",
        "haircut_model": "dynamic" if snap.params.haircut_dynamic else "static",
        # the rest of the setup, so that two reports can say whether they were run alike
        "risk_limit_tiers": tab.tiers is not None or (tab.var is not None and tab.var["tiers"] is not None),
        "liquidation_mode": liq_cfg["mode"],
        "partial_target": float(liq_cfg["partial_target"]) if liq_cfg["mode"] == "partial" else None,
        "liquidation_fee_rate": float(liq_cfg["fee_rate"]),
        "price_impact": sorted(liq_cfg["impact"]),
        "dtype": dtype if isinstance(dtype, str) else np.dtype(dtype).name,
        "runtime_seconds": time.perf_counter() - t0,
    }
    return Result(accounts=accounts, scenarios=scenarios, summary=summary)


def _cascade_columns(snap, scen, scenarios, fund, *, rnd, on, chunk_size, dtype, parts=None) -> dict:
    """With ``[liquidation] cascade``, run every path again with price feedback
    (``stress.cascade``) and add its columns beside the engine's: ``bad_debt_feedback``,
    ``impact_cost_feedback``, ``liquidated_notional_feedback``, ``amplification`` (feedback /
    no feedback; NaN when cascades are off, inf where only the feedback run has bad debt) and
    ``price_impact_<ASSET>``; returns the summary's cascade keys. ``parts``: the sweeper,
    where it steps cascades itself (``cascade.run(parts=...)``: a cluster)."""
    S = len(scen)
    if not on:
        scenarios["amplification"] = np.full(S, np.nan)
        return {"cascade": False}
    from . import cascade

    c = cascade.run(snap, scen, chunk_size=chunk_size, dtype=dtype, parts=parts)
    for k in ("bad_debt", "impact_cost", "liquidated_notional"):
        scenarios[f"{k}_feedback"] = c[f"{k}_feedback"]
    scenarios["amplification"] = c["amplification"]
    moved = {a for a in liquidation.config(snap.liquidation_config)["impact"]}
    for a, name in enumerate(snap.assets):
        if name in moved:
            scenarios[f"price_impact_{name}"] = c["price_impact"][:, a]
    bad = c["bad_debt_feedback"]
    amp = c["amplification"]
    finite = amp[np.isfinite(amp)]
    fees = scenarios["fees"].to_numpy() if "fees" in scenarios else 0.0
    depleted = (bad > 0) & (bad >= fund + c.get("fees_feedback", fees))
    return {"cascade": True, "bad_debt_feedback_worst": float(bad.max(initial=0.0)),
            "amplification_worst": float(finite.max()) if len(finite) else None,
            "scenarios_cascade_created_bad_debt": int(np.isinf(amp).sum()),
            "p_fund_depleted_feedback": float(depleted[rnd].mean()) if rnd.any() else None}


def _by_lag(lag_bad: dict, fund: np.ndarray, rnd: np.ndarray) -> list[dict]:
    """Per reported oracle lag: the worst bad debt, the mean bad debt and P(fund depleted) over
    random scenarios (the fund before fees: fees differ per lag and are not tracked per lag)."""
    out = []
    for lag, bad in lag_bad.items():
        depleted = (bad > 0) & (bad >= fund)
        out.append({"lag": int(lag), "worst_bad_debt": float(bad.max()),
                    "bad_debt_mean": float(bad[rnd].mean()) if rnd.any() else None,
                    "p_fund_depleted": float(depleted[rnd].mean()) if rnd.any() else None})
    return out


def _bad_debt_distribution(bad: np.ndarray) -> dict:
    """Exchange-wide bad debt over the random scenarios: mean, 99% quantile and ES (the
    estimator of ``tail_loss``); None when the run has no random scenarios."""
    if not len(bad):
        return {"bad_debt_mean": None, "bad_debt_q99": None, "bad_debt_es99": None}
    q, es = tail_loss_host(np.asarray(bad, np.float64)[None, :])
    return {"bad_debt_mean": float(bad.mean()), "bad_debt_q99": float(q[0]), "bad_debt_es99": float(es[0])}


def pnl_matrix(snap: Snapshot, scen: Scenarios, *, chunk_size: int | None = None, dtype: str = "float64"):
    """Equity change per account and scenario, USD, collateral included.

    Returns:
      DataFrame indexed by ``account_id`` with one column per scenario (file order). It holds
      the full ``accounts x scenarios`` matrix, so it is meant for modest exchanges or subsets.
    """
    import pandas as pd

    _check_options(chunk_size, dtype)
    *_, pnl = _stream(snap, scen, chunk_size, dtype, None, True)
    return pd.DataFrame(pnl, index=pd.Index(snap.account_ids.astype(str), name="account_id"), columns=list(scen.names))
