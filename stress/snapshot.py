"""The exchange at ``as_of``: assets, instruments, accounts, balances and positions.

Arrays that jitted code reads are pytrees (``Market``, ``Instruments``, ``Params``); ids and
names stay on the host beside them in ``Snapshot`` and never enter jitted code.
"""

from __future__ import annotations

import dataclasses
import weakref
from datetime import datetime
from typing import Any

import numpy as np

from ._tree import pytree_dataclass

# Instrument kind codes used inside jitted code.
FUTURE, PERPETUAL, OPTION = 0, 1, 2
KIND_CODES = {"future": FUTURE, "perpetual": PERPETUAL, "option": OPTION}


@pytree_dataclass
class Instruments:
    """Instrument terms, one entry per instrument ``[I]``."""

    kind: Any  # [I] int32: FUTURE, PERPETUAL or OPTION
    underlying: Any  # [I] int32: asset index of the underlying
    settlement: Any  # [I] int32: asset index of the settlement asset
    inverse: Any  # [I] bool: settled in the underlying (Deribit inverse conventions)
    contract_size: Any  # [I] coins per contract (linear, options) or USD face value (inverse futures)
    strike: Any  # [I] USD; 0 for futures and perpetuals
    expiry: Any  # [I] years of 365 days from as_of; inf for perpetuals
    is_call: Any  # [I] bool; False for futures and perpetuals
    mark: Any  # [I] USD: mark price F of futures and perpetuals; 0 for options
    iv: Any  # [I] annualised implied vol (0.55 = 55%) of options; 0 otherwise


@pytree_dataclass
class Market:
    """Prices at ``as_of``."""

    price: Any  # [A] USD per unit of each asset, > 0
    rate: Any  # [] continuously compounded rate for option pricing, per year


