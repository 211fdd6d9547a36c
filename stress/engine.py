"""The run loop: revalue once, then stream chunks of accounts through one jitted kernel.

Every instrument is valued once per scenario (``pricing.revalue`` → ``[I, S]``); accounts
gather from those matrices in fixed-shape chunks; each chunk reduces at once to per-account
rows and per-scenario sums, so no ``accounts x scenarios`` matrix of the whole exchange is ever
held. Column 0 of every internal matrix is the unshocked market (the snapshot itself), so the
snapshot state and the P&L reference come from the same kernel.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import insurance, liquidation, margin, portfolio, pricing
from ._tree import pytree_dataclass
from .portfolio import Holdings
from .scenarios import Scenarios
from .snapshot import Snapshot

DTYPES = {"float64": jnp.float64, "float32": jnp.float32}
DEFAULT_CHUNK = 128
VAR_LEVEL = 0.99


@pytree_dataclass
class Tables:
    """Per-run matrices every chunk reads; scenario axis ``S`` includes the base column 0."""

    value: Any  # [I, S] value per contract, settlement-asset units
    mm: Any  # [I, S] maintenance margin per contract of weight, USD
    price: Any  # [A, S] asset prices, USD
    haircut: Any  # [A]
    settlement: Any  # [I] int32 settlement asset index
    user: Any  # [S] bool: a user scenario (not the base column, not padding)
    random: Any  # [S] bool: a random (Monte Carlo / replay) scenario


def pad_scenarios(n: int) -> int:
    """Pad the scenario axis to a few sizes so shapes (and compiled kernels) repeat."""
    if n <= 128:
        return 1 << max(3, math.ceil(math.log2(n)))
    return 128 * math.ceil(n / 128)


def tables(snap: Snapshot, scen: Scenarios, dtype: Any = jnp.float64) -> tuple[Tables, dict]:
    """Revalue every instrument under the base market and every scenario, padded."""
    S = 1 + len(scen)
    S_pad = pad_scenarios(S)
    A = snap.n_assets
    spot = np.ones((S_pad, A))
    vol = np.zeros((S_pad, A))
    hor = np.zeros(S_pad)
    spot[1:S], vol[1:S], hor[1:S] = scen.spot_mult, scen.vol_shift, scen.horizon_days
    rv = pricing.revalue_jit(snap.instruments, snap.market, spot, vol, hor)
    im, mm = jax.jit(margin.per_contract)(snap.instruments, snap.params, rv["spot"], rv["option"])
    cols = np.arange(S_pad)
    user = (cols >= 1) & (cols < S)
    random = np.zeros(S_pad, bool)
    random[1:S] = scen.random
    t = Tables(
        value=rv["value"].astype(dtype),
        mm=mm.astype(dtype),
        price=rv["price"].astype(dtype),
        haircut=jnp.asarray(snap.params.haircut, dtype),
        settlement=jnp.asarray(snap.instruments.settlement),
        user=jnp.asarray(user),
        random=jnp.asarray(random),
    )
    # Host copies at float64 for exchange-level numbers.
    host = {"price": np.asarray(rv["price"]), "im0": np.asarray(im[:, 0]), "mm0": np.asarray(mm[:, 0])}
    return t, host


@partial(jax.jit, static_argnames=("n_assets", "n_random", "with_pnl"))
def chunk_kernel(h: Holdings, t: Tables, n_assets: int, n_random: int, with_pnl: bool = False) -> dict:
    """All per-scenario account work for one chunk, reduced at once.

    Returns per-account ``[n]`` rows (snapshot state, worst cases, random-scenario statistics)
    and per-scenario ``[S]`` sums over the chunk's valid accounts.
    """
    e = portfolio.net_amounts(h, t.value, t.settlement, n_assets)  # [n, A, S]
    eq = portfolio.equity(e, t.price)  # [n, S]
    coll = portfolio.collateral(e, t.price, t.haircut)
    mm = portfolio.weighted_sum(h, t.mm)
    pnl = eq - eq[:, :1]
    short = jnp.maximum(mm - coll, 0.0)
    liq = coll < mm
    bad = liquidation.bad_debt(eq)

    valid = h.valid[:, None]
    user = t.user[None, :]

    def total(x):
        return jnp.sum(jnp.where(valid, x, 0), axis=0)

    masked = jnp.where(user, pnl, jnp.inf)
    out = {
        "equity": eq[:, 0],
        "collateral_value": coll[:, 0],
        "maintenance_margin": mm[:, 0],
        "pnl_worst": jnp.min(masked, axis=1),
        "scenario_worst": jnp.argmin(masked, axis=1),
        "shortfall_worst": jnp.max(jnp.where(user, short, -jnp.inf), axis=1),
        "bad_debt_worst": jnp.max(jnp.where(user, bad, -jnp.inf), axis=1),
        "s_pnl": total(pnl),
        "s_pnl_abs": total(jnp.abs(pnl)),
        "s_liquidatable": total(liq.astype(jnp.int32)),
        "s_shortfall": total(short),
        "s_bad_debt": total(bad),
    }
    if n_random:
        rnd = t.random[None, :]
        out["p_liquidation"] = jnp.sum(liq & rnd, axis=1) / n_random
        out["var_99"], out["es_99"] = tail_loss(jnp.where(rnd, -pnl, -jnp.inf), n_random)
    if with_pnl:
        out["pnl"] = pnl
    return out


def tail_loss(loss: Any, m: int, level: float = VAR_LEVEL) -> tuple[Any, Any]:
    """Empirical VaR and ES of the ``m`` finite entries per row (others are ``-inf``).

    With the ``m`` losses sorted ascending ``L(1) <= ... <= L(m)`` and ``k = ceil(level * m)``:
    ``VaR = L(k)`` (the lower empirical quantile) and ``ES = mean(L(k), ..., L(m))``.
    """
    S = loss.shape[1]
    k = math.ceil(level * m - 1e-9)
    srt = jnp.sort(loss, axis=1)
    first = S - m + k - 1
    return srt[:, first], jnp.mean(srt[:, first:], axis=1)


def _chunks(snap: Snapshot, chunk: int, dtype: Any):
    """Yield ``(account indices, Holdings)`` for fixed-shape chunks, bucket by bucket."""
    kind = np.asarray(snap.instruments.kind)
    weight_all = np.asarray(margin.position_weight(kind[snap.pos_instrument], snap.pos_quantity))
    A = snap.n_assets
    for b in portfolio.buckets(snap.pos_account, snap.n_accounts):
        m = len(b.accounts)
        for lo in range(0, m, chunk):
            acc = b.accounts[lo : lo + chunk]
            slots = b.slots[lo : lo + chunk]
            n = len(acc)
            pad = chunk - n
            has = slots >= 0
            s = np.where(has, slots, 0)
            inst = np.where(has, snap.pos_instrument[s], 0).astype(np.int32)
            qty = np.where(has, snap.pos_quantity[s], 0.0)
            w = np.where(has, weight_all[s], 0.0)
            bal = snap.balances[acc]
            if pad:
                inst = np.pad(inst, ((0, pad), (0, 0)))
                qty = np.pad(qty, ((0, pad), (0, 0)))
                w = np.pad(w, ((0, pad), (0, 0)))
                bal = np.pad(bal, ((0, pad), (0, 0)))
            valid = np.arange(chunk) < n
            yield acc, Holdings(
                inst=inst, qty=qty.astype(dtype), weight=w.astype(dtype), balance=bal.astype(dtype).reshape(chunk, A), valid=valid
            )


@dataclasses.dataclass(frozen=True)
class Result:
    """A stress run: per-account rows, per-scenario rows and the summary (SPEC section 5)."""

    accounts: Any  # pandas DataFrame, one row per account
    scenarios: Any  # pandas DataFrame, one row per scenario
    summary: dict


def _initial_margin(snap: Snapshot, im0: np.ndarray) -> np.ndarray:
    kind = np.asarray(snap.instruments.kind)
    w = np.asarray(margin.position_weight(kind[snap.pos_instrument], snap.pos_quantity))
    return np.bincount(snap.pos_account, weights=w * im0[snap.pos_instrument], minlength=snap.n_accounts)


def _stream(snap, scen, chunk_size, dtype, progress, with_pnl):
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    t, host = tables(snap, scen, dt)
    n_random = int(scen.random.sum())
    per_acc: dict[str, np.ndarray] = {}
    sums: dict[str, Any] = {}
    pnl = np.empty((snap.n_accounts, len(scen)), np.float64) if with_pnl else None
    done = 0
    pending = []

    def drain():
        nonlocal done
        for acc, out in pending:
            out = jax.device_get(out)
            n = len(acc)
            for k, v in out.items():
                if k.startswith("s_"):
                    sums[k] = sums.get(k, 0) + v.astype(np.float64)
                elif k == "pnl":
                    pnl[acc] = v[:n, 1 : 1 + len(scen)]
                else:
                    if k not in per_acc:
                        per_acc[k] = np.empty(snap.n_accounts, v.dtype if v.dtype.kind in "iu" else np.float64)
                    per_acc[k][acc] = v[:n]
            done += n
            if progress:
                progress(done, snap.n_accounts)
        pending.clear()

    for acc, h in _chunks(snap, chunk_size, dt):
        pending.append((acc, chunk_kernel(h, t, snap.n_assets, n_random, with_pnl)))
        if len(pending) >= 32:  # keep the device busy while bounding what is in flight
            drain()
    drain()
    return t, host, per_acc, sums, pnl, n_random


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
    t, host, acc, sums, _, n_random = _stream(snap, scen, chunk_size, dtype, progress, False)
    S = len(scen)
    cols = slice(1, 1 + S)
    nan = np.full(snap.n_accounts, np.nan)

    im = _initial_margin(snap, host["im0"])
    names = np.array(scen.names, dtype=object)
    worst_idx = np.clip(acc["scenario_worst"] - 1, 0, S - 1)
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
        }
    )

    price = host["price"][:, cols]
    fund = insurance.fund_value(snap.insurance_fund, price)
    bad = sums["s_bad_debt"][cols]
    fund_after, social = insurance.waterfall(bad, fund)
    scenarios = pd.DataFrame(
        {
            "scenario": list(scen.names),
            "kind": list(scen.kinds),
            "pnl_total": sums["s_pnl"][cols],
            "pnl_gross": sums["s_pnl_abs"][cols],
            "accounts_liquidatable": np.rint(sums["s_liquidatable"][cols]).astype(np.int64),
            "shortfall_total": sums["s_shortfall"][cols],
            "bad_debt": bad,
            "insurance_fund_before": fund,
            "insurance_fund_after": fund_after,
            "socialized_loss": social,
        }
    )

    order = np.lexsort((np.arange(S), -scenarios["shortfall_total"].to_numpy(), -bad))
    worst = int(order[0])
    rnd = scen.random
    depleted = (bad > 0) & (bad >= fund)
    summary = {
        "as_of": snap.as_of.isoformat().replace("+00:00", "Z"),
        "accounts": int(snap.n_accounts),
        "positions": int(snap.n_positions),
        "scenarios": int(S),
        "random_scenarios": int(n_random),
        "insurance_fund": float(insurance.fund_value(snap.insurance_fund, np.asarray(snap.market.price))),
        "worst_scenario": scen.names[worst],
        "worst_bad_debt": float(bad[worst]),
        "p_fund_depleted": float(depleted[rnd].mean()) if n_random else None,
        "accounts_liquidatable": int(accounts["liquidatable"].sum()),
        "total_equity": float(accounts["equity"].sum()),
        "total_initial_margin": float(im.sum()),
        "total_maintenance_margin": float(accounts["maintenance_margin"].sum()),
        "margin_model": "standard",
        "dtype": dtype if isinstance(dtype, str) else np.dtype(dtype).name,
        "runtime_seconds": time.perf_counter() - t0,
    }
    return Result(accounts=accounts, scenarios=scenarios, summary=summary)


def pnl_matrix(snap: Snapshot, scen: Scenarios, *, chunk_size: int = DEFAULT_CHUNK, dtype: str = "float64"):
    """Equity change per account and scenario, USD, collateral included.

    Returns:
      DataFrame indexed by ``account_id`` with one column per scenario (file order). It holds
      the full ``accounts x scenarios`` matrix, so it is meant for modest exchanges or subsets.
    """
    import pandas as pd

    *_, pnl, _ = _stream(snap, scen, chunk_size, dtype, None, True)
    return pd.DataFrame(pnl, index=pd.Index(snap.account_ids.astype(str), name="account_id"), columns=list(scen.names))
