"""From instruments to accounts: holdings layout, equity, collateral and margin per account.

Each account's holdings are laid out as ``J`` asset *slots*: a slot is one asset the account
has a balance in or holds positions settled in. The first ``P`` slots hold positions, ``L``
each (those settled in the slot's asset); the others are balances only, and cost no gather from
the per-instrument tables. The net amount of the asset is then
``e_j = balance_j + sum_l qty_jl * value[inst_jl]``, the haircut applies to ``max(e_j, 0)``, and
no account pays for assets it does not touch. Accounts are grouped into buckets by
``(J, P, L)`` rounded up to powers of two, so a trader with one position is not padded to the
width of a market maker with three hundred, and each bucket shape compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import pytree_dataclass

VAR_BLOCK = 8  # states per block of the var model's window losses (var_margin)
UNROLL_MAX = 8  # holdings of up to P * L = 8 positions are unrolled (XLA fuses them); wider ones loop
# Padded shapes (J slots, P of them with positions, L positions per slot) for ordinary accounts,
# smallest first. Each shape is one compilation (about two seconds on CPU), so a short ladder
# beats a shape per power of two; accounts beyond the last rung share one shape, the powers of
# two of their largest J, P and L. Slots without positions are kept apart because most
# accounts hold a balance in an asset they trade nothing settled in: in the 100,000-account
# sample 44,409 accounts are one position and a second asset's balance, and as (2 slots x 1
# position) they gathered a padding position from every per-instrument table. A balance-only
# slot costs one price gather (with static haircuts). (4, 2, 1), not (2, 2, 1) and (4, 2, 1):
# a third and fourth balance-only slot is cheap, a compilation is not.
LADDER = ((1, 1, 1), (2, 1, 1), (4, 2, 1), (4, 2, 2), (4, 4, 1), (4, 2, 4), (4, 4, 2), (4, 4, 4))
# Rungs for deeper books, kept only where at least ``RUNG_MIN_ACCOUNTS`` accounts have them as
# their smallest fit, and never the "next rung" the rules below measure a rung against (so a
# snapshot without such accounts lays out as if they were not there). With about three
# positions per account (1M accounts, 3M positions) 285,079 accounts fell into (4, 4, 4) at
# 30% fill; these two take 228,000 of them at half its positions, and a warm run at
# 5,000 scenarios went from 6.9-7.6 s to 4.8-5.0 s (docs/benchmarks.md).
FINE_RUNGS = ((4, 2, 4), (4, 4, 2))
# A rung costs a compilation per kernel variant (1.5-2.5 s each on CPU; a cold run on the
# default set's paths compiles two per rung) and a part-filled group of chunks; what it saves
# is per account. So a snapshot leaves out a rung that would hold fewer accounts than this when
# the next rung that holds them has at most twice the slots (J) and at most twice the position
# gathers (P * L): (1, 1, 1) goes into (2, 1, 1), (2, 1, 1) into (4, 2, 1), (4, 2, 1) into
# (4, 2, 2), never (4, 4, 1) into (4, 4, 4). A rung's count holds the accounts of the rungs
# left out before it, so moves chain: the 10,000-account sample's (2, 1, 1) accounts end in
# (4, 2, 2), which measured no slower warm (4x the gathers of one position; 2 positions in
# place of 1 cost nothing measurable even for 234,113 accounts at 1M). With slots alone (the
# (J, L) ladder), leaving (1, 1) out took 2-3 s off a cold run at 100,000 x 5,000 and nothing
# off a warm one; at 1,000,000, whose (1, 1) rung holds 170,000 accounts, the rung was worth
# 2-5 s a warm run. With positions too, the 10,000-account sample's default run compiles 6
# kernels in place of 12 (docs/benchmarks.md, "Fewer rungs for small snapshots").
RUNG_MIN_ACCOUNTS = 32_768
# And whatever the next rung's shape, a rung is left out when moving its accounts there adds at
# most this many slots and position gathers in all (each account: the next rung's J + P * L
# less its own), about 8 ms a pass at 5,000 scenarios on CPU: the few hundred accounts of
# (4, 4, 1) in a small exchange go into (4, 4, 4).
RUNG_MIN_WORK = 8_192
# Up to this many (account, asset) pairs, ``layout`` finds the slots by marking them in a dense
# table (a bool and an int32 per pair: 80 MB at the most) rather than by sorting the keys and
# searching each position's: at 1M accounts x 5 assets with 3M positions 0.03 s against 0.13 s.
DENSE_SLOTS_MAX = 16_000_000


@pytree_dataclass
class Holdings:
    """A chunk of ``n`` accounts, padded to a fixed shape: ``J`` slots, the first ``P`` of them
    with ``L`` positions each (``P <= J``; the positions of slot ``j < P`` are ``[:, j, :]``)."""

    inst: Any  # [n, P, L] int32 instrument index (0 in padding)
    qty: Any  # [n, P, L] contracts, signed; 0 in padding
    weight: Any  # [n, P, L] margin weight (see margin.position_weight); 0 in padding
    asset: Any  # [n, J] int32 asset of each slot (0 in padding)
    balance: Any  # [n, J] balance of the slot's asset, in its units; 0 in padding
    valid: Any  # [n] bool: a real account (False for padding rows)
    group: Any = None  # [n] int32 row of the account's group (Cover 2); n_groups: alone; None: no groups


def _rows(x: Any) -> Any:
    """``x`` as a function of row indices: ``x`` itself when it already is one."""
    return x if callable(x) else (lambda i: x.at[i].get(mode="promise_in_bounds"))


@pytree_dataclass
class Haircut:
    """Dynamic collateral haircuts of a tile of states (``margin.haircut_at``): the haircut of
    asset ``a`` on ``e > 0`` units held is ``min(cap, base[a] + coef[a] * sqrt(e * share[a]))``."""

    base: Any  # [A, W] vol-scaled haircut of each asset at each state (a function of rows, inside kernels)
    coef: Any  # [A] concentration add-on per sqrt(share of a day's volume held)
    share: Any  # [A] share of a day's volume one unit of the asset is (P0 / V); 0: no add-on
    cap: Any  # [] the largest haircut


def keep_share(haircut: Any, a: Any, e: Any) -> Any:
    """``1 - haircut`` of assets ``a`` ``[n]`` (or ``[n, J]``) on net amounts ``e`` ``[n, W]``
    (``[n, J, W]``): the share of a positive amount that counts as collateral. ``haircut`` is
    ``[A]`` (static) or a ``Haircut`` (its ``base`` an array or a function of rows); ``a``
    None: ``haircut`` is already per slot (``slots``)."""
    pick = (lambda x: x) if a is None else (lambda x: x[a])
    if not isinstance(haircut, Haircut):
        return 1.0 - pick(haircut)[..., None]
    base = haircut.base if a is None else _rows(haircut.base)(a)
    ratio = e * pick(haircut.share)[..., None]  # share of a day's volume held
    held = ratio > 0  # the square root is guarded so that its gradient stays finite at 0
    add = jnp.where(held, pick(haircut.coef)[..., None] * jnp.sqrt(jnp.where(held, ratio, 1.0)), 0.0)
    return 1.0 - jnp.minimum(base + add, haircut.cap)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """All accounts of one padded shape ``(J, P, L)``, as host arrays to slice into chunks."""

    J: int
    P: int
    L: int
    accounts: np.ndarray  # [m] account index of each row (ascending, unless ``layout`` was given an order)
    inst: np.ndarray  # [m, P, L] int32
    qty: np.ndarray  # [m, P, L]
    weight: np.ndarray  # [m, P, L]
    asset: np.ndarray  # [m, J] int32
    balance: np.ndarray  # [m, J]


def _repeat(count: int, body: Any, carry: Any, unroll: bool) -> Any:
    """``carry = body(k, carry)`` for ``k`` in ``range(count)``: unrolled, so XLA fuses the
    small holdings of ordinary accounts, or a ``fori_loop`` for wide ones (market makers), whose
    unrolling would cost compile time."""
    if unroll:
        for k in range(count):
            carry = body(k, carry)
        return carry
    return jax.lax.fori_loop(0, count, body, carry)


def _pow2(x: np.ndarray) -> np.ndarray:
    x = np.maximum(x, 1)
    return (1 << np.ceil(np.log2(x)).astype(np.int64)).astype(np.int64)


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """0, 1, 2... within runs of equal values of a sorted array."""
    idx = np.arange(len(group))
    if not len(group):
        return idx
    new = np.empty(len(group), bool)
    new[0] = True
    np.not_equal(group[1:], group[:-1], out=new[1:])
    return idx - np.maximum.accumulate(np.where(new, idx, 0))


def _rank_in_group_unsorted(group: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group."""
    order = np.argsort(group, kind="stable")
    rank = np.empty(len(group), np.int64)
    rank[order] = _rank_in_group(group[order])
    return rank


