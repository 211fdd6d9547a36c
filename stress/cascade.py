"""Liquidation cascades: along a path, what forced closes sell at one step moves later prices.

The engine (``engine.run``) closes each account out at the first step of a path where its
collateral value is below its maintenance margin, and charges it the price impact of what the
whole exchange closes there; the path itself is given. Here the path answers back: the net
notional the liquidation engine sells in each underlying at step ``t`` pushes that underlying's
price down (buying pushes it up) at every later step, by the square-root law's move
(``liquidation.impact_move``), so later steps are revalued at moved prices, more accounts
breach, and their forced closes move the price again.

Model, per path and underlying ``a`` (docs/cascade.md has the formulas and a worked example):

- ``X_a(t)``: net notional closed out at step ``t`` in instruments on ``a``, USD, signed so that
  closing longs (a sale) is positive: futures and perpetuals at their notional (SPEC section 2,
  ``|contract_size| * S`` linear, the USD face value inverse), options at ``delta * contract_size
  * S`` (Black-Scholes delta at that step: whoever takes a closed option over hedges its delta
  in the underlying, so only the delta reaches the underlying's market).
- ``c_a(0) = 1``, ``c_a(t + 1) = c_a(t) * max(1 + impact_move(X_a(t)), MIN_FACTOR)``: permanent
  impact, cumulative and multiplicative over the steps. The half-spread is a cost paid, not a
  move of the mid, so only the square-root term moves prices. Volatilities are not moved.
- Step ``t`` is revalued at the path's price times ``c(t)``: instrument values, margins (risk-
  limit tiers included, by each position's notional at the moved prices) and notionals all
  follow. Who breaches, the impact charged (``liquidation.impact_cost`` of each
  instrument's net notional at that step's moved prices, shared pro rata to the contracts each
  liquidated account closes), the fee and the bad debt are then exactly the engine's.
- Only paths (``montecarlo`` and ``replay`` scenarios of a set with ``K > 1`` steps) feed back:
  an explicit, grid or event scenario is a one-off shock (in a path set it is repeated at every
  step), so there is no later step for its closes to move; its feedback run is its plain run.

With the feedback switched off (every ``c = 1``) this is the engine's model, and the same
numbers come out (``bad_debt_no_feedback`` equals ``engine.run(...).scenarios.bad_debt``), for
full close-out (``[liquidation] mode = "full"``) under the standard margin model; partial
liquidation and the portfolio margin model are not modelled here (``NotImplementedError``).

Shape (DESIGN.md): steps outermost, a ``lax.scan`` over them, and inside each step one pass
over every account (stacked chunks, a ``lax.scan`` over the chunks of each holdings bucket);
only exchange-wide aggregates per step and path (net and gross contracts closed per instrument)
pass from the accounts to the market. The per-account state carried from step to step is one
integer per account and path: the step it first breached. Everything else about an account
(its equity, notional and impact charge where it was closed out) is recomputed once after the
scan from the small per-step tables ``[K, I, W]``. Paths are independent, so they are processed
in tiles (``W`` paths, the feedback and the plain run side by side: ``2W`` columns), one tile
per device at a time; each jitted function compiles once per holdings shape. Where the
accounts are spread over a cluster (``run(parts=...)``), each tile is driven a step at a time
from the client instead, out of the same three step functions (docs/cluster.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import engine, liquidation, margin, portfolio, pricing
from .liquidation import Impact, impact_params
from .portfolio import Holdings
from .scenarios import RANDOM_KINDS, Scenarios
from .snapshot import OPTION, Snapshot

try:
    from jax import shard_map
except ImportError:  # jax < 0.6
    from jax.experimental.shard_map import shard_map

# A step's price factor 1 + move is floored here, so prices stay positive: a forced sale large
# enough to reach it (|X| ~ daily_volume / (k * daily_vol)^2) is far outside the square-root
# law's range anyway.
MIN_FACTOR = 1e-3
MAX_PATHS_PER_TILE = 128  # 2 x 128 columns: the engine's widest CPU tile (float32), [128, 256] per chunk
STATE_BYTES = 128e6  # per device, the [accounts, 2W] int32 breach state of one tile at most
# Per-scenario outputs: each for the feedback run (``_feedback``) and the plain run (``_no_feedback``).
SUMS = ("bad_debt", "impact_cost", "fees", "liquidated_notional", "accounts_liquidated")
# The per-step tables ``[K, X, W2]`` that settle each account at the step that decided its path.
TABLE_KEYS = ("value", "price", "notional", "charge", "haircut")


def time_ordered(scen: Scenarios) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The set's paths in time order: ``(spot_mult [S, K, A], vol_shift [S, K, A], horizon_days
    [S, K])``, step ``K - 1`` the scenario's last (``spot_mult``), steps before it ``path_*``."""
    last = (scen.spot_mult[:, None], scen.vol_shift[:, None], scen.horizon_days[:, None])
    if scen.steps == 1:
        return tuple(np.asarray(x, np.float64) for x in last)
    before = (scen.path_spot_mult, scen.path_vol_shift, scen.path_horizon_days)
    return tuple(np.concatenate([b, x], axis=1).astype(np.float64) for b, x in zip(before, last))


