"""Greeks per account and underlying by autodiff of the engine's own valuation (SPEC section 5),
and a hedge search driven by the gradient with respect to position quantities.

An account's equity (SPEC section 2, USD, no haircut) as a function of the market is

    E(m, v, h) = sum_a balance_a * P_a * m_a
               + sum_p q_p * value_p(m, v, h) * P_settle(p) * m_settle(p)

with ``m [A]`` the spot multipliers, ``v [A]`` the implied-vol shifts and ``h`` the days that
pass, and ``value_p`` the per-contract value of ``pricing.revalue`` in the settlement asset's
units — the function every scenario of a run goes through. The Greeks are its derivatives at
the unshocked point ``m = 1, v = 0, h = 0``, taken with ``jax.jvp`` (forward mode, one
direction per asset):

- ``delta = dE/dS_a = (dE/dm_a) / P_a``, in units of asset ``a`` (a balance of 2 BTC is a
  delta of 2);
- ``gamma = d2E/dS_a2 = (d2E/dm_a2) / P_a**2``, per unit of asset ``a`` squared, USD;
- ``vega = 0.01 * dE/dv_a``: USD per +0.01 (one vol point) of every option on ``a``;
- ``theta = dE/dh``: USD per calendar day passing (time to expiry in years of 365 days);
- ``delta_usd = delta * P_a``.

Inverse instruments are settled in their underlying, so their USD value depends on ``S``
through the coin value and through the coin's price; differentiating the real valuation
counts both. A position settled in a stablecoin is exposed to the stablecoin's price too (an
asset of its own, with its own row), not to the underlying's.

Equity is linear in holdings, so the derivatives are taken once per instrument (of its USD
value per contract, ``instrument_greeks``) and the accounts' are segment sums of
``quantity * derivative`` over their positions, plus their balances' deltas; nothing loops
over accounts or positions in Python.

``hedge`` searches the trade in a few instruments that most improves an account's worst-case
``collateral - maintenance margin`` over a scenario set, by Newton steps on a smoothed
objective (``jax.grad``/``jax.hessian`` in the quantities), then re-evaluates it exactly.
See ``docs/greeks.md``.
"""

from __future__ import annotations

import functools
import itertools
import sys
import types
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _exported, engine, liquidation, margin, portfolio, pricing
from ._tree import pytree_dataclass
from .engine import PM_GRID_BATCH
from .errors import InputError
from .snapshot import OPTION, PERPETUAL, Instruments, Market, Snapshot, account_id_column, names_at

VOL_POINT = 0.01  # vega is the equity change per +0.01 of implied vol
COLUMNS = ("account_id", "underlying", "delta", "gamma", "vega", "theta", "delta_usd")


def instrument_greeks(inst: Instruments, market: Market) -> dict[str, Any]:
    """Derivatives of each instrument's USD value per contract at the unshocked market.

    The USD value of one contract is ``u = value * P_settle`` with ``value`` from
    ``pricing.revalue`` (settlement-asset units) and ``P_settle`` the settlement asset's price,
    both functions of the spot multipliers ``m [A]``, vol shifts ``v [A]`` and horizon ``h``.

    Args:
      inst: instrument terms ``[I]``. market: prices at ``as_of``.

    Returns:
      ``dm [I, A]`` = du/dm_a, ``dm2 [I, A]`` = d2u/dm_a2, ``dv [I, A]`` = du/dv_a (USD per
      1.00 of vol), ``dh [I]`` = du/dh (USD per day), all by forward-mode autodiff at
      ``m = 1, v = 0, h = 0``; ``u [I]`` the USD value itself.
    """
    return _kept_greeks(inst, market)


@jax.jit
def _instrument_greeks(inst: Instruments, market: Market) -> dict[str, Any]:
    """``instrument_greeks`` as one jitted function, kept traced on disk (``_exported``)."""
    A = market.price.shape[0]
    one, zero, now = jnp.ones(A), jnp.zeros(A), jnp.zeros(())

    def usd(m, v, h):
        rv = pricing.revalue(inst, market, m[None, :], v[None, :], h[None])
        return rv["value"][:, 0] * rv["price"][inst.settlement, 0]

    def d_mult(e):  # m -> du/dm along e
        return lambda m: jax.jvp(lambda x: usd(x, zero, now), (m,), (e,))[1]

    eye = jnp.eye(A)
    dm = jax.vmap(lambda e: d_mult(e)(one))(eye)  # [A, I]
    dm2 = jax.vmap(lambda e: jax.jvp(d_mult(e), (one,), (e,))[1])(eye)
    dv = jax.vmap(lambda e: jax.jvp(lambda v: usd(one, v, now), (zero,), (e,))[1])(eye)
    u, dh = jax.jvp(lambda h: usd(one, zero, h), (now,), (jnp.ones(()),))
    return {"dm": dm.T, "dm2": dm2.T, "dv": dv.T, "dh": dh, "u": u}


_kept_greeks = _exported.Kept(_instrument_greeks, ("instrument_greeks",))


