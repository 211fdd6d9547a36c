"""A plain NumPy/SciPy reference for the engine's stages (SPEC section 2), for timing and checking.

Written from the SPEC, not from ``stress/``'s code: it reads only the loaded input arrays of a
``stress.Snapshot`` (instrument terms, prices, haircuts, margin rates, balances, positions) and
a ``stress.Scenarios``. No JAX anywhere; Black-Scholes is written in Black-76 form on the
forward ``F = S e^{rT}`` (equivalent to the spot form of SPEC section 2), with
``scipy.special.ndtr``.

Stages, each a function below:

1. ``instrument_tables``: per instrument and scenario ``[I, S]`` the value per contract in
   settlement-asset units (futures and perpetuals marked to market, options Black-Scholes,
   linear or inverse) and the maintenance margin per contract of weight (USD, the standard
   rules of ``stress/margin.py``'s docstring), plus asset prices ``[A, S]``.
2. ``holdings``: positions as ``scipy.sparse`` CSR matrices (accounts x instruments): one
   quantity matrix per settlement asset (only that asset's instruments as columns) and one
   margin-weight matrix.
3. ``accounts_and_reductions``: accounts in chunks; per chunk ``Q_a @ value_a + balance_a``
   per asset, equity, collateral (haircuts on positive per-asset amounts), maintenance margin
   ``W @ mm``, shortfall, liquidatable, bad debt ``max(0, -equity)``, and the reductions: per
   account the unshocked state and worst cases, per scenario the sums over accounts.

Column 0 of every ``[*, S]`` matrix is the unshocked base market (multiplier 1, no vol shift,
no horizon); user scenarios are columns ``1..S``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtr

YEAR_DAYS = 365.0
VOL_FLOOR = 0.01
OPTION_KIND = 2  # stress.snapshot.OPTION: the loaded snapshot stores instrument kinds as codes


@dataclasses.dataclass
class RefTables:
    value: np.ndarray  # [I, S1] value per contract, settlement-asset units
    mm: np.ndarray  # [I, S1] maintenance margin per contract of weight, USD
    price: np.ndarray  # [A, S1] asset prices, USD
    haircut: np.ndarray  # [A]
    settlement: np.ndarray  # [I] settlement asset index


@dataclasses.dataclass
class RefHoldings:
    qty: list  # per asset a: (instrument indices settled in a [I_a], CSR [n, I_a] quantities)
    weight: sp.csr_matrix  # [n, I] margin weight: |q| futures, max(-q, 0) options
    balance: np.ndarray  # [n, A]


def _black76(F, K, T, vol, r, is_call):
    """Black-76 value of a European option on forward ``F``, discounted at ``r``; intrinsic on
    the spot (``F`` at ``T = 0``) when ``T <= 0``."""
    live = T > 0
    Tl = np.where(live, T, 1.0)
    srt = vol * np.sqrt(Tl)
    d1 = np.log(F / K) / srt + 0.5 * srt
    d2 = d1 - srt
    disc = np.exp(-r * Tl)
    call = disc * (F * ndtr(d1) - K * ndtr(d2))
    put = disc * (K * ndtr(-d2) - F * ndtr(-d1))
    v = np.where(is_call, call, put)
    intrinsic = np.maximum(np.where(is_call, F - K, K - F), 0.0)
    return np.where(live, v, intrinsic)


def instrument_tables(snap, scen) -> RefTables:
    """Stage 1: instrument values and maintenance margin per contract, ``[I, 1 + S]``."""
    ins = snap.instruments
    A = snap.n_assets
    S1 = 1 + len(scen)
    mult = np.ones((A, S1))
    mult[:, 1:] = np.asarray(scen.spot_mult, np.float64).T
    vshift = np.zeros((A, S1))
    vshift[:, 1:] = np.asarray(scen.vol_shift, np.float64).T
    horizon = np.zeros(S1)
    horizon[1:] = np.asarray(scen.horizon_days, np.float64)

    p0 = np.asarray(snap.market.price, np.float64)
    price = p0[:, None] * mult  # [A, S1]
    r = float(snap.market.rate)

    kind = np.asarray(ins.kind)
    und = np.asarray(ins.underlying)
    settle = np.asarray(ins.settlement)
    inverse = und == settle  # settled in its own underlying: Deribit inverse conventions
    c = np.asarray(ins.contract_size, np.float64)
    mm_rate = np.asarray(snap.params.mm_rate, np.float64)
    I = len(kind)

    value = np.zeros((I, S1))
    mm = np.zeros((I, S1))

    # Futures and perpetuals: F' = F S'/S, marked to market (worth 0 at the mark).
    fut = np.flatnonzero(kind != OPTION_KIND)
    if len(fut):
        F = np.asarray(ins.mark, np.float64)[fut, None]
        ratio = mult[und[fut]]  # S'/S
        F1 = F * ratio
        cf = c[fut, None]
        inv = inverse[fut, None]
        value[fut] = np.where(inv, cf * (1.0 / F - 1.0 / F1), cf * (F1 - F))
        notional = np.where(inv, cf, cf * price[und[fut]])  # inverse: contract size is USD face
        mm[fut] = mm_rate[fut, None] * notional

    # Options: Black-Scholes per coin in USD, then linear (c V) or inverse (c V / S) units.
    opt = np.flatnonzero(kind == OPTION_KIND)
    if len(opt):
        S = price[und[opt]]  # [O, S1]
        K = np.asarray(ins.strike, np.float64)[opt, None]
        T = np.asarray(ins.expiry, np.float64)[opt, None] - horizon[None, :] / YEAR_DAYS
        vol = np.maximum(np.asarray(ins.iv, np.float64)[opt, None] + vshift[und[opt]], VOL_FLOOR)
        is_call = np.asarray(ins.is_call)[opt, None]
        Fwd = S * np.exp(r * np.maximum(T, 0.0))
        V = _black76(Fwd, K, T, vol, r, is_call)  # USD per coin
        co = c[opt, None]
        value[opt] = np.where(inverse[opt, None], co * V / S, co * V)
        m = mm_rate[opt, None]
        # Deribit standard option MM (short side only; longs carry weight 0).
        per_coin = np.where(is_call, m * S + V, np.maximum(m * S, m * V) + V)
        mm[opt] = co * per_coin

    return RefTables(
        value=value,
        mm=mm,
        price=price,
        haircut=np.asarray(snap.params.haircut, np.float64),
        settlement=settle,
    )


def holdings(snap) -> RefHoldings:
    """Stage 2: sparse holdings matrices from the snapshot's COO positions."""
    n, A = snap.n_accounts, snap.n_assets
    I = len(np.asarray(snap.instruments.kind))
    rows = np.asarray(snap.pos_account)
    cols = np.asarray(snap.pos_instrument)
    q = np.asarray(snap.pos_quantity, np.float64)
    is_opt = np.asarray(snap.instruments.kind)[cols] == OPTION_KIND
    w = np.where(is_opt, np.maximum(-q, 0.0), np.abs(q))
    weight = sp.csr_matrix((w, (rows, cols)), shape=(n, I))
    weight.eliminate_zeros()
    settle = np.asarray(snap.instruments.settlement)
    qty = []
    for a in range(A):
        inst_a = np.flatnonzero(settle == a)
        if len(inst_a) == 0:
            qty.append((inst_a, None))
            continue
        col_of = np.full(I, -1)
        col_of[inst_a] = np.arange(len(inst_a))
        keep = settle[cols] == a
        Q = sp.csr_matrix((q[keep], (rows[keep], col_of[cols[keep]])), shape=(n, len(inst_a)))
        qty.append((inst_a, Q))
    return RefHoldings(qty=qty, weight=weight, balance=np.asarray(snap.balances, np.float64))