def stacked(snap: Snapshot, chunk: int, dtype: Any) -> tuple[list[Holdings], list[np.ndarray]]:
    """Every account as stacked chunks, one ``Holdings [C_b, chunk, ...]`` per holdings
    bucket (the last chunk padded with ``valid`` False rows), and each bucket's account indices
    ``[m_b]`` in row order."""
    out, rows = [], []
    for b in engine.buckets(snap):
        m = len(b.accounts)
        C = max(1, math.ceil(m / chunk))
        pad = C * chunk - m

        def take(x, dt=None, C=C, pad=pad):
            x = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((C, chunk) + x.shape[1:])
            return x if dt is None else x.astype(dt)

        out.append(Holdings(inst=take(b.inst), qty=take(b.qty, dtype), weight=take(b.weight, dtype),
                            asset=take(b.asset), balance=take(b.balance, dtype),
                            valid=(np.arange(C * chunk) < m).reshape(C, chunk)))
        rows.append(b.accounts)
    return out, rows


def paths_per_tile(n_scenarios: int, n_accounts: int, n_devices: int) -> int:
    """``W``: a power of two from 8 to ``MAX_PATHS_PER_TILE``, no wider than the set spread over
    the devices needs, and small enough that a tile's ``[accounts, 2W]`` int32 breach state
    stays within ``STATE_BYTES``."""
    fit = STATE_BYTES / (8 * max(n_accounts, 1))
    need = math.ceil(n_scenarios / n_devices)
    w = 8
    while 2 * w <= min(fit, MAX_PATHS_PER_TILE) and w < need:
        w *= 2
    return w


# --------------------------------------------------------------------------------------------
# Inside the jit: one tile of paths


def _market(inst, market, params, spot_mult, vol_shift, horizon):
    """Every instrument at one step of ``W2`` paths (``spot_mult [W2, A]`` moved prices):
    ``engine._revalue_and_margin``'s values (``[I, W2]``, ``price [A, W2]``) and, per contract,
    the signed USD notional that reaches the underlying's market when it is closed (``[I,
    W2]``): the notional for futures and perpetuals, ``delta * contract_size * S`` for options.
    The option delta comes from a JVP along ``spot_mult`` itself (``dV/dm * m = delta * S``)."""
    def f(m):
        rv, _, mm = engine._revalue_and_margin(inst, market, params, m, vol_shift, horizon)
        return rv, mm

    (rv, mm), (d_rv, _) = jax.jvp(f, (spot_mult,), (spot_mult,))
    is_opt = (inst.kind == OPTION)[:, None]
    move_notional = jnp.where(is_opt & rv["live"], inst.contract_size[:, None] * d_rv["option"], rv["notional"])
    return rv, mm, move_notional


def _breach_chunk(h: Holdings, br: Any, contracts: Any, closed_n: Any, value, mm, price, notional, haircut, tiers,
                  t, length, *, K, lag):
    """One chunk at step ``t``: record first breaches (``br`` ``[n, W2]``, ``K`` = none yet) and
    add the contracts of accounts closed out at ``t`` (breached at ``t - lag``) to the step's
    exchange-wide ``contracts [2, I, W2]`` (net signed, closing longs > 0; gross) and count.
    ``tiers``: the maintenance margin's risk-limit tiers (``engine._tiers``), or None.
    ``length``: ``[W2]`` each column's own steps (``Scenarios.length``): past them a path only
    repeats its last state, where nothing breaches or closes again."""
    if tiers is None:
        _, coll, m = portfolio.state(h, value, mm, price, haircut)
    else:  # a position's tier follows its notional at the step's (moved) prices
        _, coll, m, _ = portfolio.state(h, value, mm, price, haircut, notional, tiers=tiers)
    live = t < length  # [W2]
    br = jnp.where((br == K) & (m > coll) & live, t, br)
    closed = (br + liquidation.path_lag(lag, length) == t) & live & h.valid[:, None]
    cf = closed.astype(contracts.dtype)
    n, P, L = h.inst.shape
    qty, inst = h.qty.reshape(n, P * L), h.inst.reshape(n, P * L)

    def add(p, acc):
        q = qty[:, p, None] * cf
        return acc.at[0, inst[:, p]].add(q).at[1, inst[:, p]].add(jnp.abs(q))

    contracts = jax.lax.fori_loop(0, P * L, add, contracts)
    return br, contracts, closed_n + jnp.sum(cf, axis=0)


