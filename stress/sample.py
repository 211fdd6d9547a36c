"""The built-in sample exchange: deterministic, synthetic, shaped like a real crypto venue.

- Assets: USDC, USDT, BTC, ETH, SOL, with haircuts on the volatile ones.
- Instruments: Deribit-style inverse BTC/ETH perpetuals, dated futures and option chains
  (named only: their terms are parsed from the name), linear USDC perpetuals and options, and
  a USDT-margined linear perpetual given with explicit columns.
- Accounts: many small directional traders with power-law sizes and leverage, option writers
  (covered calls, cash-secured puts), basis traders (long coins, short perpetual) and a few
  market makers who take the other side of all net flow and delta-hedge with the perpetuals.
- The book is matched: every instrument's quantities sum to zero.

Everything is vectorised numpy driven by one seeded generator, so a given (accounts, seed)
always yields the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .margin import DEFAULTS

AS_OF = "2026-11-23T08:00:00Z"
ASSETS = pd.DataFrame(
    {
        "asset": ["USDC", "USDT", "BTC", "ETH", "SOL"],
        "price": [1.0, 0.9995, 90_000.0, 3_000.0, 140.0],
        "haircut": [0.0, 0.02, 0.05, 0.08, 0.15],
    }
)
_PRICE = dict(zip(ASSETS.asset, ASSETS.price))
_EXPIRIES = {"27NOV26": 4 / 365, "25DEC26": 32 / 365, "26MAR27": 123 / 365}


def _instruments() -> pd.DataFrame:
    rows = []

    def add(instrument_id, **kw):
        rows.append({"instrument_id": instrument_id, **kw})

    # Inverse (Deribit): named only, marks given.
    add("BTC-PERPETUAL", mark_price=90_045.0)
    add("ETH-PERPETUAL", mark_price=3_001.2)
    for code, basis in (("27NOV26", 1.0004), ("25DEC26", 1.0045), ("26MAR27", 1.018)):
        add(f"BTC-{code}", mark_price=round(90_000 * basis, 1))
        add(f"ETH-{code}", mark_price=round(3_000 * basis, 2))
    for under, strikes, atm in (
        ("BTC", range(70_000, 120_001, 5_000), 0.52),
        ("ETH", range(2_200, 4_001, 200), 0.68),
    ):
        S = _PRICE[under]
        for code in ("25DEC26", "26MAR27"):
            for K in strikes:
                m = np.log(K / S)
                iv = atm + 0.25 * m * m - 0.08 * m + (0.02 if code == "26MAR27" else 0.0)
                for cp in "CP":
                    add(f"{under}-{code}-{K}-{cp}", mark_iv=round(iv, 4))
    # Linear USDC (Deribit naming, 1 coin per contract).
    add("BTC_USDC-PERPETUAL", mark_price=90_040.0)
    add("ETH_USDC-PERPETUAL", mark_price=3_001.0)
    add("SOL_USDC-PERPETUAL", mark_price=140.05, im_rate=0.04, mm_rate=0.02)
    for K in (80_000, 90_000, 100_000):
        for cp in "CP":
            m = np.log(K / 90_000)
            add(f"BTC_USDC-25DEC26-{K}-{cp}", mark_iv=round(0.52 + 0.25 * m * m - 0.08 * m, 4))
    # Linear USDT perpetual with explicit terms (0.001 BTC per contract).
    add(
        "BTCUSDT",
        kind="perpetual",
        underlying="BTC",
        settlement="USDT",
        contract_size=0.001,
        mark_price=90_030.0,
    )
    df = pd.DataFrame(rows)
    for c in ("kind", "underlying", "settlement", "expiry", "strike", "option_type", "contract_size", "im_rate", "mm_rate"):
        if c not in df:
            df[c] = np.nan
    return df[
        ["instrument_id", "kind", "underlying", "settlement", "contract_size", "expiry", "strike",
         "option_type", "mark_price", "mark_iv", "im_rate", "mm_rate"]
    ]


def _terms(instruments: pd.DataFrame) -> pd.DataFrame:
    """Resolved terms of each instrument (through the same name parser the loader uses)."""
    from .io import parse_deribit_name

    out = []
    for row in instruments.itertuples():
        t = parse_deribit_name(row.instrument_id) or {}
        kind = t.get("kind", row.kind)
        under = t.get("underlying", row.underlying)
        settle = t.get("settlement", row.settlement)
        cs = t.get("contract_size", row.contract_size)
        years = {"perpetual": np.inf}.get(kind)
        if years is None:
            code = row.instrument_id.split("-")[1]
            years = _EXPIRIES[code]
        out.append(
            {
                "kind": kind,
                "underlying": under,
                "inverse": under == settle,
                "cs": float(cs),
                "strike": t.get("strike", np.nan),
                "call": t.get("option_type") == "call",
                "years": years,
                "mark": row.mark_price,
                "iv": row.mark_iv,
            }
        )
    return pd.DataFrame(out)


def _greeks(terms: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per contract: USD delta in coins of the underlying, and option value in USD (0 for
    futures). Used only to hedge and collateralise the sample's books."""
    from math import erf, log, sqrt

    N = lambda x: 0.5 * (1 + erf(x / sqrt(2)))
    S = terms.underlying.map(_PRICE).to_numpy()
    delta, value = np.zeros(len(terms)), np.zeros(len(terms))
    for i, t in enumerate(terms.itertuples()):
        if t.kind == "option":
            sd = t.iv * sqrt(t.years)
            d1 = (log(S[i] / t.strike) + 0.5 * sd * sd) / sd
            call = S[i] * N(d1) - t.strike * N(d1 - sd)
            delta[i] = t.cs * (N(d1) if t.call else N(d1) - 1)
            value[i] = t.cs * (call if t.call else call - S[i] + t.strike)
        elif t.inverse:
            delta[i] = t.cs / t.mark
        else:
            delta[i] = t.cs * t.mark / S[i]
    return delta, value


