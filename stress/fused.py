"""The chunk kernel fused into one GPU kernel (Pallas, Triton backend) for plain runs.

``engine.chunk_kernel`` is a chain of XLA fusions: each tile's ``[accounts, scenarios]``
equity, collateral, margin and the masks derived from them travel through device memory
between the fusions that compute and reduce them (about twenty passes of 4-8 bytes per
account and scenario). Here one program takes a block of scenarios and walks over blocks of
accounts: it gathers each position's value, margin and notional from the instrument tables
(small enough to stay in the L2 cache), builds the account state in registers, decides
liquidation and the fee, and folds the block into per-scenario sums and per-account extremes.
Nothing of size accounts x scenarios is written.

It covers the plain run only, the one a nightly stress of explicit scenarios is: one step per
scenario, the standard margin model, static haircuts, full liquidation with an optional fee,
no price impact, risk-limit tiers, account groups or reported oracle lags, and holdings of at
most ``MAX_POSITIONS`` slots x positions (the market makers' wide bucket takes the XLA
kernel). ``applies`` says whether a chunk qualifies; the results are those of
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
# of accounts x scenarios is one set of registers, so float64 takes fewer. The fastest of those
# tried on an H200 at 1M accounts x 10,000 scenarios (bench/gpu.py; docs/benchmarks.md).
BLOCKS = {"float32": (32, 256, 1024, 8), "float64": (16, 128, 1024, 4)}
MAX_POSITIONS = 16  # slots x positions unrolled in the kernel


def blocks(dtype: Any, n: int, W: int) -> tuple[int, int, int, int]:
    """``(BA, BS, R, warps)`` for a chunk of ``n`` accounts and tiles of ``W`` scenarios: blocks
    of ``BA`` accounts, ``R`` of them per program, ``BS`` scenarios per program."""
    ba, bs, per_program, warps = BLOCKS[jnp.dtype(dtype).name]
    ba, bs = min(ba, n), min(bs, W)
    r = max(1, min(per_program, n) // ba)
    while n % (ba * r):
        r //= 2
    return ba, bs, r, warps


def applies(h: portfolio.Holdings, t: Any, n_random: int, with_pnl: bool) -> bool:
    """Whether ``chunk_kernel`` computes this chunk (shapes and configuration are static)."""
    n, J, L = h.inst.shape[-3:]  # one chunk, or a group of them
    T, W = t.user.shape
    ba = blocks(t.value.dtype, n, W)[0]
    return (
        n_random == 0 and not with_pnl and t.value.shape[2] == W  # one step per scenario
        and t.pm is None and t.var is None and t.tiers is None and t.impact is None and t.partial_target is None
        and not t.n_groups and not t.lags and t.haircut_base is None
        and not isinstance(t.haircut, portfolio.Haircut) and h.group is None
        and J * L <= MAX_POSITIONS and n % ba == 0 and (n & (n - 1)) == 0 and (W & (W - 1)) == 0
    )


def _kernel(J: int, L: int, BA: int, BS: int, R: int, U: int):
    """The Pallas body for holdings of ``J`` slots x ``L`` positions."""

    def kernel(inst, qty, wgt, asset, bal, valid, eq0, ulin, ufix, value, mm, notional, price, keep, user, rate,
               o_min, o_arg, o_gap, o_cost, s_liq, s_short, s_bad, s_fee, s_closed, s_top1, s_top2, *s_und):
        p, s = pl.program_id(0), pl.program_id(1)
        s0 = pl.multiple_of(s * BS, BS)
        cols = pl.ds(s0, BS)
        usr = user[cols][None, :] > 0  # [1, BS]
        col = jax.lax.broadcasted_iota(jnp.int32, (BA, BS), 1) + s0
        f_rate = rate[0]
        dt = value.dtype
        zero_b = jnp.zeros((BS,), dt)

        def block(r, carry):
            liq_n, short, bad_s, fee_s, closed_s, top1, top2, *und = carry
            lo = pl.multiple_of((p * R + r) * BA, BA)
            rows = pl.ds(lo, BA)
            zero = jnp.zeros((BA, BS), dt)
            eq, coll, m, g = zero, zero, zero, zero
            for j in range(J):
                e = zero + bal[j, rows][:, None]
                for l in range(L):
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
            at = jnp.min(jnp.where(worst == lowest[:, None], col, jnp.iinfo(jnp.int32).max), axis=1)
            out = pl.ds(pl.multiple_of(r * BA, BA), BA)
            o_min[out] = lowest
            o_arg[out] = at
            o_gap[out] = jnp.max(jnp.where(usr, gap, -jnp.inf), axis=1)
            o_cost[out] = jnp.max(jnp.where(usr, fee, 0.0), axis=1)

            # per scenario: sums over the block's real accounts
            ok = valid[rows][:, None] > 0
            hit = jnp.where(ok & liq, 1.0, 0.0).astype(dt)
            bad = jnp.where(ok, jnp.maximum(-eq, 0.0), 0.0)
            first = jnp.max(bad, axis=0)
            is_first = bad == first[None, :]
            twice = jnp.sum(jnp.where(is_first, 1.0, 0.0), axis=0) > 1
            second = jnp.where(twice, first, jnp.max(jnp.where(is_first, 0.0, bad), axis=0))
            und = [u + jnp.sum(hit * w[rows][:, None], axis=0) for u, w in zip(und, [*ulin, *ufix])] if U else []
            return (
                liq_n + jnp.sum(hit, axis=0),
                short + jnp.sum(jnp.where(ok, jnp.maximum(gap, 0.0), 0.0), axis=0),
                bad_s + jnp.sum(bad, axis=0),
                fee_s + jnp.sum(jnp.where(ok, fee, 0.0), axis=0),
                closed_s + jnp.sum(hit * g, axis=0),
                jnp.maximum(top1, first),
                jnp.maximum(jnp.minimum(top1, first), jnp.maximum(top2, second)),
                *und,
            )

        carry = jax.lax.fori_loop(0, R, block, tuple(zero_b for _ in range(7 + 2 * U)))
        for ref, x in zip((s_liq, s_short, s_bad, s_fee, s_closed, s_top1, s_top2, *s_und), carry):
            ref[...] = x

    # the underlyings' weights come in as 2U refs of [n]: split them out of the argument list
    def unpack(*refs):
        head, tail = refs[:7], refs[7:]
        ulin, ufix, rest = tail[:U], tail[U : 2 * U], tail[2 * U :]
        return kernel(*head, ulin, ufix, *rest)

    return unpack


def chunk_kernel(h: portfolio.Holdings, t: Any, interpret: bool | None = None) -> dict:
    """``engine.chunk_kernel(h, t, 0, False)`` for a chunk that ``applies``: the same outputs."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    n, J, L = h.inst.shape
    T, W = t.user.shape
    S = T * W
    dt = t.value.dtype
    U = t.und_asset.shape[0]
    BA, BS, R, warps = blocks(dt, n, W)
    nsplit, nS = n // (BA * R), S // BS

    eq0, coll0, mm0, g0 = (x[:, 0] for x in portfolio.state(h, t.value0, t.mm0, t.price0, t.haircut, t.notional0))
    validf = h.valid.astype(dt)
    und = (engine.underlying_notional(h, t) * validf[:, None]).T  # [2U, n]

    def flat(x):  # [T, X, W] -> [X, T * W], scenario s at column s
        return x.transpose(1, 0, 2).reshape(x.shape[1], S)

    price = flat(t.price)
    keep = (1.0 - t.haircut).astype(dt)
    rate = jnp.reshape(jnp.asarray(0.0 if t.fee_rate is None else t.fee_rate, dt), (1,))
    hold = (h.inst.reshape(n, J * L).T, h.qty.reshape(n, J * L).T, h.weight.reshape(n, J * L).T, h.asset.T, h.balance.T)
    ins = (*hold, validf, eq0, *und, flat(t.value), flat(t.mm), flat(t.notional), price, keep,
           t.user.reshape(S).astype(jnp.int32), rate)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda p, s, nd=x.ndim: (0,) * nd)

    per_account = pl.BlockSpec((pl.squeezed, BA * R), lambda p, s: (s, p))
    per_scenario = pl.BlockSpec((pl.squeezed, BS), lambda p, s: (p, s))
    out_shape = (
        [jax.ShapeDtypeStruct((nS, n), dt), jax.ShapeDtypeStruct((nS, n), jnp.int32)]
        + [jax.ShapeDtypeStruct((nS, n), dt)] * 2
        + [jax.ShapeDtypeStruct((nsplit, S), dt)] * (7 + 2 * U)
    )
    extra = {} if interpret else {"compiler_params": _triton_params(warps)}
    outs = pl.pallas_call(
        _kernel(J, L, BA, BS, R, U),
        grid=(nsplit, nS),
        in_specs=[whole(x) for x in ins],
        out_specs=[per_account] * 4 + [per_scenario] * (7 + 2 * U),
        out_shape=out_shape,
        interpret=interpret,
        **extra,
    )(*ins)
    o_min, o_arg, o_gap, o_cost, liq, short, bad, fee, closed, top1, top2, *und_s = outs

    # the worst scenario: the first block holding the lowest P&L, then that block's first
    b = jnp.argmin(o_min, axis=0)
    best = jnp.min(o_min, axis=0)
    arg = jnp.take_along_axis(o_arg, b[None, :], axis=0)[0]
    by_name = {"liquidatable": liq, "shortfall": short, "bad_debt": bad, "fees": fee, "liquidated_notional": closed}
    sums = jnp.stack([by_name[k].sum(0) if k in by_name else jnp.zeros(S, dt) for k in engine.SUM_NAMES])
    both = jnp.concatenate([top1, top2])  # the two largest of each block: the chunk's two largest
    top2_chunk = jax.lax.top_k(both.T, 2)[0].T
    if U:
        r_lin = jnp.stack([x.sum(0) for x in und_s[:U]])
        r_fix = jnp.stack([x.sum(0) for x in und_s[U:]])
        und_closed = r_lin * price[t.und_asset] + r_fix
    else:
        und_closed = jnp.zeros((0, S), dt)
    return {
        **engine.account_rows(eq0, coll0, mm0, g0, best, arg, jnp.max(o_gap, axis=0), jnp.max(o_cost, axis=0)),
        "sums": sums,
        "top2": top2_chunk,
        "und_closed": und_closed,
    }


def _triton_params(warps: int) -> Any:
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=warps, num_stages=1)
