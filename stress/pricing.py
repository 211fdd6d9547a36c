"""Valuation (SPEC section 2): Black-Scholes options, futures marked to market, linear and
inverse conventions. Every instrument is valued once per scenario into ``[I, S]`` matrices.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from .snapshot import OPTION, Instruments, Market

YEAR_DAYS = 365.0
MIN_VOL = 0.01  # shifted implied vols are floored here (SPEC section 3)


def floor_vol(vol: Any, mark_iv: Any) -> Any:
    """A shifted implied ``vol`` floored at ``MIN_VOL`` (SPEC section 3), or at the option's own
    ``mark_iv`` where that is lower: an option marked below the floor is valued at its mark
    (SPEC section 2), and a shift down from it goes no lower. Broadcasts.

    A select, not ``jnp.maximum``: at a tie (a mark at the floor, no shift) the maximum's
    gradient splits evenly between its arguments, which halved such an option's vega. A
    ``mark_iv`` of 0 (futures and perpetuals, whose option branch is computed and masked)
    floors at ``MIN_VOL``: a vol of 0 there would put 0 * inf, NaN, into every gradient.
    """
    floor = jnp.where((mark_iv > 0) & (mark_iv < MIN_VOL), mark_iv, MIN_VOL)  # selects: no split gradient
    return jnp.where(vol < floor, floor, vol)


def black_scholes(S: Any, K: Any, T: Any, vol: Any, r: Any, is_call: Any) -> Any:
    """Black-Scholes value of a European option per unit of underlying, no dividend.

    Args:
      S: spot price, USD (> 0). K: strike, USD (> 0). T: years to expiry; at ``T <= 0`` the
      value is the intrinsic value. vol: annualised volatility (> 0). r: continuously
      compounded rate per year. is_call: True for a call, False for a put. All broadcast.

    Returns:
      The option value in USD, broadcast shape of the inputs.

    References:
      Black and Scholes (1973); Hull, Options, Futures and Other Derivatives, ch. 15.
    """
    live = T > 0
    # Double where: the branch not taken must still have finite gradients.
    t = jnp.where(live, T, 1.0)
    sd = vol * jnp.sqrt(t)
    d1 = (jnp.log(S / K) + (r + 0.5 * vol * vol) * t) / sd
    d2 = d1 - sd
    df = jnp.exp(-r * t)
    call = S * ndtr(d1) - K * df * ndtr(d2)
    put = K * df * ndtr(-d2) - S * ndtr(-d1)
    value = jnp.where(is_call, call, put)
    intrinsic = jnp.where(is_call, jnp.maximum(S - K, 0.0), jnp.maximum(K - S, 0.0))
    return jnp.where(live, value, intrinsic)


def revalue(
    inst: Instruments, market: Market, spot_mult: Any, vol_shift: Any, horizon_days: Any
) -> dict[str, Any]:
    """Value every instrument under every scenario.

    Args:
      inst: instrument terms ``[I]``.
      market: prices at ``as_of``.
      spot_mult: ``[S, A]`` scenario price of each asset over its snapshot price.
      vol_shift: ``[S, A]`` absolute implied-vol change of options on each underlying.
      horizon_days: ``[S]`` days that pass before the scenario's revaluation.

    Returns:
      A dict of ``[I, S]`` arrays unless stated:
      ``value``: value (P&L for futures and perpetuals) per contract in units of the
      settlement asset; ``spot``: the underlying's price, USD; ``option``: option value per
      coin, USD (0 for futures); ``price``: ``[A, S]`` asset prices, USD; ``live``: bool,
      False where the scenario's horizon reaches the instrument's expiry. Such an option or
      future has settled: its value above stays in equity (an option at its intrinsic value, a
      future at ``F'``), and it carries no margin, fee or price impact (``margin.per_contract``).
    """
    price = market.price[:, None] * spot_mult.T  # [A, S]
    S = price[inst.underlying]  # [I, S]
    is_opt = (inst.kind == OPTION)[:, None]
    c = inst.contract_size[:, None]

    vol = floor_vol(inst.iv[:, None] + vol_shift.T[inst.underlying], inst.iv[:, None])
    left = inst.expiry[:, None] - horizon_days[None, :] / YEAR_DAYS  # years; inf for perpetuals
    T = jnp.where(is_opt, left, 1.0)  # keep the option branch finite for the others
    opt = jnp.where(is_opt, black_scholes(S, inst.strike[:, None], T, vol, market.rate, inst.is_call[:, None]), 0.0)

    F0 = jnp.where(is_opt, 1.0, inst.mark[:, None])
    # F0 * S / S0 rounds: a future at its mark (S = S0) came out a few ulps off, enough to
    # call an account at exactly its maintenance margin liquidatable
    F = F0 * spot_mult.T[inst.underlying]
    inverse = inst.inverse[:, None]
    fut = jnp.where(inverse, c * (1.0 / F0 - 1.0 / F), c * (F - F0))
    opt_units = jnp.where(inverse, c * opt / S, c * opt)
    value = jnp.where(is_opt, opt_units, fut)
    live = jnp.broadcast_to(left > 0, value.shape)
    return {"value": value, "spot": S, "option": opt, "price": price, "live": live}


def hold_settled(value: Any, live: Any, axis: int = 1, xp: Any = jnp) -> Any:
    """``value`` along a path's steps (``axis``, in time order) with each contract held, from
    the first step past its expiry on, at what it settled into there.

    ``revalue`` values a contract past its expiry at the scenario's intrinsic value (SPEC
    section 3); along a path it settles once, at the first step past its expiry, into a fixed
    amount of its settlement asset, which later steps' prices no longer move (equity still
    converts it at that asset's price). ``live``: ``revalue``'s, shaped like ``value`` (False
    from some step on: horizons grow along a path). ``xp``: ``jnp``, or ``numpy`` on the host.
    """
    K = value.shape[axis]
    first = xp.sum(xp.cumprod(live, axis=axis), axis=axis, keepdims=True)  # steps before settling
    steps = xp.arange(K).reshape([K if d == axis % value.ndim else 1 for d in range(value.ndim)])
    return xp.take_along_axis(value, xp.minimum(steps, first), axis=axis)


def hold_settled_paths(value: Any, live: Any, before: Any, before_live: Any) -> tuple[np.ndarray, np.ndarray]:
    """``hold_settled`` in the layout of path tables, on the host: ``value`` and ``live``
    ``[I, 1 + S]`` (now, then each path's last step), ``before`` and ``before_live`` ``[I, K1 *
    S]`` (the ``K1`` steps before the last, step-major). Returns ``(value, before)`` with
    contracts that settled along a path held at what they settled into."""
    I, S = value.shape[0], value.shape[1] - 1
    K1 = before.shape[1] // S
    value = np.asarray(value)

    def in_time(steps, last):  # [I, K1 + 1, S]
        return np.concatenate([np.asarray(steps).reshape(I, K1, S), np.asarray(last)[:, None, 1:]], axis=1)

    held = hold_settled(in_time(before, value), in_time(before_live, live), axis=1, xp=np)
    return np.concatenate([value[:, :1], held[:, K1]], axis=1), held[:, :K1].reshape(I, K1 * S)


def hold_settled_step(value: Any, live: Any, before: tuple) -> Any:
    """``hold_settled`` one step at a time, in a scan over a path's steps: ``before`` is the
    ``(value, live)`` this returned and ``revalue`` gave at the step before (at the first step,
    anything and True). Returns this step's ``value``, settled contracts held."""
    held, was_live = before
    return jnp.where(live | was_live, value, held)