def _account_sums(g: dict, underlying: np.ndarray, pos_account: np.ndarray, pos_instrument: np.ndarray,
                  pos_quantity: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per-position terms ``q * d(u)`` summed per account: ``[n, A]`` each; theta is put on the
    column of the option's underlying.

    One ``bincount`` per (Greek, asset) column over the positions: no ``[positions, A]``
    temporaries (several hundred MiB at 3M positions) and nothing to compile. A column no
    instrument has (gamma and vega of a stablecoin) stays zero without a pass: at 1M accounts
    8 of the 15 passes remain.
    """
    A = np.shape(g["dm"])[1]
    q = np.asarray(pos_quantity, np.float64)
    out = {}
    for k in ("dm", "dm2", "dv"):
        per_inst = np.asarray(g[k], np.float64)  # [I, A]
        out[k] = np.zeros((n, A))
        for a in np.flatnonzero((per_inst != 0).any(axis=0)):  # NaN counts as non-zero
            out[k][:, a] = np.bincount(pos_account, weights=q * per_inst[pos_instrument, a], minlength=n)
    key = pos_account.astype(np.int64) * A + np.asarray(underlying)[pos_instrument]
    dh = q * np.asarray(g["dh"], np.float64)[pos_instrument]
    out["dh"] = np.bincount(key, weights=dh, minlength=n * A).reshape(n, A)
    return out


def _select(snap: Snapshot, accounts: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the accounts asked for (all by default) and a mask of their positions.

    Raises:
      InputError: an id that is not in the snapshot.
    """
    if accounts is None:
        return np.arange(snap.n_accounts), np.ones(snap.n_positions, bool)
    ids = snap.account_ids.astype(str)
    wanted = np.asarray(list(accounts), dtype=str)
    idx = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))  # ids are sorted
    found = ids[idx] == wanted if len(ids) else np.zeros(len(wanted), bool)
    if not found.all():
        raise InputError("account", None, None, f"unknown account id {str(wanted[~found][0])!r}: not in the snapshot")
    idx = np.unique(idx)
    keep = np.zeros(snap.n_accounts, bool)
    keep[idx] = True
    return idx, keep[snap.pos_account]


def account_greeks(snap: Snapshot, accounts: Sequence[str] | None = None):
    """Greeks of every account's equity per asset it is exposed to, by autodiff (SPEC section 5).

    Equity is SPEC section 2 equity in USD (no haircut), collateral included. Derivatives are
    taken with respect to each asset's price at the snapshot (``S``), every option's implied
    vol on that asset, and time (see the module docstring and ``docs/greeks.md``).

    Args:
      snap: the snapshot.
      accounts: account ids to restrict to (default: every account).

    Returns:
      A DataFrame, one row per account and asset the account is exposed to — an underlying
      or settlement asset of one of its positions, or a non-zero balance — ordered by account
      id, then the snapshot's asset order. Columns: ``account_id``; ``underlying`` (the asset);
      ``delta`` (dE/dS, in units of the asset, collateral coins included); ``gamma``
      (d2E/dS2, USD per unit of the asset squared); ``vega`` (USD per +0.01 of implied vol of
      every option on the asset); ``theta`` (USD per calendar day passing, of the options on
      the asset); ``delta_usd`` (``delta * S``, USD).

    Raises:
      InputError: an id in ``accounts`` is not in the snapshot.

    Example:
      >>> g = stress.greeks(snap)
      >>> g.groupby("underlying").delta_usd.sum()   # exchange-wide USD delta per asset
    """
    return _greeks_rows(snap, accounts)[0]


def _greeks_rows(snap: Snapshot, accounts: Sequence[str] | None):
    """``account_greeks`` and its rows as flat indices into ``[n, A]`` (``_exposed``)."""
    import pandas as pd

    idx, keep = _select(snap, accounts)
    n = len(idx)
    remap = np.full(snap.n_accounts, -1, np.int64)
    remap[idx] = np.arange(n)
    pos_acc = remap[snap.pos_account[keep]].astype(np.int32)
    pos_inst = snap.pos_instrument[keep].astype(np.int32)
    qty = np.asarray(snap.pos_quantity[keep], np.float64)
    bal = np.asarray(snap.balances[idx], np.float64)

    inst = snap.instruments
    g = instrument_greeks(inst, snap.market)
    under = np.asarray(inst.underlying, np.int32)
    s = _account_sums(g, under, pos_acc, pos_inst, qty, n=n)
    P = np.asarray(snap.market.price, np.float64)
    A = len(P)

    rows = _exposed(bal, pos_acc, pos_inst, inst)
    acc, a = rows // A, rows % A
    # each [n, A] sum is taken at the exposed rows and dropped at once: at 1M accounts the
    # dense arrays and their derived copies were most of this function's peak memory
    at = lambda x: x.reshape(-1)[rows]  # noqa: E731
    delta = at(s.pop("dm")) / P[a] + at(bal)  # a balance's USD value is amount * P, its delta the amount
    frame = pd.DataFrame(
        {
            "account_id": account_id_column(snap, idx[acc]),
            "underlying": names_at(snap.assets, a),
            "delta": delta,
            "gamma": at(s.pop("dm2")) / P[a] ** 2,
            "vega": VOL_POINT * at(s.pop("dv")),
            "theta": at(s.pop("dh")),
            "delta_usd": delta * P[a],
        },
        columns=list(COLUMNS),
    )
    return frame, rows



# --------------------------------------------------------------------------------------------
# Hedge suggestion

LOT_DIGITS = 3  # a suggested trade is rounded to 0.001 contract (whole contracts: inverse futures)


@jax.jit
def _market_tables(inst: Instruments, market: Market, params: Any, spot: Any, vol: Any, horizon: Any):
    """Per-contract value, maintenance margin (the first risk-limit tier's), asset prices,
    ``live`` flags and USD notional per contract (what the tiers are of) under ``[S]`` market
    states."""
    rv = pricing.revalue(inst, market, spot, vol, horizon)
    _, mm = margin.per_contract(inst, params, rv["spot"], rv["option"], rv["live"])
    return rv["value"], mm, rv["price"], rv["live"], margin.contract_notional(inst, rv["spot"], rv["live"])