def _notional_per_contract(terms: pd.DataFrame) -> np.ndarray:
    S = terms.underlying.map(_PRICE).to_numpy()
    return np.where(terms.inverse & (terms.kind != "option"), terms.cs, terms.cs * S)


def _lot(terms: pd.DataFrame) -> np.ndarray:
    """Quantity step per instrument: whole contracts, 0.1 option, 0.001 linear coin."""
    return np.where(terms.kind == "option", 0.1, np.where(terms.cs < 1, 1.0, np.where(terms.inverse, 1.0, 0.001)))


def _distinct_draws(rng: np.random.Generator, owners: np.ndarray, k: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, item)`` pairs: ``k[j]`` distinct items for ``owners[j]``, drawn by weights
    ``p`` ``[I]`` without replacement (successive sampling, by Gumbel top-k), in blocks of
    owners so the ``[block, I]`` keys stay small."""
    I = len(p)
    logp = np.log(p)
    acc, ins = [], []
    block = max(1, (1 << 22) // I)
    for lo in range(0, len(owners), block):
        kk = k[lo : lo + block]
        keys = logp + rng.gumbel(size=(len(kk), I))
        top = np.argsort(-keys, axis=1)  # each row's items, the first k of it its draws
        take = np.arange(I) < kk[:, None]
        acc.append(np.repeat(owners[lo : lo + block], kk))
        ins.append(top[take])
    return np.concatenate(acc), np.concatenate(ins)


def _directional_draws(rng: np.random.Generator, dir_ix: np.ndarray, p: np.ndarray, others: float,
                       positions: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(account, instrument)`` pairs of the directional traders ``dir_ix``, instruments drawn
    by weights ``p``: 1-3 draws each (60/30/10%; a repeated draw merges into one position
    later), or, where ``positions`` asks for about that many positions in all, ``1 + Poisson``
    distinct instruments each, with the mean that leaves ``others`` (the other roles' expected
    positions) to the rest, at most ``len(p)``."""
    n_dir, I = len(dir_ix), len(p)
    if positions is None:
        k = rng.choice([1, 2, 3], size=n_dir, p=[0.6, 0.3, 0.1])
        acc = np.repeat(dir_ix, k)
        return acc, rng.choice(I, size=len(acc), p=p)
    mean = max((positions - others) / n_dir, 1.0)
    return _distinct_draws(rng, dir_ix, np.minimum(1 + rng.poisson(mean - 1.0, n_dir), I), p)


