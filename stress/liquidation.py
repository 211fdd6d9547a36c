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

import math
from typing import Any

import jax.numpy as jnp

from .errors import InputError

# Defaults of exchange.toml [liquidation].
DEFAULTS = {
    "fee_rate": 0.0,  # liquidation fee, of the notional closed out
    "oracle_lag_steps": 0,  # the liquidation engine sees a path's prices this many steps late
    "oracle_lags": [],  # lags whose bad debt and P(fund depleted) are reported side by side
    "adl": True,  # socialise what the fund cannot pay by auto-deleveraging the winners
    "cascade": False,  # along paths, forced closes move later prices (needs impact parameters)
    "impact": {},  # per underlying: {spread, k, daily_vol, daily_volume}; none: closing is free
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
    for key in ("adl", "cascade"):
        if not isinstance(out[key], bool):
            raise InputError("exchange.toml", "[liquidation]", key, f"{out[key]!r} must be true or false")
    out["impact"] = _impact_config(out["impact"])
    if out["cascade"] and not out["impact"]:
        raise InputError("exchange.toml", "[liquidation]", "cascade",
                         "a cascade needs [liquidation.impact.<ASSET>] parameters to move prices with")
    return out


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


def fee(equity: Any, notional: Any, liquidated: Any, rate: Any) -> Any:
    """Liquidation fee, USD: ``rate * notional`` of each liquidated account, capped at its
    remaining equity (and 0 when that is negative), so the fee never creates bad debt."""
    return jnp.where(liquidated, jnp.minimum(rate * notional, jnp.maximum(equity, 0.0)), 0.0)


def bad_debt(equity: Any) -> Any:
    """Bad debt per account and scenario, USD: ``max(0, -equity)`` after closing at no cost."""
    return jnp.maximum(-equity, 0.0)


def path_outcome(W: int, eq: Any, coll: Any, mm: Any, *more: Any, lag: int = 0, at: bool = False) -> tuple[Any, ...]:
    """Each account's state at the step that decides each path: its first breach, else the end.

    With an oracle ``lag`` of ``k`` steps the liquidation engine sees step ``t - k``'s prices at
    step ``t``: a breach at step ``t - k`` is acted on at step ``t``, at step ``t``'s prices (later
    and deeper underwater); a breach in the last ``k`` steps is not acted on within the path.
    A one-step scenario is an instantaneous shock: the lag does not apply to it.

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
    breach = m > c
    if lag:  # seen lag steps late: step t acts on step t - lag's breach
        seen = jnp.zeros((n, min(lag, K), W), bool)
        breach = jnp.concatenate([seen, breach[:, : max(K - lag, 0)]], axis=1)
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
