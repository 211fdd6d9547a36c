"""Closing out accounts: when along a path, and at what loss.

An account is liquidated at the first step of a path where its collateral value is below its
maintenance margin, and closed out in full at that step's prices. It pays a liquidation fee,
``[liquidation] fee_rate`` of the notional closed, out of its remaining equity and never
beyond it (a fee never creates bad debt), credited to the insurance fund. Price impact comes
next. From then on it holds no positions, so its equity is what it had at the
liquidation step: a higher margin, breached earlier, limits the loss. That is what makes
margin parameters matter to bad debt. A one-step scenario is a path of one step.

What the closed positions gain or lose after the liquidation step belongs to whoever took
them over (the market, through the liquidation engine), not to the exchange's accounts: the
engine reports it per scenario as ``pnl_closed_out`` so that the accounts' P&L plus it is the
revaluation of every position held to the end (the conservation law of a matched book).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import portfolio
from ._tree import pytree_dataclass
from .errors import InputError

# Defaults of exchange.toml [liquidation].
DEFAULTS = {
    "fee_rate": 0.0,  # liquidation fee, of the notional closed out
    "mode": "full",  # "full": close everything at the breach; "partial": back to partial_target
    "partial_target": 1.25,  # partial mode: collateral / maintenance margin after a close
    "oracle_lag_steps": 0,  # the liquidation engine sees a path's prices this many steps late
    "oracle_lags": [],  # lags whose bad debt and P(fund depleted) are reported side by side
    "adl": True,  # socialise what the fund cannot pay by auto-deleveraging the winners
    "cascade": False,  # along paths, forced closes move later prices (needs impact parameters)
    "impact": {},  # per underlying: {spread, k, daily_vol, daily_volume}; none: closing is free
    "group_column": "",  # the balances column naming accounts under common control (Cover 2); "": none
}
# Keys of one underlying's [liquidation.impact.<ASSET>] table.
IMPACT_KEYS = {
    "spread": "half-spread paid on every unit of notional closed, a fraction (0.0005 = 5 bp)",
    "k": "square-root-law coefficient (of order 1)",
    "daily_vol": "daily volatility of the underlying, a fraction (0.04 = 4%)",
    "daily_volume": "USD notional traded per day in the underlying's contracts",
}


def config(cfg: dict) -> dict:
    """``[liquidation]`` with defaults, checked; an unknown key is an error (no silent default)."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        key = sorted(unknown)[0]
        raise InputError("exchange.toml", "[liquidation]", key, f"unknown key (known: {', '.join(DEFAULTS)})")
    out = {**DEFAULTS, **cfg}
    v = out["fee_rate"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
        raise InputError("exchange.toml", "[liquidation]", "fee_rate", f"{v!r} must be a number in [0, 1)")
    out["fee_rate"] = float(v)
    lag = out["oracle_lag_steps"]
    if isinstance(lag, bool) or not isinstance(lag, int) or not 0 <= lag <= 1000:
        raise InputError("exchange.toml", "[liquidation]", "oracle_lag_steps", f"{lag!r} must be a whole number of steps >= 0")
    lags = out["oracle_lags"]
    if not isinstance(lags, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 1000 for x in lags):
        raise InputError("exchange.toml", "[liquidation]", "oracle_lags", f"{lags!r} must be a list of whole numbers of steps >= 0")
    out["oracle_lags"] = tuple(sorted(set(lags)))
    if out["mode"] not in ("full", "partial"):
        raise InputError("exchange.toml", "[liquidation]", "mode", f"{out['mode']!r} must be \"full\" or \"partial\"")
    v = out["partial_target"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v >= 1:
        raise InputError("exchange.toml", "[liquidation]", "partial_target",
                         f"{v!r} must be a number >= 1 (collateral / maintenance margin after a partial close)")
    out["partial_target"] = float(v)
    if out["mode"] == "partial" and out["cascade"]:
        raise InputError("exchange.toml", "[liquidation]", "cascade", "cascades are modelled for full close-out only (mode = \"full\")")
    if out["mode"] == "partial" and (out["oracle_lag_steps"] or out["oracle_lags"]):
        key = "oracle_lag_steps" if out["oracle_lag_steps"] else "oracle_lags"
        raise InputError("exchange.toml", "[liquidation]", key, "oracle lags are modelled for full close-out only (mode = \"full\")")
    for key in ("adl", "cascade"):
        if not isinstance(out[key], bool):
            raise InputError("exchange.toml", "[liquidation]", key, f"{out[key]!r} must be true or false")
    col = out["group_column"]
    if not isinstance(col, str) or col in ("account_id", "asset", "amount"):
        raise InputError("exchange.toml", "[liquidation]", "group_column",
                         f"{col!r} must be the name of an extra column of balances (\"\": no groups)")
    out["impact"] = _impact_config(out["impact"])
    if out["cascade"] and not out["impact"]:
        raise InputError("exchange.toml", "[liquidation]", "cascade",
                         "a cascade needs [liquidation.impact.<ASSET>] parameters to move prices with")
    return out


def check_lag(cfg: dict, scen: Any) -> None:
    """Refuse an oracle lag (``cfg``: ``config``'s) of at least the steps of one of the set's
    paths (``scen``, a ``Scenarios``; each path's own steps, ``Scenarios.length``): no breach
    within that path would be acted on. One-off shocks (length 1) are instantaneous and take
    any lag, so does a set of them only; a replay window over a gap in the history is a path of
    its own rows, so the shortest window bounds the lag."""
    length = np.asarray(scen.length)
    paths = np.flatnonzero(length > 1)
    if not len(paths):
        return
    short = paths[np.argmin(length[paths])]  # the first of the shortest paths, in file order
    steps = int(length[short])
    for key, lags in (("oracle_lag_steps", (cfg["oracle_lag_steps"],)), ("oracle_lags", cfg["oracle_lags"])):
        if max(lags, default=0) >= steps:
            which = "the scenario set's paths" if steps == scen.steps else \
                f"path {scen.names[short]!r}, the shortest of the set's paths"
            raise InputError("exchange.toml", "[liquidation]", key,
                             f"a lag of {max(lags)} steps is not less than the {steps} steps of {which}: no breach "
                             f"within it would be acted on; use at most {steps - 1}, or longer paths")


def check_partial(cfg: dict, model: str) -> None:
    """Refuse partial close-outs (``cfg``: ``config``'s) under the var margin model, whose
    margin of a share of the book ``partial_path`` cannot compute: its expected shortfall
    includes the collateral's own risk, which a close does not scale. The standard model
    (flat rates and risk-limit tiers, ``kept_share``) and the portfolio model (``Blocks``,
    ``kept_share_blocks``) are solved exactly."""
    if cfg["mode"] != "partial":
        return
    if model == "var":
        raise InputError("exchange.toml", "[liquidation]", "mode",
                         'partial close-outs are modelled under the standard and portfolio margin models; the var '
                         "model's margin of a share of the book is not (its expected shortfall includes the "
                         'collateral\'s own risk): use mode = "full" or another [margin] model')


def _impact_config(tables: Any) -> dict:
    """``[liquidation.impact.<ASSET>]`` tables, each key checked: ``{asset: {key: float}}``."""
    if not isinstance(tables, dict):
        raise InputError("exchange.toml", "[liquidation]", "impact", "must be a table of [liquidation.impact.<ASSET>] tables")
    out = {}
    for asset, t in tables.items():
        where = f"[liquidation.impact.{asset}]"
        if not isinstance(t, dict):
            raise InputError("exchange.toml", where, "impact", "must be a table with keys " + ", ".join(IMPACT_KEYS))
        unknown = set(t) - set(IMPACT_KEYS)
        missing = set(IMPACT_KEYS) - set(t)
        if unknown or missing:
            key = sorted(unknown or missing)[0]
            what = "unknown key" if unknown else "missing key"
            raise InputError("exchange.toml", where, key, f"{what} (keys: {', '.join(IMPACT_KEYS)})")
        for key, v in t.items():
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            ok = ok and (v > 0 if key == "daily_volume" else v >= 0) and (key != "spread" or v < 1)
            if not ok:
                bound = "> 0" if key == "daily_volume" else "in [0, 1)" if key == "spread" else ">= 0"
                raise InputError("exchange.toml", where, key, f"{v!r} must be a number {bound}: {IMPACT_KEYS[key]}")
        out[str(asset)] = {k: float(t[k]) for k in IMPACT_KEYS}
    return out


def impact_cost(net_notional: Any, spread: Any, k: Any, daily_vol: Any, daily_volume: Any) -> Any:
    """Cost of closing a net notional at once, USD: half-spread plus the square-root law,

        ``|X| * (spread + k * daily_vol * sqrt(|X| / daily_volume))``,

    on the *net* notional ``X`` closed (forced buys and sells of one instrument offset).
    Works on NumPy or JAX arrays; parameters broadcast against ``X``."""
    x = abs(net_notional)
    return x * (spread + k * daily_vol * (x / daily_volume) ** 0.5)


def impact_move(net_notional: Any, k: Any, daily_vol: Any, daily_volume: Any) -> Any:
    """Relative price move a net forced close pushes the market by: ``-sign(X) * k * daily_vol
    * sqrt(|X| / daily_volume)`` (selling longs, ``X > 0``, pushes the price down). The spread
    is paid, not a move of the mid, so only the square-root term moves later prices."""
    x = abs(net_notional)
    sign = (net_notional > 0) * 1.0 - (net_notional < 0) * 1.0
    return -sign * k * daily_vol * (x / daily_volume) ** 0.5


@pytree_dataclass
class Impact:
    """``[liquidation.impact.<ASSET>]`` as arrays over the snapshot's assets ``[A]``; assets
    without a table have ``spread = k = 0`` (no cost, no move) and ``daily_volume = 1`` (any
    positive number: it only keeps the formula finite)."""

    spread: Any  # [A] half-spread, a fraction of the notional closed
    k: Any  # [A] square-root-law coefficient
    daily_vol: Any  # [A] daily volatility, a fraction
    daily_volume: Any  # [A] USD notional traded per day


def impact_params(snap: Any) -> Impact:
    """The snapshot's impact parameters per asset (``config``, checked)."""
    cfg = config(snap.liquidation_config)["impact"]
    par = {"spread": np.zeros(snap.n_assets), "k": np.zeros(snap.n_assets),
           "daily_vol": np.zeros(snap.n_assets), "daily_volume": np.ones(snap.n_assets)}
    for asset, table in cfg.items():  # a handful of underlyings
        for key, v in table.items():
            par[key][snap.assets.index(asset)] = v
    return Impact(**par)


def fee(equity: Any, notional: Any, liquidated: Any, rate: Any) -> Any:
    """Liquidation fee, USD: ``rate * notional`` of each liquidated account, capped at its
    remaining equity (and 0 when that is negative), so the fee never creates bad debt.

    The cap is a select, not ``jnp.minimum``: at a tie (a bankrupt account at ``rate = 0``,
    where both are 0) the minimum's gradient in ``rate`` is half the notional, but raising
    the rate raises no fee there; the select gives the derivative of the cap, 0."""
    uncapped, cap = rate * notional, jnp.maximum(equity, 0.0)
    return jnp.where(liquidated, jnp.where(uncapped < cap, uncapped, cap), 0.0)


def bad_debt(equity: Any) -> Any:
    """Bad debt per account and scenario, USD: ``max(0, -equity)`` after closing at no cost."""
    return jnp.maximum(-equity, 0.0)


def path_lag(lag: int, length: Any) -> Any:
    """The oracle lag of each path of ``length`` steps (``Scenarios.length``, any shape): ``lag``,
    but none for a path of length 1, an instantaneous shock."""
    return jnp.where(length > 1, lag, 0)


def acted(breach: Any, lag: int = 0, length: Any = None) -> Any:
    """Where the liquidation engine acts on a breach, ``[n, K, W]`` bool in time order, from
    ``breach`` (collateral below maintenance margin at each step, the same shape).

    With an oracle ``lag`` of ``k`` steps it sees step ``t - k``'s prices at step ``t``: a
    breach at step ``t - k`` is acted on at step ``t``; one in a path's last ``k`` steps is not
    acted on within the path. ``length`` (``[W]`` or ``[n, W]`` int, or None: every path has
    all ``K`` steps) is each path's own steps before it only repeats its last state
    (``Scenarios.length``): the lag counts within them, so a short path padded to ``K`` steps
    acts as it would in a set of its own length, and a path of length 1 (a one-off shock) is
    an instantaneous shock, which no lag delays. Without a lag nothing changes: a repeated
    step breaches as the step it repeats, so the first breach is within the path's length.
    """
    n, K, W = breach.shape
    if not lag:
        return breach
    seen = jnp.concatenate([jnp.zeros((n, min(lag, K), W), bool), breach[:, : max(K - lag, 0)]], axis=1)
    if length is None:
        return seen
    L = jnp.asarray(length)[..., None, :]  # [1 or n, 1, W]
    return jnp.where(path_lag(lag, L) > 0, seen & (jnp.arange(K)[:, None] < L), breach)


def path_outcome(W: int, eq: Any, coll: Any, mm: Any, *more: Any, lag: int = 0, length: Any = None,
                 at: bool = False) -> tuple[Any, ...]:
    """Each account's state at the step that decides each path: its first breach, else the end.

    With an oracle ``lag`` of ``k`` steps the liquidation engine sees step ``t - k``'s prices at
    step ``t``: a breach at step ``t - k`` is acted on at step ``t``, at step ``t``'s prices (later
    and deeper underwater); a breach in the last ``k`` steps is not acted on within the path.
    A one-step scenario is an instantaneous shock: the lag does not apply to it. ``length``:
    each path's own steps, ``[W]`` or ``[n, W]`` int (``acted``), or None.

    Args:
      W: scenarios per tile.
      eq, coll, mm: ``[n, K * W]`` equity, collateral value and maintenance margin, USD, in the
        engine's tile layout: the last step's ``W`` columns first, then steps ``1 .. K-1``.
      more: further ``[n, K * W]`` arrays to take at the same step (e.g. gross notional).

      at: also return where each path was decided, as a mask in the input's layout.

    Returns:
      ``(eq, coll, mm, *more, liquidated)``, each ``[n, W]``: the values at the first step
      where ``coll < mm`` (the account is closed out there) or, if none, at the last step; and
      whether it was liquidated at all. With ``at``, a last ``[n, K * W]`` bool: True at the
      column of the step where the account was closed out (all False if it was not).
    """
    n, KW = eq.shape
    K = KW // W
    if K == 1:  # an instantaneous shock: no step to lag
        liq = mm > coll
        return (eq, coll, mm, *more, liq, liq) if at else (eq, coll, mm, *more, liq)
    order = list(range(1, K)) + [0]  # time order: steps 1 .. K-1, then the last

    def timed(x):
        return x.reshape(n, K, W)[:, order, :]

    c, m = timed(coll), timed(mm)
    breach = acted(m > c, lag, length)
    liquidated = breach.any(axis=1)
    first = jnp.where(liquidated, jnp.argmax(breach, axis=1), K - 1)[:, None, :]

    def pick(x):
        return jnp.take_along_axis(x, first, axis=1)[:, 0]

    out = (pick(timed(eq)), pick(c), pick(m), *(pick(timed(x)) for x in more), liquidated)
    if not at:
        return out
    # back to the input's layout: block 0 is the last step (time K - 1), block b >= 1 is time b - 1
    block_time = jnp.asarray([K - 1] + list(range(K - 1)))
    mask = liquidated[:, None, :] & (first == block_time[None, :, None])
    return (*out, mask.reshape(n, K * W))


def partial_path(W: int, pos: Any, bal: Any, px: Any, keep: Any, mm: Any, notional: Any, target: Any,
                 fee_rate: Any = None, impact: Any = None, tiers: Any = None, blocks: Any = None,
                 length: Any = None) -> dict:
    """Partial liquidation along each path: at every step where collateral < maintenance margin,
    close the same fraction of every position, just enough that collateral is back at
    ``target`` times the margin still required, as Deribit, Binance and Hyperliquid do; the
    rest is held on, and may be liquidated again later.

    Closing a fraction ``f`` of an account's positions at a step's marks turns that share of
    their value into its settlement asset (equity is unchanged) and costs the fee ``fee_rate *
    f * notional`` and the impact ``f * impact``. At flat rates it cuts the margin to ``(1 -
    f)`` of itself: with ``C`` the collateral, ``M`` the margin, ``G`` the notional still
    held, ``C - f * fee_rate * G >= target * (1 - f) * M`` gives ``f = (target M - C) /
    (target M - fee_rate G)``, clipped to [0, 1]; ``f = 1`` (a full close-out) when ``C <=
    0``. Under risk-limit tiers a smaller position may fall into a lower tier, so the share
    kept is solved for with each position's tier at that share (``kept_share``); under the
    portfolio model a smaller book may fall under a block's delta-shock threshold
    (``kept_share_blocks``). The price impact is not in ``f`` (its rate comes from pass 1).

    Args:
      W: scenarios per tile.
      pos: ``[n, J, K * W]`` value of the positions settled in each slot's asset, in its units,
        every step in the engine's tile layout (last step first, then steps ``1 .. K - 1``).
      bal: ``[n, J]`` balances. px: ``[n, J, K * W]`` the slot asset's price, USD.
      keep: the slot's haircut, ``[n, J]`` or a per-slot ``portfolio.Haircut`` (base ``[n, J,
        K * W]``), as ``portfolio.slots`` gives it (applies to a positive net amount).
      mm, notional: ``[n, K * W]`` maintenance margin (at the first tier's rates where
        ``tiers`` are given) and gross notional of the whole book, USD.
      target: collateral / margin after a close (``>= 1``).
      impact: ``[n, K * W]`` impact charge of closing the whole book at each step, USD, or None.
      tiers: the positions under risk-limit tiers (a ``Tiered``), or None.
      blocks: the books' blocks under the portfolio model (a ``Blocks``; ``mm`` is then the
        whole book's portfolio margin), or None.
      length: ``[W]`` or ``[n, W]`` int, or None (all ``K``): each path's own steps before it
        only repeats its last state (``Scenarios.length``: 1 for a one-off shock in a set with
        paths, less than ``K`` for a short replay window). Closes happen at those steps only:
        a close and its costs can leave an account below ``target``, and a repeated step
        would close it again, which the same path in a set of its own length never does.

    Returns:
      Each ``[n, W]``, USD: ``equity`` (at the path's end, after every cost), ``collateral`` and
      ``margin`` at the first breach (else the end), ``liquidated`` (at any step), ``fee``,
      ``impact``, ``closed_notional`` (notional closed over the path), ``closed_out`` (what the
      closed shares gained after their close, which the market has), ``held`` (equity had
      everything been held to the end), ``gone`` (bool: nothing left at the end); and
      ``closed`` ``[n, K * W]``, the share of the original book closed at each step, in the
      input's layout.
    """
    n, J, KW = pos.shape
    K = KW // W
    order = list(range(1, K)) + [0]  # time order of the tile's step blocks
    timed = lambda x: jnp.moveaxis(x.reshape(x.shape[:-1] + (K, W))[..., order, :], -2, 0)  # noqa: E731
    dt = pos.dtype
    dynamic = isinstance(keep, portfolio.Haircut)
    xs = (timed(pos), timed(px), timed(mm), timed(notional), timed(impact) if impact is not None else None,
          timed(keep.base) if dynamic else None,
          None if tiers is None else (timed(tiers.whole), timed(tiers.notional())),
          None if blocks is None else (timed(blocks.lin), timed(blocks.delta)), jnp.arange(K))
    ladder = None if tiers is None else (tiers.bound[tiers.inst], tiers.step[tiers.inst])  # [n, Q, K - 1]
    zero = jnp.zeros((n, W), dt)

    def counted(e, base):  # the share of each slot's net amount that counts as collateral
        return jnp.where(e > 0, portfolio.keep_share(dataclasses.replace(keep, base=base) if dynamic else keep, None, e), 1.0)

    def step(carry, x):
        held, locked, paid, first = carry  # share held [n, W], cash of closes [n, J, W], costs, first-breach state
        p, q, m, g, c, base, tiered, parts, k = x
        act = True if length is None else k < length  # a repeated step is the same instant: no second close
        e = bal[:, :, None] + held[:, None, :] * p + locked  # net amount per slot
        coll = jnp.sum(counted(e, base) * e * q, axis=1) - paid
        eq = jnp.sum(e * q, axis=1) - paid
        if blocks is not None:
            lin, delta = parts
            # a book held whole has the margin of the full run; a share of it, the blocks' margin
            # at that share (the delta shocks' thresholds), and the solve only where one breaches
            margin = jnp.where(held < 1.0, blocks.margin(held, lin, delta), m)
            breach = (margin > coll) & act
            kept = jax.lax.cond(jnp.any(breach),
                                lambda: kept_share_blocks(coll, held, g, blocks, lin, delta, target, fee_rate),
                                lambda: held)
            rest = jnp.where(breach, kept, held)
            share = held - rest
        elif tiers is None:
            margin = held * m
            breach = (margin > coll) & act
            # when the fee on the whole rest exceeds the target margin, no share restores it: close all
            den = target * margin - (0.0 if fee_rate is None else fee_rate) * held * g
            f = jnp.where(den > 0, jnp.clip((target * margin - coll) / jnp.where(den > 0, den, 1.0), 0.0, 1.0), 1.0)
            share = held * jnp.where(breach, jnp.where(coll <= 0, 1.0, f), 0.0)  # of the original book
            rest = held - share
        else:
            whole, per = tiered
            pn = lambda: tiers.qty[..., None] * per[tiers.inst] if tiers.per_row else per  # noqa: E731  [n, Q, W] USD
            # a book held whole has the margin full mode computes; a share of it, each position's
            # tier at that share (computed only where some account of the chunk holds a share,
            # and the solve only where one breaches)
            part = held < 1.0
            margin = jnp.where(part, jax.lax.cond(jnp.any(part), lambda: held * tier_rate(held, m, pn(), ladder),
                                                  lambda: whole), whole)
            breach = (margin > coll) & act
            kept = jax.lax.cond(jnp.any(breach), lambda: kept_share(coll, held, m, g, pn(), ladder, target, fee_rate, breach),
                                lambda: jnp.ones_like(held))
            # carried as held * kept: held - held * (1 - kept) would round a cut to a tier's
            # bound over it where kept is small
            rest = held * jnp.where(breach, jnp.where(coll <= 0, 0.0, kept), 1.0)
            share = held - rest
        cost = share * c if c is not None else zero
        fee = zero
        if fee_rate is not None:
            fee = jnp.where(breach, jnp.minimum(fee_rate * share * g, jnp.maximum(eq - cost, 0.0)), 0.0)
        new_first = jnp.where(first[0] | ~breach, first[0], True)
        first = (new_first, jnp.where(first[0], first[1], coll), jnp.where(first[0], first[2], margin))
        carry = (rest, locked + share[:, None, :] * p, paid + cost + fee, first)
        return carry, (share, fee, cost, share * g, eq)

    init = (jnp.ones((n, W), dt), jnp.zeros((n, J, W), dt), zero, (jnp.zeros((n, W), bool), zero, zero))
    (held, locked, paid, (liq, coll, margin)), (share, fee, cost, closed_g, eqs) = jax.lax.scan(step, init, xs)
    p_end, q_end = timed(pos)[-1], timed(px)[-1]
    e_end = bal[:, :, None] + held[:, None, :] * p_end + locked
    equity = jnp.sum(e_end * q_end, axis=1) - paid
    full = jnp.sum((bal[:, :, None] + p_end) * q_end, axis=1)
    coll_end = jnp.sum(counted(e_end, timed(keep.base)[-1] if dynamic else None) * e_end * q_end, axis=1) - paid
    block = [K - 1] + list(range(K - 1))  # back to the tile layout
    return {
        "equity": equity,
        "collateral": jnp.where(liq, coll, coll_end),
        # an account never liquidated holds its whole book
        "margin": jnp.where(liq, margin, timed(mm)[-1] if tiers is None else timed(tiers.whole)[-1]),
        "liquidated": liq,
        "fee": fee.sum(axis=0),
        "impact": cost.sum(axis=0),
        "closed_notional": closed_g.sum(axis=0),
        "closed_out": full - equity - paid,
        "held": full,
        "closed": jnp.moveaxis(share[jnp.asarray(block)], 0, 1).reshape(n, K * W),
        "gone": held == 0,  # closed out in full (a close of f = 1 leaves exactly 0)
    }


@pytree_dataclass
class Tiered:
    """The positions of a chunk of accounts under risk-limit tiers, as ``partial_path`` needs
    them to find the margin of a share of each book: every position at the tier its share of
    the notional falls in (``portfolio.tier_extra``, ``margin.tier_margin``)."""

    whole: Any  # [n, K * W] USD maintenance margin of the whole book, each position at its tier
    qty: Any  # [n, Q] contracts of each position, |q| (0 for padding)
    inst: Any  # [n, Q] int32 instrument of each position
    # [I, K * W] USD notional per contract (margin.contract_notional), or a function of
    # instrument indices [n, Q] -> [n, Q, K * W] (the rows of each account's own tile)
    per_contract: Any
    bound: Any  # [I, K - 1] USD upper bound of tiers 1 .. K - 1
    step: Any  # [I, K - 1] how much the MM rate rises past each bound

    @property
    def per_row(self) -> bool:
        """Whether the positions' notional is gathered step by step (from a table)."""
        return not callable(self.per_contract)

    def notional(self) -> Any:
        """What ``partial_path`` walks the steps of: the table per contract ``[I, K * W]``, or
        each position's notional ``[n, Q, K * W]`` where ``per_contract`` is a function."""
        return self.per_contract if self.per_row else self.qty[..., None] * self.per_contract(self.inst)


def tier_rate(y: Any, m: Any, pn: Any, ladder: Any, right: bool = False) -> Any:
    """Maintenance margin per unit of the book held, USD ``[n, W]``, when a share ``y`` ``[n,
    W]`` of it is held under risk-limit tiers: ``m`` (the whole book's margin at the first
    tier's rates) plus, for each position, its notional ``pn`` ``[n, Q, W]`` times every rate
    step whose bound ``y * pn`` exceeds (``portfolio.tier_extra``; ``ladder``: ``(bound,
    step)`` ``[n, Q, K - 1]``). The margin of that share is ``y * tier_rate(y, ...)``. With
    ``right``, the rate just above ``y`` (a bound that ``y * pn`` reaches counts)."""
    held = y[:, None, :] * pn  # [n, Q, W] each position's notional at that share
    return m + jnp.sum(pn * portfolio.rate_steps(held, ladder[0][:, :, None, :], ladder[1][:, :, None, :], right), axis=1)


# Books with more tier bounds than this (positions times bounds) halve the shares this many
# times before walking the runs between bounds (kept_share): a walk takes one step per bound
# it passes, the halvings leave few to pass.
WALK_BOUNDS = 8
HALVINGS = 8
# Books with at most this many bounds look at all of them at once (their number squared
# comparisons, no loop) rather than walking.
AT_ONCE_BOUNDS = 16


def kept_share(coll: Any, held: Any, m: Any, g: Any, pn: Any, ladder: Any, target: Any, fee_rate: Any,
               active: Any = None) -> Any:
    """The largest share ``x`` ``[n, W]`` of what an account holds (``held`` of its book) that
    it can keep after a partial close under risk-limit tiers: the largest ``x`` in [0, 1]
    with

        ``D(x) = C - fee_rate * G * held * (1 - x) - target * M(held * x) >= 0``,

    ``M(y) = y * tier_rate(y)`` the margin of a share ``y`` of the book. Within a run of shares
    where no position changes tier ``D`` is linear, with slope ``held * (fee_rate * G -
    target * rate)``, and it drops where a position enters a higher tier. Rates rise with the
    share, so past the share ``x_t`` where ``target * rate`` first reaches ``fee_rate * G``
    (``x_t = 0`` unless the fee is above the first tiers' margin, as Binance's 1% fee is above
    1.25 x its first tier's 0.4%) ``D`` decreases, and the shares there that restore the
    target are ``[x_t, x*]``.

    Every tier bound is a share ``s = bound / (notional * held)`` of what is held, where a
    position's rate rises by its step. The search walks the runs between them in order: from
    0 to ``x_t`` (where needed), then from ``x_t`` on, run by run, while the run's line is
    still above 0 at its end. ``x*`` is then solved for exactly in the run it stops in: the
    root of its line, or its start (a bound cut to). Each step of the walk is one look at every
    position's bounds, and a chunk walks as many runs as its furthest account needs, at most one
    per bound; books of more than ``WALK_BOUNDS`` bounds first halve the shares ``HALVINGS``
    times (lo where ``D >= 0``, or where the rate is still below the fee), which leaves few
    bounds to walk past. Books of at most ``AT_ONCE_BOUNDS`` bounds do not walk: ``D`` (falling
    past ``x_t``) and the rate are evaluated at every bound at once, and the walk's stops are
    the last bound where ``D`` is still above 0 and the first where the rate reaches the fee.

    Where even the run just past ``x_t`` misses the target, the account keeps ``x_t`` if that
    restores it (``D`` rises up to it), else nothing: the shares below ``x_t`` where ``D`` is
    positive lie between bounds the search does not look at, so it then closes more than
    needed. ``x = 0`` (close all) also where ``D(0) < 0`` and ``D`` only falls. ``active``
    ``[n, W]`` (default all): the accounts to solve for; the others' ``x`` is meaningless. The
    search carries no gradient; the last step does (a root's in ``C``, the rates and the
    notionals, a bound's in the notional)."""
    fee_g = jnp.zeros_like(g) if fee_rate is None else fee_rate * g
    rest = coll - fee_g * held  # D(0)
    bound, step = ladder[0][:, :, None, :], ladder[1][:, :, None, :]  # [n, Q, 1, K - 1]
    live = (pn > 0)[..., None] & jnp.isfinite(bound)  # [n, Q, W, K - 1]
    per_unit = (jnp.where(pn > 0, pn, 1.0) * jnp.where(held > 0, held, 1.0)[:, None, :])[..., None]
    # (selects, not infinities, in what is differentiated: 0 * inf would make a gradient NaN)
    share = jnp.where(live, jnp.where(live, bound, 0.0) / per_unit, 2.0)  # each bound as a share held; 2: none
    rise = pn[..., None] * step  # what the rate per unit of the book rises by past it, USD
    Q, K = pn.shape[1], bound.shape[-1] + 1

    def rate(x, right=False):  # margin per unit of the book held at a share x (just above it, with right)
        over = x[:, None, :, None] >= share if right else x[:, None, :, None] > share
        return m + jnp.sum(jnp.where(over, rise, 0.0), axis=(1, 3))

    def next_share(x):  # the next bound above x (2: none)
        return jnp.min(jnp.where(share > x[:, None, :, None], share, 2.0), axis=(1, 3))

    def D(x, right=False):
        return rest + fee_g * held * x - target * held * x * rate(x, right)

    C = Q * (K - 1)  # bounds per book
    if C <= AT_ONCE_BOUNDS:  # few: every bound looked at against every other, no loop
        bounds = jnp.moveaxis(share, 2, 1).reshape(share.shape[0], share.shape[2], C)  # [n, W, C]
        rises = jnp.moveaxis(rise, 2, 1).reshape(bounds.shape)

        def rate_at_bounds(right):  # [n, W, C] the rate at each bound (just above it, with right)
            # one bound at a time (C <= AT_ONCE_BOUNDS, unrolled): elementwise work that fuses,
            # where a [n, W, C, C] select would be written out first
            r = jnp.broadcast_to(m[..., None], bounds.shape)
            for c in range(C):
                other = bounds[..., c:c + 1]
                over = bounds >= other if right else bounds > other
                r = r + jnp.where(over, rises[..., c:c + 1], 0.0)
            return r

    def walk(go, test, x0, todo):  # from x0, to the next bound while go(x, next bound) holds
        if C > WALK_BOUNDS:  # many bounds: halvings first, to where test turns
            def halve(_, lo_hi):
                lo, hi = lo_hi
                mid = 0.5 * (lo + hi)
                ok = test(mid)
                return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
            x0 = jax.lax.fori_loop(0, HALVINGS, halve, (x0, jnp.ones_like(x0)))[0]

        def body(carry):
            x, todo = carry
            end = next_share(x)
            on = todo & go(x, end) & (end < 1.0)
            return jnp.where(on, end, x), on
        return jax.lax.while_loop(lambda c: jnp.any(c[1]), body, (x0, todo))[0]

    zero, one = jnp.zeros_like(held), jnp.ones_like(held)
    active = jnp.ones(held.shape, bool) if active is None else active
    eps = jnp.finfo(held.dtype).eps
    falls = lambda x: target * rate(x, right=True) >= fee_g  # noqa: E731
    rising = target * m < fee_g  # the first tiers release less margin than the fee on them costs

    def turn():
        """``x_t``, the first bound where ``target * rate`` reaches the fee (1: none), whether
        the run just past it restores the target, and whether keeping ``x_t`` does (a few ulps
        under the bound, as it would be kept: ``bound / (pn * held) * pn * held`` can round
        over the bound, into the upper tier)."""
        if C <= AT_ONCE_BOUNDS:  # the first bound below 1 where the rate reaches the fee
            at = (target * rate_at_bounds(right=True) >= fee_g[..., None]) & (bounds < 1.0)
            x_t = jnp.where(rising, jnp.min(jnp.where(at, bounds, 1.0), axis=-1), 0.0)
        else:
            x = walk(lambda x, end: ~falls(x), lambda x: ~falls(x), zero, rising & active)
            x_t = jnp.where(rising, jnp.where(falls(x), x, 1.0), 0.0)
        return x_t, D(x_t, right=True) >= 0, (x_t > 0) & (D(x_t * (1.0 - 4 * eps)) >= 0)

    # where no account rises, x_t = 0 and the run past it restores the target where D(0) >= 0
    x_t, start, keep_t = jax.lax.cond(jnp.any(rising & active), turn,
                                      lambda: (zero, rest >= 0, jnp.zeros(rest.shape, bool)))
    x_t = jax.lax.stop_gradient(x_t)

    def root(x):  # of the line of the run just above x
        den = held * (target * rate(x, right=True) - fee_g)
        return jnp.where(den > 0, rest / jnp.where(den > 0, den, 1.0), 2.0)

    # in the falling part, on to the run whose line crosses 0 (lo: its start): the last bound
    # below 1 past x_t where D (falling there) is still above 0
    if C <= AT_ONCE_BOUNDS:
        before = rate_at_bounds(False)  # the rate of the run that ends at each bound
        d = rest[..., None] + (fee_g * held)[..., None] * bounds - (target * held)[..., None] * bounds * before
        # as the walk: on past a bound where D is above 0, or where the run to it is flat (D
        # then 0 along it, still restoring the target)
        flat = target * before == fee_g[..., None]
        on = (bounds > x_t[..., None]) & (bounds < 1.0) & ((d > 0) | (flat & (d >= 0)))
        lo = jnp.maximum(x_t, jnp.max(jnp.where(on, bounds, 0.0), axis=-1))
    else:
        lo = walk(lambda x, end: root(x) > end, lambda x: D(x) >= 0, x_t, active & start)
    lo = jax.lax.stop_gradient(lo)
    x = jnp.clip(jnp.minimum(root(lo), next_share(lo)), lo, 1.0)
    x = jnp.where(start, x, jnp.where(keep_t, x_t, 0.0))
    x = jnp.where((rest < 0) & ~rising, 0.0, x)
    # Kept at a bound: a few ulps under it, so that the share held times the notional, rounded,
    # is not over the bound (which would put the rest in the upper tier at the next look).
    notional = ((held * x)[:, None, :] * pn)[..., None]
    near = (jnp.abs(notional - bound) <= 8 * eps * bound) & live
    return jnp.minimum(x, jnp.min(jnp.where(near, share * (1.0 - 4 * eps), 2.0), axis=(1, 3)))


@pytree_dataclass
class Blocks:
    """A chunk's books under the portfolio margin model, as ``partial_path`` needs them to find
    the margin of a share of each book (``portfolio.portfolio_margin``'s ``parts``). A share
    ``y`` of every position scales each block's grid P&L, roll shock and net delta by ``y``,
    so its margin is

        ``M(y) = y * lin + factor * sum_b mds_b * max(y * delta_b - thr_b, 0)``:

    linear but for each block's delta shock, which starts where ``y * delta_b`` passes the
    block's threshold. ``B`` blocks per account (the engine: one per asset, unused ones 0)."""

    lin: Any  # [n, K * W] USD mm_factor * the blocks' risk matrix and roll shock, per unit share
    delta: Any  # [n, B, K * W] USD |net delta| of each block of the whole book
    mds: Any  # [n or 1, B, 1] max delta shock of each block's underlying
    thr: Any  # [n or 1, B, 1] USD delta-shock threshold of each block's underlying
    factor: Any  # [] mm_factor

    @classmethod
    def per_asset(cls, lin: Any, delta: Any, mds: Any, thr: Any, factor: Any) -> Blocks:
        """Blocks of one per asset (``delta`` ``[n, A, K * W]``), the parameters ``mds`` and
        ``thr`` given per asset ``[A]``."""
        return cls(lin=lin, delta=delta, mds=mds[None, :, None], thr=thr[None, :, None], factor=factor)

    def margin(self, y: Any, lin: Any, delta: Any) -> Any:
        """``M(y)`` ``[n, W]``, USD, at one step (``lin`` ``[n, W]``, ``delta`` ``[n, B, W]``)
        for a share ``y`` ``[n, W]`` of the book."""
        return y * lin + self.factor * jnp.sum(self.mds * jnp.maximum(y[:, None, :] * delta - self.thr, 0.0), axis=1)


def kept_share_blocks(coll: Any, held: Any, g: Any, b: Blocks, lin: Any, delta: Any, target: Any, fee_rate: Any) -> Any:
    """The share ``y`` ``[n, W]`` of the original book an account keeps after a partial close
    under the portfolio model, holding ``held`` of it now: the largest ``y`` in ``[0, held]``
    with

        ``D(y) = C - fee_rate * G * (held - y) - target * M(y) >= 0``

    (``M``: ``Blocks.margin`` at this step), else 0 (close all). ``M`` is convex and piecewise
    linear, with a kink where each block's delta shock starts (``y = thr_b / delta_b``), so
    ``D`` is concave and piecewise linear: its largest root lies between the largest of the
    kinks, 0 and ``held`` where ``D >= 0`` and the next of them, where ``D`` is one line, and
    is found there exactly, by interpolation. Being concave, ``D`` may rise before it falls
    (a fee above ``target`` times the margin's rate), and the answer is the same. No search:
    it is smooth in every input between kinks, and so is its gradient."""
    fee_g = jnp.zeros_like(g) if fee_rate is None else fee_rate * g
    safe = jnp.where(delta > 0, delta, 1.0)
    kinks = jnp.where(delta > 0, jnp.clip(b.thr / safe, 0.0, held[:, None, :]), held[:, None, :])  # [n, B, W]
    points = jnp.concatenate([jnp.zeros_like(held)[:, None, :], kinks, held[:, None, :]], axis=1)  # [n, B + 2, W]

    def D(y):  # [n, X, W] -> [n, X, W]
        m = jax.vmap(lambda yy: b.margin(yy, lin, delta), in_axes=1, out_axes=1)(y)
        return coll[:, None, :] - fee_g[:, None, :] * (held[:, None, :] - y) - target * m

    d = D(points)
    ok = d >= 0
    pick = lambda x, i: jnp.take_along_axis(x, i[:, None, :], axis=1)[:, 0, :]  # noqa: E731
    lo = jnp.argmax(jnp.where(ok, points, -1.0), axis=1)  # the largest point where D >= 0
    y_lo, d_lo = pick(points, lo), pick(d, lo)
    above = points > y_lo[:, None, :]
    hi = jnp.argmin(jnp.where(above, points, 2.0 + held[:, None, :]), axis=1)  # the next point: D < 0 there
    y_hi, d_hi = pick(points, hi), pick(d, hi)
    found = jnp.any(ok, axis=1)
    between = found & jnp.any(above, axis=1)
    den = jnp.where(between, d_lo - d_hi, 1.0)  # > 0 where between
    y = y_lo + jnp.where(between, d_lo / den, 0.0) * (y_hi - y_lo)
    # no point restores the target: D < 0 everywhere (its maximum is at a point), close all
    return jnp.where(found & (coll > 0), jnp.clip(y, 0.0, held), 0.0)