def _ladder(J: np.ndarray, P: np.ndarray, L: np.ndarray) -> list[tuple[int, int, int]]:
    """``LADDER`` less the rungs not worth a compilation for accounts of ``J`` slots, ``P`` of
    them with positions, and ``L`` positions per slot (``[n]`` each): see ``RUNG_MIN_ACCOUNTS``
    and ``FINE_RUNGS``."""
    kept, taken = [], np.zeros(len(J), bool)
    for k, (lj, lp, ll) in enumerate(LADDER):
        here = ~taken & (J <= lj) & (P <= lp) & (L <= ll)  # the accounts this rung is the smallest fit for
        count = np.count_nonzero(here)
        if (lj, lp, ll) in FINE_RUNGS:
            if count < RUNG_MIN_ACCOUNTS:
                continue
            kept.append((lj, lp, ll))
            taken |= here
            continue
        nxt = next((r for r in LADDER[k + 1:] if r not in FINE_RUNGS and r[0] >= lj and r[1] >= lp and r[2] >= ll), None)
        if nxt is not None and (
                (nxt[0] <= 2 * lj and nxt[1] * nxt[2] <= 2 * lp * ll and count < RUNG_MIN_ACCOUNTS)
                or count * (nxt[0] + nxt[1] * nxt[2] - lj - lp * ll) <= RUNG_MIN_WORK):
            continue  # its accounts go to the next rung that fits them
        kept.append((lj, lp, ll))
        taken |= here
    return kept


