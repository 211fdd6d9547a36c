"""Sensitivities of exchange-wide stress totals by autodiff: to asset prices and vols, to the
risk parameters in ``Params``, and the Euler allocation of bad debt and shortfall to accounts.

The whole exchange is one pure function (``totals``) of

- ``x [A]``: a relative price perturbation, every state's price of asset ``a`` times
  ``1 + x_a`` (the snapshot's and every scenario's);
- ``dv [A]``: an implied-vol perturbation added to every option on underlying ``a``;
- ``params``: the ``Params`` pytree (margin rates, haircuts, ...);
- ``lam [n]``: a scale of each account's whole book (positions and balances), 1 at the
  snapshot, used only for the Euler allocation;

evaluated at ``x = 0, dv = 0, lam = 1``. It follows the engine's definitions (``engine.run``,
SPEC section 2). Multi-step paths are revalued at every step and each account is taken at the
step that decides its path, as the engine does: the first step where its collateral is below
its maintenance margin (closed out there, an oracle lag late where one is set, paying the
price impact and the liquidation fee), else the last step (``first_breach``).
The insurance fund is valued at the last step's prices. In formulas:

- per account ``i`` and state ``s``: net amount of asset ``a``
  ``e_ias = lam_i * (balance_ia + sum_p q_p * value_ps)`` over its positions settled in
  ``a``; equity ``sum_a e_ias * P_as``; collateral ``sum_a (1 - h_a [e_ias > 0]) e_ias P_as``;
  maintenance margin ``lam_i * sum_p w_p * mm_ps`` (``margin.per_contract``, standard model,
  as the engine);
- per state: ``maintenance_margin = sum_i MM_is``; ``shortfall = sum_i max(0, MM_is - C_is)``;
  ``bad_debt = sum_i max(0, -E_is)``; fund ``F_s = sum_a fund_a P_as``;
  ``insurance_fund_after = max(0, F_s - bad_debt_s)``;
- ``p_fund_depleted_smooth = mean over random scenarios of sigmoid((bad_debt_s - F_s) / tau)``
  with the temperature ``tau = TEMPERATURE_FRACTION * F_now`` (1% of the fund's value at the
  snapshot, USD); the exact share (``bad_debt > 0 and bad_debt >= F``) is reported beside it.

``max(0, x)`` and the haircut's ``[e > 0]`` have kinks; autodiff gives the derivative of the
side the point is on, a one-sided derivative (at an exact tie JAX's ``maximum`` splits it
evenly; ties have probability zero with real books). The gradients are those of the piecewise-smooth function
where it is smooth: an account's margin gap counts while it is positive. Shifted vols are
floored at 0.01, or at the mark where that is lower (``pricing.floor_vol``); an option
shifted onto the floor has zero vega, as in the valuation.

No array of the size ``accounts x scenarios x assets`` is built: positions gather from
``[I, S]`` instrument tables into ``[N, S]`` terms, which segment-sum into ``M`` (account,
asset) slots ``[M, S]`` and then accounts ``[n, S]``. Reverse mode keeps these, so memory is
of the order of ``(positions + slots) x scenarios x steps x 8 bytes`` times a few. The
accounts are therefore taken in chunks (``account_chunks``, about ``CHUNK_CELLS`` positions x
states each): the totals are sums over accounts, so the forward pass adds the chunks' sums,
the objectives' derivatives in those sums are taken once (``_outer``), and each chunk pulls
them back through its own accounts (``_chunk_pullback``, reverse mode, ``jax.vjp``); the
chunks' gradients add up. Memory is bounded by a chunk, not by the exchange.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import liquidation, margin, portfolio, pricing
from ._tree import pytree_dataclass
from .errors import InputError
from .scenarios import Scenarios
from .snapshot import OPTION, Params, Snapshot

PRICE_BUMP = 0.01  # price sensitivities are per +1% of the asset's price
VOL_BUMP = 0.01  # vol sensitivities are per +0.01 (one vol point) of implied vol
PARAM_BUMP = 0.01  # rates and haircuts: per +0.01 (one percentage point)
TEMPERATURE_FRACTION = 0.01  # smoothing of p_fund_depleted: 1% of the fund's value now
KIND_NAMES = {0: "future", 1: "perpetual", 2: "option"}
GRID_BATCH = 32  # states revalued at a time in pm_grids (reverse mode recomputes them per batch)

# The scalar objectives differentiated, in order: (total, scope). ``now`` is the unshocked
# snapshot, ``sum`` the sum over the scenarios, ``worst`` the worst scenario (largest bad
# debt, then largest shortfall, then file order, as engine.run), ``random`` the random ones.
OBJECTIVES = (
    ("maintenance_margin", "now"),
    ("maintenance_margin", "sum"),
    ("maintenance_margin", "worst"),
    ("shortfall", "sum"),
    ("shortfall", "worst"),
    ("bad_debt", "sum"),
    ("bad_debt", "worst"),
    ("insurance_fund_after", "sum"),
    ("insurance_fund_after", "worst"),
    ("p_fund_depleted_smooth", "random"),
)


@pytree_dataclass
class Book:
    """The exchange's holdings in COO form and the scenario states, as device arrays.

    ``M`` slots are the distinct (account, asset) pairs with a balance or a position settled
    in the asset; state 0 is the unshocked snapshot, then the ``K`` steps of the ``S``
    scenarios in time order, step-major (``K = 1`` without paths).
    """

    pos_slot: Any  # [N] int32 slot of each position (its account and settlement asset)
    pos_account: Any  # [N] int32 account of each position
    pos_instrument: Any  # [N] int32
    pos_quantity: Any  # [N] contracts, signed
    slot_account: Any  # [M] int32
    slot_asset: Any  # [M] int32
    slot_balance: Any  # [M] balance of the slot's asset, in its units
    fund: Any  # [A] insurance fund balances
    spot_mult: Any  # [1 + K * S, A] price over the snapshot price: now, then step-major paths
    vol_shift: Any  # [1 + K * S, A]
    horizon_days: Any  # [1 + K * S]
    random: Any  # [S] float 1.0 for a random (Monte Carlo / replay) scenario
    length: Any  # [S] int32: the path's own steps before it only repeats its state (Scenarios.length)
    temperature: Any  # [] USD, smoothing of p_fund_depleted
    # Risk-limit tiers of maintenance margin (engine._tiers): a position pays, on its whole
    # notional, every rate step whose bound its notional exceeds; None: untiered.
    tier_bound: Any = None  # [I, T-1] USD notional bounds of tiers 1 .. T-1
    tier_step: Any = None  # [I, T-1] how much the rate rises past each bound
    lag: int = dataclasses.field(default=0, metadata={"static": True})  # oracle lag, steps (paths only)
    # Portfolio margin model (None: standard): positions summed into sub-blocks (account,
    # underlying, settlement asset) and blocks (account, underlying), margin.portfolio_requirements.
    pos_sub: Any = None  # [N] int32 sub-block of each position
    sub_block: Any = None  # [Ms] int32 block of each sub-block
    sub_settle: Any = None  # [Ms] int32 settlement asset of each sub-block
    block_account: Any = None  # [Kb] int32
    block_underlying: Any = None  # [Kb] int32
    # Partial liquidation ([liquidation] mode = "partial"; None: full close-out at the breach)
    partial_target: Any = None  # [] collateral / maintenance margin after a partial close
    slot_rank: Any = None  # [M] int32 place of the slot among its account's (slot_width: padding)
    slot_width: int = dataclasses.field(default=0, metadata={"static": True})  # J: most slots of one account
    # Partial liquidation under risk-limit tiers: positions laid out [account, Q] (partial_path
    # finds each position's tier at the share of the book held)
    pos_rank: Any = None  # [N] int32 place of the position among its account's (pos_width: padding)
    pos_width: int = dataclasses.field(default=0, metadata={"static": True})  # Q: most positions of one account
    steps: int = dataclasses.field(default=1, metadata={"static": True})  # K: the states' steps per scenario


def book(snap: Snapshot, scen: Scenarios, tau: float | None = None) -> Book:
    """Lay out the snapshot's holdings as slots and every step of the scenarios as states;
    ``tau`` overrides the temperature of ``p_fund_depleted_smooth`` (USD)."""
    A = snap.n_assets
    settle = np.asarray(snap.instruments.settlement)[snap.pos_instrument].astype(np.int64)
    b_acc, b_asset = np.nonzero(snap.balances)
    pos_key = snap.pos_account.astype(np.int64) * A + settle
    keys = np.unique(np.concatenate([pos_key, b_acc.astype(np.int64) * A + b_asset]))
    slot_acc, slot_asset = keys // A, keys % A
    # States in time order, step-major: now, step 1 of every scenario, ..., the last step.
    steps_spot, steps_vol, steps_hor = [scen.spot_mult[:, None]], [scen.vol_shift[:, None]], [scen.horizon_days[:, None]]
    if scen.steps > 1:
        steps_spot.insert(0, scen.path_spot_mult)
        steps_vol.insert(0, scen.path_vol_shift)
        steps_hor.insert(0, scen.path_horizon_days)
    path = lambda parts: np.concatenate(parts, axis=1).swapaxes(0, 1).reshape((-1,) + parts[0].shape[2:])
    spot = np.vstack([np.ones((1, A)), path(steps_spot)])
    vol = np.vstack([np.zeros((1, A)), path(steps_vol)])
    hor = np.concatenate([[0.0], path(steps_hor)])
    fund_now = float(np.asarray(snap.insurance_fund, np.float64) @ np.asarray(snap.market.price, np.float64))
    from .engine import _tiers

    model = snap.margin_config.get("model", "standard")
    tiers = _tiers(snap.params, snap.params.tier_mm) if model == "standard" else None  # the portfolio model's has none
    cfg = liquidation.config(snap.liquidation_config)
    liquidation.check_lag(cfg, scen)  # a snapshot or a set built or changed in Python
    partial = {}
    if cfg["mode"] == "partial":  # slots laid out [account, J] for liquidation.partial_path
        first = np.searchsorted(slot_acc, slot_acc)  # slots are sorted by account
        rank = np.arange(len(slot_acc)) - first
        partial = {"partial_target": np.float64(cfg["partial_target"]), "slot_rank": rank.astype(np.int32),
                   "slot_width": int(rank.max(initial=0)) + 1}
        if tiers is not None:
            p_rank = portfolio._rank_in_group_unsorted(np.asarray(snap.pos_account, np.int64))
            partial |= {"pos_rank": p_rank.astype(np.int32), "pos_width": int(p_rank.max(initial=0)) + 1}
    pm = {}
    if model == "portfolio":
        pm = pm_layout(snap.pos_account, np.asarray(snap.instruments.underlying)[snap.pos_instrument], settle, A)
    return Book(
        pos_slot=np.searchsorted(keys, pos_key).astype(np.int32),
        pos_account=snap.pos_account.astype(np.int32),
        pos_instrument=snap.pos_instrument.astype(np.int32),
        pos_quantity=np.asarray(snap.pos_quantity, np.float64),
        slot_account=slot_acc.astype(np.int32),
        slot_asset=slot_asset.astype(np.int32),
        slot_balance=np.asarray(snap.balances, np.float64)[slot_acc, slot_asset],
        fund=np.asarray(snap.insurance_fund, np.float64),
        spot_mult=spot, vol_shift=vol, horizon_days=hor,
        random=np.asarray(scen.random, np.float64),
        length=np.asarray(scen.length, np.int32),
        temperature=np.float64(default_temperature(fund_now) if tau is None else tau),
        tier_bound=None if tiers is None else np.asarray(tiers[0]),
        tier_step=None if tiers is None else np.asarray(tiers[1]),
        lag=int(cfg["oracle_lag_steps"]),
        steps=int(scen.steps),
        **pm,
        **partial,
    )


def pm_layout(pos_account: np.ndarray, pos_underlying: np.ndarray, pos_settle: np.ndarray, A: int) -> dict:
    """``Book``'s portfolio-model fields for positions of ``pos_account`` (numbered from 0):
    sub-blocks (account, underlying, settlement asset) and blocks (account, underlying), in
    key order."""
    key = (np.asarray(pos_account, np.int64) * A + pos_underlying) * A + pos_settle
    subs, pos_sub = np.unique(key, return_inverse=True)
    blocks, sub_block = np.unique(subs // A, return_inverse=True)
    return {"pos_sub": pos_sub.astype(np.int32), "sub_block": sub_block.astype(np.int32),
            "sub_settle": (subs % A).astype(np.int32), "block_account": (blocks // A).astype(np.int32),
            "block_underlying": (blocks % A).astype(np.int32)}


def pm_grids(x: Any, dv: Any, params: Params, inst: Any, market: Any, b: Book) -> dict:
    """The portfolio model's risk matrix around every state of the book, revalued once per
    (state, grid point) for the whole exchange: ``pnl [1 + K * S, I, G]``, ``delta``,
    ``roll`` ``[1 + K * S, I]``, USD per contract (``margin.scenario_grids``)."""
    return margin.scenario_grids(inst, market, params, b.spot_mult * (1.0 + x)[None, :], b.vol_shift + dv[None, :],
                                 b.horizon_days, batch=GRID_BATCH)


def default_temperature(fund_now: float) -> float:
    """Smoothing of ``p_fund_depleted``, USD: ``TEMPERATURE_FRACTION`` of the fund's value at
    the snapshot (1 USD for an empty fund, so the sigmoid stays defined)."""
    return max(TEMPERATURE_FRACTION * fund_now, 1.0)


def account_states(x: Any, dv: Any, params: Params, lam: Any, inst: Any, market: Any, b: Book,
                   n: int, impact: Any = None, grids: Any = None, settled: Any = None) -> dict[str, Any]:
    """Equity, collateral and maintenance margin per account and state, USD.

    Args:
      x: ``[A]`` relative price perturbation. dv: ``[A]`` vol perturbation.
      params: risk parameters. lam: ``[n]`` book scale per account. inst, market: the
      snapshot's instruments and market. b: the laid-out book. n: accounts (static).
      impact: ``(closed, liquidation.Impact)``, or None: the contracts every instrument closes
        out exchange-wide at each state (``closed_contracts``, ``[2, I, 1 + K * S]``) and the
        impact parameters, from which each account's price-impact charge is computed.
      grids: the portfolio model's ``pm_grids``, from which maintenance margin is computed
        when the book has the portfolio model's layout (revalued here when None).
      settled: for a book of one path step's states only (a scan over the steps, ``calibrate``),
        the ``"settled"`` this returned at the step before (None at the first): contracts that
        settled along the path keep what they settled into (``pricing.hold_settled``, which
        a book of every step applies itself).

    Returns:
      ``equity``, ``collateral``, ``maintenance_margin``, ``notional`` (gross, USD) and, with
      ``impact``, ``impact`` (the charge of closing the whole book there): ``[n, 1 + K * S]``
      each, in the book's state order (state 0 the snapshot); ``price``: ``[A, 1 + K * S]``,
      USD; ``settled``: each instrument's value per contract and ``live`` ``[I, states]``.
    """
    rv = pricing.revalue(inst, market, b.spot_mult * (1.0 + x)[None, :], b.vol_shift + dv[None, :], b.horizon_days)
    _, mm = margin.per_contract(inst, params, rv["spot"], rv["option"], rv["live"])  # [I, 1+S]
    value = _held_along_paths(rv["value"], rv["live"], b.steps, settled)
    M = b.slot_account.shape[0]
    held = jax.ops.segment_sum(b.pos_quantity[:, None] * value[b.pos_instrument], b.pos_slot, num_segments=M)
    e = lam[b.slot_account][:, None] * (b.slot_balance[:, None] + held)  # [M, 1+S] asset units
    usd = e * rv["price"][b.slot_asset]
    # Haircut on a positive net amount only; the where keeps both branches' gradients finite.
    hc = slot_haircuts(dv, params, market, b)
    coll = jnp.where(e > 0, portfolio.keep_share(hc, None, e), 1.0) * usd
    w = margin.position_weight(inst.kind[b.pos_instrument], b.pos_quantity)
    per_position = w[:, None] * mm[b.pos_instrument]  # [N, 1+S] USD
    seg = functools.partial(jax.ops.segment_sum, segment_ids=b.slot_account, num_segments=n)
    notional = margin.contract_notional(inst, rv["spot"], rv["live"])  # per contract, USD, as the engine
    absq = jnp.abs(b.pos_quantity)[:, None]
    pn = absq * notional[b.pos_instrument]  # [N, 1+S] each position's notional, USD
    flat = per_position
    if b.tier_bound is not None:  # the tier its notional is in at each state (portfolio.tier_extra)
        bound, step = b.tier_bound[b.pos_instrument][:, None, :], b.tier_step[b.pos_instrument][:, None, :]
        per_position = per_position + pn * portfolio.rate_steps(pn, bound, step)
    m = lam[:, None] * jax.ops.segment_sum(per_position, b.pos_account, num_segments=n)
    if b.pos_sub is not None:  # grids not given: revalued here (callers that chunk pass them)
        m = portfolio_maintenance(params, lam, inst, b, n, pm_grids(x, dv, params, inst, market, b) if grids is None else grids,
                                  parts=b.partial_target is not None)
        if b.partial_target is not None:  # what the margin of a share of each book is made of
            m, lin, delta = m
            out_blocks = liquidation.Blocks.per_asset(lin, delta, params.pm_max_delta_shock, params.pm_delta_threshold,
                                                      params.pm_mm_factor)
    g = jax.ops.segment_sum(pn, b.pos_account, num_segments=n)
    out = {"equity": seg(usd), "collateral": seg(coll), "maintenance_margin": m,
           "notional": lam[:, None] * g, "price": rv["price"], "settled": (value, rv["live"])}
    if b.partial_target is not None:  # what liquidation.partial_path needs, per slot
        if b.pos_sub is not None:
            out["blocks"] = out_blocks
        out["slots"] = (lam[b.slot_account][:, None] * held, lam[b.slot_account] * b.slot_balance,
                        rv["price"][b.slot_asset], hc)
    if b.pos_rank is not None:  # and under tiers: the first tier's margin, the notional per contract, |q|
        out["tiered"] = (lam[:, None] * jax.ops.segment_sum(flat, b.pos_account, num_segments=n), notional,
                         lam[b.pos_account] * absq[:, 0])
    if impact is not None:
        charge = impact_charge(impact[0], notional, impact[1], inst.underlying)  # [I, 1+K*S]
        out["impact"] = lam[:, None] * jax.ops.segment_sum(absq * charge[b.pos_instrument], b.pos_account, num_segments=n)
    return out


def _held_along_paths(value: Any, live: Any, K: int, before: Any) -> Any:
    """``value`` ``[I, states]`` with contracts that settled along a path held at what they
    settled into: one step's states after ``before`` (``account_states``' ``settled``), or a book
    of every step (now, then ``K`` steps of every scenario, step-major; ``K = 1``: nothing to
    hold)."""
    if before is not None:
        return pricing.hold_settled_step(value, live, before)
    if K < 2:
        return value
    I, S = value.shape[0], (value.shape[1] - 1) // K
    steps = pricing.hold_settled(value[:, 1:].reshape(I, K, S), live[:, 1:].reshape(I, K, S), axis=1)
    return jnp.concatenate([value[:, :1], steps.reshape(I, K * S)], axis=1)


def slot_haircuts(dv: Any, params: Params, market: Any, b: Book) -> Any:
    """Each slot's haircut: ``[M]`` static, or a per-slot ``portfolio.Haircut`` (``base``
    ``[M, 1 + K * S]`` vol-scaled at each state's vol shift; the concentration add-on on the
    slot's net amount, ``portfolio.keep_share``). The add-on's share of a day's volume is at
    the unperturbed snapshot price (a quantity, as in the engine), so prices do not move it."""
    a = b.slot_asset
    if not params.haircut_dynamic:
        return params.haircut[a]
    return portfolio.Haircut(base=margin.scaled_haircut(params, (b.vol_shift + dv[None, :]).T[a], a[:, None]),
                             coef=params.haircut_concentration[a], share=margin.unit_share(params, market.price)[a],
                             cap=params.haircut_max)


def portfolio_maintenance(params: Params, lam: Any, inst: Any, b: Book, n: int, grids: dict, parts: bool = False) -> Any:
    """``[n, 1 + K * S]`` portfolio-model maintenance margin per account and state, USD, from
    the risk matrices ``grids`` (``pm_grids``): ``margin.portfolio_requirements`` per state
    over the book's sub-blocks and blocks, summed per account. The book is scaled by ``lam``
    position by position (the delta shock's threshold makes the model not quite homogeneous).
    With ``parts``, also what the margin of a share of each book is made of, laid out as the
    engine's (``portfolio.portfolio_margin``): ``(margin, lin [n, states], delta [n, A,
    states])``."""
    q = lam[b.pos_account] * b.pos_quantity
    i = b.pos_instrument
    u = b.block_underlying
    extended = margin.grid_moves(params)[2]

    def one(state):  # the risk matrices around one state -> [n]
        pnl, delta, roll = state
        r = margin.portfolio_requirements(
            q[:, None] * pnl[i], q * delta[i], jnp.abs(q) * roll[i], b.pos_sub, b.sub_block,
            params.pm_pnl_offset[b.sub_settle], params.pm_extended_fraction[u], params.pm_max_delta_shock[u],
            params.pm_delta_threshold[u], params.pm_mm_factor, extended,
            n_sub=b.sub_block.shape[0], n_block=b.block_account.shape[0])
        m = jax.ops.segment_sum(r["maintenance_margin"], b.block_account, num_segments=n)
        if not parts:
            return m
        lin = params.pm_mm_factor * jax.ops.segment_sum(r["risk_matrix"] + r["roll_shock"], b.block_account, num_segments=n)
        delta = jnp.zeros((n, b.spot_mult.shape[1]), m.dtype).at[b.block_account, u].add(jnp.abs(r["net_delta"]))
        return m, lin, delta

    out = jax.lax.map(one, (grids["pnl"], grids["delta"], grids["roll"]))
    if not parts:
        return out.T
    m, lin, delta = out  # [states, n], [states, n], [states, n, A]
    return m.T, lin.T, jnp.moveaxis(delta, 0, -1)


def impact_charge(closed: Any, notional: Any, imp: Any, underlying: Any) -> Any:
    """``[I, states]`` USD per contract closed: each instrument's price-impact cost
    (``liquidation.impact_cost`` of the net notional it closes out exchange-wide) shared pro
    rata to the contracts each liquidated account closes, as the engine's pass 1.

    ``closed`` ``[2, I, states]`` (net, gross contracts) is held fixed: who is liquidated is
    piecewise constant in every input, so the charge moves with prices (the notional) and the
    impact parameters only. The square root is guarded so that an instrument that closes
    nothing has a zero, not a NaN, derivative."""
    X = jnp.abs(closed[0] * notional)
    safe = jnp.where(X > 0, X, 1.0)
    p = lambda v: v[underlying][:, None]  # noqa: E731
    cost = jnp.where(X > 0, X * (p(imp.spread) + p(imp.k) * p(imp.daily_vol) * jnp.sqrt(safe / p(imp.daily_volume))), 0.0)
    return jnp.where(closed[1] > 0, cost / jnp.where(closed[1] > 0, closed[1], 1.0), 0.0)


def _to_tiles(x: Any, K: int, S: int) -> Any:
    """``[..., 1 + K * S]`` in the book's state order (now, then steps 1 .. K step-major) ->
    ``[..., K * S]`` in the engine's tile layout (the last step first, then steps 1 .. K-1)."""
    steps = x[..., 1:].reshape(x.shape[:-1] + (K, S))
    return jnp.concatenate([steps[..., K - 1:, :], steps[..., : K - 1, :]], axis=-2).reshape(x.shape[:-1] + (K * S,))


