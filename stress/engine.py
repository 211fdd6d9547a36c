"""The run loop: revalue once, then stream chunks of accounts through one jitted kernel.

Every instrument is valued once per scenario (``pricing.revalue`` → ``[I, S]``); accounts
gather from those matrices in fixed-shape chunks; each chunk reduces at once to per-account
rows and per-scenario sums, so no ``accounts x scenarios`` matrix of the whole exchange is ever
held. Inside a chunk the scenario axis is walked in tiles (``lax.scan``) so the working set
stays in cache; the snapshot state and the P&L reference come from the same ``portfolio.state``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

try:
    from jax import shard_map
except ImportError:  # jax < 0.6
    from jax.experimental.shard_map import shard_map

from . import insurance, liquidation, margin, portfolio, pricing
from ._tree import pytree_dataclass
from .portfolio import Holdings
from .scenarios import Scenarios
from .snapshot import OPTION, Snapshot

DTYPES = {"float64": jnp.float64, "float32": jnp.float32}
DEFAULT_CHUNK = 128  # accounts per chunk: [128, 256] tiles keep the working set in L2
VAR_LEVEL = 0.99
# Per-scenario sums over accounts; ``closed_out``: what positions closed out before a path's end
# gain after their liquidation (exactly 0 for one-step scenarios); ``fees``: liquidation fees.
SUM_NAMES = ("liquidatable", "shortfall", "bad_debt", "closed_out", "fees")


@pytree_dataclass
class Tables:
    """Per-run matrices every chunk reads, the scenario axis split into ``T`` tiles of ``W``.

    Scenario ``s`` of the set sits at tile ``s // W``, column ``s % W``; columns past the end
    of the set are padding (``user`` False). The unshocked market is kept apart (``*0``).
    For paths of ``K`` steps a tile holds ``K`` blocks of ``W`` columns: the last step first,
    then the steps before it, so one state evaluation covers every step; each account is then
    taken at its first breaching step, or the last (``liquidation.path_outcome``).
    """

    value: Any  # [T, I, K*W] value per contract, settlement-asset units
    mm: Any  # [T, I, K*W] maintenance margin per contract of weight, USD
    price: Any  # [T, A, K*W] asset prices, USD
    user: Any  # [T, W] bool: a scenario of the set (not padding)
    random: Any  # [T, W] bool: a random (Monte Carlo / replay) scenario
    random_index: Any  # [m] int32: flat column (tile * W + column) of each random scenario
    value0: Any  # [I, 1] at the snapshot
    mm0: Any  # [I, 1]
    price0: Any  # [A, 1]
    haircut: Any  # [A]
    notional: Any = None  # [T, I, K*W] notional per contract, USD; None when no fee is charged
    fee_rate: Any = None  # [] liquidation fee, of the notional closed out
    lag: int = dataclasses.field(default=0, metadata={"static": True})  # oracle lag, steps
    lags: tuple = dataclasses.field(default=(), metadata={"static": True})  # lags reported side by side


def tile_width(n_scenarios: int, max_tile: int = 256) -> int:
    """Scenario tile: a power of two up to ``max_tile``, so chunk working sets stay in cache."""
    return min(max_tile, 1 << max(3, math.ceil(math.log2(max(n_scenarios, 1)))))


@jax.jit
def _revalue_and_margin(inst, market, params, spot, vol, horizon):
    """Instrument values and margin per contract under every scenario, in one compilation."""
    rv = pricing.revalue(inst, market, spot, vol, horizon)
    im, mm = margin.per_contract(inst, params, rv["spot"], rv["option"])
    c = inst.contract_size[:, None]
    rv["notional"] = jnp.where(inst.inverse[:, None] & (inst.kind != OPTION)[:, None], c, c * rv["spot"])
    return rv, im, mm


def tables(snap: Snapshot, scen: Scenarios, dtype: Any = jnp.float64) -> tuple[Tables, dict]:
    """Revalue every instrument under the snapshot and every scenario, tiled and padded."""
    liq_cfg = liquidation.config(snap.liquidation_config)
    fee_rate = liq_cfg["fee_rate"]
    S = len(scen)
    W = tile_width(S)
    T = math.ceil(S / W)
    A = snap.n_assets
    spot = np.ones((1 + T * W, A))
    vol = np.zeros((1 + T * W, A))
    hor = np.zeros(1 + T * W)
    spot[1 : 1 + S], vol[1 : 1 + S], hor[1 : 1 + S] = scen.spot_mult, scen.vol_shift, scen.horizon_days
    rv, im, mm = _revalue_and_margin(snap.instruments, snap.market, snap.params, spot, vol, hor)

    def tiled(x):  # [X, 1 + T*W] -> [T, X, W]
        return x[:, 1:].reshape(x.shape[0], T, W).transpose(1, 0, 2).astype(dtype)

    value, mm_t, price, notional = tiled(rv["value"]), tiled(mm), tiled(rv["price"]), tiled(rv["notional"])
    if scen.steps > 1:  # every earlier step of every path, revalued in one call
        K1 = scen.steps - 1
        p_spot, p_vol, p_hor = np.ones((K1, T * W, A)), np.zeros((K1, T * W, A)), np.zeros((K1, T * W))
        p_spot[:, :S] = scen.path_spot_mult.transpose(1, 0, 2)
        p_vol[:, :S] = scen.path_vol_shift.transpose(1, 0, 2)
        p_hor[:, :S] = scen.path_horizon_days.T
        prv, _, pmm = _revalue_and_margin(snap.instruments, snap.market, snap.params, p_spot.reshape(-1, A),
                                          p_vol.reshape(-1, A), p_hor.reshape(-1))

        def steps(x):  # [X, K1 * T * W] -> [T, X, K1 * W], step-major within a tile
            return x.reshape(x.shape[0], K1, T, W).transpose(2, 0, 1, 3).reshape(T, x.shape[0], K1 * W).astype(dtype)

        value = jnp.concatenate([value, steps(prv["value"])], axis=2)
        mm_t = jnp.concatenate([mm_t, steps(pmm)], axis=2)
        price = jnp.concatenate([price, steps(prv["price"])], axis=2)
        notional = jnp.concatenate([notional, steps(prv["notional"])], axis=2)

    user = np.arange(T * W) < S
    random = np.zeros(T * W, bool)
    random[:S] = scen.random
    t = Tables(
        value=value,
        mm=mm_t,
        price=price,
        user=jnp.asarray(user.reshape(T, W)),
        random=jnp.asarray(random.reshape(T, W)),
        random_index=jnp.asarray(np.flatnonzero(random).astype(np.int32)),
        value0=rv["value"][:, :1].astype(dtype),
        mm0=mm[:, :1].astype(dtype),
        price0=rv["price"][:, :1].astype(dtype),
        haircut=jnp.asarray(snap.params.haircut, dtype),
        **({"notional": notional, "fee_rate": jnp.asarray(fee_rate, dtype)} if fee_rate > 0 else {}),
        lag=liq_cfg["oracle_lag_steps"],
        lags=liq_cfg["oracle_lags"],
    )
    # Host copies at float64 for exchange-level numbers.
    price_all = np.asarray(rv["price"])[:, : 1 + S]
    host = {"price_all": price_all, "value": np.asarray(rv["value"])[:, : 1 + S], "im0": np.asarray(im[:, 0])}
    return t, host


def chunk_kernel(h: Holdings, t: Tables, n_random: int, with_pnl: bool = False, level: float = VAR_LEVEL) -> dict:
    """All per-scenario account work for one chunk, reduced at once, tile by tile.

    Per tile, the accounts' state (equity, collateral, margin) is computed once and kept
    (``optimization_barrier``: XLA would otherwise recompute it inside every reduction), then
    reduced: per account, the tile's worst P&L and largest ``margin - collateral``; per
    scenario, the shortfall, bad-debt and liquidatable sums. The scenario of the worst P&L is
    found after the scan, by revaluing each account on its worst tile only.

    Returns:
      Per-account ``[n]`` rows and ``sums``, ``[len(SUM_NAMES), T * W]`` per-scenario sums
      over the chunk's valid accounts.
    """
    eq0, coll0, mm0 = (x[:, 0] for x in portfolio.state(h, t.value0, t.mm0, t.price0, t.haircut))
    n = eq0.shape[0]
    T, W = t.user.shape
    dt = eq0.dtype
    validf = h.valid.astype(dt)
    keep_pnl = with_pnl or n_random > 0

    paths = t.value.shape[2] > W  # K > 1 steps per scenario
    fees = t.fee_rate is not None

    def outcome(value, mm, price, notional):
        """Per account and scenario: equity after close-out and fee, collateral and margin at
        the deciding step, liquidated or not, the fee, and the equity held to the end."""
        if t.fee_rate is None:
            eq, coll, m = portfolio.state(h, value, mm, price, t.haircut)
            eq, coll, m = jax.lax.optimization_barrier((eq, coll, m))
            eq_end = eq[:, :W]  # as if every position were held to the last step
            lagged = [liquidation.path_outcome(W, eq, coll, m, lag=k)[0] for k in t.lags]
            eq, coll, m, liq = liquidation.path_outcome(W, eq, coll, m, lag=t.lag)
            return eq, coll, m, liq, jnp.zeros_like(eq), eq_end, lagged
        eq, coll, m, g = jax.lax.optimization_barrier(portfolio.state(h, value, mm, price, t.haircut, notional))
        eq_end = eq[:, :W]
        # a fee never creates bad debt, so the lags' bad debt needs no fee
        lagged = [liquidation.path_outcome(W, eq, coll, m, lag=k)[0] for k in t.lags]
        eq, coll, m, g, liq = liquidation.path_outcome(W, eq, coll, m, g, lag=t.lag)
        f = liquidation.fee(eq, g, liq, t.fee_rate)
        return eq - f, coll, m, liq, f, eq_end, lagged

    def tile(carry, x):
        value, mm, price, notional, user, rnd, k = x
        # closed out at the first step of a path that breaches maintenance margin, else held
        eq, coll, m, liq, f, eq_end, lagged = outcome(value, mm, price, notional)
        liq = liq.astype(dt)
        pnl = eq - eq0[:, None]
        gap = m - coll  # > 0: liquidated (at that step), and the shortfall there
        best, best_tile, gap_max, n_liq, fee_max = carry
        t_min = jnp.min(jnp.where(user[None, :], pnl, jnp.inf), axis=1)
        better = t_min < best  # strict: ties keep the earlier tile (file order)
        carry = (
            jnp.where(better, t_min, best),
            jnp.where(better, k, best_tile),
            jnp.maximum(gap_max, jnp.max(jnp.where(user[None, :], gap, -jnp.inf), axis=1)),
            n_liq + (jnp.sum(liq * rnd[None, :], axis=1) if n_random else 0.0),
            jnp.maximum(fee_max, jnp.max(jnp.where(user[None, :], f, 0.0), axis=1)) if fees else fee_max,
        )
        bad = liquidation.bad_debt(eq)
        zero = jnp.zeros(W, dt)
        sums = jnp.stack([validf @ liq, validf @ jnp.maximum(gap, 0.0), validf @ bad,
                          validf @ (eq_end - eq - f) if paths else zero,  # nothing closes early in one step
                          validf @ f if fees else zero])
        lag_bad = jnp.stack([validf @ liquidation.bad_debt(e) for e in lagged]) if lagged else None
        return carry, (sums, largest_two(bad * validf[:, None]), lag_bad, pnl if keep_pnl else None)

    inf = jnp.full(n, jnp.inf, dt)
    init = (inf, jnp.zeros(n, jnp.int32), -inf, jnp.zeros(n, dt), jnp.zeros(n, dt))
    xs = (t.value, t.mm, t.price, t.notional, t.user, t.random, jnp.arange(T, dtype=jnp.int32))
    (best, best_tile, gap_max, n_liq, fee_max), (sums, top2, lag_bad, pnl) = jax.lax.scan(tile, init, xs)

    # The worst scenario: revalue each account on its own worst tile, take the first minimum.
    at_best = lambda x: None if x is None else (lambda i: x[best_tile, i])  # noqa: E731
    eq_b = outcome(at_best(t.value), at_best(t.mm), at_best(t.price), at_best(t.notional))[0]
    masked = jnp.where(t.user[best_tile], eq_b - eq0[:, None], jnp.inf)
    arg = best_tile * W + jnp.argmin(masked, axis=1).astype(jnp.int32)
    out = {
        "equity": eq0,
        "collateral_value": coll0,
        "maintenance_margin": mm0,
        "pnl_worst": best,
        "scenario_worst": arg,
        "shortfall_worst": jnp.maximum(gap_max, 0.0),
        # bad debt falls as equity rises, so its worst is at the worst P&L
        "bad_debt_worst": liquidation.bad_debt(eq0 + best),
        "liquidation_cost_worst": fee_max,
        "sums": sums.transpose(1, 0, 2).reshape(len(SUM_NAMES), T * W),
        "top2": top2.transpose(1, 0, 2).reshape(2, T * W),  # the chunk's two largest bad debts
    }
    if lag_bad is not None:  # bad debt per scenario under each reported oracle lag
        out["lag_bad"] = lag_bad.transpose(1, 0, 2).reshape(len(t.lags), T * W)
    if keep_pnl:
        pnl = pnl.transpose(1, 0, 2).reshape(n, T * W)  # [n, S_pad]
    if n_random:
        out["p_liquidation"] = n_liq / n_random
        loss = -pnl[:, t.random_index]  # [n, m]
        if jax.default_backend() == "cpu":  # selected on the host: see tail_loss
            out["random_loss"] = loss
        else:
            out["var_99"], out["es_99"] = tail_loss(loss, level)
    if with_pnl:
        out["pnl"] = pnl
    return out


def largest_two(x: Any) -> Any:
    """``[2, W]``: the largest and second-largest entry of each column of ``x`` ``[n, W]``,
    ``x >= 0``: the maximum, then the maximum below it, or the maximum again when it occurs
    twice (plain fused reductions: a variadic (first, second) reduce doubled the kernel's time)."""
    first = jnp.max(x, axis=0)
    below = jnp.max(jnp.where(x < first[None, :], x, 0.0), axis=0)
    twice = jnp.sum((x == first[None, :]).astype(x.dtype), axis=0) > 1
    return jnp.stack([first, jnp.where(twice, first, below)])


def _tail_size(m: int, level: float) -> int:
    """``r = m - k + 1`` with ``k = ceil(level * m)``: how many of ``m`` losses make the tail."""
    return m - math.ceil(level * m - 1e-9) + 1


def tail_loss(loss: Any, level: float = VAR_LEVEL) -> tuple[Any, Any]:
    """Empirical VaR and ES of each row of ``loss`` ``[n, m]``, on the device (``top_k``).

    With the ``m`` losses sorted ascending ``L(1) <= ... <= L(m)`` and ``k = ceil(level * m)``:
    ``VaR = L(k)`` (the lower empirical quantile) and ``ES = mean(L(k), ..., L(m))``, the
    mean of the ``r = m - k + 1`` largest losses: only those are selected, never a full sort.
    """
    tail, _ = jax.lax.top_k(loss, _tail_size(loss.shape[1], level))  # descending
    return tail[:, -1], jnp.mean(tail, axis=1)


def tail_loss_host(loss: np.ndarray, level: float = VAR_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """``tail_loss`` on the host by NumPy's introselect (``np.partition``): on CPU, XLA's sort
    and ``top_k`` select at a few million elements per second, 30x slower, and a host callback
    inside the multi-device kernel can deadlock, so CPU runs return the random losses per
    chunk and select here, while the devices work on the next chunks."""
    m = loss.shape[1]
    r = _tail_size(m, level)
    top = np.partition(loss, m - r, axis=1)[:, m - r :]
    return top.min(axis=1), top.mean(axis=1)


def devices() -> list:
    """The local devices chunks are spread over (every CPU device, or every GPU)."""
    return jax.local_devices()


@functools.lru_cache(maxsize=None)
def sharded_kernel(n_random: int, with_pnl: bool, n_devices: int, level: float = VAR_LEVEL) -> Callable:
    """``chunk_kernel`` over a group of chunks ``[n_devices * B, ...]``: each device runs its
    ``B`` chunks in turn (``lax.map``), all devices at once (``shard_map``); compiled once per
    holdings shape for the whole device mesh."""
    mesh = Mesh(np.array(devices()[:n_devices]), ("d",))

    def local(h: Holdings, t: Tables) -> dict:
        return jax.lax.map(lambda one: chunk_kernel(one, t, n_random, with_pnl, level), h)

    specs = dict(mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
    try:  # every device runs the same per-chunk code; no cross-device values to check
        mapped = shard_map(local, check_vma=False, **specs)
    except TypeError:  # jax < 0.6 calls it check_rep
        mapped = shard_map(local, check_rep=False, **specs)
    return jax.jit(mapped)


def position_weights(snap: Snapshot) -> np.ndarray:
    """``[N]`` contracts of each position that carry its instrument's margin."""
    kind = np.asarray(snap.instruments.kind)
    return np.asarray(margin.position_weight(kind[snap.pos_instrument], snap.pos_quantity))


def buckets(snap: Snapshot) -> list[portfolio.Bucket]:
    """The snapshot's accounts grouped by padded holdings shape ``(J, L)``."""
    return portfolio.layout(
        snap.pos_account, snap.pos_instrument, snap.pos_quantity, position_weights(snap),
        np.asarray(snap.instruments.settlement), snap.balances,
    )


MAX_CHUNKS_PER_DEVICE = 8  # per call: enough to hide dispatch, few enough to pad little


def _groups(snap: Snapshot, chunk: int, dtype: Any, n_devices: int):
    """Yield ``(account indices per chunk, Holdings [G, chunk, ...])``, bucket by bucket.

    A group holds ``G = n_devices * B`` chunks, ``B`` per device, with ``B`` a power of two
    sized to the bucket (so a bucket of 30 market makers is not padded to 8 chunks a
    device). The last group of a bucket is padded with empty chunks and the last chunk with
    empty rows (``valid`` False), so shapes stay fixed.
    """
    for b in buckets(snap):
        m = len(b.accounts)
        per_device = math.ceil(m / (chunk * n_devices))
        B = min(MAX_CHUNKS_PER_DEVICE, 1 << max(0, math.ceil(math.log2(max(per_device, 1)))))
        group = n_devices * B
        step = chunk * group
        for lo in range(0, m, step):
            hi = min(lo + step, m)
            pad = step - (hi - lo)

            def take(x, dt=None):
                x = x[lo:hi]
                if pad:
                    x = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
                x = x.reshape((group, chunk) + x.shape[1:])
                return x if dt is None else x.astype(dt)

            accs = [b.accounts[lo + g * chunk : min(lo + (g + 1) * chunk, hi)] for g in range(group)]
            yield accs, Holdings(
                inst=take(b.inst), qty=take(b.qty, dtype), weight=take(b.weight, dtype), asset=take(b.asset),
                balance=take(b.balance, dtype), valid=(np.arange(step) < hi - lo).reshape(group, chunk),
            )


@dataclasses.dataclass(frozen=True)
class Result:
    """A stress run: per-account rows, per-scenario rows and the summary (SPEC section 5)."""

    accounts: Any  # pandas DataFrame, one row per account
    scenarios: Any  # pandas DataFrame, one row per scenario
    summary: dict


def exchange_pnl(snap: Snapshot, host: dict) -> tuple[np.ndarray, np.ndarray]:
    """Exchange-wide P&L per scenario and its gross scale, USD, at the instrument level.

    Equity is linear in holdings, so the sum over accounts of their P&L is the open interest
    of each instrument times its USD value change, plus the balances' revaluation; no
    per-account work is needed. ``gross`` sums the same terms in absolute value per
    position and balance (the scale against which a net total of ~0 is judged).
    """
    settle = np.asarray(snap.instruments.settlement)
    usd = host["value"] * host["price_all"][settle]  # [I, 1 + S] USD value per contract
    d_usd = usd[:, 1:] - usd[:, :1]
    d_price = host["price_all"][:, 1:] - host["price_all"][:, :1]  # [A, S]
    I = len(snap.instrument_ids)
    oi = np.bincount(snap.pos_instrument, weights=snap.pos_quantity, minlength=I)
    gross_q = np.bincount(snap.pos_instrument, weights=np.abs(snap.pos_quantity), minlength=I)
    total = oi @ d_usd + snap.balances.sum(axis=0) @ d_price
    gross = gross_q @ np.abs(d_usd) + np.abs(snap.balances).sum(axis=0) @ np.abs(d_price)
    return total, gross


def _initial_margin(snap: Snapshot, im0: np.ndarray) -> np.ndarray:
    """Initial margin per account at the snapshot, USD (``[n]``)."""
    w = position_weights(snap) * im0[snap.pos_instrument]
    return np.bincount(snap.pos_account, weights=w, minlength=snap.n_accounts)


def _stream(snap, scen, chunk_size, dtype, progress, with_pnl, level=VAR_LEVEL):
    """Revalue once, stream every chunk through the kernel; returns ``(host tables,
    per-account columns, per-scenario sums, [n, S] P&L or None)``. ``level``: the
    confidence of ``var_99``/``es_99`` (0.99 for reports; the ``var`` margin model sets its own)."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    t, host = tables(snap, scen, dt)
    S = len(scen)
    n_random = int(scen.random.sum())
    D = len(devices())
    kernel = sharded_kernel(n_random, with_pnl, D, level)
    total = np.zeros((len(SUM_NAMES), t.user.size))
    largest = np.zeros((2, t.user.size))  # per scenario, the two largest account bad debts
    lag_total = np.zeros((len(t.lags), t.user.size))  # bad debt per reported oracle lag
    per_acc: dict[str, np.ndarray] = {}
    pnl = np.empty((snap.n_accounts, S), np.float64) if with_pnl else None
    done = 0
    pending: list = []

    def put(name: str, acc: np.ndarray, values: np.ndarray) -> None:
        if name not in per_acc:
            per_acc[name] = np.empty(snap.n_accounts, values.dtype if values.dtype.kind in "iu" else np.float64)
        per_acc[name][acc] = values

    def drain_one(accs, out) -> None:
        nonlocal done, total
        out = jax.device_get(out)
        total = total + out.pop("sums").sum(axis=0, dtype=np.float64)
        if "lag_bad" in out:
            lag_total[:] += out.pop("lag_bad").sum(axis=0, dtype=np.float64)
        top2 = out.pop("top2")  # [G, 2, S_pad]: merge into the exchange's two largest
        both = np.concatenate([largest[None], top2.astype(np.float64)], axis=0).reshape(-1, top2.shape[-1])
        largest[:] = np.sort(both, axis=0)[-2:][::-1]
        for g, acc in enumerate(accs):
            n = len(acc)
            if not n:
                continue
            for k, v in out.items():
                if k == "pnl":
                    pnl[acc] = v[g, :n, :S]
                elif k == "random_loss":
                    var, es = tail_loss_host(v[g, :n], level)
                    put("var_99", acc, var)
                    put("es_99", acc, es)
                else:
                    put(k, acc, v[g, :n])
            done += n
        if progress:
            progress(done, snap.n_accounts)

    # Dispatch is asynchronous: the devices compute while Python prepares the next group and
    # finishes the ones before. Groups in flight are bounded by the bytes they return (the
    # random losses of a Monte Carlo run are [chunk, paths] per chunk).
    per_group = chunk_size * D * MAX_CHUNKS_PER_DEVICE * max(n_random, S if with_pnl else 0) * 8
    in_flight = max(1, min(4, int(256e6 // max(per_group, 1))))
    for accs, h in _groups(snap, chunk_size, dt, D):
        pending.append((accs, kernel(h, t)))
        while len(pending) > in_flight:
            drain_one(*pending.pop(0))
    while pending:
        drain_one(*pending.pop(0))
    sums = {name: total[i, :S] for i, name in enumerate(SUM_NAMES)}
    sums["cover2"] = largest[:, :S].sum(axis=0)  # CPMI-IOSCO Cover 2: the two largest defaults
    sums["lag_bad_debt"] = dict(zip(t.lags, lag_total[:, :S]))
    return host, per_acc, sums, pnl


def run(
    snap: Snapshot,
    scen: Scenarios,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    dtype: str = "float64",
    progress: Callable[[int, int], None] | None = None,
) -> Result:
    """Stress the exchange under every scenario (SPEC sections 2 and 5).

    Args:
      snap: the snapshot. scen: the scenario set.
      chunk_size: accounts per chunk (results do not depend on it).
      dtype: ``"float64"`` (default, exact reports) or ``"float32"`` (speed).
      progress: called as ``progress(accounts_done, accounts_total)``.

    Returns:
      ``Result`` with ``accounts`` and ``scenarios`` DataFrames and the ``summary`` dict.
    """
    import pandas as pd

    t0 = time.perf_counter()
    host, acc, sums, _ = _stream(snap, scen, chunk_size, dtype, progress, False)
    n_random = int(scen.random.sum())
    S = len(scen)
    nan = np.full(snap.n_accounts, np.nan)

    im = _initial_margin(snap, host["im0"])
    names = np.array(scen.names, dtype=object)
    worst_idx = np.clip(acc["scenario_worst"], 0, S - 1)
    accounts = pd.DataFrame(
        {
            "account_id": snap.account_ids.astype(str),
            "equity": acc["equity"],
            "collateral_value": acc["collateral_value"],
            "initial_margin": im,
            "maintenance_margin": acc["maintenance_margin"],
            "liquidatable": acc["collateral_value"] < acc["maintenance_margin"],
            "pnl_worst": acc["pnl_worst"],
            "scenario_worst": names[worst_idx],
            "var_99": acc.get("var_99", nan),
            "es_99": acc.get("es_99", nan),
            "p_liquidation": acc.get("p_liquidation", nan),
            "shortfall_worst": acc["shortfall_worst"],
            "bad_debt_worst": acc["bad_debt_worst"],
            "liquidation_cost_worst": acc["liquidation_cost_worst"],
        }
    )

    pnl_held, pnl_gross = exchange_pnl(snap, host)
    closed_out, fees = sums["closed_out"], sums["fees"]
    fund = insurance.fund_value(snap.insurance_fund, host["price_all"][:, 1:])
    bad = sums["bad_debt"]
    fund_after, social = insurance.waterfall(bad, fund + fees)  # fees in, bad debt out
    scenarios = pd.DataFrame(
        {
            "scenario": list(scen.names),
            "kind": list(scen.kinds),
            # the accounts' P&L: positions held to the end, less what positions closed out
            # earlier along a path went on to gain (which the market, not the accounts, has)
            "pnl_total": pnl_held - closed_out - fees,
            "pnl_closed_out": closed_out,
            "fees": fees,
            "pnl_gross": pnl_gross,
            "accounts_liquidatable": np.rint(sums["liquidatable"]).astype(np.int64),
            "shortfall_total": sums["shortfall"],
            "bad_debt": bad,
            "insurance_fund_before": fund,
            "insurance_fund_after": fund_after,
            "socialized_loss": social,
            "cover2": sums["cover2"],
            "cover2_covered": sums["cover2"] <= fund + fees,
        }
    )

    order = np.lexsort((np.arange(S), -scenarios["shortfall_total"].to_numpy(), -bad))
    worst = int(order[0])
    rnd = scen.random
    depleted = (bad > 0) & (bad >= fund + fees)
    summary = {
        "as_of": snap.as_of.isoformat().replace("+00:00", "Z"),
        "accounts": int(snap.n_accounts),
        "positions": int(snap.n_positions),
        "scenarios": int(S),
        "random_scenarios": int(n_random),
        "insurance_fund": float(insurance.fund_value(snap.insurance_fund, host["price_all"][:, 0])),
        "worst_scenario": scen.names[worst],
        "worst_bad_debt": float(bad[worst]),
        "p_fund_depleted": float(depleted[rnd].mean()) if n_random else None,
        **_bad_debt_distribution(bad[rnd]),
        "accounts_liquidatable": int(accounts["liquidatable"].sum()),
        "oracle_lag_steps": int(liquidation.config(snap.liquidation_config)["oracle_lag_steps"]),
        "oracle_lags": _by_lag(sums["lag_bad_debt"], fund, rnd),
        "cover2_worst": float(sums["cover2"].max()),
        "cover2_scenario": scen.names[int(np.argmax(sums["cover2"]))],
        "cover2_covered": bool((sums["cover2"] <= fund + fees).all()),
        "total_equity": float(accounts["equity"].sum()),
        "total_initial_margin": float(im.sum()),
        "total_maintenance_margin": float(accounts["maintenance_margin"].sum()),
        "margin_model": "standard",
        "dtype": dtype if isinstance(dtype, str) else np.dtype(dtype).name,
        "runtime_seconds": time.perf_counter() - t0,
    }
    return Result(accounts=accounts, scenarios=scenarios, summary=summary)


def _by_lag(lag_bad: dict, fund: np.ndarray, rnd: np.ndarray) -> list[dict]:
    """Per reported oracle lag: the worst bad debt, the mean bad debt and P(fund depleted) over
    random scenarios (the fund before fees: fees differ per lag and are not tracked per lag)."""
    out = []
    for lag, bad in lag_bad.items():
        depleted = (bad > 0) & (bad >= fund)
        out.append({"lag": int(lag), "worst_bad_debt": float(bad.max()),
                    "bad_debt_mean": float(bad[rnd].mean()) if rnd.any() else None,
                    "p_fund_depleted": float(depleted[rnd].mean()) if rnd.any() else None})
    return out


def _bad_debt_distribution(bad: np.ndarray) -> dict:
    """Exchange-wide bad debt over the random scenarios: mean, 99% quantile and ES (the
    estimator of ``tail_loss``); None when the run has no random scenarios."""
    if not len(bad):
        return {"bad_debt_mean": None, "bad_debt_q99": None, "bad_debt_es99": None}
    q, es = tail_loss_host(np.asarray(bad, np.float64)[None, :])
    return {"bad_debt_mean": float(bad.mean()), "bad_debt_q99": float(q[0]), "bad_debt_es99": float(es[0])}


def pnl_matrix(snap: Snapshot, scen: Scenarios, *, chunk_size: int = DEFAULT_CHUNK, dtype: str = "float64"):
    """Equity change per account and scenario, USD, collateral included.

    Returns:
      DataFrame indexed by ``account_id`` with one column per scenario (file order). It holds
      the full ``accounts x scenarios`` matrix, so it is meant for modest exchanges or subsets.
    """
    import pandas as pd

    *_, pnl = _stream(snap, scen, chunk_size, dtype, None, True)
    return pd.DataFrame(pnl, index=pd.Index(snap.account_ids.astype(str), name="account_id"), columns=list(scen.names))