def layout(
    pos_account: np.ndarray,
    pos_instrument: np.ndarray,
    pos_quantity: np.ndarray,
    pos_weight: np.ndarray,
    settlement: np.ndarray,
    balances: np.ndarray,
    order: np.ndarray | None = None,
) -> list[Bucket]:
    """Group accounts into ``(J, P, L)`` buckets of slot-major holdings (vectorised, no row loop).

    Each account goes to the smallest ``LADDER`` shape that holds it; those beyond the ladder
    (market makers) share one power-of-two shape. An account's slots with positions come
    first, each group in asset order.

    Args:
      pos_*: positions in COO form ``[N]``. settlement: ``[I]`` settlement asset index.
      balances: ``[n, A]`` balances.
      order: optional ``[n]`` rank of each account (a permutation of ``0 .. n-1``): within a
        bucket, accounts are laid out in this order (default: by index). Only which chunk an
        account lands in depends on it, not any of its values.

    Returns:
      One ``Bucket`` per padded shape, in ascending ``(J, P, L)``.
    """
    n, A = balances.shape
    settle = settlement[pos_instrument].astype(np.int64)
    pos_key = pos_account.astype(np.int64) * A + settle
    # the slots, (account, asset) pairs keyed account * A + asset, sorted and unique
    if n * A <= DENSE_SLOTS_MAX:  # marked in a table the size of ``balances``: no sort, no search
        mark = (balances != 0).reshape(-1)
        mark[pos_key] = True
        keys = np.flatnonzero(mark)
        slot_of = np.empty(n * A, np.int32 if len(keys) < 2**31 else np.int64)
        slot_of[keys] = np.arange(len(keys))
        pos_slot = slot_of[pos_key].astype(np.int64)
        del mark, slot_of
    else:
        b_acc, b_asset = np.nonzero(balances)
        keys = np.sort(np.concatenate([pos_key, b_acc.astype(np.int64) * A + b_asset]))
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys  # np.unique, 30x faster
        pos_slot = np.searchsorted(keys, pos_key)
    slot_acc, slot_asset = keys // A, keys % A
    within = _rank_in_group_unsorted(pos_slot)
    per_slot = np.bincount(pos_slot, minlength=len(keys))
    # each account's slots with positions first, then its balance-only ones, each in asset
    # order (slots are sorted by account, then asset, and so is either subset)
    held = per_slot > 0
    J = np.bincount(slot_acc, minlength=n)
    P = np.bincount(slot_acc[held], minlength=n)
    slot_rank = np.empty(len(keys), np.int64)
    slot_rank[held] = _rank_in_group(slot_acc[held])
    slot_rank[~held] = P[slot_acc[~held]] + _rank_in_group(slot_acc[~held])
    L = np.zeros(n, np.int64)
    if len(keys):  # slots are sorted by account: the widest slot of each account
        first = np.flatnonzero(np.r_[True, slot_acc[1:] != slot_acc[:-1]])
        L[slot_acc[first]] = np.maximum.reduceat(per_slot, first)

    # Beyond the ladder (market makers, accounts in many assets): one shape for them all,
    # since a compilation costs more than padding a few hundred large accounts.
    rungs = _ladder(J, P, L)
    # each account's rung (len(rungs): beyond the ladder), the first that fits it, looked up
    # by (J, P, L) capped one past the ladder's widest: a pass over the accounts per rung took
    # 58 ms at 1M accounts with 9 rungs
    cap = 1 + max(max(r) for r in LADDER)
    grid = np.full((cap + 1,) * 3, len(rungs), np.int16)
    for k in range(len(rungs) - 1, -1, -1):  # smallest rung that fits wins
        lj, lp, ll = rungs[k]
        grid[: lj + 1, : lp + 1, : ll + 1] = k
    rung = grid.reshape(-1)[(np.minimum(J, cap) * (cap + 1) + np.minimum(P, cap)) * (cap + 1) + np.minimum(L, cap)]
    big = rung == len(rungs)
    shapes_all = rungs + ([tuple(int(_pow2(x[big].max())) for x in (J, P, L))] if big.any() else [])
    # the shapes in use, numbered in ascending order (the big one may sort between rungs): a
    # count per rung in place of np.unique over every account
    used = sorted(np.flatnonzero(np.bincount(rung, minlength=len(shapes_all))), key=lambda k: shapes_all[k])
    number = np.zeros(len(shapes_all), np.int16)
    number[used] = np.arange(len(used))
    shapes = [shapes_all[k] for k in used]
    # Bucket numbers are small: as int16, NumPy's stable argsort is a radix sort, linear in n
    # (by account, by slot, by position: 0.2 s of comparison sorts at 1M accounts before)
    bucket = number[rung]
    by_rank = np.arange(n)  # the accounts in rank order: the inverse of the permutation ``order``
    if order is not None:
        by_rank[np.asarray(order, np.int64)] = np.arange(n)
    by_row = by_rank[np.argsort(bucket[by_rank], kind="stable")]  # by bucket, then rank
    row = np.empty(n, np.int64)
    row[by_row] = _rank_in_group(bucket[by_row])  # each account's row within its bucket
    first_row = np.searchsorted(bucket[by_row], np.arange(len(shapes) + 1))
    s_bucket, p_bucket = bucket[slot_acc], bucket[pos_account]
    s_order = np.argsort(s_bucket, kind="stable")
    p_order = np.argsort(p_bucket, kind="stable")
    s_split = np.searchsorted(s_bucket[s_order], np.arange(1, len(shapes)))
    p_split = np.searchsorted(p_bucket[p_order], np.arange(1, len(shapes)))
    # flat indices into each bucket's arrays: one 1-D scatter per array (indexing with a tuple
    # of index arrays took twice as long); a slot's key is account * A + asset, its balance's
    # flat index
    # (each computed once for all slots and positions, then taken per bucket: one gather each)
    bj_of, bp_of, bl_of = (np.array([sh[k] for sh in shapes], np.int64) for k in range(3))
    s_at = row[slot_acc] * bj_of[s_bucket] + slot_rank
    p_at = (row[pos_account] * bp_of[p_bucket] + slot_rank[pos_slot]) * bl_of[p_bucket] + within
    flat_balances = balances.reshape(-1)
    out = []
    for b, ((bj, bp, bl), s, p) in enumerate(zip(shapes, np.split(s_order, s_split), np.split(p_order, p_split))):
        acc = by_row[first_row[b] : first_row[b + 1]]  # the bucket's accounts, in row order
        m = len(acc)
        asset, bal = np.zeros((m, bj), np.int32), np.zeros((m, bj))
        at = s_at[s]
        asset.reshape(-1)[at] = slot_asset[s]
        bal.reshape(-1)[at] = flat_balances[keys[s]]
        inst, qty, w = np.zeros((m, bp, bl), np.int32), np.zeros((m, bp, bl)), np.zeros((m, bp, bl))
        at = p_at[p]
        inst.reshape(-1)[at] = pos_instrument[p]
        qty.reshape(-1)[at] = pos_quantity[p]
        w.reshape(-1)[at] = pos_weight[p]
        out.append(Bucket(bj, bp, bl, acc, inst, qty, w, asset, bal))
    return out