def _from_tiles(x: Any, K: int, S: int) -> Any:
    """``_to_tiles``' inverse without the snapshot column: ``[..., K * S]`` -> ``[..., K * S]``."""
    blocks = x.reshape(x.shape[:-1] + (K, S))
    return jnp.concatenate([blocks[..., 1:, :], blocks[..., :1, :]], axis=-2).reshape(x.shape)


def partial_outcome(st: dict, b: Book, n: int, fee_rate: Any, impact: Any = None) -> dict:
    """Partial liquidation along every path, as the engine: ``liquidation.partial_path`` on
    the book's slots laid out ``[n, J]`` (``slot_rank``) and its states in the engine's tile
    layout. ``st``: ``account_states`` with its ``slots``; ``impact``: ``[n, 1 + K * S]``
    charge of closing the whole book, or None. Returns ``partial_path``'s dict (``[n, S]``
    values; ``closed`` ``[n, K * S]`` in the tile layout)."""
    S = b.random.shape[0]
    K = (st["collateral"].shape[1] - 1) // S
    J = b.slot_width
    value, balance, price, hc = st["slots"]

    def dense(v):  # [M, ...] -> [n, J, ...]; padding slots (rank J) are dropped
        return jnp.zeros((n, J) + v.shape[1:], v.dtype).at[b.slot_account, b.slot_rank].add(v, mode="drop")

    if isinstance(hc, portfolio.Haircut):
        keep = portfolio.Haircut(base=dense(_to_tiles(hc.base, K, S)), coef=dense(hc.coef), share=dense(hc.share),
                                 cap=hc.cap)
    else:
        keep = dense(hc)
    tiles = lambda x: _to_tiles(x, K, S)  # noqa: E731
    mm, tiers = st["maintenance_margin"], None
    if b.pos_rank is not None:  # [n, Q] positions: partial_path finds their tiers at the share held
        mm, per_contract, qty = st["tiered"]
        by_position = lambda v: jnp.zeros((n, b.pos_width), v.dtype).at[b.pos_account, b.pos_rank].add(  # noqa: E731
            v, mode="drop")
        tiers = liquidation.Tiered(whole=tiles(st["maintenance_margin"]), qty=by_position(qty),
                                   inst=by_position(b.pos_instrument), per_contract=tiles(per_contract),
                                   bound=b.tier_bound, step=b.tier_step)
    blocks = st.get("blocks")
    if blocks is not None:  # [n, A] blocks: partial_path finds the delta shocks at the share held
        blocks = dataclasses.replace(blocks, lin=tiles(blocks.lin), delta=tiles(blocks.delta))
    return liquidation.partial_path(S, dense(tiles(value)), dense(balance), dense(tiles(price)), keep,
                                    tiles(mm), tiles(st["notional"]), b.partial_target,
                                    fee_rate, None if impact is None else tiles(impact), tiers=tiers, blocks=blocks,
                                    length=b.length)


