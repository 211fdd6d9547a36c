"""The chunk kernel fused into one GPU kernel (Pallas, Triton backend) for plain runs.

``engine.chunk_kernel`` is a chain of XLA fusions: each tile's ``[accounts, scenarios]``
equity, collateral, margin and the masks derived from them travel through device memory
between the fusions that compute and reduce them (about twenty passes of 4-8 bytes per
account and scenario). Here one program takes a block of scenarios and walks over blocks of
accounts: it gathers each position's value, margin and notional from the instrument tables
(small enough to stay in the L2 cache), builds the account state in registers, decides
liquidation and the fee, and folds the block into per-account extremes and elementwise
per-scenario accumulators, reduced over their rows once at the end. Nothing of size accounts x
scenarios is written. A device's whole group of chunks is one launch, so that its programs
fill the device (one chunk's few hundred programs did not), and blocks past a program's last
real account (a group's padding) are not computed.

It covers the plain run only, the one a nightly stress of explicit scenarios is: one step per
scenario, the standard margin model, static haircuts, full liquidation with an optional fee,
no price impact, risk-limit tiers, account groups or reported oracle lags, and holdings of at
most ``MAX_POSITIONS`` position slots x positions (the market makers' wide bucket takes the XLA
kernel). ``applies`` says whether a group of chunks qualifies; the results are those of
``engine.chunk_kernel`` up to the order of floating-point sums. On CPU it runs only in
Pallas's interpret mode, which the tests use to check it against the XLA kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import engine, portfolio

# (accounts per block, scenarios per program, accounts per program, warps), per dtype: a block
# of accounts x scenarios is one set of registers (and each per-scenario sum keeps one such
# block), so float64 takes fewer. The fastest of those tried on an H100 at 1M accounts x
# 10,000 scenarios (bench/gpu.py; docs/benchmarks.md). Blocks of 64 scenarios beat 128 and 256
# by 15%: presumably a program's slice of the instrument tables then stays in L1 (not profiled).
BLOCKS = {"float32": (8, 64, 1024, 4), "float64": (4, 64, 1024, 4)}
MAX_POSITIONS = 16  # position slots x positions unrolled in the kernel
# Device memory for one launch's outputs (per account: a block's extremes for every block of
# scenarios; per scenario: every program's sums). A launch covers as many scenario tiles as fit,
# and the launches' results are merged as they come, so memory does not grow with scenarios.
# 1M accounts x 10,000 scenarios, as measured, is one launch in both dtypes (202 / 362 MB).
PASS_BYTES = 512 * 2**20


def blocks(dtype: Any, n: int, W: int) -> tuple[int, int, int, int]:
    """``(BA, BS, R, warps)`` for chunks of ``n`` accounts and tiles of ``W`` scenarios: blocks
    of ``BA`` accounts, ``R`` of them per program, ``BS`` scenarios per program."""
    ba, bs, per_program, warps = BLOCKS[jnp.dtype(dtype).name]
    ba, bs = min(ba, n), min(bs, W)
    r = max(1, min(per_program, n) // ba)
    while n % (ba * r):
        r //= 2
    return ba, bs, r, warps


def applies(h: portfolio.Holdings, t: Any, n_random: int, with_pnl: bool) -> bool:
    """Whether ``group_kernel`` computes this group of chunks (shapes and configuration are
    static)."""
    n, P, L = h.inst.shape[-3:]
    T, W = t.user.shape
    ba = blocks(t.value.dtype, n, W)[0]
    return (
        n_random == 0 and not with_pnl and t.value.shape[2] == W  # one step per scenario
        and t.pm is None and t.var is None and t.tiers is None and t.impact is None and t.partial_target is None
        and not t.n_groups and not t.lags and t.haircut_base is None and t.und_rep is None
        and not isinstance(t.haircut, portfolio.Haircut) and h.group is None
        and P * L <= MAX_POSITIONS and n % ba == 0 and (n & (n - 1)) == 0 and (W & (W - 1)) == 0
    )


N_SUMS = 5  # liquidatable, shortfall, bad debt, fees, notional closed


def _kernel(J: int, P: int, L: int, BA: int, BS: int, R: int, U: int):
    """The Pallas body for holdings of ``J`` slots, the first ``P`` of them with ``L`` positions."""
    INT_MAX = jnp.iinfo(jnp.int32).max

    def kernel(off, nblk, inst, qty, wgt, asset, bal, valid, eq0, ulin, ufix, value, mm, notional, price, keep, user,
               rate, o_min, o_arg, o_gap, o_cost, *s_out):
        p = pl.program_id(0)
        s0 = pl.multiple_of((pl.program_id(1) + off[0]) * BS, BS)  # this launch's blocks start at off
        cols = pl.ds(s0, BS)
        usr = user[cols][None, :] > 0  # [1, BS]
        col = jax.lax.broadcasted_iota(jnp.int32, (BA, BS), 1) + s0
        f_rate = rate[0]
        dt = value.dtype
        weights = [*ulin, *ufix]

        def out_rows(r):
            return pl.ds(pl.multiple_of(r * BA, BA), BA)

        def block(r, carry):
            sums, top1, top2, und = carry
            lo = pl.multiple_of((p * R + r) * BA, BA)
            rows = pl.ds(lo, BA)
            zero = jnp.zeros((BA, BS), dt)
            eq, coll, m, g = zero, zero, zero, zero
            for j in range(J):
                e = zero + bal[j, rows][:, None]
                for l in range(L if j < P else 0):
                    k = j * L + l
                    i = inst[k, rows]
                    q = qty[k, rows][:, None]
                    e = e + q * value[i, cols]
                    m = m + wgt[k, rows][:, None] * mm[i, cols]
                    g = g + jnp.abs(q) * notional[i, cols]
                a = asset[j, rows]
                usd = e * price[a, cols]
                eq = eq + usd
                coll = coll + jnp.where(e > 0, keep[a][:, None], 1.0) * usd
            liq = m > coll
            gap = m - coll
            # the fee comes out of what remains, so it never creates bad debt (liquidation.fee)
            fee = jnp.where(liq, jnp.minimum(f_rate * g, jnp.maximum(eq, 0.0)), 0.0)
            eq = eq - fee
            pnl = eq - eq0[rows][:, None]

            # per account: the block's worst P&L (its first scenario), largest gap and cost
            worst = jnp.where(usr, pnl, jnp.inf)
            lowest = jnp.min(worst, axis=1)
            out = out_rows(r)
            o_min[out] = lowest
            o_arg[out] = jnp.min(jnp.where(worst == lowest[:, None], col, INT_MAX), axis=1)
            o_gap[out] = jnp.max(jnp.where(usr, gap, -jnp.inf), axis=1)
            o_cost[out] = jnp.max(jnp.where(usr, fee, 0.0), axis=1)

            # per scenario, over the block's real accounts: added elementwise into [BA, BS]
            # accumulators, reduced over their rows once per program (reducing every block
            # across its accounts cost more than the rest of the block on an H100)
            ok = valid[rows][:, None] > 0
            hit = jnp.where(ok & liq, 1.0, 0.0).astype(dt)
            bad = jnp.where(ok, jnp.maximum(-eq, 0.0), 0.0)
            terms = (hit, jnp.where(ok, jnp.maximum(gap, 0.0), 0.0), bad, jnp.where(ok, fee, 0.0), hit * g)
            sums = tuple(c + x for c, x in zip(sums, terms))
            # each row's two largest bad debts so far (a tie counts twice)
            top1, top2 = jnp.maximum(top1, bad), jnp.maximum(top2, jnp.minimum(top1, bad))
            und = tuple(u + hit * w[rows][:, None] for u, w in zip(und, weights))
            return sums, top1, top2, und

        def empty(r, c):  # a block of padding rows only: defined values, nothing computed
            out = out_rows(r)
            o_min[out] = jnp.full((BA,), jnp.inf, dt)
            o_arg[out] = jnp.zeros((BA,), jnp.int32)
            o_gap[out] = jnp.full((BA,), -jnp.inf, dt)
            o_cost[out] = jnp.zeros((BA,), dt)
            return c

        zero = jnp.zeros((BA, BS), dt)
        init = ((zero,) * N_SUMS, zero, zero, (zero,) * len(weights))
        n_blocks = nblk[p]
        sums, top1, top2, und = jax.lax.fori_loop(0, n_blocks, block, init)
        jax.lax.fori_loop(n_blocks, R, empty, 0)
        # the program's two largest: the largest row maximum, then the next of the rows'
        # maxima (that one again if two rows share it) or the largest row runner-up
        first, second = engine.two_largest(top1)
        reduced = (*(jnp.sum(x, axis=0) for x in sums), first, jnp.maximum(second, jnp.max(top2, axis=0)),
                   *(jnp.sum(x, axis=0) for x in und))
        for ref, x in zip(s_out, reduced):
            ref[...] = x

    # the underlyings' weights come in as 2U refs of [n]: split them out of the argument list
    def unpack(*refs):
        head, tail = refs[:9], refs[9:]
        ulin, ufix, rest = tail[:U], tail[U : 2 * U], tail[2 * U :]
        return kernel(*head, ulin, ufix, *rest)

    return unpack


def group_kernel(h: portfolio.Holdings, t: Any, interpret: bool | None = None) -> dict:
    """``engine.chunk_kernel(h, t, 0, False)`` over a group of ``G`` chunks ``[G, n, ...]``
    that ``applies``: one kernel launch for the whole group (so that its programs fill the
    device, not one chunk's few hundred at a time) per run of scenario tiles whose outputs fit
    ``PASS_BYTES``, merged launch by launch.

    Returns:
      The per-account rows ``[G, n]`` of ``engine.chunk_kernel`` under ``lax.map``, and the
      group's per-scenario ``sums`` ``[1, len(SUM_NAMES), S]``, ``top2`` ``[1, 2, S]`` and
      ``und_closed`` ``[1, U, S]``: summed (or, for the two largest bad debts, merged) over its
      chunks, which is all the caller does with them.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    G, n, P, L = h.inst.shape
    J = h.asset.shape[-1]
    N = G * n
    T, W = t.user.shape
    S = T * W
    dt = t.value.dtype
    U = t.und_asset.shape[0]
    BA, BS, R, warps = blocks(dt, n, W)
    n_prog = N // (BA * R)
    n_sc = N_SUMS + 2 + 2 * U
    # scenario tiles per launch: the most that divides the tiles and keeps its outputs in budget
    per_tile = (W // BS) * (N * (3 * dt.itemsize + 4) + n_prog * BS * n_sc * dt.itemsize)
    tiles = max([k for k in range(1, T + 1) if T % k == 0 and k * per_tile <= PASS_BYTES] or [1])
    nS, n_pass = tiles * W // BS, T // tiles  # scenario blocks per launch, launches
    flat_h = jax.tree_util.tree_map(lambda x: None if x is None else x.reshape((N,) + x.shape[2:]), h)

    eq0, coll0, mm0, g0 = t.state0(flat_h)  # applies() leaves out tiers
    validf = flat_h.valid.astype(dt)
    und = (engine.underlying_notional(flat_h, t) * validf[:, None]).T  # [2U, N]
    # each program computes its blocks up to the last that holds a real account: a group's
    # padding (rows, or whole chunks, at its end) costs nothing
    last = jnp.max(jnp.where(flat_h.valid, jnp.arange(N), -1).reshape(n_prog, R * BA), axis=1)
    nblk = jnp.where(last >= 0, last - jnp.arange(n_prog) * R * BA, -1) // BA + 1  # [n_prog]

    def flat(x):  # [T, X, W] -> [X, T * W], scenario s at column s
        return x.transpose(1, 0, 2).reshape(x.shape[1], S)

    price = flat(t.price)
    keep = (1.0 - t.haircut).astype(dt)
    rate = jnp.reshape(jnp.asarray(0.0 if t.fee_rate is None else t.fee_rate, dt), (1,))
    PL = P * L
    hold = (flat_h.inst.reshape(N, PL).T, flat_h.qty.reshape(N, PL).T, flat_h.weight.reshape(N, PL).T,
            flat_h.asset.T, flat_h.balance.T)
    ins = (nblk.astype(jnp.int32), *hold, validf, eq0, *und, flat(t.value), flat(t.mm), flat(t.notional), price, keep,
           t.user.reshape(S).astype(jnp.int32), rate)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda p, s, nd=x.ndim: (0,) * nd)

    per_account = pl.BlockSpec((pl.squeezed, BA * R), lambda p, s: (s, p))
    per_scenario = pl.BlockSpec((pl.squeezed, BS), lambda p, s: (p, s))
    out_shape = (
        [jax.ShapeDtypeStruct((nS, N), dt), jax.ShapeDtypeStruct((nS, N), jnp.int32)]
        + [jax.ShapeDtypeStruct((nS, N), dt)] * 2
        + [jax.ShapeDtypeStruct((n_prog, nS * BS), dt)] * n_sc
    )
    extra = {} if interpret else {"compiler_params": _triton_params(warps)}
    call = pl.pallas_call(
        _kernel(J, P, L, BA, BS, R, U),
        grid=(n_prog, nS),
        in_specs=[pl.BlockSpec((1,), lambda p, s: (0,))] + [whole(x) for x in ins],  # the offset, then ins
        out_specs=[per_account] * 4 + [per_scenario] * n_sc,
        out_shape=out_shape,
        interpret=interpret,
        **extra,
    )

    def launch(acc, k):
        """One launch over scenario blocks ``k * nS ...``, merged into the accounts' extremes."""
        o_min, o_arg, o_gap, o_cost, *per_scen = call(jnp.reshape(k * nS, (1,)).astype(jnp.int32), *ins)
        # the worst scenario: the first block holding the lowest P&L, then that block's first
        lowest = jnp.min(o_min, axis=0)
        at = jnp.take_along_axis(o_arg, jnp.argmin(o_min, axis=0)[None, :], axis=0)[0]
        best, arg, gap, cost = acc
        better = lowest < best  # strict: ties keep the earlier launch's (file order)
        acc = (jnp.where(better, lowest, best), jnp.where(better, at, arg),
               jnp.maximum(gap, jnp.max(o_gap, axis=0)), jnp.maximum(cost, jnp.max(o_cost, axis=0)))
        liq, short, bad, fee, closed, top1, top2, *und_s = per_scen
        by_name = {"liquidatable": liq, "shortfall": short, "bad_debt": bad, "fees": fee, "liquidated_notional": closed}
        sums = jnp.stack([by_name[k].sum(0) if k in by_name else jnp.zeros(nS * BS, dt) for k in engine.SUM_NAMES])
        two = jax.lax.top_k(jnp.concatenate([top1, top2]).T, 2)[0].T  # of each program's two largest
        und_r = jnp.stack([x.sum(0) for x in und_s]) if U else jnp.zeros((0, nS * BS), dt)
        return acc, (sums, two, und_r)

    inf = jnp.full(N, jnp.inf, dt)
    init = (inf, jnp.zeros(N, jnp.int32), -inf, jnp.zeros(N, dt))
    (best, arg, gap, cost), per_pass = jax.lax.scan(launch, init, jnp.arange(n_pass))
    sums, top2_group, und_r = (x.transpose(1, 0, 2).reshape(x.shape[1], S) for x in per_pass)  # [X, S]
    und_closed = und_r[:U] * price[t.und_asset] + und_r[U:]
    rows = engine.account_rows(eq0, coll0, mm0, g0, best, arg, gap, cost)
    return {
        **{k: v.reshape((G, n) + v.shape[1:]) for k, v in rows.items()},
        "sums": sums[None],
        "top2": top2_group[None],
        "und_closed": und_closed[None],
    }


def _triton_params(warps: int) -> Any:
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=warps, num_stages=1)
