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
    return out


def fee(equity: Any, notional: Any, liquidated: Any, rate: Any) -> Any:
    """Liquidation fee, USD: ``rate * notional`` of each liquidated account, capped at its
    remaining equity (and 0 when that is negative), so the fee never creates bad debt."""
    return jnp.where(liquidated, jnp.minimum(rate * notional, jnp.maximum(equity, 0.0)), 0.0)


def bad_debt(equity: Any) -> Any:
    """Bad debt per account and scenario, USD: ``max(0, -equity)`` after closing at no cost."""
    return jnp.maximum(-equity, 0.0)


def path_outcome(W: int, eq: Any, coll: Any, mm: Any, *more: Any, lag: int = 0) -> tuple[Any, ...]:
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

    Returns:
      ``(eq, coll, mm, *more, liquidated)``, each ``[n, W]``: the values at the first step
      where ``coll < mm`` (the account is closed out there) or, if none, at the last step; and
      whether it was liquidated at all.
    """
    n, KW = eq.shape
    K = KW // W
    if K == 1:
        return (eq, coll, mm, *more, mm > coll)  # an instantaneous shock: no step to lag
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

    return (pick(timed(eq)), pick(c), pick(m), *(pick(timed(x)) for x in more), liquidated)
