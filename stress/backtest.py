"""Margin backtesting: would today's margin have covered the losses of history?

Today's portfolios are held fixed and revalued under each non-overlapping window of ``H``
days of a price history (the window starting at row ``i`` ends at the first row at least
``H`` days later, and the next window starts there, so no price move is counted twice). An
account *exceeds* in a window when its realised loss is larger than its coverage:

    loss[a, w]   = -(equity change of account a under window w)       (USD, collateral included)
    coverage[a]  = margin[a] + haircut[a]                             (USD, at the snapshot)
    margin[a]    = maintenance (default) or initial margin of the model
    haircut[a]   = equity[a] - collateral_value[a]  (>= 0: what haircuts already hold back)

An account sitting exactly at its liquidation point (collateral value = maintenance margin)
has equity = margin + haircut, so ``loss > coverage`` is exactly "it would have ended the
window with negative equity": the event margin exists to prevent (EMIR Art. 49; RTS 153/2013
Art. 49). With zero haircuts the coverage is the margin itself.

The statistics are the standard ones for VaR backtesting; each takes the count of
exceedances ``x`` in ``n`` observations at the exceedance probability ``p = 1 - confidence``:

* Kupiec (1995) proportion of failures: ``LR_pof = 2 [x ln(x/(n p)) + (n-x) ln((n-x)/(n (1-p)))]``,
  chi-square with 1 degree of freedom under the null that the exceedance rate is ``p``.
* Christoffersen (1998) independence: with ``n_ij`` the number of days in state ``i``
  followed by state ``j`` (1 = exceedance), ``pi_i = n_i1 / (n_i0 + n_i1)`` and
  ``pi = (n_01 + n_11) / (n - 1)``, ``LR_ind = 2 [ln L(pi_0, pi_1) - ln L(pi)]``, chi-square(1);
  conditional coverage ``LR_cc = LR_pof + LR_ind``, chi-square(2).
* Basel (1996) traffic light: green while the binomial probability of at most ``x``
  exceedances is below 95%, yellow below 99.99%, red from there (250 observations at 99%:
  green 0-4, yellow 5-9, red 10 or more).

Terms ``0 ln 0`` are 0, so all-pass and all-fail samples and empty transition cells are fine.
Nothing here needs scipy: chi-square survival functions are ``erfc(sqrt(x/2))`` (1 dof) and
``exp(-x/2)`` (2 dof); binomial probabilities are computed in log space.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

DEFAULT_CONFIDENCE = 0.99
BASES = ("maintenance", "initial")
ZONES = ("green", "yellow", "red")
# Basel Committee (1996), "Supervisory framework for the use of backtesting": the
# zone boundaries as cumulative binomial probabilities of the exceedance count.
GREEN_BELOW, YELLOW_BELOW = 0.95, 0.9999


# --------------------------------------------------------------------------------------------
# Statistics (pure; numbers or numpy arrays that broadcast)


def _xlogy(x: Any, y: Any) -> np.ndarray:
    """``x * ln(y)`` with ``0 * ln(anything) = 0`` (the limit the likelihoods need)."""
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    safe = np.where(x > 0, y, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(safe), 0.0)


def chi2_sf_1(x: Any) -> Any:
    """Survival function of chi-square with 1 degree of freedom: ``erfc(sqrt(x / 2))``."""
    x = np.asarray(x, float)
    sf = [math.nan if math.isnan(v) else math.erfc(math.sqrt(max(v, 0.0) / 2.0)) for v in x.ravel().tolist()]
    out = np.asarray(sf, float).reshape(x.shape)
    return float(out) if out.ndim == 0 else out


def chi2_sf_2(x: Any) -> Any:
    """Survival function of chi-square with 2 degrees of freedom: ``exp(-x / 2)``."""
    out = np.exp(-np.maximum(np.asarray(x, float), 0.0) / 2.0)
    return float(out) if out.ndim == 0 else out


def _check_p(p: float) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"exceedance probability {p!r} must be in (0, 1)")


def kupiec_lr(n_exceptions: Any, n_obs: Any, p: float) -> Any:
    """Kupiec's proportion-of-failures likelihood ratio; NaN where ``n_obs`` is 0.

    ``LR = -2 ln[(1-p)^(n-x) p^x] + 2 ln[(1-x/n)^(n-x) (x/n)^x]`` (the binomial coefficient
    cancels), written as ``2 [x ln(x/(np)) + (n-x) ln((n-x)/(n(1-p)))]`` so that ``x = 0`` and
    ``x = n`` need no special case.
    """
    _check_p(p)
    x, n = np.broadcast_arrays(np.asarray(n_exceptions, float), np.asarray(n_obs, float))
    if np.any((x < 0) | (x > n)):
        raise ValueError("exceptions must be between 0 and the number of observations")
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = 2.0 * (_xlogy(x, x / (n * p)) + _xlogy(n - x, (n - x) / (n * (1.0 - p))))
    lr = np.where(n > 0, np.maximum(lr, 0.0), np.nan)  # >= 0 up to round-off at x = n p
    return float(lr) if lr.ndim == 0 else lr


def kupiec_pof(n_exceptions: Any, n_obs: Any, p: float) -> tuple[Any, Any]:
    """``(LR_pof, p-value)`` of Kupiec's test that exceedances occur with probability ``p``.

    Args:
      n_exceptions: exceedance count(s) ``x``. n_obs: observations ``n`` (>= x).
      p: exceedance probability under the null, ``1 - confidence`` (0.01 for 99%).
    Returns:
      the statistic and its chi-square(1) p-value; NaN for ``n = 0``.
    """
    lr = kupiec_lr(n_exceptions, n_obs, p)
    return lr, chi2_sf_1(lr)


def transition_counts(hits: Any) -> np.ndarray:
    """``[..., 2, 2]`` counts ``n_ij`` of an exceedance state ``i`` followed by ``j`` along
    the last axis of the boolean array ``hits`` ``[..., T]`` (time order)."""
    h = np.asarray(hits, bool)
    a, b = h[..., :-1], h[..., 1:]
    n = [[(~a & ~b).sum(-1), (~a & b).sum(-1)], [(a & ~b).sum(-1), (a & b).sum(-1)]]
    return np.moveaxis(np.asarray(n, float), (0, 1), (-2, -1))


def christoffersen_lr(counts: np.ndarray) -> Any:
    """Christoffersen's independence LR from transition counts ``[..., 2, 2]``; NaN when there
    is no transition (fewer than two observations)."""
    c = np.asarray(counts, float)
    n00, n01, n10, n11 = c[..., 0, 0], c[..., 0, 1], c[..., 1, 0], c[..., 1, 1]
    total = n00 + n01 + n10 + n11
    with np.errstate(divide="ignore", invalid="ignore"):
        pi = (n01 + n11) / total
        pi0 = n01 / (n00 + n01)  # NaN when state 0 never occurs: its terms are 0 * ln(.)
        pi1 = n11 / (n10 + n11)
        ll_markov = _xlogy(n00, 1 - pi0) + _xlogy(n01, pi0) + _xlogy(n10, 1 - pi1) + _xlogy(n11, pi1)
        ll_iid = _xlogy(n00 + n10, 1 - pi) + _xlogy(n01 + n11, pi)
    lr = np.where(total > 0, np.maximum(2.0 * (ll_markov - ll_iid), 0.0), np.nan)
    return float(lr) if lr.ndim == 0 else lr


def christoffersen_independence(hits: Any) -> tuple[Any, Any]:
    """``(LR_ind, p-value)`` of Christoffersen's test that an exceedance does not make the
    next one more (or less) likely.

    Args:
      hits: ``[T]`` (or ``[..., T]``) booleans in time order, True = exceedance.
    Returns:
      the statistic and its chi-square(1) p-value; NaN for fewer than 2 observations.
    """
    lr = christoffersen_lr(transition_counts(hits))
    return lr, chi2_sf_1(lr)


def conditional_coverage(hits: Any, p: float) -> tuple[Any, Any]:
    """``(LR_cc, p-value)``: ``LR_pof + LR_ind``, chi-square(2) (Christoffersen 1998).

    ``LR_pof`` is taken over all ``T`` observations (the usual convention; Christoffersen's
    paper conditions on the first, a difference of one observation).
    """
    h = np.asarray(hits, bool)
    lr = kupiec_lr(h.sum(-1), h.shape[-1], p) + christoffersen_lr(transition_counts(h))
    return lr, chi2_sf_2(lr)


def basel_thresholds(n_obs: int, p: float) -> tuple[int, int]:
    """``(first yellow count, first red count)`` of the traffic light for ``n_obs`` observations.

    Green while ``P(X <= x) < 95%``, yellow while ``< 99.99%``, red from there; zero
    exceedances are green whatever ``n_obs`` (see ``basel_zone``).
    """
    _check_p(p)
    if n_obs <= 0:
        raise ValueError("the traffic light needs at least one observation")
    lgn = math.lgamma(n_obs + 1)
    lp, lq = math.log(p), math.log1p(-p)
    cdf, yellow = 0.0, None
    for k in range(n_obs + 1):  # walks up to ~ n p + 4 sd terms, then stops
        # P(X = k) in log space: (1-p)^n underflows for a pooled sample of millions
        cdf += math.exp(lgn - math.lgamma(k + 1) - math.lgamma(n_obs - k + 1) + k * lp + (n_obs - k) * lq)
        if yellow is None and cdf >= GREEN_BELOW:
            yellow = k
        if cdf >= YELLOW_BELOW:
            return _floored((k if yellow is None else yellow, k))
    # P(X <= n) = 1 always reaches 99.99%; round-off can leave it a hair below
    return _floored((n_obs if yellow is None else yellow, n_obs))


def _floored(thresholds: tuple[int, int]) -> tuple[int, int]:
    """No exceedance is always green: in a short sample ((1-p)^n >= 95%, under 6 observations
    at 99%) the literal rule would put a perfect record in the yellow zone."""
    return max(thresholds[0], 1), max(thresholds[1], 1)


def basel_zone(n_exceptions: Any, n_obs: int, p: float) -> Any:
    """The Basel traffic-light zone(s) ``"green"``, ``"yellow"`` or ``"red"`` of exceedance
    count(s) out of ``n_obs`` observations at exceedance probability ``p``.

    Zero exceedances are green even where ``(1-p)^n_obs >= 95%`` (fewer than 6 observations
    at 99%), which the cumulative-probability rule alone would call yellow.
    """
    yellow, red = basel_thresholds(n_obs, p)
    x = np.asarray(n_exceptions)
    zone = np.where(x >= red, "red", np.where(x >= yellow, "yellow", "green")).astype(object)
    return str(zone) if zone.ndim == 0 else zone


# --------------------------------------------------------------------------------------------
# Windows of the history


def nonoverlapping_starts(ends: np.ndarray) -> np.ndarray:
    """Start rows of consecutive non-overlapping windows, from row 0.

    Args:
      ends: ``[R]`` end row of the window starting at each row (``R``: too short), as
        ``replay.window_ends`` gives.
    Returns:
      ``[W]`` start rows; window ``w`` runs from ``starts[w]`` to ``ends[starts[w]]``, where
      window ``w + 1`` starts.
    """
    R, i, out = len(ends), 0, []
    while i < R and ends[i] < R:  # one step per window, not per row
        out.append(i)
        i = int(ends[i])
    return np.asarray(out, dtype=np.int64)


def history_scenarios(snap: Any, history_path: Path, horizon_days: float):
    """The non-overlapping windows of a price history as one-step ``replay`` scenarios.

    Each window moves every asset with a column by ``P_end / P_start``; an ``ASSET_iv`` column
    (implied-vol level) shifts that underlying's vols by its change over the window (0 without
    one); options are revalued ``elapsed`` days later (the window's real length, ``>= H``).
    Assets without a column keep today's price; those that underlie a position must have one.

    Returns:
      ``(scenarios, info)``: a ``Scenarios`` of ``W`` windows and a dict with ``start``,
      ``end`` (``[W]`` datetime64) and ``unmoved`` (asset names held at today's price).
    Raises:
      InputError: an unreadable history, a missing column, or fewer rows than one window.
    """
    from . import replay
    from .scenarios import Scenarios, _Ctx, _read_history

    path = Path(history_path)
    if not path.is_file():
        raise InputError(str(path), None, None, "price history not found")
    ctx = _Ctx(file=path.name, label=None, snap=snap, skip_unknown=False, folder=path.parent)
    times, cols = _read_history(ctx, path)
    A = snap.n_assets
    held = np.unique(np.asarray(snap.instruments.underlying)[snap.pos_instrument])
    missing = [snap.assets[a] for a in held if snap.assets[a] not in cols]
    if missing:
        raise InputError(path.name, None, missing[0], f"missing column: positions on {missing[0]} need its price history")
    ends = replay.window_ends(times, horizon_days)
    starts = nonoverlapping_starts(ends)
    if not len(starts):
        span = (times[-1] - times[0]) / np.timedelta64(1, "D") if len(times) else 0.0
        raise InputError(path.name, None, "date",
                         f"the history ({len(times)} rows, {span:g} days) is shorter than one window of {horizon_days:g} days")
    stops = ends[starts]
    W = len(starts)
    spot, vol = np.ones((W, A)), np.zeros((W, A))
    for a, name in enumerate(snap.assets):
        if name in cols:
            spot[:, a] = cols[name][stops] / cols[name][starts]  # the realised ratio, exactly
        if name + "_iv" in cols:
            vol[:, a] = cols[name + "_iv"][stops] - cols[name + "_iv"][starts]
    elapsed = ((times[stops] - times[starts]) / np.timedelta64(1, "D")).astype(np.float64)
    stamps = np.datetime_as_string(times[starts], unit="m")
    names = tuple(s[:10] if s.endswith("T00:00") else s.replace("T", " ") for s in stamps)  # window start
    scen = Scenarios(names=names, kinds=("replay",) * W, spot_mult=spot, vol_shift=vol,
                     horizon_days=elapsed, source=str(path))
    unmoved = [n for n in snap.assets if n not in cols]
    return scen, {"start": times[starts], "end": times[stops], "unmoved": unmoved}


# --------------------------------------------------------------------------------------------
# The backtest


def confidence_of(snap: Any, confidence: float | None) -> float:
    """The confidence level: the argument, else ``[margin] confidence``, else 0.99."""
    c = confidence if confidence is not None else snap.margin_config.get("confidence", DEFAULT_CONFIDENCE)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c < 1.0:
        where = ("--confidence", None, None) if confidence is not None else ("exchange.toml", "[margin]", "confidence")
        raise InputError(*where, f"{c!r} must be a number between 0 and 1 (0.99 for 99%)")
    return float(c)


def backtest(snap: Any, history_path: Path | str, horizon_days: float, model: str | None = None,
             confidence: float | None = None, *, basis: str = "maintenance") -> dict:
    """Backtest the margin model on a price history with today's portfolios held fixed.

    Args:
      snap: a loaded snapshot. history_path: CSV or Parquet, a ``date`` column and one USD
        price column per asset. horizon_days: window length ``H`` (> 0), the liquidation
        horizon the margin is meant to cover. model: ``standard`` or ``portfolio`` (default
        ``[margin] model``). confidence: default ``[margin] confidence`` where the margin
        table has it, else 0.99; exceedance probability ``p = 1 - confidence``.
      basis: ``maintenance`` (default) or ``initial`` margin as the coverage.

    Returns:
      A dict: ``accounts`` (one row per account with a positive margin: ``account_id``,
      ``windows``, ``exceedances``, ``expected``, ``margin``, ``haircut``, ``coverage``,
      ``worst_loss``, ``worst_window``, ``kupiec_lr``, ``kupiec_p``, ``christoffersen_p``,
      ``zone``); ``exchange`` (rows ``pooled``, every account-window as one observation, and
      ``aggregate``, the gross loss of losing accounts vs total coverage per window);
      ``windows`` (one row per window: ``window``, ``start``, ``end``, ``days``,
      ``loss_total``, ``coverage_total``, ``exceeded``, ``accounts_exceeding``); and
      ``model``, ``basis``, ``confidence``, ``horizon_days``, ``unmoved`` (assets without a
      history column, held at today's price) and ``untested`` (accounts with positions but a
      zero requirement). An account with no positions is tested where its collateral alone
      has a requirement (the var model).
    Raises:
      InputError: bad history, horizon, confidence or model.
    """
    import pandas as pd

    from .engine import pnl_matrix
    from .margin import account_margin

    if isinstance(horizon_days, bool) or not isinstance(horizon_days, (int, float)) or not (
            math.isfinite(horizon_days) and horizon_days > 0):
        raise InputError("--horizon-days", None, None, f"{horizon_days!r} must be a number of days > 0")
    if basis not in BASES:
        raise InputError("--basis", None, None, f"{basis!r} is not one of {', '.join(BASES)}")
    conf = confidence_of(snap, confidence)
    p = 1.0 - conf
    m = account_margin(snap, model)
    scen, info = history_scenarios(snap, Path(history_path), float(horizon_days))

    # Only a positive requirement claims to cover something: accounts whose positions need no
    # margin (long options under the standard model) are not tested, nor are those without
    # positions, unless their collateral alone needs margin (the var model's ES counts it).
    held = np.unique(snap.pos_account)
    req = m["accounts"][f"{basis}_margin"].to_numpy(float)
    tested = np.flatnonzero(req > 0)
    acc = m["accounts"].iloc[tested]
    margin = req[tested]
    haircut = np.maximum(acc.equity.to_numpy(float) - acc.collateral_value.to_numpy(float), 0.0)
    coverage = margin + haircut  # [n]
    loss = -pnl_matrix(snap, scen).to_numpy()[tested]  # [n, W] USD
    hits = loss > coverage[:, None]  # [n, W]
    n, W = hits.shape
    x = hits.sum(1)

    names = np.asarray(scen.names, dtype=object)
    worst = loss.argmax(1) if W else np.zeros(n, int)
    lr, pv = kupiec_pof(x, W, p)
    _, ind_p = christoffersen_independence(hits)
    accounts = pd.DataFrame({
        "account_id": acc.account_id.astype(str).to_numpy(),
        "windows": np.full(n, W, dtype=np.int64),
        "exceedances": x.astype(np.int64),
        "expected": np.full(n, W * p),
        "margin": margin, "haircut": haircut, "coverage": coverage,
        "worst_loss": loss.max(1), "worst_window": names[worst].astype(str),
        "kupiec_lr": np.asarray(lr, float).reshape(n), "kupiec_p": np.asarray(pv, float).reshape(n),
        "christoffersen_p": np.asarray(ind_p, float).reshape(n),
        "zone": np.asarray(basel_zone(x, W, p), dtype=object).reshape(n),
    })

    # Exchange aggregate: every long has a short, so net P&L is about zero; what the margins
    # must absorb together is the gross loss of the accounts that lose.
    agg_loss = np.maximum(loss, 0.0).sum(0)  # [W]
    agg_cov = float(coverage.sum())
    agg_hits = agg_loss > agg_cov
    windows = pd.DataFrame({
        "window": names.astype(str), "start": info["start"], "end": info["end"],
        "days": scen.horizon_days, "loss_total": agg_loss, "coverage_total": np.full(W, agg_cov),
        "exceeded": agg_hits, "accounts_exceeding": hits.sum(0).astype(np.int64),
    })
    exchange = pd.DataFrame([
        _summary("pooled", hits.ravel(), p, time_ordered=False),
        _summary("aggregate", agg_hits, p, time_ordered=True),
    ])
    return {"accounts": accounts, "exchange": exchange, "windows": windows, "model": m["model"], "basis": basis,
            "confidence": conf, "horizon_days": float(horizon_days), "unmoved": info["unmoved"],
            "untested": snap.account_ids[np.setdiff1d(held, tested)].astype(str).tolist()}


def _summary(label: str, hits: np.ndarray, p: float, *, time_ordered: bool) -> dict:
    """One row of the exchange table. The pooled account-windows are neither independent
    (accounts share windows) nor one time series, so they get Kupiec only."""
    n, x = hits.size, int(hits.sum())
    lr, pv = kupiec_pof(x, n, p)
    row = {"test": label, "observations": n, "exceedances": x, "expected": n * p,
           "rate": x / n if n else math.nan, "kupiec_lr": lr, "kupiec_p": pv,
           "christoffersen_lr": math.nan, "christoffersen_p": math.nan, "cc_lr": math.nan, "cc_p": math.nan,
           "zone": None}
    if time_ordered and n:
        ind, ind_p = christoffersen_independence(hits)
        cc, cc_p = conditional_coverage(hits, p)
        row.update(christoffersen_lr=ind, christoffersen_p=ind_p, cc_lr=cc, cc_p=cc_p, zone=basel_zone(x, n, p))
    return row
