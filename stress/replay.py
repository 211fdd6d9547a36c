"""Historical replay: a price history becomes one scenario per overlapping window.

The window starting at row ``i`` ends at the first row ``j`` at least ``horizon_days`` later;
its rows ``i+1 .. j`` are the path's steps, so a liquidation at any intermediate close counts.
Plain replay moves each asset by its realised return ``P_j / P_i - 1`` exactly.

Filtered historical simulation (Barone-Adesi et al. 1999; Hull and White 1998) rescales each
daily log return by today's volatility over the volatility at its time, so a calm history
replayed in a stormy market (or the reverse) keeps its shape but takes today's scale:

    sigma2[1] = mean(r[1..min(30, R-1)]^2)              (seed: the first month's mean square)
    sigma2[t+1] = lam * sigma2[t] + (1 - lam) * r[t]^2  (RiskMetrics EWMA, lam = 0.94)
    r*[t] = r[t] * sigma[R] / max(sigma[t], f * s)      (sigma[R]: the forecast for tomorrow)

and a window's move is ``exp(sum of r*) - 1``. Each asset is filtered on its own series.
``s`` is the root mean square of the series' returns over the whole history and ``f`` =
``FHS_VOL_FLOOR``: a series that starts flat (a stablecoin at exactly 1, a listing with stale
prices) has an EWMA vol of 0 until its first move, and that move, divided by 0, became a
price of 0 and froze the asset for every later window.
"""

from __future__ import annotations

import numpy as np

FHS_SEED_RETURNS = 30
FHS_VOL_FLOOR = 0.1  # a return's vol is taken as at least this share of its series' RMS return


def ewma_vol(r: np.ndarray, lam: float) -> np.ndarray:
    """EWMA volatility ``[R, M]`` of log returns ``r`` ``[R-1, M]``: entry ``t`` (1-based
    ``t+1`` of the docstring above) is the estimate made before return ``t`` is seen; the last
    entry is the forecast after the whole history."""
    n = len(r)
    var = np.empty((n + 1,) + r.shape[1:])
    var[0] = np.mean(r[: min(FHS_SEED_RETURNS, n)] ** 2, axis=0)
    for t in range(n):  # a loop over history rows (thousands), not accounts or scenarios
        var[t + 1] = lam * var[t] + (1.0 - lam) * r[t] ** 2
    return np.sqrt(var)


def window_ends(times: np.ndarray, horizon_days: float) -> np.ndarray:
    """``[R]`` end row of the window starting at each row (``R`` where the history is too short).

    ``times``: ``[R]`` datetime64, strictly increasing.
    """
    target = times + np.timedelta64(int(round(horizon_days * 86400e3)), "ms")
    return np.searchsorted(times, target, side="left")


def windows(
    times: np.ndarray, prices: np.ndarray, horizon_days: float, *, filtered: bool = False, lam: float = 0.94
) -> tuple[np.ndarray, np.ndarray]:
    """Every full window of the history as a price path.

    Args:
      times: ``[R]`` datetime64, strictly increasing. prices: ``[R, M]`` USD, > 0.
      horizon_days: window length in days (> 0). filtered: rescale returns (FHS, see module).
      lam: EWMA decay of the filter.

    Returns:
      ``(starts, mult)``: ``[W]`` start rows and ``[W, K, M]`` price at each step over the
      price at the start, ``K`` the longest window in rows; shorter windows (irregular
      sampling) repeat their last step.
    """
    ends = window_ends(times, horizon_days)
    starts = np.flatnonzero(ends < len(times))
    if not len(starts):
        return starts, np.zeros((0, 1, prices.shape[1]))
    K = int((ends[starts] - starts).max())
    step = np.minimum(starts[:, None] + np.arange(1, K + 1)[None, :], ends[starts][:, None])  # [W, K]
    if not filtered:  # the realised ratios themselves, to the last bit
        return starts, prices[step] / prices[starts][:, None, :]
    r = np.diff(np.log(prices), axis=0)
    vol = ewma_vol(r, lam)
    floor = FHS_VOL_FLOOR * np.sqrt(np.mean(r**2, axis=0))  # [M]; 0 only for a series that never moves
    r = np.where(r == 0.0, 0.0, r * vol[-1] / np.maximum(vol[:-1], np.maximum(floor, 1e-300)))
    logp = np.concatenate([np.zeros((1, prices.shape[1])), np.cumsum(r, axis=0)])
    return starts, np.exp(logp[step] - logp[starts][:, None, :])