def rate_steps(notional: Any, bound: Any, step: Any, right: bool = False) -> Any:
    """How much a position's maintenance-margin rate rises over its first tier's: the sum of
    the ``step`` ``[..., K - 1]`` of every tier ``bound`` ``[..., K - 1]`` its ``notional``
    ``[...]`` (USD) exceeds (reaches, with ``right``: the rate just above it). Tier ``k``
    covers ``bound[k-1] < notional <= bound[k]`` (``margin.tier_margin``)."""
    over = notional[..., None] >= bound if right else notional[..., None] > bound
    return jnp.sum(jnp.where(over, step, 0.0), axis=-1)


def tier_extra(pn: Any, i: Any, tiers: Any) -> Any:
    """Maintenance margin a position pays beyond its first risk-limit tier, USD ``[n, W]``.

    ``pn``: ``[n, W]`` its notional; ``i``: ``[n]`` its instrument; ``tiers``: ``(bound,
    step)``, each ``[I, K - 1]``: the upper bound of tiers ``1 .. K - 1`` and how much the
    rate rises past each. The whole position pays the rate of the tier its notional is in
    (``margin.tier_margin``), i.e. the first tier's rate plus every step whose bound it exceeds.
    """
    bound, step = tiers[0][i], tiers[1][i]  # [n, K - 1]
    return pn * rate_steps(pn, bound[:, None, :], step[:, None, :])