def _settle_chunk(h: Holdings, br: Any, tab: dict, haircut, fee_rate, *, K, lag, with_fee):
    """One chunk after the last step: each account at the step that decided its path (closed
    out at ``br + lag``, else held to step ``K - 1``), its closing costs and bad debt, from the
    per-step tables ``tab`` (``[K, X, W2]``; ``tab["length"]`` ``[W2]`` each column's own
    steps: a path not closed out is held to its step ``length - 1``, the state its later
    steps repeat). Returns ``[len(SUMS), W2]`` sums over the chunk and ``[n, W2]`` the step of
    each close-out (-1: none)."""
    W2 = br.shape[1]
    length, tab = tab["length"], {k: v for k, v in tab.items() if k != "length"}
    acted = br + liquidation.path_lag(lag, length)
    liq = (acted < length) & h.valid[:, None]
    # [n, W2] the deciding step; flat indices into [K, I, W2] tables in int64 only when needed
    big = K * max(x.shape[1] for x in tab.values()) * W2 >= 2**31
    d = jnp.minimum(acted, length - 1).astype(jnp.int64 if big else jnp.int32)
    col = jnp.arange(W2, dtype=d.dtype)[None, :]

    def at_step(x):  # [K, X, W2] -> rows(i [n]) = x[d, i, column], [n, W2]
        X = x.shape[1]
        flat = x.reshape(-1)
        return lambda i: flat.at[(d * X + i[:, None].astype(d.dtype)) * W2 + col].get(mode="promise_in_bounds")

    value = at_step(tab["value"])
    if "haircut" in tab:  # dynamic haircuts: the vol-scaled haircuts of the deciding step
        haircut = dataclasses.replace(haircut, base=at_step(tab["haircut"]))
    eq, _, _, gross, charge = portfolio.state(h, value, value, at_step(tab["price"]), haircut,
                                              at_step(tab["notional"]), at_step(tab["charge"]))
    cost = jnp.where(liq, charge, 0.0)
    fee = liquidation.fee(eq - cost, gross, liq, fee_rate) if with_fee else jnp.zeros_like(eq)
    bad = liquidation.bad_debt(eq - cost - fee)  # the fee never creates bad debt; the impact can
    validf = h.valid.astype(eq.dtype)
    liqf = liq.astype(eq.dtype)
    sums = jnp.stack([validf @ bad, validf @ cost, validf @ fee, validf @ (liqf * gross), validf @ liqf])
    return sums, jnp.where(liq, d, -1).astype(jnp.int32)


def _market_step(inst, market, params, mult, vol, hor, settled, *, dt: Any, dynamic: bool):
    """The exchange's side of one step, before the accounts: every instrument at the step's
    (moved) prices ``mult [W2, A]``, vol shifts ``vol [W2, A]``, horizon ``hor [W2]``;
    ``settled``: what this returned for the step before (at the first step, ``unsettled``).

    Returns ``(acc, notional, move_notional, settled)``: ``acc``, what the accounts read, in
    the accounts' dtype ``dt``: ``value``, ``mm``, ``notional`` ``[I, W2]`` per contract,
    ``price [A, W2]`` and, with dynamic haircuts, ``haircut [A, W2]``; ``notional`` and
    ``move_notional`` ``[I, W2]`` (float64) for ``_exchange_step``; ``settled``, the value
    and ``live`` flags for the next step (contracts that settled along the path keep what
    they settled into: ``pricing.hold_settled_step``)."""
    rv, mm, move_notional = _market(inst, market, params, mult, vol, hor)
    value = pricing.hold_settled_step(rv["value"], rv["live"], settled)
    acc = {"value": value.astype(dt), "mm": mm.astype(dt), "price": rv["price"].astype(dt),
           "notional": rv["notional"].astype(dt)}
    if dynamic:  # the step's vol-scaled haircuts [A, W2]
        acc["haircut"] = margin.scaled_haircut(params, vol).T.astype(dt)
    return acc, rv["notional"], move_notional, (value, rv["live"])


def unsettled(I: int, W2: int) -> tuple:
    """``_market_step``'s ``settled`` before a path's first step: nothing has settled."""
    return jnp.zeros((I, W2), jnp.float64), jnp.ones((I, W2), bool)