def first_breach(eq: Any, coll: Any, mm: Any, S: int, *more: Any, lag: int = 0, length: Any = None) -> tuple[Any, ...]:
    """Each account's state at the step that decides each path: the first step where its
    collateral is below its maintenance margin (it is closed out there, as
    ``liquidation.path_outcome`` in the engine), else the last step. With an oracle ``lag``
    of ``k`` steps a breach at step ``t`` is acted on at step ``t + k`` (at that step's
    values), and a breach in the last ``k`` steps not at all; one-step scenarios have no lag.

    Args:
      eq, coll, mm: ``[n, 1 + K * S]``: now, then the ``K`` steps of every scenario, step-major.
      S: scenarios. more: further ``[n, 1 + K * S]`` arrays to take at the same step.
      length: ``[S]`` each path's own steps (``liquidation.acted``), or None.

    Returns:
      ``(eq, coll, mm, *more, liquidated)``, each ``[n, 1 + S]``: now, then the deciding step
      of each scenario, and whether the account is closed out there (column 0: ``mm > coll``
      now). Which step decides is piecewise constant in every input, so gradients flow
      through the values at that step only (margin parameters move bad debt by jumps, not by
      slopes).
    """
    n, cols = eq.shape
    K = (cols - 1) // S
    if K == 1:
        return (eq, coll, mm, *more, mm > coll)
    timed = lambda x: x[:, 1:].reshape(n, K, S)  # noqa: E731
    step, hit = _deciding_step(coll, mm, S, lag, length)
    pick = lambda x: jnp.concatenate([x[:, :1], jnp.take_along_axis(timed(x), step[:, None, :], axis=1)[:, 0]], axis=1)  # noqa: E731
    return (*(pick(x) for x in (eq, coll, mm, *more)), jnp.concatenate([mm[:, :1] > coll[:, :1], hit], axis=1))