def default_chunk(n_scen_cols: int, target_elems: float = 2e7, cap: int = 20_000) -> int:
    """Accounts per chunk so that one ``[chunk, S]`` array holds about ``target_elems``."""
    return int(max(256, min(cap, target_elems // n_scen_cols)))


def accounts_and_reductions(t: RefTables, h: RefHoldings, *, chunk: int | None = None, dtype=np.float64) -> dict:
    """Stage 3: per-account and per-scenario results, streaming chunks of accounts.

    Returns a dict of numpy arrays: per account ``[n]`` ``equity``, ``collateral_value``,
    ``maintenance_margin`` (unshocked, column 0), ``pnl_worst``, ``scenario_worst`` (0-based
    user scenario), ``shortfall_worst``, ``bad_debt_worst``; per user scenario ``[S]``
    ``pnl_total``, ``pnl_gross``, ``accounts_liquidatable``, ``shortfall_total``,
    ``bad_debt``.
    """
    dt = np.dtype(dtype)
    n, A = h.balance.shape
    S1 = t.value.shape[1]
    chunk = chunk or default_chunk(S1)
    value = [None if Q is None else t.value[inst].astype(dt) for inst, Q in h.qty]
    mmtab = t.mm.astype(dt)
    price = t.price.astype(dt)
    keep = (1.0 - t.haircut).astype(dt)
    bal = h.balance.astype(dt)

    out = {k: np.empty(n) for k in ("equity", "collateral_value", "maintenance_margin", "pnl_worst",
                                    "shortfall_worst", "bad_debt_worst")}
    out["scenario_worst"] = np.empty(n, np.int64)
    sums = {k: np.zeros(S1) for k in ("pnl_total", "pnl_gross", "shortfall_total", "bad_debt")}
    sums["accounts_liquidatable"] = np.zeros(S1, np.int64)

    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        m = hi - lo
        eq = np.zeros((m, S1), dt)
        coll = np.zeros((m, S1), dt)
        for a, (inst, Q) in enumerate(h.qty):
            if Q is None:
                e = np.broadcast_to(bal[lo:hi, a, None], (m, S1)).copy()
            else:
                e = np.asarray(Q[lo:hi] @ value[a], dtype=dt)
                e += bal[lo:hi, a, None]
            e *= price[a]  # USD
            eq += e
            np.multiply(e, keep[a], out=e, where=e > 0)  # haircut the positive amounts
            coll += e
        mm = np.asarray(h.weight[lo:hi] @ mmtab, dtype=dt)

        pnl = eq - eq[:, :1]
        short = np.maximum(mm - coll, 0.0)
        liq = coll < mm
        bad = np.maximum(-eq, 0.0)

        out["equity"][lo:hi] = eq[:, 0]
        out["collateral_value"][lo:hi] = coll[:, 0]
        out["maintenance_margin"][lo:hi] = mm[:, 0]
        user = pnl[:, 1:]
        j = np.argmin(user, axis=1)
        out["scenario_worst"][lo:hi] = j
        out["pnl_worst"][lo:hi] = user[np.arange(m), j]
        out["shortfall_worst"][lo:hi] = short[:, 1:].max(axis=1)
        out["bad_debt_worst"][lo:hi] = bad[:, 1:].max(axis=1)
        sums["pnl_total"] += pnl.sum(axis=0, dtype=np.float64)
        sums["pnl_gross"] += np.abs(pnl).sum(axis=0, dtype=np.float64)
        sums["shortfall_total"] += short.sum(axis=0, dtype=np.float64)
        sums["bad_debt"] += bad.sum(axis=0, dtype=np.float64)
        sums["accounts_liquidatable"] += liq.sum(axis=0)

    for k, v in sums.items():
        out[k] = v[1:]  # user scenarios only
    return out


def run_reference(snap, scen, *, chunk: int | None = None, dtype=np.float64) -> dict:
    """All three stages; also returns the stage timings under ``"_seconds"``."""
    import time

    t0 = time.perf_counter()
    t = instrument_tables(snap, scen)
    t1 = time.perf_counter()
    h = holdings(snap)
    t2 = time.perf_counter()
    out = accounts_and_reductions(t, h, chunk=chunk, dtype=dtype)
    t3 = time.perf_counter()
    out["_seconds"] = {"tables": t1 - t0, "holdings": t2 - t1, "accounts": t3 - t2, "total": t3 - t0}
    return out


def rel_err(a: np.ndarray, b: np.ndarray, scale: np.ndarray | float | None = None) -> float:
    """``max |a - b| / max(|b|, scale)`` (0 where both are 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.abs(b) if scale is None else np.maximum(np.abs(b), scale)
    diff = np.abs(a - b)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(diff == 0, 0.0, diff / den)
    return float(np.max(r)) if r.size else 0.0

