"""The exchange at ``as_of``: assets, instruments, accounts, balances and positions.

Arrays that jitted code reads are pytrees (``Market``, ``Instruments``, ``Params``); ids and
names stay on the host beside them in ``Snapshot`` and never enter jitted code.
"""

from __future__ import annotations

import dataclasses
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

    The standard margin model (``margin.py``) reads them; see README "Margin" for the rules.
    """

    im_rate: Any  # [I] initial-margin rate: of notional (futures) or the base rate a (short options)
    mm_rate: Any  # [I] maintenance-margin rate: of notional (futures) or of underlying (short options)
    option_im_floor: Any  # [] floor b of the short-option IM rate, max(a - OTM/S, b)
    haircut: Any  # [A] collateral haircut per asset, 0 <= h < 1


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