def _accounts_step(hs, brs, acc, haircut, tiers, t, *, K, lag):
    """The accounts' side of step ``t``: every chunk of every bucket through ``_breach_chunk``.

    Args:
      hs: tuple of ``Holdings [C_b, chunk, ...]``, one per bucket; brs: their first-breach
        steps ``[C_b, chunk, W2]`` (``K``: none yet). acc: ``_market_step``'s tables, and
        ``length`` ``[W2]``, each column's own steps.

    Returns the new ``brs`` and, summed over these accounts, ``contracts [2, I, W2]`` (net
    signed, closing longs > 0; gross) and ``closed [W2]`` (accounts closed out at ``t``), in
    the accounts' dtype. Any set of accounts may be stepped on its own and the sums added:
    only ``_exchange_step`` couples them.
    """
    dt = hs[0].qty.dtype
    I, W2 = acc["value"].shape
    hc = dataclasses.replace(haircut, base=acc["haircut"]) if "haircut" in acc else haircut
    contracts, closed_n = jnp.zeros((2, I, W2), dt), jnp.zeros(W2, dt)
    new = []
    for h_b, br_b in zip(hs, brs):  # a handful of holdings shapes, unrolled at trace time
        def body(c, xs):
            br, contracts, closed_n = _breach_chunk(xs[0], xs[1], *c, acc["value"], acc["mm"], acc["price"],
                                                    acc["notional"], hc, tiers, t, acc["length"], K=K, lag=lag)
            return (contracts, closed_n), br

        (contracts, closed_n), br_b = jax.lax.scan(body, (contracts, closed_n), (h_b, br_b))
        new.append(br_b)
    return tuple(new), contracts, closed_n


def _exchange_step(contracts, notional, move_notional, imp: Impact, und, fb, factor):
    """The exchange's side of one step, after the accounts: from the contracts closed
    exchange-wide (``contracts [2, I, W2]``, float64), the engine's pass 1 (impact ``cost [I,
    W2]`` of each instrument's net notional, ``charge [I, W2]`` per contract closed, shared pro
    rata) and the feedback: ``X [A, W2]``, the net notional per underlying, moves the price
    factor ``factor [W2, A]`` of the later steps of the feedback columns (``fb [W2]``).

    Returns ``(cost, charge, X, next factor)``."""
    A = factor.shape[1]

    def per_inst(x):  # [A] -> [I, 1]
        return x[und][:, None]

    net, gross = contracts[0], contracts[1]
    cost = liquidation.impact_cost(net * notional, per_inst(imp.spread), per_inst(imp.k),
                                   per_inst(imp.daily_vol), per_inst(imp.daily_volume))
    charge = jnp.where(gross > 0, cost / jnp.where(gross > 0, gross, 1.0), 0.0)
    X = jax.ops.segment_sum(net * move_notional, und, num_segments=A)  # [A, W2]
    move = liquidation.impact_move(X, imp.k[:, None], imp.daily_vol[:, None], imp.daily_volume[:, None])
    grow = jnp.where(fb[None, :], jnp.maximum(1.0 + move, MIN_FACTOR), 1.0)
    return cost, charge, X, factor * grow.T


def _settle_all(hs, brs, tab, haircut, fee_rate, *, K, lag, with_fee, with_accounts):
    """After the last step: ``_settle_chunk`` over every chunk of every bucket. Returns ``sums
    [len(SUMS), W2]`` (float64) and, with ``with_accounts``, the close-out step of each
    account per bucket ``[C_b, chunk, W2]`` (else None)."""
    sums = jnp.zeros((len(SUMS), brs[0].shape[-1]), jnp.float64)
    steps_out = []
    for h_b, br_b in zip(hs, brs):
        def body(s, xs):
            out, at = _settle_chunk(xs[0], xs[1], tab, haircut, fee_rate, K=K, lag=lag, with_fee=with_fee)
            return s + out.astype(jnp.float64), (at if with_accounts else None)

        sums, at = jax.lax.scan(body, sums, (h_b, br_b))
        steps_out.append(at)
    return sums, (tuple(steps_out) if with_accounts else None)


def _step_record(acc, charge, cost, closed, X, factor, dt) -> dict:
    """What a tile keeps of one step: the tables that settle its accounts (``TABLE_KEYS``)
    and the per-step outputs of ``_tile_out``."""
    return {"charge": charge.astype(dt), "cost": cost.sum(axis=0), "closed": closed, "net_notional": X,
            "factor": factor, **{k: v for k, v in acc.items() if k not in ("mm", "length")}}


def _tile_out(sums, ys) -> dict:
    """A tile's outputs from its settled ``sums`` and its steps' records stacked ``[K, ...]``."""
    return {"sums": sums, "price": ys["price"].astype("float64"), "impact_cost": ys["cost"],
            "closed": ys["closed"].astype("float64"), "net_notional": ys["net_notional"], "factor": ys["factor"][-1]}