def generate(accounts: int = 10_000, seed: int = 7, positions: int | None = None) -> dict[str, pd.DataFrame | dict]:
    """Build the sample exchange's tables (not yet written).

    ``positions``: about how many position rows in all (directional traders then hold
    ``1 + Poisson`` distinct instruments each, with the mean that gives that total; never
    fewer than one each). ``None``: the usual mix, about 1.5 per account. A given
    ``(accounts, seed, positions)`` always yields the same tables.

    Returns:
      A dict with DataFrames ``assets``, ``instruments``, ``balances``, ``positions`` and the
      ``exchange`` settings.
    """
    if accounts < 20:
        raise ValueError("the sample exchange needs at least 20 accounts")
    rng = np.random.default_rng(seed)
    inst = _instruments()
    terms = _terms(inst)
    I = len(inst)
    notional_pc = _notional_per_contract(terms)
    lot = _lot(terms)
    delta_pc, premium_pc = _greeks(terms)
    is_opt = (terms.kind == "option").to_numpy()
    under = terms.underlying.to_numpy()

    n_mm = max(3, accounts // 2500)
    n_basis = max(2, accounts // 200)
    n_writer = max(3, accounts // 20)
    n_dir = accounts - n_mm - n_basis - n_writer
    ids = np.array([f"acct-{i:07d}" for i in range(accounts)], dtype=object)
    role = np.repeat(["directional", "writer", "basis", "mm"], [n_dir, n_writer, n_basis, n_mm])
    rng.shuffle(role)
    dir_ix, wri_ix = np.flatnonzero(role == "directional"), np.flatnonzero(role == "writer")
    bas_ix, mm_ix = np.flatnonzero(role == "basis"), np.flatnonzero(role == "mm")

    # Directional traders: 1-3 positions (or as many as ``positions`` asks), popular
    # instruments first, power-law notionals.
    popularity = np.where(is_opt, 0.15, 1.0)
    popularity[inst.instrument_id.str.contains("PERPETUAL|BTCUSDT").to_numpy()] = 6.0
    popularity /= popularity.sum()
    # the other roles' positions, as generated below: writers 1.3 each, makers one per
    # instrument, basis traders one per hedged perpetual
    others = 1.3 * n_writer + n_mm * I + 3 * n_basis
    acc, ins = _directional_draws(rng, dir_ix, popularity, others, positions)
    usd = np.minimum(2_000.0 * (rng.pareto(1.4, len(acc)) + 1.0), 5e6)
    side = np.where(is_opt[ins], np.where(rng.random(len(acc)) < 0.8, 1.0, -1.0), rng.choice([-1.0, 1.0], len(acc)))
    qty = side * usd / notional_pc[ins]
    lev = np.clip(rng.lognormal(np.log(4.0), 0.8, n_dir), 1.0, 40.0)
    dir_pos = pd.DataFrame({"a": acc, "i": ins, "q": qty})

    # Option writers: short one or two OTM options, covered by coins or cash.
    k = rng.choice([1, 2], size=n_writer, p=[0.7, 0.3])
    acc = np.repeat(wri_ix, k)
    opt_ids = np.flatnonzero(is_opt)
    S_opt = terms.underlying.map(_PRICE).to_numpy()
    otm = opt_ids[np.where(terms.call.to_numpy()[opt_ids], terms.strike.to_numpy()[opt_ids] >= S_opt[opt_ids], terms.strike.to_numpy()[opt_ids] <= S_opt[opt_ids])]
    ins = rng.choice(otm, size=len(acc))
    usd = np.minimum(10_000.0 * (rng.pareto(1.6, len(acc)) + 1.0), 3e6)
    wri_pos = pd.DataFrame({"a": acc, "i": ins, "q": -usd / notional_pc[ins]})

    pos = pd.concat([dir_pos, wri_pos]).groupby(["a", "i"], as_index=False)["q"].sum()
    pos["q"] = np.round(pos.q / lot[pos.i]) * lot[pos.i]
    pos["q"] = np.where(pos.q == 0, np.sign(rng.random(len(pos)) - 0.5) * lot[pos.i], pos.q)

    # Market makers take the other side of all net flow, split by Dirichlet weights.
    net = np.bincount(pos.i, weights=pos.q, minlength=I)
    share = rng.dirichlet(np.ones(n_mm), size=I)  # [I, n_mm]
    mm_q = np.round(-net[:, None] * share / lot[:, None]) * lot[:, None]
    mm_q[:, 0] += -net - mm_q.sum(1)  # exact remainder to the first market maker
    mm_pos = pd.DataFrame({"a": np.tile(mm_ix, I), "i": np.repeat(np.arange(I), n_mm), "q": mm_q.ravel()})

    # They delta-hedge per underlying with its perpetual; basis traders take the other side.
    hedge_inst = {u: int(np.flatnonzero(inst.instrument_id == name)[0]) for u, name in
                  (("BTC", "BTC-PERPETUAL"), ("ETH", "ETH-PERPETUAL"), ("SOL", "SOL_USDC-PERPETUAL"))}
    mm_delta = pd.DataFrame({"a": mm_pos.a, "u": under[mm_pos.i], "d": mm_pos.q * delta_pc[mm_pos.i]})
    mm_delta = mm_delta.groupby(["a", "u"], as_index=False)["d"].sum()
    h_i = mm_delta.u.map(hedge_inst).to_numpy()
    h_q = np.round(-mm_delta.d / delta_pc[h_i] / lot[h_i]) * lot[h_i]
    hedges = pd.DataFrame({"a": mm_delta.a, "i": h_i, "q": h_q})
    mm_pos = pd.concat([mm_pos, hedges]).groupby(["a", "i"], as_index=False)["q"].sum()

    hedge_net = np.bincount(hedges.i, weights=hedges.q, minlength=I)
    bas_share = rng.dirichlet(np.ones(n_basis), size=I)
    bq = np.round(-hedge_net[:, None] * bas_share / lot[:, None]) * lot[:, None]
    bq[:, 0] += -hedge_net - bq.sum(1)
    bas_pos = pd.DataFrame({"a": np.tile(bas_ix, I), "i": np.repeat(np.arange(I), n_basis), "q": bq.ravel()})

    pos = pd.concat([pos, mm_pos, bas_pos])
    pos["q"] = np.round(pos.q.to_numpy(), 6)
    pos = pos[pos.q != 0].sort_values(["a", "i"]).reset_index(drop=True)

    # Collateral: directional traders post notional / leverage; writers cover; makers and
    # basis traders hold coins against their short perpetuals plus a USDC cushion.
    gross = np.bincount(pos.a, weights=np.abs(pos.q) * notional_pc[pos.i], minlength=accounts)
    delta = pd.DataFrame({"a": pos.a, "u": under[pos.i], "d": pos.q * delta_pc[pos.i]})
    delta = delta.groupby(["a", "u"])["d"].sum()
    bal = {a: np.zeros(accounts) for a in ASSETS.asset}
    lev_all = np.ones(accounts)
    lev_all[dir_ix] = lev
    cash = gross / lev_all
    pick = rng.choice(["USDC", "USDT", "BTC", "ETH"], size=accounts, p=[0.55, 0.15, 0.2, 0.1])
    for a in ("USDC", "USDT", "BTC", "ETH"):
        m = np.isin(np.arange(accounts), dir_ix) & (pick == a)
        bal[a][m] += cash[m] / _PRICE[a]
    da = delta.index.get_level_values(0).to_numpy()
    du = delta.index.get_level_values(1).to_numpy()
    dv = delta.to_numpy()
    covered = np.isin(role[da], ["writer", "basis", "mm"]) & (dv < 0)
    frac = np.where(role[da] == "writer", rng.uniform(0.3, 1.0, len(da)), 1.0)
    for u in np.unique(du[covered]):
        m = covered & (du == u)
        np.add.at(bal[u], da[m], -dv[m] * frac[m])
    cushion = np.where(role == "mm", 0.08, np.where(role == "basis", 0.05, np.where(role == "writer", 0.25, 0.0)))
    bal["USDC"] += cushion * gross
    # Top up collateral to a multiple of an initial-margin estimate (2% of futures notional,
    # rates from the instruments table where given; 15% of underlying plus premium per short
    # option), as an exchange admits no position without margin. A few directional accounts
    # (0.3%) are left between margin and zero, as a snapshot catches some mid-liquidation.
    rate = inst.im_rate.fillna(DEFAULTS["future_im_rate"]).to_numpy()
    short_option = DEFAULTS["option_im_rate"] * S_opt * terms.cs.to_numpy() + premium_pc
    per_contract = np.where(is_opt, short_option, rate * notional_pc)
    weight = np.where(is_opt[pos.i], np.maximum(-pos.q, 0), np.abs(pos.q))
    im = np.bincount(pos.a, weights=weight * per_contract[pos.i], minlength=accounts)
    value_now = np.bincount(pos.a, weights=np.where(is_opt[pos.i], pos.q * premium_pc[pos.i], 0.0), minlength=accounts)
    haircut = dict(zip(ASSETS.asset, ASSETS.haircut))
    coll = sum(bal[a] * _PRICE[a] * (1 - haircut[a]) for a in bal) + value_now
    cover = np.clip(rng.lognormal(np.log(1.8), 0.5, accounts), 1.1, 20.0)
    stressed = np.isin(np.arange(accounts), dir_ix) & (rng.random(accounts) < 0.003)
    cover[stressed] = rng.uniform(0.3, 0.95, stressed.sum())
    top_up = np.where(stressed, 0.0, np.maximum(cover * im - coll, 0.0))
    for a in ("USDC", "USDT", "BTC", "ETH"):
        m = pick == a
        bal[a][m] += top_up[m] / (_PRICE[a] * (1 - haircut[a]))
    balances = pd.DataFrame(
        {"account_id": np.repeat(ids, len(bal)), "asset": np.tile(list(bal), accounts),
         "amount": np.stack([bal[a] for a in bal], axis=1).ravel()}
    )
    balances = balances[balances.amount != 0].copy()
    # Round to the cent / satoshi-ish so the CSV is exact and readable.
    balances["amount"] = np.round(balances.amount, 8)

    marks = np.where(is_opt, np.nan, terms.mark.to_numpy())
    entry = marks[pos.i] * np.exp(rng.normal(0.0, 0.06, len(pos)))
    position_rows = pd.DataFrame(
        {"account_id": ids[pos.a], "instrument_id": inst.instrument_id.to_numpy()[pos.i],
         "quantity": pos.q.to_numpy(), "entry_price": np.round(entry, 2)}
    )
    exchange = {
        "as_of": AS_OF,
        "rate": 0.0,
        "insurance_fund": {"USDC": round(2_500.0 * accounts, 2), "BTC": round(0.015 * accounts, 4)},
    }
    return {"assets": ASSETS.copy(), "instruments": inst, "balances": balances, "positions": position_rows, "exchange": exchange}


def write(folder: str | Path, accounts: int = 10_000, seed: int = 7, fmt: str = "csv", positions: int | None = None) -> Path:
    """Write the sample exchange as a snapshot folder (``fmt``: ``csv`` or ``parquet``;
    ``positions``: about how many positions in all, see ``generate``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tables = generate(accounts, seed, positions)
    write_snapshot(folder, tables, fmt)
    return folder


def write_snapshot(folder: Path, tables: dict, fmt: str = "csv") -> None:
    """Write snapshot tables and ``exchange.toml`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ex = tables["exchange"]
    fund = ", ".join(f"{k} = {float(v)!r}" for k, v in ex["insurance_fund"].items())
    lines = [
        "# Sample exchange written by `stress generate sample`",
        f"as_of = {ex['as_of']}",
        f"rate = {float(ex.get('rate', 0.0))!r}",
        f"insurance_fund = {{ {fund} }}",
        "",
        "[margin]",
        *(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in DEFAULTS.items()),
        "",
        "[liquidation]",
        "",
    ]
    (folder / "exchange.toml").write_text("\n".join(lines))
    for name in ("assets", "instruments", "balances", "positions"):
        df = tables[name]
        if fmt == "parquet":
            df.to_parquet(folder / f"{name}.parquet", index=False)
        else:
            df.to_csv(folder / f"{name}.csv", index=False)