def _deciding_step(coll: Any, mm: Any, S: int, lag: int = 0, length: Any = None) -> tuple[Any, Any]:
    """``(step, liquidated)``, each ``[n, S]``: the step that decides each account's path (its
    first breach, ``lag`` steps late, else the last) and whether it is closed out there
    (``first_breach``)."""
    n, cols = coll.shape
    K = (cols - 1) // S
    breach = (mm[:, 1:] > coll[:, 1:]).reshape(n, K, S)
    if K > 1:  # step t acts on step t - lag's breach, within the path's length
        breach = liquidation.acted(breach, lag, length)
    hit = breach.any(axis=1)
    return jnp.where(hit, jnp.argmax(breach, axis=1), K - 1), hit


def closed_contracts(x: Any, dv: Any, params: Params, inst: Any, market: Any, b: Book, n: int, grids: Any = None,
                     fee_rate: Any = 0.0) -> Any:
    """``[2, I, 1 + K * S]``: the net (signed: longs closed are sold, > 0) and gross contracts
    each instrument closes out at each state (0 at the snapshot), summed over the book's
    accounts: the engine's pass 1 of the price impact. Sums over disjoint sets of accounts
    add up, so chunks of accounts are summed."""
    st = account_states(x, dv, params, jnp.ones(n), inst, market, b, n, grids=grids)
    S = b.random.shape[0]
    K = (st["collateral"].shape[1] - 1) // S
    if b.partial_target is not None:  # the share of the book closed at each step
        closed = partial_outcome(st, b, n, fee_rate)["closed"]  # [n, K * S], tile layout
        at = jnp.concatenate([jnp.zeros((n, 1)), _from_tiles(closed, K, S)], axis=1)
    else:
        step, hit = _deciding_step(st["collateral"], st["maintenance_margin"], S, b.lag, b.length)
        at = (jnp.arange(K)[None, :, None] == step[:, None, :]) & hit[:, None, :]  # [n, K, S]
        at = jnp.concatenate([jnp.zeros((n, 1)), at.reshape(n, K * S).astype(jnp.float64)], axis=1)
    q = b.pos_quantity[:, None] * at[b.pos_account]  # [N, 1 + K * S]
    I = inst.kind.shape[0]
    return jnp.stack([jax.ops.segment_sum(q, b.pos_instrument, num_segments=I),
                      jax.ops.segment_sum(jnp.abs(q), b.pos_instrument, num_segments=I)])