def state(h: Holdings, value: Any, mm: Any, price: Any, haircut: Any, *gross: Any, tiers: Any = None) -> tuple[Any, ...]:
    """Equity, collateral value and maintenance margin of a chunk of accounts, USD.

    Args:
      h: holdings (``[n, P, L]`` positions, ``[n, J]`` slots).
      value: ``[I, W]`` value per contract in its settlement asset's units, or a function
        mapping instrument indices ``[n]`` to rows ``[n, W]`` (likewise ``mm``, ``price`` and
        each of ``gross``).
      mm: ``[I, W]`` maintenance margin per contract of weight, USD.
      price: ``[A, W]`` asset prices, USD.
      haircut: ``[A]``, or a ``Haircut`` (dynamic; its ``base`` ``[A, W]`` or a function of rows).
      gross: further ``[I, W]`` per-contract amounts, USD, each summed per account over
        ``|quantity|`` (the notional of SPEC section 2, a closing cost per contract, ...).
      tiers: optional risk-limit tiers ``(bound, step)`` (``tier_extra``); ``gross[0]`` must
        then be the notional per contract.

    Returns:
      ``(equity, collateral, margin, *gross_sums)``, each ``[n, W]``: ``sum_p |q_p| * g[i_p]``
      for each table of ``gross``. Collateral haircuts each asset's positive net amount; a
      negative amount counts in full.
    """
    rows = _rows
    value, mm, price = rows(value), rows(mm), rows(price)
    gross = tuple(rows(g) for g in gross)
    n, P, L = h.inst.shape
    J = h.asset.shape[1]
    first = price(h.asset[:, 0])
    W, dt = first.shape[1], first.dtype
    unroll = P * L <= UNROLL_MAX

    def position(j, l, carry):
        e, m, g = carry
        i = h.inst[:, j, l]
        m = m + h.weight[:, j, l, None] * mm(i)
        per = tuple(jnp.abs(h.qty[:, j, l, None]) * table(i) for table in gross)
        if tiers is not None:
            m = m + tier_extra(per[0], i, tiers)
        g = tuple(gk + p for gk, p in zip(g, per))
        return e + h.qty[:, j, l, None] * value(i), m, g

    def slot(j, carry, positions):
        eq, coll, margin, g = carry
        e = jnp.broadcast_to(h.balance[:, j, None], (n, W)).astype(dt)
        if positions:
            e, margin, g = _repeat(L, lambda l, c: position(j, l, c), (e, margin, g), unroll)
        a = h.asset[:, j]
        usd = e * price(a)
        return eq + usd, coll + jnp.where(e > 0, keep_share(haircut, a, e), 1.0) * usd, margin, g

    zeros = jnp.zeros((n, W), dt)
    carry = (zeros, zeros, zeros, tuple(zeros for _ in gross))
    carry = _repeat(P, lambda j, c: slot(j, c, True), carry, unroll)
    eq, coll, margin, g = _repeat(J - P, lambda j, c: slot(P + j, c, False), carry, unroll)  # balances only
    return (eq, coll, margin, *g)