def _path_states(inst: Instruments, snap: Snapshot, scen: Any, value: np.ndarray, live: np.ndarray) -> tuple:
    """The states of the steps before each path's last, appended: ``value`` ``[I, 1 + S]`` (now,
    then each scenario's last step) with a contract that settled earlier along a path held at
    what it settled into (``pricing.hold_settled_paths``), as ``stress run`` values it, and
    ``(value, mm, price, notional)`` of steps ``1 .. K-1``, ``[I or A, (K-1) * S]`` step-major
    (empty for a one-step set): the layout of ``liquidation.path_outcome`` after the first column."""
    if scen.steps < 2:
        none = np.zeros((value.shape[0], 0))
        return value, (value[:, :0], none, np.zeros((snap.n_assets, 0)), none)
    before, mm, price, before_live, notional = _market_tables(inst, snap.market, snap.params, *_path_steps(scen))
    value, before = pricing.hold_settled_paths(value, live, before, before_live)
    return value, (before, np.asarray(mm), np.asarray(price), np.asarray(notional))


def _path_steps(scen: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``spot_mult``, ``vol_shift`` ``[(K-1) * S, A]`` and ``horizon_days`` of the steps before
    each path's last, step-major."""
    step_major = lambda x: np.swapaxes(np.asarray(x), 0, 1).reshape((-1,) + np.shape(x)[2:])  # noqa: E731
    return step_major(scen.path_spot_mult), step_major(scen.path_vol_shift), step_major(scen.path_horizon_days)


@functools.partial(jax.jit, static_argnames=("n_sub",))
def _account_grids(inst: Instruments, market: Market, params: Any, spot: Any, vol: Any, hor: Any, fixed: Any,
                   pos_sub: Any, traded: Any, n_sub: int) -> tuple[Any, Any, Any]:
    """``margin.instrument_grid`` around each state (``spot``, ``vol`` ``[M, A]``, ``hor [M]``),
    ``engine.PM_GRID_BATCH`` states at a time (as the run), each state's reduced at once to ``P = n_sub + K`` rows: the
    ``fixed [U]`` contracts summed per sub-block, then the ``traded [K]`` instruments per
    contract. ``(pnl [M, P, G], delta [M, P], roll [M, P])``, USD; memory grows with the
    states times ``P``, not times the account's instruments."""
    def one(state):
        g = margin.instrument_grid(*margin.shifted(inst, market, *state), params)
        seg = functools.partial(jax.ops.segment_sum, segment_ids=pos_sub, num_segments=n_sub)
        rows = lambda x, q: jnp.concatenate([seg(q.reshape(q.shape + (1,) * (x.ndim - 1)) * x), x[traded]])  # noqa: E731
        return rows(g["pnl"], fixed), rows(g["delta"], fixed), rows(g["roll"], jnp.abs(fixed))

    return margin._each_state(one, (spot, vol, hor), PM_GRID_BATCH)


def _risk_matrices(snap: Snapshot, U: np.ndarray, q0: np.ndarray, traded: np.ndarray, spot: Any, vol: Any,
                   hor: Any) -> _RiskMatrices:
    """The portfolio model's ``_RiskMatrices`` of one account holding ``q0 [U]`` contracts of
    instruments ``U`` and trading ``U[traded]``, around each of the states ``spot``, ``vol``
    ``[M, A]``, ``hor [M]``."""
    from . import sensitivities

    inst, p = snap.instruments, snap.params
    lay = sensitivities.pm_layout(np.zeros(len(U), np.int64), np.asarray(inst.underlying)[U],
                                  np.asarray(inst.settlement)[U], snap.n_assets)
    # What the trade does not change is summed once per sub-block: the held contracts of the
    # instruments not traded. The traded ones follow, per contract.
    fixed = np.where(np.isin(np.arange(len(U)), traded), 0.0, q0)
    Ms = lay["sub_block"].shape[0]
    pnl, delta, roll = _account_grids(jax.tree_util.tree_map(lambda a: np.asarray(a)[U], inst), snap.market, p,
                                      jnp.asarray(spot), jnp.asarray(vol), jnp.asarray(hor), fixed, lay["pos_sub"],
                                      np.asarray(traded), n_sub=Ms)
    u = lay["block_underlying"]
    return _RiskMatrices(
        pnl=jnp.moveaxis(pnl, 0, 1), delta=delta.T, roll=roll.T,
        pos_sub=np.concatenate([np.arange(Ms), lay["pos_sub"][traded]]).astype(np.int32),
        sub_block=lay["sub_block"], sub_offset=np.asarray(p.pm_pnl_offset)[lay["sub_settle"]],
        fraction=np.asarray(p.pm_extended_fraction)[u], max_delta_shock=np.asarray(p.pm_max_delta_shock)[u],
        threshold=np.asarray(p.pm_delta_threshold)[u], mm_factor=p.pm_mm_factor,
        extended=np.asarray(margin.grid_moves(p)[2]))


@pytree_dataclass
class _RiskMatrices:
    """The portfolio model's risk matrices of one account around each of a ``_HedgeBook``'s
    ``M`` states (``margin.scenario_grids``), over ``P = Ms + K`` rows: the account's holdings
    that no trade changes, summed per sub-block (underlying, settlement asset), then each traded
    instrument per contract; and the sub-blocks and blocks (underlying) as
    ``margin.portfolio_requirements`` takes them."""

    pnl: Any  # [P, M, G] USD P&L at each grid point around each state (a sub-block's: its whole)
    delta: Any  # [P, M] USD delta
    roll: Any  # [P, M] USD roll shock
    pos_sub: Any  # [P] int32 sub-block of each row
    sub_block: Any  # [Ms] int32 block of each sub-block
    sub_offset: Any  # [Ms] pnl_offset of the sub-block's settlement asset
    fraction: Any  # [Kb] extended_pnl_fraction of the block's underlying
    max_delta_shock: Any  # [Kb]
    threshold: Any  # [Kb] USD net delta the delta shock spares
    mm_factor: Any  # [] maintenance margin over initial margin
    extended: Any  # [G] bool: extended-table grid points


@pytree_dataclass
class _HedgeBook:
    """One account over the instruments it holds or may trade (``U``), under ``M`` market
    states (the snapshot first, then each scenario)."""

    inst: Any  # [U] int32 instrument index
    q0: Any  # [U] contracts held now (0 for instruments not held)
    hedge: Any  # [K] int32: which of the U instruments the trade is in
    value: Any  # [U, M] value per contract, settlement-asset units
    mm: Any  # [U, M] maintenance margin per contract of weight, USD (standard model)
    settle: Any  # [U, A] one-hot settlement asset
    is_opt: Any  # [U] bool
    balance: Any  # [A] the account's balances
    price: Any  # [A, M] asset prices, USD
    haircut: Any  # [A, M] haircut of each asset at each state (dynamic haircuts: vol-scaled)
    pm: Any = None  # _RiskMatrices under the portfolio model; None: the standard model
    # Dynamic haircuts' concentration add-on (None: static haircuts), margin.haircut_at: the
    # haircut on e > 0 units held is min(cap, haircut + coef * sqrt(e * share))
    hc_coef: Any = None  # [A] add-on per sqrt(share of a day's volume held)
    hc_share: Any = None  # [A] share of a day's volume one unit is (0: no add-on)
    hc_cap: Any = None  # [] the largest haircut
    # Risk-limit tiers of maintenance margin (standard model; None: untiered): a position pays,
    # on its whole notional, every rate step whose bound its notional exceeds in that state
    notional: Any = None  # [U, M] USD notional per contract (0 where settled)
    tier_bound: Any = None  # [U, T-1] USD upper bounds of tiers 1 .. T-1 (inf: none)
    tier_step: Any = None  # [U, T-1] how much the rate rises past each bound


def _state(b: _HedgeBook, x: Any, tau: Any = None) -> tuple[Any, Any, Any]:
    """Equity, collateral value and maintenance margin ``[M]`` after trading ``x [K]``
    contracts at the mark (an option's premium is paid from its settlement asset).

    ``tau`` (USD) smooths the kinks for the search — ``|q|`` in margin weights, the haircut's
    ``max(e, 0)`` and cap — each within about ``tau`` USD; ``None`` is the exact, non-smoothed
    value.
    """
    q = jnp.asarray(b.q0).at[b.hedge].add(x)
    cash = -(x * b.value[b.hedge, 0]) @ b.settle[b.hedge]  # [A] premium paid at the mark
    if tau is None:
        absq = jnp.abs(q)
    else:  # |q| within the contracts whose margin is about tau (1 where a contract needs none)
        if b.pm is None:  # a contract's margin at its largest rate, tiers' steps included
            scale = jnp.max(b.mm, axis=1)
            if b.tier_bound is not None:
                scale = jnp.maximum(scale, jnp.max(b.notional, axis=1) * jnp.sum(b.tier_step, axis=1))
        else:  # only the traded instruments' |q| enters (their roll shock); the others' is fixed
            K = b.hedge.shape[0]
            traded = jnp.max(jnp.abs(b.pm.pnl[-K:]), axis=(1, 2)) + jnp.max(b.pm.roll[-K:], axis=1)
            scale = jnp.zeros(q.shape[0], q.dtype).at[b.hedge].set(traded)
        eps = jnp.where(scale > 0, tau / jnp.where(scale > 0, scale, 1.0), 1.0)
        absq = jnp.sqrt(q * q + eps * eps)
    e = b.balance[:, None] + cash[:, None] + b.settle.T @ (q[:, None] * b.value)  # [A, M]
    usd = e * b.price
    delta_a = None if tau is None else tau / b.price[:, :1]  # asset units worth tau USD
    held = margin.soft_relu(e, delta_a)  # [A, M] units a haircut applies to
    coll = jnp.sum(usd - _haircut(b, held, tau) * held * b.price, axis=0)
    if b.pm is not None:
        return jnp.sum(usd, axis=0), coll, _portfolio_margin(b.pm, q[b.hedge], absq[b.hedge], tau)
    w = jnp.where(b.is_opt, 0.5 * (absq - q), absq)  # margin.position_weight, smoothed
    mm = w @ b.mm
    if b.tier_bound is not None:
        mm = mm + jnp.sum(_tier_extra(absq[:, None] * b.notional, b.tier_bound, b.tier_step, tau), axis=0)
    return jnp.sum(usd, axis=0), coll, mm


def _haircut(b: _HedgeBook, held: Any, tau: Any) -> Any:
    """``[A, M]`` haircut on ``held`` units (``>= 0``) of each asset at each state: the book's,
    plus under dynamic haircuts the concentration add-on, capped (``portfolio.keep_share``);
    with ``tau`` the cap's kink smoothed within about ``tau`` USD of the amount's value."""
    if b.hc_coef is None:
        return b.haircut
    ratio = held * b.hc_share[:, None]
    some = ratio > 0  # the square root is guarded so that its derivative stays finite at 0
    h = b.haircut + jnp.where(some, b.hc_coef[:, None] * jnp.sqrt(jnp.where(some, ratio, 1.0)), 0.0)
    if tau is None:
        return jnp.minimum(h, b.hc_cap)
    width = tau / (held * b.price + tau)  # haircut points worth about tau USD on the amount
    return b.hc_cap - margin.soft_relu(b.hc_cap - h, width)


def _tier_extra(pn: Any, bound: Any, step: Any, tau: Any) -> Any:
    """``[U, M]`` maintenance margin past the first risk-limit tier of positions of notional
    ``pn [U, M]`` USD (``portfolio.tier_extra``): exact with ``tau`` None; else each step
    ``1[pn > bound]`` a sigmoid over ``tau / step`` USD of notional, the span over which the
    step's rate moves the margin by about ``tau`` (a bound of inf never passed)."""
    if tau is None:
        return pn * portfolio.rate_steps(pn, bound[:, None, :], step[:, None, :])
    passed = (jnp.isfinite(bound) & (step > 0))[:, None, :]  # [U, 1, T-1] bounds a notional can pass
    over = pn[..., None] - jnp.where(passed, bound[:, None, :], 0.0)  # [U, M, T-1]
    width = tau / jnp.where(step > 0, step, 1.0)[:, None, :]
    return pn * jnp.sum(jnp.where(passed, step[:, None, :] * jax.nn.sigmoid(over / width), 0.0), axis=-1)


def _portfolio_margin(t: _RiskMatrices, q: Any, absq: Any, tau: Any) -> Any:
    """``[M]`` the portfolio model's maintenance margin at each state, USD
    (``margin.portfolio_requirements`` summed over the account's blocks), holding ``q [K]``
    contracts of the traded instruments (``absq``: ``|q|``, smoothed as ``_state`` does);
    ``tau`` smooths the model's kinks."""
    one_each = jnp.ones(t.pnl.shape[0] - q.shape[0], q.dtype)  # the fixed rows hold their sums
    q, absq = jnp.concatenate([one_each, q]), jnp.concatenate([one_each, absq])

    def one(pnl, delta, roll):  # one state: [P, G], [P], [P]
        r = margin.portfolio_requirements(
            q[:, None] * pnl, q * delta, absq * roll, t.pos_sub, t.sub_block, t.sub_offset, t.fraction,
            t.max_delta_shock, t.threshold, t.mm_factor, t.extended, tau,
            n_sub=t.sub_block.shape[0], n_block=t.fraction.shape[0])
        return jnp.sum(r["maintenance_margin"])

    return jax.vmap(one, in_axes=(1, 1, 1))(t.pnl, t.delta, t.roll)


TRADE_COST = 1e-4  # tie-break: 1 bp of the notional traded, so the smallest of equal trades wins


@jax.jit
def _smooth_objective(y: Any, scale: Any, b: _HedgeBook, tau: Any) -> Any:
    """Soft maximum over market states of ``margin - collateral``, USD, plus ``TRADE_COST``
    on the notional traded; ``y`` is the trade in USD of notional per instrument
    (``x = y / scale`` contracts), ``tau`` the smoothing in USD."""
    _, coll, mm = _state(b, y / scale, tau)
    return tau * jax.nn.logsumexp((mm - coll) / tau) + TRADE_COST * jnp.sum(jnp.sqrt(y * y + tau * tau))


@jax.jit
def _newton_parts(y: Any, scale: Any, b: _HedgeBook, tau: Any) -> tuple[Any, Any, Any]:
    f, g = jax.value_and_grad(_smooth_objective)(y, scale, b, tau)
    return f, g, jax.hessian(_smooth_objective)(y, scale, b, tau)


_exact_state = jax.jit(_state)


def _minimise(b: _HedgeBook, scale: np.ndarray, size: float, steps: int = 30) -> np.ndarray:
    """Damped Newton on the smoothed objective, the smoothing shrunk from ``size * 1e-2`` to
    ``size * 1e-7`` USD (a continuation: each stage starts where the last ended). The
    objective is convex (margin is convex in the quantities, collateral concave), so this
    ends near a minimum of the exact objective, within about the last smoothing; but for
    risk-limit tiers, whose steps make the margin jump with a position's notional, and dynamic
    haircuts past their cap, where collateral is no longer concave in the amount held: there
    it ends at a local minimum (where the Hessian is not positive, it is shifted until it is,
    so each step still descends)."""
    y = np.zeros(len(scale))
    for tau in size * 10.0 ** -np.arange(2.0, 8.0):
        for _ in range(steps):
            f, g, H = (np.asarray(v) for v in _newton_parts(y, scale, b, tau))
            mu = 1e-9 * max(np.abs(np.diag(H)).max(), 1e-300)
            mu = max(mu, mu - 1.01 * float(np.linalg.eigvalsh(0.5 * (H + H.T)).min()))
            newton = -np.linalg.solve(H + mu * np.eye(len(y)), g)
            if float(g @ newton) > -1e-12 * max(abs(float(f)), size):
                break  # no descent left at this smoothing
            # Where the objective is locally linear (between tier bounds, its Hessian about
            # 1e-17) the Newton step is absurdly long and no backtracking rescues it: then a
            # steepest-descent step from the scale of the trade and the account.
            steepest = -g / np.linalg.norm(g) * max(np.abs(y).max(), size)
            for step in (newton, steepest):
                t = _backtrack(lambda z: float(_smooth_objective(z, scale, b, tau)), y, f, float(g @ step), step)
                if t:
                    break
            else:
                break
            y = y + t * step
    return y / scale


def _best_lot(b: _HedgeBook, x: np.ndarray, lot: np.ndarray) -> np.ndarray:
    """The trade on the lot grid next to ``x [K]`` (each instrument rounded down or up: every
    combination for up to 6 instruments, else to the nearest) with the best exact worst excess;
    ties go to the nearest. Rounding to the nearest can cross a risk-limit tier's bound that the
    search stopped at, and cost the whole step there."""
    down = np.floor(x / lot) * lot
    if len(x) > 6:
        choices = [np.round(x / lot) * lot]
    else:
        choices = [np.array(c) for c in itertools.product(*zip(down, down + lot))]

    def worst(c):
        _, coll, mm = _exact_state(b, c)
        return float(np.min(np.asarray(coll) - np.asarray(mm)))
    scored = [(-worst(c), float(np.abs(c - x).sum()), k) for k, c in enumerate(choices)]
    best = choices[min(scored)[2]]
    return np.where(lot == 1.0, np.round(best), np.round(best, LOT_DIGITS)) + 0.0


def _backtrack(f: Callable[[np.ndarray], float], y: np.ndarray, f0: float, decrease: float, step: np.ndarray) -> float:
    """The largest ``t`` in 1, 1/2, 1/4 ... > 1e-10 with ``f(y + t step)`` down by at least
    ``1e-4 * t`` of the first-order ``decrease`` (Armijo), or 0 where none is."""
    t = 1.0
    while t > 1e-10:
        if f(y + t * step) <= f0 + 1e-4 * t * decrease:
            return t
        t *= 0.5
    return 0.0


def default_hedge_instruments(snap: Snapshot, account: int) -> list[str]:
    """The perpetuals on the account's underlyings: for each asset that some perpetual is on
    and that the account has positions on or a balance in, the perpetual it already trades,
    else one settled in an asset it holds, else any; the first by id among several (so the
    choice does not depend on the instruments table's row order)."""
    inst = snap.instruments
    kind, under, settle = (np.asarray(x) for x in (inst.kind, inst.underlying, inst.settlement))
    mine = snap.pos_instrument[snap.pos_account == account]
    held_assets = set(np.flatnonzero(snap.balances[account] != 0)) | set(settle[mine])
    exposed = set(under[mine]) | set(np.flatnonzero(snap.balances[account] != 0))
    out = []
    for a in range(snap.n_assets):
        perps = np.flatnonzero((kind == PERPETUAL) & (under == a))
        if a not in exposed or not len(perps):
            continue
        held = [i for i in perps if i in set(mine)]
        funded = [i for i in perps if settle[i] in held_assets]
        out.append(min(str(snap.instrument_ids[i]) for i in (held or funded or list(perps))))
    return out


def hedge(snap: Snapshot, account_id: str, instruments: Sequence[str] | None = None, scenarios: Any = None) -> dict:
    """The trade in ``instruments`` that most improves the account's worst-case margin excess.

    The objective is the account's largest ``maintenance margin - collateral value`` (USD)
    over the snapshot and every scenario of the set: the shortfall in its worst state when
    positive, minus its margin headroom there otherwise. Reducing it lowers losses in the
    stressed states and counts the margin the hedge itself needs. (Under the standard model
    margin is summed per position, so a trade in another instrument can only add margin; the
    snapshot's maintenance margin alone goes down only by closing positions. Under the
    portfolio model, whose risk matrices net an underlying's positions, it can fall.) The
    margin is the snapshot's model, standard (untiered) or portfolio. The trade is
    found by damped Newton steps on a smoothed version of that convex, piecewise-linear
    objective (gradient and Hessian with respect to the quantities by ``jax.grad`` /
    ``jax.hessian``), rounded to a lot, then re-evaluated exactly; a trade that does not improve
    the exact objective is not suggested (an empty trade).

    Args:
      snap: the snapshot. account_id: the account.
      instruments: ids of the instruments to trade (default: ``default_hedge_instruments``).
      scenarios: a ``Scenarios`` set (default: the built-in default set).

    Returns:
      A dict: ``account_id``; ``instruments``; ``trade`` ({instrument id: contracts}, signed,
      at the mark; options pay their premium from the settlement asset); ``before`` and
      ``after``, each with ``maintenance_margin``, ``collateral_value``, ``equity`` (now),
      ``worst_excess`` (min over now and every step of every scenario of collateral -
      margin, USD), ``worst_state`` (``"now"``, the scenario's name, or a path's with its
      step), ``shortfall_worst`` (the largest of the shortfall now and, per scenario, at the
      step that decides it, as ``stress run`` takes it), ``pnl_worst`` (over the scenarios, at
      that step, before closing costs) and ``delta`` ({asset: delta}); ``scenarios`` (how many).

    Raises:
      InputError: an unknown account or instrument id, no instrument to trade, or margin it does
        not model (``margin.require_per_contract``: the var model, tiers under the standard
        model, dynamic haircuts).
    """
    acc = int(_select(snap, [account_id])[0][0])
    if instruments is None:
        instruments = default_hedge_instruments(snap, acc)
        if not instruments:
            raise InputError("--with", None, None, f"account {account_id!r} has no underlying with a perpetual: name instruments to trade")
    b, hedge_ix, scenarios = _book(snap, acc, instruments, scenarios)
    inst, kind = snap.instruments, np.asarray(snap.instruments.kind)
    # Variables in USD of notional, so the Newton regularisation treats instruments alike.
    S0 = np.asarray(snap.market.price)[np.asarray(inst.underlying)[hedge_ix]]
    c = np.asarray(inst.contract_size)[hedge_ix]
    inverse_fut = np.asarray(inst.inverse)[hedge_ix] & (kind[hedge_ix] != OPTION)
    scale = np.where(inverse_fut, c, c * S0)
    before = _report(snap, b, np.zeros(len(hedge_ix)), scenarios)
    # The smoothing's scale: the margin now and how far the worst state's excess falls below
    # now's, what a hedge moves. Not the equity: an idle balance shifts every state alike, and
    # as a scale it coarsened the search (407 USD off the optimum on 1e10 USDC).
    swing = before["collateral_value"] - before["maintenance_margin"] - before["worst_excess"]
    size = max(before["maintenance_margin"], swing, 1.0)
    lot = np.where(inverse_fut, 1.0, 10.0 ** -LOT_DIGITS)
    x = _best_lot(b, _minimise(b, scale, size), lot)
    after = _report(snap, b, x, scenarios)
    if not after["worst_excess"] > before["worst_excess"]:  # no improvement: suggest nothing
        x, after = np.zeros_like(x), before
    ids = snap.instrument_ids.astype(str)
    return {
        "account_id": account_id,
        "instruments": [str(ids[i]) for i in hedge_ix],
        "trade": {str(ids[i]): float(v) for i, v in zip(hedge_ix, x) if v != 0},
        "before": before,
        "after": after,
        "scenarios": len(scenarios),
    }


def evaluate(snap: Snapshot, account_id: str, trade: dict[str, float], scenarios: Any = None) -> dict:
    """Exact numbers of an account after a trade at the mark (the ``after`` of ``hedge``).

    Args:
      snap: the snapshot. account_id: the account. trade: {instrument id: contracts, signed}.
      scenarios: a ``Scenarios`` set (default: the built-in default set).

    Returns:
      The dict described under ``hedge`` (``before``/``after``) for that trade.
    """
    acc = int(_select(snap, [account_id])[0][0])
    b, _, scenarios = _book(snap, acc, list(trade), scenarios)
    return _report(snap, b, np.asarray(list(trade.values()), np.float64), scenarios)


def _book(snap: Snapshot, acc: int, instruments: Sequence[str], scenarios: Any):
    """The account's ``_HedgeBook`` over its instruments and ``instruments`` (in that order of
    trade variables), under the snapshot and ``scenarios``."""
    from . import scenarios as scen_mod

    margin.require_per_contract(snap, "stress hedge", models=("standard", "portfolio"), tiers=True, dynamic=True)

    ids = list(snap.instrument_ids.astype(str))
    for i in instruments:
        if i not in ids:
            raise InputError("--with", None, None, f"unknown instrument id {i!r}")
    if len(set(instruments)) != len(instruments):
        raise InputError("--with", None, None, "an instrument is named twice")
    if scenarios is None:
        scenarios = scen_mod.load_scenarios(scen_mod.default_path(), snap, skip_unknown_assets=True)
    liquidation.check_lag(liquidation.config(snap.liquidation_config), scenarios)  # a set built in Python
    inst = snap.instruments
    mine = snap.pos_account == acc
    hedge_ix = np.array([ids.index(i) for i in instruments], np.int64)
    U = np.unique(np.concatenate([snap.pos_instrument[mine], hedge_ix]))
    q0 = np.zeros(len(U))
    q0[np.searchsorted(U, snap.pos_instrument[mine])] = snap.pos_quantity[mine]
    A = snap.n_assets
    spot = np.vstack([np.ones((1, A)), scenarios.spot_mult])
    vol = np.vstack([np.zeros((1, A)), scenarios.vol_shift])
    hor = np.concatenate([[0.0], scenarios.horizon_days])
    value, mm, price, live, notional = (np.asarray(x) for x in _market_tables(inst, snap.market, snap.params, spot,
                                                                              vol, hor))
    # every step of a path is a state: a hedge that keeps the excess up at each leaves no breach
    value, steps = _path_states(inst, snap, scenarios, value, live)
    value, mm, price, notional = (np.concatenate([a, b], axis=1) for a, b in zip((value, mm, price, notional), steps))
    pm, tiers = None, {}
    ladder = engine._tiers(snap.params, snap.params.tier_mm)  # the run's (bound, step), or None
    if snap.margin_config.get("model", "standard") == "standard" and ladder is not None:
        tiers = {"notional": notional[U], "tier_bound": np.asarray(ladder[0])[U], "tier_step": np.asarray(ladder[1])[U]}
    if scenarios.steps > 1:  # every state's market, in the tables' order: now, the last steps, the steps before
        spot, vol, hor = (np.concatenate([a, b]) for a, b in zip((spot, vol, hor), _path_steps(scenarios)))
    if snap.margin_config.get("model", "standard") == "portfolio":
        pm = _risk_matrices(snap, U, q0, np.searchsorted(U, hedge_ix), spot, vol, hor)
    p = snap.params
    haircut = {"haircut": np.repeat(np.asarray(p.haircut, np.float64)[:, None], price.shape[1], axis=1)}
    if p.haircut_dynamic:  # vol-scaled at each state, and the concentration add-on, as the run
        haircut = {"haircut": np.asarray(margin.scaled_haircut(p, vol), np.float64).T,
                   "hc_coef": np.asarray(p.haircut_concentration, np.float64),
                   "hc_share": np.asarray(margin.unit_share(p, np.asarray(snap.market.price)), np.float64),
                   "hc_cap": np.float64(p.haircut_max)}
    b = _HedgeBook(
        inst=U.astype(np.int32), q0=q0, hedge=np.searchsorted(U, hedge_ix).astype(np.int32), value=value[U], mm=mm[U],
        settle=np.eye(A)[np.asarray(inst.settlement)[U]], is_opt=np.asarray(inst.kind)[U] == OPTION,
        balance=np.asarray(snap.balances[acc], np.float64), price=price, pm=pm, **haircut, **tiers,
    )
    return b, hedge_ix, scenarios


def _report(snap: Snapshot, b: _HedgeBook, x: np.ndarray, scen: Any) -> dict:
    """Exact (non-smoothed) numbers of the account after trading ``x``."""
    eq, coll, mm = (np.asarray(v) for v in _exact_state(b, x))
    excess = coll - mm  # [M]: now, each scenario's last step, then the steps before (step-major)
    k = int(np.argmin(excess))
    # the shortfall and P&L stress run reports: at the step that decides each path
    lag = liquidation.config(snap.liquidation_config)["oracle_lag_steps"]
    eq_d, coll_d, mm_d, _ = (np.asarray(v)[0] for v in liquidation.path_outcome(
        len(scen), jnp.asarray(eq[None, 1:]), jnp.asarray(coll[None, 1:]), jnp.asarray(mm[None, 1:]), lag=lag,
        length=jnp.asarray(scen.length)))
    # Delta: balances (less the premium paid) plus each instrument's dE/dm / S.
    g = instrument_greeks(snap.instruments, snap.market)
    U, hedge = np.asarray(b.inst), np.asarray(b.hedge)
    q = np.asarray(b.q0).copy()
    np.add.at(q, hedge, x)
    cash = -(x * np.asarray(b.value)[hedge, 0]) @ np.asarray(b.settle)[hedge]
    amount = np.asarray(b.balance) + cash
    delta = amount + (q @ np.asarray(g["dm"])[U]) / np.asarray(snap.market.price)
    exposed = amount != 0
    live = U[q != 0]
    exposed[np.asarray(snap.instruments.underlying)[live]] = True
    exposed[np.asarray(snap.instruments.settlement)[live]] = True
    return {
        "maintenance_margin": float(mm[0]),
        "collateral_value": float(coll[0]),
        "equity": float(eq[0]),
        "worst_excess": float(excess[k]),
        "worst_state": _state_name(scen, k),
        "shortfall_worst": float(max(0.0, mm[0] - coll[0], np.max(mm_d - coll_d, initial=0.0))),
        "pnl_worst": float(np.min(eq_d - eq[0])) if len(eq) > 1 else float("nan"),
        "delta": {snap.assets[a]: float(delta[a]) for a in np.flatnonzero(exposed)},
    }


def _state_name(scen: Any, k: int) -> str:
    """State ``k`` of a ``_HedgeBook``: ``now``, a scenario, or a path's step (``mc:0042 step
    2/4``)."""
    if k == 0:
        return "now"
    S, K = len(scen), scen.steps
    s, step = (k - 1, K) if k <= S else ((k - 1 - S) % S, (k - 1 - S) // S + 1)
    return f"{scen.names[s]} step {step}/{K}" if K > 1 and scen.random[s] else scen.names[s]


def gross_notional(snap: Snapshot):
    """Gross notional per account and underlying at the snapshot, USD (SPEC section 2: ``|q| c``
    for inverse futures and perpetuals, ``|q| c S`` otherwise), as a DataFrame with
    ``account_id``, ``underlying`` and ``gross_notional``: the size a liquidation would have to
    close, beside the Greeks' net exposure."""
    import pandas as pd

    total, held = _gross(snap)
    keys = np.flatnonzero(held)
    A = snap.n_assets
    return pd.DataFrame({"account_id": account_id_column(snap, keys // A),
                         "underlying": names_at(snap.assets, keys % A), "gross_notional": total[keys]})


def exposure(snap: Snapshot):
    """``account_greeks`` of every account with ``gross_notional`` beside (NaN where the account
    has no position on that underlying): the report's exposure rows.

    The same rows as merging the two frames on (account, underlying), matched here by integer
    codes: merging 2.4M rows on their id strings held about 300 MiB more at 1M accounts.
    """
    g, rows = _greeks_rows(snap, None)  # every account: rows index [n, A] directly
    total, held = _gross(snap)
    g["gross_notional"] = np.where(held[rows], total[rows], np.nan)
    return g


def _gross(snap: Snapshot) -> tuple[np.ndarray, np.ndarray]:
    """``(notional, held)``, each flat ``[n * A]`` by (account, underlying): the sum of the
    positions' gross notional, USD, and whether the account holds any position on it."""
    from .margin import position_notional

    inst = snap.instruments
    und = np.asarray(inst.underlying)
    spot = np.asarray(snap.market.price)[und]
    notional = position_notional(inst, snap.pos_instrument, np.asarray(snap.pos_quantity), spot, xp=np)
    size = snap.n_accounts * snap.n_assets
    key = snap.pos_account.astype(np.int64) * snap.n_assets + und[snap.pos_instrument]
    return np.bincount(key, weights=notional, minlength=size), np.bincount(key, minlength=size) > 0


def _exposed(bal: np.ndarray, pos_account: np.ndarray, pos_instrument: np.ndarray, inst: Instruments) -> np.ndarray:
    """The (account, asset) pairs an account is exposed to, as flat indices into ``[n, A]`` in
    row-major order (by account, then asset): a non-zero balance ``bal`` ``[n, A]``, or the
    underlying or settlement asset of one of its positions."""
    exposed = bal != 0
    exposed[pos_account, np.asarray(inst.underlying)[pos_instrument]] = True
    exposed[pos_account, np.asarray(inst.settlement)[pos_instrument]] = True
    return np.flatnonzero(exposed)


class _CallableModule(types.ModuleType):
    """``stress.greeks(snap, accounts=None)``: ``account_greeks``; the rest of the module
    (``hedge``, ``instrument_greeks``) stays reachable as ``stress.greeks.hedge``.

    The name ``stress.greeks`` is both the SPEC's function and this module; making the module
    callable (and its own ``greeks`` attribute) keeps every way of reaching it the same
    object, whichever import ran first.
    """

    def __call__(self, snap: Snapshot, accounts: Sequence[str] | None = None):
        return account_greeks(snap, accounts)


sys.modules[__name__].__class__ = _CallableModule
greeks = sys.modules[__name__]