def state_sums(x: Any, dv: Any, params: Params, lam: Any, inst: Any, market: Any, b: Book, n: int,
               fee_rate: Any = 0.0, impact: Any = None, grids: Any = None) -> Any:
    """``[5, 1 + S]``: the sums over the book's accounts of maintenance margin, margin
    shortfall, bad debt, liquidation fees and price-impact costs per state, USD. Sums over
    disjoint sets of accounts add up, which is what lets ``sensitivities`` chunk the accounts.
    As in the engine, a liquidated account pays the impact (``impact``, see
    ``account_states``; it can create bad debt), then the fee (``liquidation.fee``:
    ``fee_rate`` of the notional it closes out, capped at what equity remains, so it never
    adds bad debt)."""
    st = account_states(x, dv, params, lam, inst, market, b, n, impact, grids)
    if b.partial_target is not None:
        r = partial_outcome(st, b, n, fee_rate, st.get("impact"))
        now = lambda k: st[k][:, 0]  # noqa: E731  (state 0, the snapshot: nothing is closed)
        first = lambda v0, v: jnp.concatenate([v0[None], jnp.sum(v, axis=0)])  # noqa: E731
        zero = jnp.zeros(())
        return jnp.stack([first(jnp.sum(now("maintenance_margin")), r["margin"]),
                          first(jnp.sum(jnp.maximum(now("maintenance_margin") - now("collateral"), 0.0)),
                                jnp.maximum(r["margin"] - r["collateral"], 0.0)),
                          first(jnp.sum(jnp.maximum(-now("equity"), 0.0)), jnp.maximum(-r["equity"], 0.0)),
                          first(zero, r["fee"]), first(zero, r["impact"])])
    eq, coll, mm, g, *imp, liq = first_breach(st["equity"], st["collateral"], st["maintenance_margin"], b.random.shape[0],
                                              st["notional"], *([st["impact"]] if impact is not None else []), lag=b.lag,
                                              length=b.length)
    cost = jnp.where(liq, imp[0], 0.0) if impact is not None else jnp.zeros_like(eq)
    fees = liquidation.fee(eq - cost, g, liq, fee_rate)
    return jnp.stack([jnp.sum(mm, axis=0), jnp.sum(jnp.maximum(mm - coll, 0.0), axis=0),
                      jnp.sum(jnp.maximum(cost - eq, 0.0), axis=0), jnp.sum(fees, axis=0), jnp.sum(cost, axis=0)])


def exchange_totals(sums: Any, x: Any, market: Any, b: Book) -> dict[str, Any]:
    """Exchange totals per state (``[1 + S]``, state 0 the snapshot), USD, and the smoothed
    ``p_fund_depleted_smooth`` ``[]`` over the random scenarios (see the module docstring),
    from the accounts' ``state_sums`` and the price perturbation ``x`` (the fund's value)."""
    S = b.random.shape[0]
    price = market.price[:, None] * (b.spot_mult * (1.0 + x)[None, :]).T  # as pricing.revalue
    fund = b.fund @ jnp.concatenate([price[:, :1], price[:, -S:]], axis=1)  # now, last steps
    mm, shortfall, bad, fees, impact = sums
    gap = (bad[1:] - fund[1:] - fees[1:]) / b.temperature  # the fees are paid in first
    n_random = jnp.maximum(jnp.sum(b.random), 1.0)
    return {
        "maintenance_margin": mm,
        "shortfall": shortfall,
        "bad_debt": bad,
        "insurance_fund_before": fund,
        "insurance_fund_after": jnp.maximum(fund + fees - bad, 0.0),
        "fees": fees,
        "impact_cost": impact,
        "p_fund_depleted_smooth": jnp.sum(b.random * jax.nn.sigmoid(gap)) / n_random,
    }


def totals(x: Any, dv: Any, params: Params, lam: Any, inst: Any, market: Any, b: Book, n: int) -> dict[str, Any]:
    """Exchange totals per state (``[1 + S]``, state 0 the snapshot), USD, and the smoothed
    ``p_fund_depleted_smooth`` ``[]`` over the random scenarios (see the module docstring).

    Keys: ``maintenance_margin``, ``shortfall``, ``bad_debt``, ``insurance_fund_before``,
    ``insurance_fund_after``, ``p_fund_depleted_smooth``. Pure and differentiable in ``x``,
    ``dv``, ``params`` and ``lam``.
    """
    return exchange_totals(state_sums(x, dv, params, lam, inst, market, b, n), x, market, b)


def objectives(x, dv, params, lam, inst, market, b: Book, worst: Any, n: int) -> Any:
    """The ``OBJECTIVES`` as one vector ``[len(OBJECTIVES)]``; ``worst`` is the worst
    scenario's index in ``0..S-1`` (state ``1 + worst``)."""
    return reduced(totals(x, dv, params, lam, inst, market, b, n), worst)


def reduced(t: dict, worst: Any) -> Any:
    """``exchange_totals`` reduced to the ``OBJECTIVES`` vector."""

    def reduce(v, scope):
        if scope == "now":
            return v[0]
        if scope == "sum":
            return jnp.sum(v[1:])
        if scope == "worst":
            return v[1 + worst]
        return v  # "random": already a mean over the random scenarios

    return jnp.stack([reduce(t[name], scope) for name, scope in OBJECTIVES])


CHUNK_CELLS = 1 << 23  # positions x states per chunk of accounts (reverse mode keeps ~100 B a cell)

_state_sums = jax.jit(state_sums, static_argnames=("n",))
_closed_contracts = jax.jit(closed_contracts, static_argnames=("n",))
_pm_grids = jax.jit(pm_grids)
_exchange_totals = jax.jit(exchange_totals)


@functools.partial(jax.jit, static_argnames=("n",))
def _chunk_pullback(x, dv, params, lam, fee_rate, imp, grids, closed, inst, market, b: Book, cotangents: Any, n: int):
    """One chunk's share of the Jacobian: ``state_sums``' reverse mode in ``(x, dv, params,
    lam, fee_rate, imp, grids, closed)`` for each row of ``cotangents`` ``[K, 5, 1 + S]`` (d
    objective / d sums); ``closed`` is the exchange-wide ``closed_contracts`` (its cotangent
    matters under partial liquidation, where the shares closed are smooth). One forward pass
    keeps its residuals (``jax.vjp``); the ``K`` rows are pulled back one after another
    (``lax.map``), so the backward pass holds one cotangent of the ``[N, S]`` size at a time.
    The portfolio model's ``grids`` are an input: the exchange's, revalued once, pulled back
    into prices, vols and parameters once after every chunk has added its share."""
    def f(x, dv, p, lam, fr, im, gr, cl):
        return state_sums(x, dv, p, lam, inst, market, b, n, fr, None if im is None else (cl, im), gr)

    _, pullback = jax.vjp(f, x, dv, params, lam, fee_rate, imp, grids, closed)
    return jax.lax.map(pullback, cotangents)


@functools.partial(jax.jit, static_argnames=("n",))
def _closed_pullback(x, dv, params, fee_rate, grids, inst, market, b: Book, cotangents: Any, n: int):
    """One chunk's ``closed_contracts`` in reverse mode, in ``(x, dv, params, fee_rate,
    grids)``, for each row of ``cotangents`` ``[K, 2, I, 1 + K * S]``: under partial
    liquidation the contracts closed move smoothly with every input, and with them the impact
    charge per contract."""
    def f(x, dv, p, fr, gr):
        return closed_contracts(x, dv, p, inst, market, b, n, gr, fr)

    _, pullback = jax.vjp(f, x, dv, params, fee_rate, grids)
    return jax.lax.map(pullback, cotangents)


