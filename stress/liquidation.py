"""Closing out accounts: when along a path, and at what loss.

An account is liquidated at the first step of a path where its collateral value is below its
maintenance margin, and closed out in full at that step's prices, at no cost (fees and price
impact come next). From then on it holds no positions, so its equity is what it had at the
liquidation step: a higher margin, breached earlier, limits the loss. That is what makes
margin parameters matter to bad debt. A one-step scenario is a path of one step.

What the closed positions gain or lose after the liquidation step belongs to whoever took
them over (the market, through the liquidation engine), not to the exchange's accounts: the
engine reports it per scenario as ``pnl_closed_out`` so that the accounts' P&L plus it is the
revaluation of every position held to the end (the conservation law of a matched book).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def bad_debt(equity: Any) -> Any:
    """Bad debt per account and scenario, USD: ``max(0, -equity)`` after closing at no cost."""
    return jnp.maximum(-equity, 0.0)


def path_outcome(eq: Any, coll: Any, mm: Any, W: int) -> tuple[Any, Any, Any, Any]:
    """Each account's state at the step that decides each path: its first breach, else the end.

    Args:
      eq, coll, mm: ``[n, K * W]`` equity, collateral value and maintenance margin, USD, in the
        engine's tile layout: the last step's ``W`` columns first, then steps ``1 .. K-1``.
      W: scenarios per tile.

    Returns:
      ``(eq, coll, mm, liquidated)``, each ``[n, W]``: the values at the first step where
      ``coll < mm`` (the account is closed out there) or, if none, at the last step; and
      whether it was liquidated at all.
    """
    n, KW = eq.shape
    K = KW // W
    if K == 1:
        return eq, coll, mm, mm > coll
    order = list(range(1, K)) + [0]  # time order: steps 1 .. K-1, then the last

    def timed(x):
        return x.reshape(n, K, W)[:, order, :]

    e, c, m = timed(eq), timed(coll), timed(mm)
    breach = m > c
    liquidated = breach.any(axis=1)
    first = jnp.where(liquidated, jnp.argmax(breach, axis=1), K - 1)[:, None, :]

    def pick(x):
        return jnp.take_along_axis(x, first, axis=1)[:, 0]

    return pick(e), pick(c), pick(m), liquidated