def calm(h: Holdings, b: dict) -> Any:
    """``[n, T]`` True where an account provably has collateral above its margin, and so
    equity above zero, in every state of a tile: the standard model, untiered.

    ``b`` holds each table's range over a tile's states (``engine.tile_ranges``): ``v_lo``,
    ``v_hi``, ``mm_lo``, ``mm_hi`` ``[I, T]``, ``p_lo``, ``p_hi`` ``[A, T]``, and ``keep``
    ``[A]``, the smallest share of a positive amount that counts as collateral.

    A slot's net amount ``e = balance + sum q * value`` is at least ``e_lo`` (each position at
    its worse end), and what it adds to collateral, ``keep * e * p`` or ``e * p``, rises with
    ``e`` and moves with ``p`` as ``e``'s sign says: at least ``keep * e_lo * p_lo`` (``e_lo >=
    0``) or ``e_lo * p_hi``. Margin is at most ``sum w * mm`` at its larger end. Collateral is
    at most equity, so collateral above zero means no bad debt either. Both sides must clear a
    slack for the rounding of the kernel's own sums (a few ulps of the gross amounts each adds
    up), so a proof never rests on a last bit.
    """
    n, P, L = h.inst.shape
    J = h.asset.shape[1]
    v_lo, v_hi, mm_lo, mm_hi, p_lo, p_hi = (b[k] for k in ("v_lo", "v_hi", "mm_lo", "mm_hi", "p_lo", "p_hi"))
    dt = v_lo.dtype
    zeros = jnp.zeros((n, v_lo.shape[1]), dt)

    def position(j, l, carry):
        e, gross, m, m_gross = carry
        i, q, w = h.inst[:, j, l], h.qty[:, j, l, None], h.weight[:, j, l, None]
        lo, hi, m_lo, m_hi = v_lo[i], v_hi[i], mm_lo[i], mm_hi[i]
        e = e + jnp.where(q >= 0, q * lo, q * hi)
        gross = gross + jnp.abs(q) * jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        m = m + jnp.where(w >= 0, w * m_hi, w * m_lo)
        m_gross = m_gross + jnp.abs(w) * jnp.maximum(jnp.abs(m_lo), jnp.abs(m_hi))
        return e, gross, m, m_gross

    def slot(j, carry, positions):
        coll, scale, m, m_gross = carry
        e = jnp.broadcast_to(h.balance[:, j, None], zeros.shape).astype(dt)
        gross = jnp.abs(e)
        if positions:
            e, gross, m, m_gross = _repeat(L, lambda l, c: position(j, l, c), (e, gross, m, m_gross), unroll)
        a = h.asset[:, j]
        coll = coll + jnp.where(e >= 0, b["keep"][a, None] * e * p_lo[a], e * p_hi[a])
        return coll, scale + gross * p_hi[a], m, m_gross

    unroll = P * L <= UNROLL_MAX
    carry = _repeat(P, lambda j, c: slot(j, c, True), (zeros, zeros, zeros, zeros), unroll)
    coll, scale, m, m_gross = _repeat(J - P, lambda j, c: slot(P + j, c, False), carry, unroll)
    slack = 4 * (P * L + J + 4) * jnp.finfo(dt).eps * (scale + m_gross)
    return (coll - m > slack) & (coll > slack)


def slots(h: Holdings, value: Any, mm: Any, price: Any, haircut: Any, *gross: Any, tiers: Any = None) -> tuple[Any, ...]:
    """The pieces of ``state`` kept per asset slot, for models that change holdings along a
    path (partial liquidation): ``(pos [n, J, W], bal [n, J], px [n, J, W], keep [n, J],
    margin [n, W], *gross_sums [n, W])``: the value of the positions settled in each slot's
    asset (its units), the balance, the asset's price (USD), the slot's haircut (``[n, J]``,
    or a ``Haircut`` per slot for ``keep_share(keep, None, e)``), and the sums of ``state``. ``sum_j (bal + pos) * px`` is ``state``'s equity.
    With ``tiers``, ``margin`` is a pair: the first tier's, and ``state``'s (every position at
    its own tier), since the margin of a share of the book needs both (``liquidation.Tiered``)."""
    rows = _rows
    value, mm, gross = rows(value), rows(mm), tuple(rows(g) for g in gross)
    n, P, L = h.inst.shape
    J = h.asset.shape[1]
    px = rows(price)(h.asset)  # [n, J, W]

    def position(l, carry):  # the l-th position of every slot at once: [n, P, W] terms
        pos, (flat, extra), sums = carry
        i, q = h.inst[:, :, l], h.qty[:, :, l, None]
        flat = flat + jnp.sum(h.weight[:, :, l, None] * mm(i), axis=1)
        if tiers is not None:  # slot by slot: tier_extra takes [n] instruments
            extra = extra + sum(tier_extra(jnp.abs(q[:, j]) * gross[0](i[:, j]), i[:, j], tiers) for j in range(P))
        sums = tuple(s + jnp.sum(jnp.abs(q) * g(i), axis=1) for s, g in zip(sums, gross))
        return pos + q * value(i), (flat, extra), sums

    zeros = jnp.zeros(px.shape[::2], px.dtype)  # [n, W]
    pos = jnp.zeros((n, P) + px.shape[2:], px.dtype)
    pos, (flat, extra), sums = _repeat(L, position, (pos, (zeros, zeros), tuple(zeros for _ in gross)), P * L <= UNROLL_MAX)
    margin = flat if tiers is None else (flat, flat + extra)
    pos = jnp.pad(pos, ((0, 0), (0, J - P), (0, 0)))  # balance-only slots hold no positions
    if isinstance(haircut, Haircut):  # per slot: base [n, J, W], coef and share [n, J]
        keep = Haircut(base=_rows(haircut.base)(h.asset), coef=haircut.coef[h.asset], share=haircut.share[h.asset],
                       cap=haircut.cap)
    else:
        keep = haircut[h.asset].astype(pos.dtype)
    return (pos, h.balance.astype(pos.dtype), px, keep, margin, *sums)