@jax.jit
def _outer(sums: Any, x: Any, market: Any, b: Book, worst: Any):
    """The objectives, and their Jacobian in the summed state totals and (through the fund's
    value) in ``x``."""
    f = lambda s, xx: reduced(exchange_totals(s, xx, market, b), worst)  # noqa: E731
    return f(sums, x), jax.jacrev(f, argnums=(0, 1))(sums, x)


def account_chunks(b: Book, n: int, cells: int = CHUNK_CELLS) -> tuple[int, list[tuple[int, Book]]]:
    """Split the book into chunks of ``C`` consecutive accounts, each a ``Book`` of its own
    with accounts, slots and positions renumbered from 0 and padded to one shape (padding
    holds 0 contracts and 0 balances, so it adds nothing), so one compilation serves all.

    ``C`` keeps an average chunk's positions x states near ``cells``. Returns ``(C, [(first
    account, chunk book), ...])``.
    """
    states = b.spot_mult.shape[0]
    N = max(len(b.pos_account), 1)
    C = int(min(n, max(1, cells * n // (N * states))))
    p_order = np.argsort(b.pos_account, kind="stable")
    p_acc = np.asarray(b.pos_account)[p_order]
    lo_acc = np.arange(0, n, C)
    p_cut = np.searchsorted(p_acc, np.r_[lo_acc, n])
    s_cut = np.searchsorted(np.asarray(b.slot_account), np.r_[lo_acc, n])  # slots are by account
    P = max(1, int(np.diff(p_cut).max()))
    M = max(1, int(np.diff(s_cut).max()))

    def take(x, rows, size, shift=0):  # rows of x, renumbered by shift, padded with zeros to size
        x = np.asarray(x)
        return np.pad(x[rows] - shift, (0, size - len(rows))).astype(x.dtype)

    layouts = [{} for _ in lo_acc]
    if b.pos_sub is not None:  # the portfolio model's blocks, renumbered within each chunk
        A = b.fund.shape[0]
        sub = np.asarray(b.pos_sub)
        und = np.asarray(b.block_underlying)[np.asarray(b.sub_block)[sub]]
        settle = np.asarray(b.sub_settle)[sub]
        for k, a0 in enumerate(lo_acc):
            p = p_order[p_cut[k]:p_cut[k + 1]]
            layouts[k] = pm_layout(np.asarray(b.pos_account)[p] - a0, und[p], settle[p], A)
        size = {f: max(1, max(len(lay[f]) for lay in layouts)) for f in layouts[0]}
        layouts = [{f: np.pad(v, (0, size[f] - len(v))) for f, v in lay.items()} for lay in layouts]

    out = []
    for k, a0 in enumerate(lo_acc):
        p, s0 = p_order[p_cut[k]:p_cut[k + 1]], s_cut[k]
        sl = np.arange(s0, s_cut[k + 1])
        out.append((int(a0), dataclasses.replace(
            b,
            pos_slot=take(b.pos_slot, p, P, s0), pos_account=take(b.pos_account, p, P, a0),
            pos_instrument=take(b.pos_instrument, p, P), pos_quantity=take(b.pos_quantity, p, P),
            slot_account=take(b.slot_account, sl, M, a0), slot_asset=take(b.slot_asset, sl, M),
            slot_balance=take(b.slot_balance, sl, M), **layouts[k],
            **({} if b.slot_rank is None else
               {"slot_rank": np.pad(np.asarray(b.slot_rank)[sl], (0, M - len(sl)), constant_values=b.slot_width)}),
            **({} if b.pos_rank is None else
               {"pos_rank": np.pad(np.asarray(b.pos_rank)[p], (0, P - len(p)), constant_values=b.pos_width)}),
        )))
    return C, out


def _jacobian(x, dv, params, fee_rate, imp, inst, market, b: Book, n: int, cells: int = CHUNK_CELLS):
    """Totals, the worst scenario, objective values and their reverse-mode Jacobian in
    ``(x, dv, params, lam, fee_rate, imp)``, chunk of accounts by chunk: exchange totals are
    sums over accounts, so each chunk pulls back the objectives' cotangents in those sums, and
    the chunks' gradients add up (``lam``'s are placed). With price impact (``imp`` a
    ``liquidation.Impact``), a first forward pass sums the contracts closed exchange-wide."""
    grids = grid_pullback = None
    if b.pos_sub is not None:  # portfolio model: every risk matrix once, for every chunk
        grids, grid_pullback = jax.vjp(lambda x, dv, p: _pm_grids(x, dv, p, inst, market, b), x, dv, params)
        cells = max(1, cells // int(grids["pnl"].shape[-1]))  # a position's work is G points per state
    if b.partial_target is not None:  # partial_path holds [accounts, J slots, states] blocks, several of them
        cells = max(1, cells // (2 * b.slot_width))
    if b.pos_rank is not None:  # and [accounts, Q positions, states, tiers] blocks in its bisection
        cells = max(1, cells // (b.pos_width * max(1, b.tier_bound.shape[1])))
    C, chunks = account_chunks(b, n, cells)
    lam = jnp.ones(C)
    closed = None
    if imp is not None:  # the engine's pass 1: who closes out what, before any closing cost
        closed = sum(np.asarray(_closed_contracts(x, dv, params, inst, market, bc, n=C, grids=grids, fee_rate=fee_rate))
                     for _, bc in chunks)
    impact = None if imp is None else (closed, imp)
    sums = sum(np.asarray(_state_sums(x, dv, params, lam, inst, market, bc, n=C, fee_rate=fee_rate, impact=impact,
                                      grids=grids), np.float64) for _, bc in chunks)
    t = {k: np.asarray(v) for k, v in _exchange_totals(sums, x, market, b).items()}
    worst = worst_scenario(t["bad_debt"][1:], t["shortfall"][1:])
    values, (d_sums, d_x) = _outer(sums, x, market, b, worst)
    shared = None  # (x, dv, params, fee_rate, imp, grids) gradients, summed over the chunks
    gl = np.zeros((len(OBJECTIVES), n))
    add = lambda a, b: b if a is None else jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
    d_closed = None
    for a0, bc in chunks:
        cx, cv, cp, cl, cf, ci, cg, cc = _chunk_pullback(x, dv, params, lam, fee_rate, imp, grids, closed, inst, market,
                                                         bc, d_sums, n=C)
        shared = add(shared, (cx, cv, cp, cf, ci, cg))
        d_closed = add(d_closed, cc)
        gl[:, a0:a0 + C] = np.asarray(cl)[:, : n - a0]
    if closed is not None and b.partial_target is not None:  # through pass 1: shares closed are smooth
        for _, bc in chunks:
            cx, cv, cp, cf, cg = _closed_pullback(x, dv, params, fee_rate, grids, inst, market, bc, d_closed, n=C)
            gx_, gv_, gp_, gf_, gi_, gg_ = shared
            shared = (gx_ + cx, gv_ + cv, add(gp_, cp), gf_ + cf, gi_, add(gg_, cg))
    if grid_pullback is not None:  # the risk matrices' share, into prices, vols and parameters
        via = jax.lax.map(grid_pullback, shared[5])
        shared = (*jax.tree_util.tree_map(jnp.add, shared[:3], via), *shared[3:])
    gx, gv, gp, gf, gi, _ = jax.tree_util.tree_map(np.asarray, shared)
    return t, worst, np.asarray(values), (np.asarray(d_x) + gx, gv, gp, gl, gf, gi)


def worst_scenario(bad_debt: np.ndarray, shortfall: np.ndarray) -> int:
    """Largest bad debt; ties (or none anywhere) by the largest shortfall, then file order
    (SPEC section 5, as ``engine.run``)."""
    return int(np.lexsort((np.arange(len(bad_debt)), -shortfall, -bad_debt))[0])


def safe_instruments(inst: Any, market: Any) -> Any:
    """``inst`` with the strike of futures and perpetuals set to their underlying's price.

    ``pricing.revalue`` evaluates Black-Scholes for every instrument and keeps it for options
    only (``jnp.where``); with a futures strike of 0 the discarded branch has ``log(S / 0)``,
    whose reverse-mode derivative is ``0 / 0``, and a NaN cotangent survives the ``where``.
    A positive strike keeps the discarded branch finite; nothing else reads a future's strike,
    so values and margins are unchanged.
    """
    is_opt = np.asarray(inst.kind) == OPTION
    price = np.asarray(market.price, np.float64)[np.asarray(inst.underlying)]
    return dataclasses.replace(inst, strike=np.where(is_opt, np.asarray(inst.strike, np.float64), price))


def _settings(snap: Snapshot) -> dict:
    """The snapshot's ``[liquidation]`` settings. The differentiable model follows every
    setting ``stress run`` models: full (first breach, an oracle lag late) or partial
    close-out, price impact and the liquidation fee, the standard (tiers included) and
    portfolio margin models, static and dynamic haircuts. The var model, whose margin under
    stress is an expected shortfall over the windows around every state, is refused."""
    if snap.margin_config.get("model", "standard") == "var":
        raise InputError("exchange.toml", "[margin]", "model",
                         "stress sensitivities does not differentiate the var model (an expected shortfall over "
                         "historical windows around every state); use model = \"standard\" or \"portfolio\"")
    return liquidation.config(snap.liquidation_config)


def _float_params(params: Params) -> Params:
    """``params`` with every leaf a float64 array (autodiff needs inexact inputs)."""
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)


def sensitivities(snap: Snapshot, scen: Scenarios, *, temperature: float | None = None,
                  cells: int = CHUNK_CELLS) -> dict:
    """Gradients of the exchange's stress totals, by reverse-mode autodiff of ``totals``.

    Args:
      snap: the snapshot. scen: the scenario set (every step of a path is revalued; each
        account is taken at its first breach of maintenance margin, else the last step).
      temperature: smoothing of ``p_fund_depleted_smooth``, USD (> 0); default
        ``TEMPERATURE_FRACTION`` of the fund's value at the snapshot.
      cells: positions x states per chunk of accounts (memory; results do not depend on it).

    Returns:
      A dict:

      - ``totals``: DataFrame, one row per objective (``total``, ``scope``: ``now``, ``sum``
        over scenarios, ``worst`` scenario, ``random`` scenarios), its ``value`` (USD, or a
        probability) and, for ``p_fund_depleted_smooth``, ``exact`` (the unsmoothed share).
      - ``scenarios``: DataFrame, one row per scenario: ``scenario``, ``maintenance_margin``,
        ``shortfall_total``, ``bad_debt``, ``fees`` (liquidation fees, paid into the fund),
        ``insurance_fund_before``, ``insurance_fund_after``.
      - ``market``: tidy DataFrame, one row per (``factor`` price or vol, ``asset``, ``total``,
        ``scope``): ``sensitivity``, the change per ``bump`` (+1% of the price, +0.01 of vol),
        USD (probability for ``p_fund_depleted_smooth``).
      - ``params``: tidy DataFrame, one row per (``parameter``, ``group``, ``total``,
        ``scope``): ``value`` (the parameter, mean over the group), ``gradient`` (per +1.00),
        ``sensitivity`` (per +0.01). ``mm_rate`` and ``im_rate`` are per instrument, summed
        per underlying and kind (the derivative of moving the group's rates together);
        ``haircut`` per asset; ``option_im_floor`` and ``fee_rate`` (``[liquidation]``) one row each.
      - ``accounts``: DataFrame, one row per account: ``bad_debt_worst`` (Euler allocation of
        the worst scenario's bad debt), ``shortfall_worst`` and ``shortfall_sum`` (of the
        worst scenario's and the summed total shortfall); each column sums to its total.
      - ``worst_scenario``, ``temperature`` (USD), ``p_fund_depleted`` (exact, None without
        random scenarios), ``p_fund_depleted_smooth``.

    Raises:
      InputError: an empty scenario set, or a temperature that is not > 0.
    """
    import pandas as pd

    if len(scen) == 0:
        raise InputError(scen.source or "scenarios", None, None, "no scenarios to differentiate over")
    if temperature is not None and not (np.isfinite(temperature) and temperature > 0):
        raise InputError("--temperature", None, None, f"{temperature!r} must be a number > 0 (USD)")
    n, A = snap.n_accounts, snap.n_assets
    b = book(snap, scen, temperature)
    params = _float_params(snap.params)
    market = snap.market
    inst = safe_instruments(snap.instruments, market)
    zero = jnp.zeros(A)
    cfg = _settings(snap)
    fee = cfg["fee_rate"]
    imp = None
    if cfg["impact"]:
        imp = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), liquidation.impact_params(snap))
    t, worst, values, (gx, gv, gp, gl, gf, gi) = _jacobian(zero, zero, params, jnp.float64(fee), imp, inst, market,
                                                           b, n, cells)

    S = len(scen)
    rnd = np.asarray(scen.random)
    fund, bad = t["insurance_fund_before"][1:], t["bad_debt"][1:]
    fees = t["fees"][1:]
    exact = float(((bad > 0) & (bad >= fund + fees))[rnd].mean()) if rnd.any() else None
    totals_df = pd.DataFrame({"total": [o[0] for o in OBJECTIVES], "scope": [o[1] for o in OBJECTIVES],
                              "value": values})
    totals_df["exact"] = np.where(totals_df.total == "p_fund_depleted_smooth",
                                  np.nan if exact is None else exact, totals_df.value)
    if not rnd.any():  # no random scenarios: the probability is undefined (SPEC section 5)
        totals_df.loc[totals_df.total == "p_fund_depleted_smooth", ["value", "exact"]] = np.nan
    scenarios = pd.DataFrame({
        "scenario": list(scen.names),
        "maintenance_margin": t["maintenance_margin"][1:],
        "shortfall_total": t["shortfall"][1:],
        "bad_debt": bad,
        "fees": fees,
        "impact_cost": t["impact_cost"][1:],
        "insurance_fund_before": fund,
        "insurance_fund_after": t["insurance_fund_after"][1:],
    })
    market_df = _market_frame(snap, gx, gv, rnd.any())
    params_df = _params_frame(snap, gp, fee, gf, gi, cfg["impact"], rnd.any())
    k_bad = OBJECTIVES.index(("bad_debt", "worst"))
    k_sw = OBJECTIVES.index(("shortfall", "worst"))
    k_ss = OBJECTIVES.index(("shortfall", "sum"))
    # Euler: each total is positively homogeneous of degree 1 in every account's scale lam_i,
    # so total = sum_i lam_i dT/dlam_i at lam = 1: the gradient row is the allocation.
    accounts = pd.DataFrame({
        "account_id": snap.account_ids.astype(str),
        "bad_debt_worst": gl[k_bad],
        "shortfall_worst": gl[k_sw],
        "shortfall_sum": gl[k_ss],
    })
    return {
        "totals": totals_df,
        "scenarios": scenarios,
        "market": market_df,
        "params": params_df,
        "accounts": accounts,
        "worst_scenario": scen.names[worst],
        "worst_index": worst,
        "temperature": float(b.temperature),
        "p_fund_depleted": exact,
        "p_fund_depleted_smooth": float(values[-1]) if rnd.any() else None,
        "scenarios_count": S,
    }


def _long(rows: dict[str, np.ndarray], grads: np.ndarray, bump: float, has_random: bool):
    """Tidy rows: every input row (``rows`` columns ``[R]``) times every objective; ``grads``
    is ``[K, R]`` per +1.00 of the input."""
    import pandas as pd

    K, R = grads.shape
    df = pd.DataFrame({k: np.tile(np.asarray(v, dtype=object if np.asarray(v).dtype.kind in "OU" else None), K)
                       for k, v in rows.items()})
    df["total"] = np.repeat([o[0] for o in OBJECTIVES], R)
    df["scope"] = np.repeat([o[1] for o in OBJECTIVES], R)
    df["gradient"] = grads.reshape(-1)
    df["sensitivity"] = bump * df["gradient"]
    if not has_random:
        df = df[df.total != "p_fund_depleted_smooth"].reset_index(drop=True)
    return df


def _named_rows(parameter: str, group: np.ndarray, value: np.ndarray, grads: np.ndarray, has_random: bool,
                 relative: bool = False):
    """``_long`` rows of one named parameter per ``group`` with a ``bump`` column: per +0.01,
    or, ``relative``, per +1% of the value (for USD amounts, where +0.01 USD is no unit)."""
    df = _long({"parameter": np.full(len(group), parameter, object), "group": np.asarray(group, object),
                "value": np.asarray(value, np.float64)}, grads, PARAM_BUMP, has_random)
    if relative:
        df["sensitivity"] = PARAM_BUMP * df["value"].astype(np.float64) * df["gradient"]
    df.insert(3, "bump", "+1%" if relative else "+0.01")
    return df


def _market_frame(snap: Snapshot, gx: np.ndarray, gv: np.ndarray, has_random: bool):
    """Price (per +1%) and vol (per +0.01) sensitivities per asset, tidy."""
    import pandas as pd

    assets = np.asarray(snap.assets, dtype=object)
    price = _long({"factor": np.full(len(assets), "price", object), "asset": assets,
                   "bump": np.full(len(assets), "+1%", object)}, gx, PRICE_BUMP, has_random)
    vol = _long({"factor": np.full(len(assets), "vol", object), "asset": assets,
                 "bump": np.full(len(assets), "+0.01", object)}, gv, VOL_BUMP, has_random)
    # Vol rows only for underlyings of options: the others are identically zero.
    under = np.asarray(snap.instruments.underlying)[np.asarray(snap.instruments.kind) == OPTION]
    vol = vol[vol.asset.isin(set(assets[np.unique(under)]))]
    return pd.concat([price, vol], ignore_index=True)


def _params_frame(snap: Snapshot, gp: Params, fee: float, g_fee: np.ndarray, g_imp: Any, impact_cfg: dict,
                  has_random: bool):
    """Sensitivities to the parameters the engine's margin and losses read, tidy; ``bump`` is
    what ``sensitivity`` is per (+0.01, or +1% of the value for an impact's daily volume)."""
    import pandas as pd

    inst = snap.instruments
    kind, under = np.asarray(inst.kind), np.asarray(inst.underlying)
    group_key = under * 3 + kind
    keys = np.unique(group_key)
    labels = np.array([f"{snap.assets[k // 3]} {KIND_NAMES[k % 3]}" for k in keys], dtype=object)
    member = (group_key[None, :] == keys[:, None]).astype(np.float64)  # [G, I], a few dozen groups
    frames = []
    for name in ("mm_rate", "im_rate"):
        g = np.asarray(getattr(gp, name))  # [K, I]
        value = member @ np.asarray(getattr(snap.params, name), np.float64) / member.sum(axis=1)
        frames.append(_named_rows(name, labels, value, g @ member.T, has_random))
    frames.append(_named_rows("option_im_floor", np.array(["all options"]), np.array([float(snap.params.option_im_floor)]),
                              np.asarray(gp.option_im_floor).reshape(-1, 1), has_random))
    frames.append(_named_rows("haircut", np.asarray(snap.assets), np.asarray(snap.params.haircut, np.float64),
                              np.asarray(gp.haircut), has_random))
    frames.append(_named_rows("fee_rate", np.array(["liquidation"]), np.array([fee]), np.asarray(g_fee).reshape(-1, 1),
                              has_random))
    # [liquidation.impact.<ASSET>]: one row per key and underlying with a table
    rows = [snap.assets.index(a) for a in impact_cfg]
    for key in liquidation.IMPACT_KEYS:
        if not rows:
            break
        g = np.asarray(getattr(g_imp, key))[:, rows]  # [K, U] per +1.00 (per USD for the volume)
        value = np.array([float(impact_cfg[snap.assets[a]][key]) for a in rows])
        frames.append(_named_rows(f"impact.{key}", np.array([snap.assets[a] for a in rows], object), value, g,
                                  has_random, relative=key == "daily_volume"))
    if snap.margin_config.get("model", "standard") == "portfolio":
        frames += _portfolio_rows(snap, gp, has_random)
    if snap.params.haircut_dynamic:
        frames += _haircut_rows(snap, gp, has_random)
    return pd.concat(frames, ignore_index=True)


def _haircut_rows(snap: Snapshot, gp: Params, has_random: bool) -> list:
    """Dynamic haircuts' parameters, named as in ``[margin]``, for the assets they apply to:
    reference vols (per +0.01), concentration coefficients (+0.01), daily volumes (per +1%
    of their USD value) and ``haircut_max`` (+0.01)."""
    p = snap.params
    names = np.asarray(snap.assets, dtype=object)
    vol, volume = np.asarray(p.haircut_vol, np.float64), np.asarray(p.haircut_volume, np.float64)
    frames = []
    for key, field, rows in (("haircut_reference_vol", "haircut_vol", np.flatnonzero(vol > 0)),
                             ("haircut_concentration", "haircut_concentration", np.flatnonzero(volume > 0)),
                             ("haircut_daily_volume", "haircut_volume", np.flatnonzero(volume > 0)),
                             ("haircut_max", "haircut_max", None)):
        value = np.asarray(getattr(p, field), np.float64)
        g = np.asarray(getattr(gp, field))
        if rows is None:
            value, g, group = value.reshape(1), g.reshape(-1, 1), np.array(["all"], object)
        else:
            value, g, group = value[rows], g[:, rows], names[rows]
        frames.append(_named_rows(key, group, value, g, has_random, relative=key == "haircut_daily_volume"))
    return frames


def _portfolio_rows(snap: Snapshot, gp: Params, has_random: bool) -> list:
    """The portfolio model's parameters, named as in ``[margin]``: per underlying (per
    settlement asset for ``pnl_offset``), ``mm_factor`` and each ``extended_moves`` entry.
    USD thresholds are per +1% of their value, the rest per +0.01."""
    inst = snap.instruments
    underlyings = np.unique(np.asarray(inst.underlying))
    settlements = np.unique(np.asarray(inst.settlement))
    names = np.asarray(snap.assets, dtype=object)
    frames = []
    for key, (field, *_) in margin._PER_ASSET.items():
        rows = settlements if key == "pnl_offset" else underlyings
        frames.append(_named_rows(key, names[rows], np.asarray(getattr(snap.params, field), np.float64)[rows],
                                  np.asarray(getattr(gp, field))[:, rows], has_random,
                                  relative=key == "delta_shock_threshold"))
    moves = np.asarray(snap.params.pm_extended_moves, np.float64)
    for key, field, group, value in (
            ("mm_factor", "pm_mm_factor", np.array(["all"], object), np.array([float(snap.params.pm_mm_factor)])),
            ("extended_moves", "pm_extended_moves", np.array([f"{m:+g}" for m in moves], object), moves)):
        frames.append(_named_rows(key, group, value, np.asarray(getattr(gp, field)).reshape(-1, len(group)), has_random))
    return frames
