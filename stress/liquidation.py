"""Closing out accounts at scenario prices.

The core model closes every position at the scenario's prices with no cost, so an account's
bad debt is ``max(0, -equity)``. Liquidation fees, price impact, partial liquidation and the
first-breach rule along paths plug in here: they change the closing cost per account, and the
rest of the engine only sees bad debt and fees.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def bad_debt(equity: Any) -> Any:
    """Bad debt per account and scenario, USD: ``max(0, -equity)`` after closing at no cost."""
    return jnp.maximum(-equity, 0.0)
