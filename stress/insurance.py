"""The insurance fund waterfall: bad debt is paid by the fund; what it cannot pay is socialised."""

from __future__ import annotations

import numpy as np


def fund_value(fund: np.ndarray, price: np.ndarray) -> np.ndarray:
    """Value of the fund's balances at each scenario's prices, USD.

    Args:
      fund: ``[A]`` balance of each asset. price: ``[A, S]`` asset prices, USD.
    Returns: ``[S]``.
    """
    return fund @ price


def waterfall(bad_debt: np.ndarray, fund: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pay bad debt from the fund.

    Args:
      bad_debt: ``[S]`` exchange-wide bad debt, USD. fund: ``[S]`` fund value, USD.
    Returns:
      ``(fund_after, socialized_loss)``, each ``[S]``: the fund after paying, floored at 0,
      and the part of the bad debt the fund could not pay.
    """
    return np.maximum(fund - bad_debt, 0.0), np.maximum(bad_debt - fund, 0.0)