def portfolio_margin(h: Holdings, pnl: Any, delta: Any, roll: Any, pm: dict, parts: bool = False) -> Any:
    """Portfolio-model maintenance margin of a chunk of accounts at every scenario state, USD
    ``[n, W]``: ``margin.portfolio_requirements`` per account and underlying, summed.

    Per (account, underlying, settlement slot) the positions' grid P&L is summed; a slot's
    gains count at its settlement asset's ``pnl_offset``; per (account, underlying) the
    requirement is the worst counted loss over the grid (extended points at their fraction),
    plus the roll shock and the delta shock; MM = ``mm_factor`` × their sum over underlyings.

    Args:
      h: holdings (``[n, P, L]`` positions).
      pnl: ``[I, W, G]`` USD P&L per contract at each grid point around each state, or a
        function of instrument indices (likewise ``delta`` ``[I, W]``, ``roll`` ``[I, W]``).
      pm: ``und [I]`` underlying of each instrument; per asset ``[A]``: ``offset``, ``frac``
        (extended fraction), ``mds`` (max delta shock), ``thr`` (delta threshold); ``factor``
        ``[]``; ``extended`` ``[G]``.
      parts: also return what the margin of a share of each book is made of (``liquidation.
        Blocks``): ``(margin, lin [n, W], delta [n, A, W])``, ``lin`` ``mm_factor`` times the
        risk matrices and roll shocks summed over underlyings, ``delta`` each underlying's
        ``|net delta|``, USD.
    """
    rows = _rows
    pnl, delta, roll = rows(pnl), rows(delta), rows(roll)
    n, P, L = h.inst.shape  # balance-only slots add nothing to a grid P&L
    first = pnl(h.inst[:, 0, 0])
    W, G = first.shape[1:]
    A = pm["offset"].shape[0]
    dt = first.dtype
    assets = jnp.arange(A)

    def position(j, l, carry):
        sub, dsum, rsum = carry
        i, q = h.inst[:, j, l], h.qty[:, j, l]
        oh = (pm["und"][i][:, None] == assets[None, :]).astype(dt)  # [n, A]
        sub = sub + oh[:, :, None, None] * (q[:, None, None] * pnl(i))[:, None]
        dsum = dsum + oh[:, :, None] * (q[:, None] * delta(i))[:, None]
        rsum = rsum + oh[:, :, None] * (jnp.abs(q)[:, None] * roll(i))[:, None]
        return sub, dsum, rsum

    def slot(j, carry):
        block, dsum, rsum = carry
        sub = jnp.zeros((n, A, W, G), dt)
        sub, dsum, rsum = _repeat(L, lambda l, c: position(j, l, c), (sub, dsum, rsum), P * L <= UNROLL_MAX)
        off = pm["offset"][h.asset[:, j]][:, None, None, None]
        return block + jnp.where(sub > 0, off * sub, sub), dsum, rsum

    carry = (jnp.zeros((n, A, W, G), dt), jnp.zeros((n, A, W), dt), jnp.zeros((n, A, W), dt))
    block, dsum, rsum = _repeat(P, slot, carry, P * L <= UNROLL_MAX)
    loss = -jnp.where(pm["extended"][None, None, None, :], pm["frac"][None, :, None, None] * block, block)
    rm = jnp.maximum(jnp.max(loss, axis=-1), 0.0)
    shock = pm["mds"][None, :, None] * jnp.maximum(jnp.abs(dsum) - pm["thr"][None, :, None], 0.0)
    margin = pm["factor"] * jnp.sum(rm + rsum + shock, axis=1)
    if not parts:
        return margin
    return margin, pm["factor"] * jnp.sum(rm + rsum, axis=1), jnp.abs(dsum)