def _tile(hs, inst, market, params, imp: Impact, haircut, fee_rate, tiers, mult, vol, hor, fb, length, *, K, lag,
          with_fee, with_accounts):
    """One tile of ``W2`` columns (paths), every step, every account: the three sides of a
    step (``_market_step``, ``_accounts_step``, ``_exchange_step``) in one ``lax.scan``.

    Args:
      hs: tuple of ``Holdings [C_b, chunk, ...]``, one per bucket.
      tiers: ``(bound, step)`` ``[I, K_tiers - 1]`` risk-limit tiers of maintenance margin, or None.
      mult, vol: ``[K, W2, A]`` the paths' spot multipliers and vol shifts, time order.
      hor: ``[K, W2]`` horizon days. fb: ``[W2]`` bool: the column's closes move later prices.
      length: ``[W2]`` int32, each column's own steps (``Scenarios.length``): the steps after
        them repeat its last state, which nothing moves.

    Returns:
      ``sums [len(SUMS), W2]`` (float64), per step ``price [K, A, W2]`` (USD, moved),
      ``impact_cost [K, W2]``, ``closed [K, W2]`` (accounts closed out), ``net_notional [K, A,
      W2]`` (``X``, USD), ``factor [W2, A]`` (``c`` at the last step) and, with
      ``with_accounts``, the close-out step of each account per bucket ``[C_b, chunk, W2]``.
    """
    dt = hs[0].qty.dtype
    W2, A = mult.shape[1], mult.shape[2]
    dynamic = isinstance(haircut, portfolio.Haircut)

    def step(carry, x):
        factor, brs, settled = carry
        m, v, h, t = x
        acc, notional, move_notional, settled = _market_step(inst, market, params, m * factor, v, h, settled, dt=dt,
                                                             dynamic=dynamic)
        brs, contracts, closed_n = _accounts_step(hs, brs, {**acc, "length": length}, haircut, tiers, t, K=K, lag=lag)
        cost, charge, X, grown = _exchange_step(contracts.astype(jnp.float64), notional, move_notional, imp,
                                                inst.underlying, fb & (t + 1 < length), factor)
        return (grown, brs, settled), _step_record(acc, charge, cost, closed_n, X, factor, dt)

    brs = tuple(jnp.full(h.valid.shape + (W2,), K, jnp.int32) for h in hs)
    init = (jnp.ones((W2, A), jnp.float64), brs, unsettled(inst.kind.shape[0], W2))
    xs = (mult, vol, hor, jnp.arange(K, dtype=jnp.int32))
    # checkpoint: reverse mode through the scan keeps one step's residuals, not K steps' accounts
    (_, brs, _), ys = jax.lax.scan(jax.checkpoint(step), init, xs)

    tab = {**{k: ys[k] for k in TABLE_KEYS if k in ys}, "length": length}
    sums, steps = _settle_all(hs, brs, tab, haircut, fee_rate, K=K, lag=lag, with_fee=with_fee,
                              with_accounts=with_accounts)
    out = _tile_out(sums, ys)
    if with_accounts:
        out["steps"] = steps
    return out


@functools.cache
def _kernel(n_devices: int, K: int, lag: int, with_fee: bool, with_accounts: bool):
    """``_tile`` over ``n_devices`` tiles at once, one per device (``shard_map``); holdings and
    instrument terms replicated. Compiled once per holdings shapes and tile width."""
    mesh = engine._mesh(n_devices)

    def local(hs, inst, market, params, imp, haircut, fee_rate, tiers, mult, vol, hor, fb, length):
        out = _tile(hs, inst, market, params, imp, haircut, fee_rate, tiers, mult[0], vol[0], hor[0], fb[0], length[0],
                    K=K, lag=lag, with_fee=with_fee, with_accounts=with_accounts)
        return jax.tree_util.tree_map(lambda x: x[None], out)

    rep = P()
    specs = {"mesh": mesh, "in_specs": (rep,) * 8 + (P("d"),) * 5, "out_specs": P("d")}
    try:  # paths are independent: no cross-device values
        mapped = shard_map(local, check_vma=False, **specs)
    except TypeError:  # jax < 0.6 calls it check_rep
        mapped = shard_map(local, check_rep=False, **specs)
    return jax.jit(mapped), mesh


# --------------------------------------------------------------------------------------------
# Accounts held elsewhere: the steps one at a time, the accounts' side in parts
#
# Where the accounts are spread over several processes (``stress.cluster``), a tile cannot be
# one scan: between two steps the contracts closed by every part must meet. ``run(parts=...)``
# then drives each tile step by step from here: ``_market_step`` and ``_exchange_step`` run in
# this process, the parts run ``_accounts_step`` and, after the last step, ``_settle_all`` on
# their own accounts (``part_of``, ``part_begin``, ``part_step``, ``part_settle``), and only
# ``[2, I, W2]`` contracts and ``[W2]`` counts per part and step come back.

_market_step_jit = jax.jit(_market_step, static_argnames=("dt", "dynamic"))
_exchange_step_jit = jax.jit(_exchange_step)
_accounts_step_jit = jax.jit(_accounts_step, static_argnames=("K", "lag"))
_settle_jit = jax.jit(_settle_all, static_argnames=("K", "lag", "with_fee", "with_accounts"))


@dataclasses.dataclass(frozen=True)
class Part:
    """A set of accounts between the steps of one tile: what ``part_step`` carries."""

    hs: tuple  # Holdings [C_b, chunk, ...] per holdings bucket, on this process's device
    rows: tuple  # [m_b] int account indices (within the part's snapshot) of each bucket's rows
    brs: tuple  # [C_b, chunk, W2] int32 step each account first breached, K: not yet (() between tiles)
    haircut: Any  # margin.snapshot_haircut: [A], or a Haircut for dynamic haircuts
    tiers: Any  # engine._tiers of maintenance margin, or None
    n_accounts: int