@pytree_dataclass
class Params:
    """Every risk parameter the exchange tunes, as arrays so they can be differentiated.

    The margin models (``margin.py``) read them; see docs/margin.md for the rules.
    """

    im_rate: Any  # [I] initial-margin rate: of notional (futures) or the base rate a (short options)
    mm_rate: Any  # [I] maintenance-margin rate: of notional (futures) or of underlying (short options)
    option_im_floor: Any  # [] floor b of the short-option IM rate, max(a - OTM/S, b)
    haircut: Any  # [A] collateral haircut per asset, 0 <= h < 1
    # Per-instrument rates as given in the instruments table (NaN where not given), kept so
    # the [margin] table can be resolved again against the snapshot's asset names.
    im_override: Any  # [I] initial-margin rate from the instruments table, or NaN
    mm_override: Any  # [I] maintenance-margin rate from the instruments table, or NaN
    # Risk-limit tiers of futures and perpetuals (standard model), padded to K tiers: a
    # position whose notional is <= tier_bound[i, k] (and above the previous bound) pays
    # tier_im/tier_mm[i, k] on its whole notional; beyond the last bound the last tier applies.
    # Without tiers K = 1, the bound is inf and the rates are im_rate/mm_rate.
    tier_bound: Any  # [I, K] USD notional up to which tier k applies, ascending (inf padding)
    tier_im: Any  # [I, K] initial-margin rate of notional in tier k
    tier_mm: Any  # [I, K] maintenance-margin rate of notional in tier k
    # Portfolio (risk-matrix) model, per asset as underlying (see docs/margin.md).
    pm_price_range: Any  # [A] largest relative price move of the risk matrix, e.g. 0.16
    pm_vol_up: Any  # [A] relative vol shock up at 30 days to expiry, e.g. 0.5 (+50% of iv)
    pm_vol_down: Any  # [A] relative vol shock down at 30 days to expiry, e.g. 0.25
    pm_min_vol_up: Any  # [A] floor of the shocked-up vol, annualised decimal, e.g. 0.5
    pm_short_vega_power: Any  # [A] exponent of 30/DTE below 30 days to expiry, e.g. 0.3
    pm_long_vega_power: Any  # [A] exponent of 30/DTE from 30 days to expiry, e.g. 0.13
    pm_extended_fraction: Any  # [A] fraction of extended-table P&L that counts, e.g. 0.03
    pm_pnl_offset: Any  # [A] per settlement asset: fraction of its gains offsetting other losses
    pm_move_risk: Any  # [A] annualised_move_risk of the roll shock, per year, e.g. 0.075
    pm_min_move: Any  # [A] min_annualised_move of the roll shock, e.g. 0.01
    pm_max_delta_shock: Any  # [A] delta-shock rate on net delta beyond the threshold, e.g. 0.1
    pm_delta_threshold: Any  # [A] USD net delta (|sum delta * S|) free of the delta shock
    pm_extended_moves: Any  # [E] relative price moves of the extended table (on vol up)
    pm_mm_factor: Any  # [] maintenance margin as a fraction of initial margin, e.g. 0.8
    pm_min_dte_days: Any  # [] days to expiry floor of the DTE-dependent vol shock
    pm_buckets: int = dataclasses.field(default=4, metadata={"static": True})  # price buckets each side of 0
    # Dynamic haircuts ([margin] haircut_model = "dynamic"; margin.haircut_at). Static: the
    # vol and volume rows are 0 and the haircut of every state is ``haircut``.
    haircut_vol: Any = None  # [A] annualised vol at which ``haircut`` holds; 0: not vol-scaled
    haircut_volume: Any = None  # [A] USD traded per day in the asset; 0: no concentration add-on
    haircut_concentration: Any = None  # [A] add-on per sqrt(USD held at the snapshot price / daily volume)
    haircut_max: Any = None  # [] the largest haircut a dynamic haircut reaches, < 1
    haircut_dynamic: bool = dataclasses.field(default=False, metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A loaded, validated snapshot (SPEC section 1).

    Positions are in COO form sorted by (account, instrument); balances are dense
    ``[accounts, assets]`` because the asset count is small.
    """

    as_of: datetime
    assets: tuple[str, ...]  # [A] asset names
    instrument_ids: np.ndarray  # [I] str
    account_ids: np.ndarray  # [n] str, sorted
    market: Market
    instruments: Instruments
    params: Params
    balances: np.ndarray  # [n, A] amount of each asset (negative = borrowed)
    pos_account: np.ndarray  # [N] int32 account index
    pos_instrument: np.ndarray  # [N] int32 instrument index
    pos_quantity: np.ndarray  # [N] float64 contracts, signed, non-zero
    pos_entry_price: np.ndarray  # [N] float64 USD, NaN where not given
    insurance_fund: np.ndarray  # [A] balance of each asset in the insurance fund
    margin_config: dict  # the [margin] table as given
    liquidation_config: dict  # the [liquidation] table as given
    limits: dict  # the optional [limits] table
    source: str  # where it was loaded from
    account_group: Any = None  # [n] object: the optional balances `group` of each account, None where not given
    # ([n] int32 row of each account's group, n_groups) fixed by the whole exchange, for a part
    # of it (stress.cluster); None: derived from account_group (engine.group_rows)
    group_index: Any = None

    @property
    def n_accounts(self) -> int:
        return len(self.account_ids)

    @property
    def n_positions(self) -> int:
        return len(self.pos_quantity)

    @property
    def n_assets(self) -> int:
        return len(self.assets)

    def asset_index(self, name: str) -> int:
        return self.assets.index(name)


def kept_for(store: dict, snap: Snapshot, build: Any) -> Any:
    """``build()``, computed once per snapshot object and kept in ``store`` while the snapshot
    lives (a snapshot is frozen; a changed one is a new object with values of its own)."""
    key = id(snap)
    if key not in store:
        store[key] = build()
        weakref.finalize(snap, store.pop, key, None)
    return store[key]


_ID_COLUMNS: dict[int, Any] = {}


def account_id_column(snap: Snapshot, rows: Any = None) -> Any:
    """The account ids at ``rows`` (indices; all by default), as the pandas array a frame's
    ``account_id`` column holds: strings of the dtype pandas gives them (Arrow-backed from
    pandas 3). Built once per snapshot object and kept while it lives: pandas 3 converts str
    objects to Arrow strings at about 0.1 s per million each time a frame is built, and a
    report builds several; taking rows from the built array costs a few milliseconds.
    """
    import pandas as pd

    ids = snap.account_ids  # the loader's str objects (1M new ones cost about 150 MiB)
    as_str = ids if ids.dtype == object else ids.astype(str).astype(object)
    column = kept_for(_ID_COLUMNS, snap, lambda: pd.Series(as_str).array)
    return column if rows is None else column.take(np.asarray(rows, np.intp))


def keep_account_id_column(snap: Snapshot, ids: Any) -> None:
    """Give ``account_id_column`` the snapshot's column ready made from ``ids``, its account ids
    in order as an Arrow string array (the loader has them so): from Arrow's strings it costs
    milliseconds, from the snapshot's 1M str objects 0.08-0.17 s of every new process's run.
    Where pandas keeps strings as objects, nothing is kept (the column is built when asked)."""
    text = _arrow_text(ids)
    if text is not None:
        kept_for(_ID_COLUMNS, snap, lambda: text)


def _arrow_text(values: Any) -> Any:
    """An Arrow string array as the pandas array a frame makes of the same str objects, or None
    where that is not Arrow-backed (pandas before 3)."""
    import pandas as pd
    import pyarrow as pa

    dtype = pd.Series(["x"]).dtype
    if isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow":
        return pd.array(values.cast(pa.large_string()), dtype=dtype)
    return None


def names_at(names: Any, codes: Any) -> Any:
    """``names[codes]``: a few names (assets, scenarios) repeated over many rows, as the array
    pandas makes of str objects (Arrow-backed strings from pandas 3, object before), ready for a
    frame's column. Taken in Arrow: converting 2.4M Python strings to pandas' strings one by
    one took 0.4 s, taking them from the names 0.05 s."""
    import pyarrow as pa

    codes = np.asarray(codes, np.intp)
    text = _arrow_text(pa.array([str(n) for n in names], pa.string()).take(codes))
    return np.asarray(names, dtype=object)[codes] if text is None else text