def var_margin(h: Holdings, pnl: Any, dp: Any, im: Any, notional: Any, var: dict, tail: int) -> Any:
    """Var-model maintenance margin of a chunk of accounts at every scenario state, USD ``[n, W]``:
    ``mm_factor * max(ES, var_floor * standard IM)``, with ES the mean of the ``tail`` largest
    losses of the account's equity over the windows around the state (floored at 0).

    Args:
      h: holdings (``[n, P, L]`` positions, ``[n, J]`` slots).
      pnl: ``[I, W, H]`` USD value change per contract in each window around each state
        (``margin.var_grids``), or a function of instrument indices; ``dp``: ``[A, W, H]``
        each asset's USD price change (its balances'), likewise.
      im: ``[I, W]`` standard initial margin per contract of weight at each state, USD.
      notional: ``[I, W]`` notional per contract at each state, USD, when ``var["tiers"]``
        (risk-limit tiers of initial margin, ``tier_extra``) tier the floor; else None.
      var: ``floor`` (``var_floor``) and ``factor`` (``mm_factor``), ``[]`` each, and ``tiers``.
      tail: losses in the tail, ``m - ceil(confidence * m) + 1`` of ``H`` windows.

    A tile of arrays is taken ``VAR_BLOCK`` states at a time: the chunk's ``[n, W, H]`` window
    losses at once (10 MB at 128 x 32 x 299 in float64) fall out of cache between the passes
    that select the tail, and ran 1.3-2.3x slower on CPU than blocks of 8 states.
    """
    if any(callable(x) for x in (pnl, dp, im, notional)):  # rows of one tile each: no blocks
        return _var_margin(h, pnl, dp, im, notional, var, tail)
    W = im.shape[1]
    block = math.gcd(W, VAR_BLOCK)
    if block == W:
        return _var_margin(h, pnl, dp, im, notional, var, tail)

    def one(b):
        part = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, b * block, block, axis=1)  # noqa: E731
        return _var_margin(h, part(pnl), part(dp), part(im), part(notional), var, tail)

    out = jax.lax.map(one, jnp.arange(W // block))  # [W / block, n, block]
    return out.transpose(1, 0, 2).reshape(out.shape[1], W)


def _var_margin(h: Holdings, pnl: Any, dp: Any, im: Any, notional: Any, var: dict, tail: int) -> Any:
    """``var_margin`` of one block of states."""
    pnl, dp, im = _rows(pnl), _rows(dp), _rows(im)
    notional = None if notional is None else _rows(notional)
    n, P, L = h.inst.shape
    J = h.asset.shape[1]
    first = pnl(h.inst[:, 0, 0])
    W, H = first.shape[1:]

    def position(j, l, carry):
        gain, std = carry
        i = h.inst[:, j, l]
        std = std + h.weight[:, j, l, None] * im(i)
        if notional is not None:  # the position's tier at the state's prices, as at the snapshot
            std = std + tier_extra(jnp.abs(h.qty[:, j, l, None]) * notional(i), i, var["tiers"])
        return gain + h.qty[:, j, l, None, None] * pnl(i), std

    # Loops, never unrolled: unrolled, XLA fuses every position's [n, W, H] gather into one
    # loop that ran 1.6-2.7x slower than a gather-multiply-add per iteration (2-4 slots)
    def slot(j, carry, positions):
        if positions:
            carry = _repeat(L, lambda l, c: position(j, l, c), carry, False)
        gain, std = carry
        return gain + h.balance[:, j, None, None] * dp(h.asset[:, j]), std

    carry = (jnp.zeros((n, W, H), first.dtype), jnp.zeros((n, W), first.dtype))
    carry = _repeat(P, lambda j, c: slot(j, c, True), carry, False)
    gain, std = _repeat(J - P, lambda j, c: slot(P + j, c, False), carry, False)  # balances only
    es = jnp.maximum(largest_mean(-gain, tail), 0.0)  # a book gaining in every window needs none
    return var["factor"] * jnp.maximum(es, var["floor"] * std)


def largest_mean(x: Any, r: int) -> Any:
    """Mean of the ``r`` largest entries along the last axis (ties counted as often as they
    occur). A few passes of ``max`` for a short tail: on XLA:CPU ``lax.top_k`` over ``[128, 32,
    299]`` took 180 ms, three passes 5 ms."""
    if r > 8:
        return jnp.mean(jax.lax.top_k(x, r)[0], axis=-1)
    idx = jnp.arange(x.shape[-1])
    total = jnp.zeros(x.shape[:-1], x.dtype)
    for _ in range(r):
        total = total + jnp.max(x, axis=-1)
        x = jnp.where(idx == jnp.argmax(x, axis=-1)[..., None], -jnp.inf, x)
    return total / r