def part_of(snap: Snapshot, chunk_size: int | None, dtype: str) -> Part:
    """The accounts of ``snap`` (a partition's sub-snapshot) laid out for the steps, once per
    run: ``part_begin`` starts each tile from it."""
    dt = engine.DTYPES[dtype] if isinstance(dtype, str) else dtype
    hs, rows = stacked(snap, chunk_size or engine.default_chunk(), dt)
    haircut = margin.snapshot_haircut(snap.params, np.asarray(snap.market.price), dt)
    tiers = engine._tiers(snap.params, snap.params.tier_mm, dt)
    return Part(jax.device_put(tuple(hs)), tuple(rows), (), haircut, tiers, snap.n_accounts)


def part_begin(p: Part, W2: int, K: int) -> Part:
    """``p`` before the first step of a tile of ``W2`` columns: no account has breached."""
    return dataclasses.replace(p, brs=tuple(jnp.full(h.valid.shape + (W2,), K, jnp.int32) for h in p.hs))


def part_step(p: Part, t: int, acc: dict, K: int, lag: int) -> tuple[Part, tuple[np.ndarray, np.ndarray]]:
    """Step ``t`` of the part's accounts on the step's tables ``acc`` (``_market_step``):
    the part carried to the next step, and its ``contracts [2, I, W2]`` and ``closed [W2]``
    (float64)."""
    brs, contracts, closed = _accounts_step_jit(p.hs, p.brs, acc, p.haircut, p.tiers, np.int32(t), K=K, lag=lag)
    return dataclasses.replace(p, brs=brs), (np.asarray(contracts, np.float64), np.asarray(closed, np.float64))


def part_settle(p: Part, tab: dict, fee_rate: float, K: int, lag: int,
                with_accounts: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """After the last step: the part's ``sums [len(SUMS), W2]`` and, with ``with_accounts``,
    each of its accounts' close-out step ``[n, W2]`` (-1: none), in the part's account order."""
    dt = p.hs[0].qty.dtype
    sums, steps = _settle_jit(p.hs, p.brs, tab, p.haircut, np.asarray(fee_rate, dt), K=K, lag=lag,
                              with_fee=fee_rate > 0, with_accounts=with_accounts)
    if not with_accounts:
        return np.asarray(sums), None
    W2 = p.brs[0].shape[-1]
    out = np.full((p.n_accounts, W2), -1, np.int64)
    for b, acc in enumerate(p.rows):
        out[acc] = np.asarray(steps[b]).reshape(-1, W2)[: len(acc)]
    return np.asarray(sums), out


def add_steps(got: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """``part_step``'s ``(contracts, closed)`` of every part, added in part order."""
    return (np.sum(np.stack([g[0] for g in got]), axis=0), np.sum(np.stack([g[1] for g in got]), axis=0))


def add_settled(got: list[tuple], index: list[np.ndarray], n_accounts: int,
                with_accounts: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``part_settle``'s results of every part (part ``k`` holding the snapshot's accounts
    ``index[k]``): sums added in part order, account steps placed in the snapshot's order."""
    sums = np.sum(np.stack([g[0] for g in got]), axis=0)
    if not with_accounts:
        return sums, None
    steps = np.full((n_accounts, got[0][1].shape[1]), -1, np.int64)
    for idx, g in zip(index, got):
        steps[idx] = g[1]
    return sums, steps


def _stepped_tile(parts: Any, inst, market, params, imp: Impact, mult, vol, hor, fb, length, *, K, lag, fee_rate,
                  dt, dynamic, with_accounts) -> dict:
    """``_tile`` with the accounts in ``parts``: the same outputs (a leading axis of one tile;
    ``account_steps [1, n, W2]`` in place of ``steps``), driven a step at a time from here."""
    W2, A = mult.shape[1], mult.shape[2]
    factor = np.ones((W2, A))
    parts.cascade_begin(W2=W2, K=K, lag=lag, fee_rate=fee_rate, dtype=np.dtype(dt).name)
    ys = []
    settled = unsettled(len(np.asarray(inst.kind)), W2)
    for t in range(K):
        acc, notional, move_notional, settled = _market_step_jit(inst, market, params, mult[t] * factor, vol[t],
                                                                 hor[t], settled, dt=dt, dynamic=dynamic)
        acc = {**jax.device_get(acc), "length": length}
        contracts, closed = parts.cascade_step(t, acc)  # summed over the parts, float64
        cost, charge, X, grown = _exchange_step_jit(contracts, notional, move_notional, imp, inst.underlying,
                                                    fb & (t + 1 < length), factor)
        ys.append(jax.device_get(_step_record(acc, charge, cost, closed, X, factor, dt)))
        factor = np.asarray(grown)
    ys = {k: np.stack([y[k] for y in ys]) for k in ys[0]}
    sums, steps = parts.cascade_settle({**{k: ys[k] for k in TABLE_KEYS if k in ys}, "length": length}, with_accounts)
    out = _tile_out(sums, ys)
    if with_accounts:
        out["account_steps"] = steps
    return {k: np.asarray(v)[None] for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# The host loop over tiles


def run(snap: Snapshot, scen: Scenarios, *, chunk_size: int | None = None, dtype: str = "float64",
        paths_per_tile: int | None = None, accounts: bool = False, parts: Any = None) -> dict:
    """Liquidation cascades: every scenario with and without price feedback.

    Args:
      snap: the snapshot (``[liquidation]``: ``impact`` per underlying, ``fee_rate``,
        ``oracle_lag_steps``; without impact parameters nothing moves and both runs agree).
      scen: the scenario set; paths (``montecarlo``, ``replay``) feed back, one-off shocks not.
      chunk_size: accounts per chunk (results do not depend on it); ``None``: the backend's.
      dtype: ``"float64"`` (default) or ``"float32"`` (accounts; the per-step instrument
        tables, impact and moves are computed in float64 either way).
      paths_per_tile: ``W``, paths per tile (default ``paths_per_tile(...)``; results do not
        depend on it).
      accounts: also return each account's close-out step per scenario (``[n, S]``).
      parts: the accounts held elsewhere (``stress.cluster.ClusterAccounts``): each tile is
        then driven one step at a time from here, and ``parts`` steps the accounts, with
        ``cascade_begin(W2=, K=, lag=, fee_rate=, dtype=)``, ``cascade_step(t, acc)`` (the sums
        of ``part_step`` over its parts) and ``cascade_settle(tab, with_accounts)`` (the sums
        of ``part_settle``, its account steps placed in the snapshot's order). Results are
        this process's own to rounding in the order of the exchange-wide sums.

    Returns:
      NumPy arrays, scenarios in file order, USD unless stated:

      - ``bad_debt_feedback``, ``impact_cost_feedback``, ``fees_feedback``,
        ``liquidated_notional_feedback`` (gross notional closed out), ``accounts_liquidated_feedback``
        ``[S]``; the same with ``_no_feedback``: the engine's model (``engine.run``'s
        ``bad_debt``, ``impact_cost``, ``fees``, ``liquidated_notional``, ``accounts_liquidatable``).
      - ``amplification`` ``[S]``: ``bad_debt_feedback / bad_debt_no_feedback``; 1.0 where both
        are 0; ``inf`` where only the feedback run has bad debt (the cascade created it); it
        can be below 1 (an earlier close-out can lose less).
      - ``price_impact`` ``[S, A]``: the relative move the cascade added to each asset's price
        at the path's last step, ``c(K-1) - 1`` (0 for one-off shocks).
      - per step of the feedback run, ``[S, K]``: ``accounts_liquidated_steps``,
        ``impact_cost_steps``; ``[S, K, A]``: ``price_steps`` (USD, moved prices),
        ``net_notional_steps`` (``X``, USD, closing longs > 0).
      - with ``accounts``: ``liquidation_step_feedback``, ``liquidation_step_no_feedback``
        ``[n, S]`` int, the step (0-based, time order) each account is closed out at, -1 if never.
    """
    dt = engine.DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg = liquidation.config(snap.liquidation_config)
    if cfg.get("mode", "full") != "full":
        raise NotImplementedError("cascades are modelled for full close-out only ([liquidation] mode = \"full\")")
    if snap.margin_config.get("model", "standard") in ("portfolio", "var"):
        raise NotImplementedError("cascades are modelled under the standard margin model only ([margin] model)")
    S, K, A = len(scen), scen.steps, snap.n_assets
    liquidation.check_lag(cfg, scen)
    lag = cfg["oracle_lag_steps"] if K > 1 else 0  # a one-step set is an instantaneous shock
    fee_rate = cfg["fee_rate"]
    mult, vol, hor = time_ordered(scen)
    feedback = np.isin(np.array(scen.kinds, dtype=object), RANDOM_KINDS) & (K > 1)
    length = scen.length

    D = 1 if parts is not None else len(engine.devices())  # parts: one tile at a time, stepped
    W = paths_per_tile or globals()["paths_per_tile"](S, snap.n_accounts, D)
    T = math.ceil(math.ceil(S / W) / D) * D  # tiles, a whole number per device
    pad = T * W - S
    mult = np.concatenate([mult, np.ones((pad, K, A))])
    vol = np.concatenate([vol, np.zeros((pad, K, A))])
    hor = np.concatenate([hor, np.zeros((pad, K))])
    feedback = np.concatenate([feedback, np.zeros(pad, bool)])
    length = np.concatenate([length, np.ones(pad, np.int32)])

    if parts is None:
        kernel, mesh = _kernel(D, K, lag, fee_rate > 0, accounts)
        rep = NamedSharding(mesh, P())
        p = part_of(snap, chunk_size, dt)  # tiers None when untiered
        rows = p.rows
        fixed = jax.device_put((p.hs, snap.instruments, snap.market, snap.params, impact_params(snap), p.haircut,
                                np.asarray(fee_rate, dt), p.tiers), rep)
    else:
        terms = (snap.instruments, snap.market, snap.params, impact_params(snap))
        stepped = functools.partial(_stepped_tile, parts, *terms, K=K, lag=lag, fee_rate=fee_rate, dt=dt,
                                    dynamic=bool(snap.params.haircut_dynamic), with_accounts=accounts)

    def group(g):  # D tiles: [D, K, 2W, ...], columns [W feedback | W plain]
        sl = slice(g * W, (g + D) * W)

        def cols(x):  # [D*W, K, ...] -> [D, K, 2W, ...]
            x = x[sl].reshape((D, W) + x.shape[1:]).swapaxes(1, 2)
            return np.concatenate([x, x], axis=2)

        fb = np.concatenate([feedback[sl].reshape(D, W), np.zeros((D, W), bool)], axis=1)
        ln = np.tile(length[sl].reshape(D, W), 2)  # [D, 2W]
        if parts is not None:
            return stepped(cols(mult)[0], cols(vol)[0], cols(hor)[0], fb[0], ln[0])
        return kernel(*fixed, cols(mult), cols(vol), cols(hor), fb, ln)

    outs = []
    pending = None
    for g in range(0, T, D):  # a loop over tiles of paths (like chunks), dispatched ahead
        nxt = group(g)
        if pending is not None:
            outs.append(jax.device_get(pending))
        pending = nxt
    outs.append(jax.device_get(pending))

    def flat(key):  # [groups][D, ..., 2W] -> feedback, plain: [T*W, ...]
        x = np.concatenate([o[key] for o in outs])  # [T, ..., 2W]
        x = np.moveaxis(x, -1, 1)  # [T, 2W, ...]
        return (x[:, :W].reshape((T * W,) + x.shape[2:])[:S], x[:, W:].reshape((T * W,) + x.shape[2:])[:S])

    res: dict[str, np.ndarray] = {}
    fb_sums, nf_sums = flat("sums")  # [S, len(SUMS)]
    for i, name in enumerate(SUMS):
        res[f"{name}_feedback"], res[f"{name}_no_feedback"] = fb_sums[:, i], nf_sums[:, i]
    for name in ("accounts_liquidated_feedback", "accounts_liquidated_no_feedback"):
        res[name] = np.rint(res[name]).astype(np.int64)
    fb_bad, nf_bad = res["bad_debt_feedback"], res["bad_debt_no_feedback"]
    res["amplification"] = amplification(fb_bad, nf_bad)
    factor = np.concatenate([o["factor"] for o in outs])  # [T, 2W, A]
    res["price_impact"] = factor[:, :W].reshape(T * W, A)[:S] - 1.0
    res["accounts_liquidated_steps"] = np.rint(flat("closed")[0]).astype(np.int64)  # [S, K]
    res["impact_cost_steps"] = flat("impact_cost")[0]
    res["price_steps"] = flat("price")[0]
    res["net_notional_steps"] = flat("net_notional")[0]
    if accounts:
        for half, name in ((slice(0, W), "feedback"), (slice(W, 2 * W), "no_feedback")):
            if parts is not None:  # [T, n, 2W] -> [n, S]
                x = np.concatenate([o["account_steps"] for o in outs])[..., half]
                if x.shape[1] != snap.n_accounts:
                    raise ValueError(f"the parts hold {x.shape[1]} accounts, the snapshot {snap.n_accounts}")
                res[f"liquidation_step_{name}"] = x.transpose(1, 0, 2).reshape(snap.n_accounts, T * W)[:, :S]
                continue
            m = np.full((snap.n_accounts, S), -1, np.int64)
            for b, acc in enumerate(rows):
                x = np.concatenate([o["steps"][b] for o in outs])  # [T, C, chunk, 2W]
                x = x[..., half].transpose(1, 2, 0, 3).reshape(-1, T * W)[: len(acc), :S]
                m[acc] = x
            res[f"liquidation_step_{name}"] = m
    return res


def amplification(with_feedback: np.ndarray, without: np.ndarray) -> np.ndarray:
    """``with_feedback / without`` per scenario; 1.0 where both are 0 (nothing to amplify) and
    ``inf`` where only the feedback run has bad debt."""
    with_feedback, without = np.asarray(with_feedback, np.float64), np.asarray(without, np.float64)
    ratio = with_feedback / np.where(without > 0, without, 1.0)
    return np.where(without > 0, ratio, np.where(with_feedback > 0, np.inf, 1.0))
