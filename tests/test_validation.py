"""Bad input is one ``stress.InputError`` naming the file, the row and the column (SPEC 1, 3, 4).

A small hand-made exchange (USDC and BTC, a Deribit-named inverse perpetual, a Deribit-named
inverse put, an explicitly described linear call, three accounts) is written to disk, one cell
is corrupted at a time, and the error must point at exactly that cell:

- CSV tables: ``line N`` where the header is line 1 (the first data row is ``line 2``);
- Parquet tables: ``row N``, 1-based;
- TOML files: the scenario (``scenario 'name'``) or the TOML line, and the key.

The case table ``CASES`` and the helpers ``build`` / ``expected`` are reused by ``test_cli.py``
to check the same cases through the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stress
from .conftest import EXCHANGE_TOML, write_snapshot

# --------------------------------------------------------------------------------------------
# The good snapshot

TABLES = ("assets", "instruments", "balances", "positions")
SCENARIO_FILE = "nightly.toml"

ASSETS = [
    {"asset": "USDC", "price": 1.0, "haircut": 0.0},
    {"asset": "BTC", "price": 90_000.0, "haircut": 0.05},
]
_NAMED_ONLY = {
    "kind": None, "underlying": None, "settlement": None, "contract_size": None,
    "expiry": None, "strike": None, "option_type": None,
}
INSTRUMENTS = [
    # line 2 / row 1: Deribit inverse perpetual, terms parsed from the name
    {"instrument_id": "BTC-PERPETUAL", **_NAMED_ONLY, "mark_price": 90_000.0, "mark_iv": None},
    # line 3 / row 2: Deribit inverse put, terms parsed from the name
    {"instrument_id": "BTC-25DEC26-100000-P", **_NAMED_ONLY, "mark_price": None, "mark_iv": 0.55},
    # line 4 / row 3: a linear USDC-settled call given with explicit columns
    {
        "instrument_id": "BTCUSDC-C100K", "kind": "option", "underlying": "BTC", "settlement": "USDC",
        "contract_size": 1.0, "expiry": "2026-12-25T08:00:00Z", "strike": 100_000.0,
        "option_type": "call", "mark_price": None, "mark_iv": 0.5,
    },
]
BALANCES = [
    {"account_id": "A", "asset": "USDC", "amount": 100_000.0},  # line 2
    {"account_id": "A", "asset": "BTC", "amount": 1.0},  # line 3
    {"account_id": "B", "asset": "USDC", "amount": 50_000.0},  # line 4
    {"account_id": "C", "asset": "BTC", "amount": 2.0},  # line 5
]
POSITIONS = [
    {"account_id": "A", "instrument_id": "BTC-PERPETUAL", "quantity": 1000.0, "entry_price": 88_000.0},  # line 2
    {"account_id": "B", "instrument_id": "BTC-PERPETUAL", "quantity": -1000.0, "entry_price": 91_000.0},  # line 3
    {"account_id": "A", "instrument_id": "BTC-25DEC26-100000-P", "quantity": -2.0, "entry_price": None},  # line 4
    {"account_id": "C", "instrument_id": "BTCUSDC-C100K", "quantity": 3.0, "entry_price": None},  # line 5
    {"account_id": "B", "instrument_id": "BTCUSDC-C100K", "quantity": -3.0, "entry_price": None},  # line 6
]
GOOD_SCENARIOS = """\
[[scenario]]
name = "btc-down-30"
moves = { BTC = -0.30 }
vol_shift = { BTC = 0.20 }

[[scenario]]
name = "usdc-depeg"
moves = { USDC = -0.10 }
horizon_days = 1
"""


def base_inputs() -> dict:
    """Everything ``build`` writes, as plain Python data that a case edits in place."""
    return {
        "assets": copy.deepcopy(ASSETS),
        "instruments": copy.deepcopy(INSTRUMENTS),
        "balances": copy.deepcopy(BALANCES),
        "positions": copy.deepcopy(POSITIONS),
        "exchange": EXCHANGE_TOML,
        "scenarios": GOOD_SCENARIOS,
        "drop": [],  # files to delete after writing
    }


def _frame(rows: list[dict], fmt: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if fmt == "parquet":
        # A corrupted cell makes a column mix text and numbers, which Parquet cannot hold: such
        # a column is written as text (as a hand-edited or badly exported file would be).
        for c in df.columns:
            if df[c].dtype == object:
                values = [v for v in df[c] if not pd.isna(v)]
                if any(isinstance(v, str) for v in values) and not all(isinstance(v, str) for v in values):
                    df[c] = [None if pd.isna(v) else str(v) for v in df[c]]
    return df


def build(folder: Path, inputs: dict | None = None, fmt: str = "csv") -> tuple[Path, Path]:
    """Write a snapshot folder and a scenario file next to it; returns (snapshot, scenarios)."""
    inputs = base_inputs() if inputs is None else inputs
    snap = folder / f"snapshot_{fmt}"
    write_snapshot(
        snap,
        **{t: _frame(inputs[t], fmt) for t in TABLES},
        exchange_toml=inputs["exchange"],
        fmt=fmt,
    )
    scen = folder / SCENARIO_FILE
    if isinstance(inputs["scenarios"], bytes):
        scen.write_bytes(inputs["scenarios"])
    else:
        scen.write_text(inputs["scenarios"])
    for name in inputs["drop"]:
        if name == SCENARIO_FILE:
            scen.unlink()
        elif name in TABLES:
            (snap / f"{name}.{fmt}").unlink()
        else:
            (snap / name).unlink()
    return snap, scen


# --------------------------------------------------------------------------------------------
# Edits


def cell(table: str, i: int, column: str, value) -> Callable[[dict], None]:
    def edit(inp: dict) -> None:
        inp[table][i][column] = value

    return edit


def append(table: str, row: dict) -> Callable[[dict], None]:
    return lambda inp: inp[table].append(dict(row))


def drop_column(table: str, column: str) -> Callable[[dict], None]:
    def edit(inp: dict) -> None:
        for r in inp[table]:
            del r[column]

    return edit


def drop(name: str) -> Callable[[dict], None]:
    return lambda inp: inp["drop"].append(name)


def exchange(text: str) -> Callable[[dict], None]:
    return lambda inp: inp.__setitem__("exchange", text)


def scenarios(text: str | bytes) -> Callable[[dict], None]:
    return lambda inp: inp.__setitem__("scenarios", text)


def scenario(name: str, body: str) -> Callable[[dict], None]:
    """A good scenario file followed by one bad scenario."""
    return scenarios(GOOD_SCENARIOS + f'\n[[scenario]]\nname = "{name}"\n{body}\n')


# --------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One corrupted input and where the error must point.

    ``file`` may hold ``{ext}`` (csv or parquet); ``row`` is a 0-based data-row index for a table
    (expected as ``line i+2`` in CSV, ``row i+1`` in Parquet), or the exact row text for a TOML
    file, or None. ``message`` is a regular expression searched (ignoring case) in the message.
    """

    id: str
    edit: Callable[[dict], None]
    file: str
    row: int | str | None
    column: str | None
    message: str
    scenario: bool = False  # the error comes from load_scenarios, the snapshot is good
    formats: tuple[str, ...] = ("csv", "parquet")


TOML_ONLY = ("csv",)  # the table format does not matter for a TOML fault

CASES = [
    # unknown references
    Case("unknown-instrument", cell("positions", 1, "instrument_id", "ETH-PERPETUAL"),
         "positions.{ext}", 1, "instrument_id", r"unknown instrument.*ETH-PERPETUAL"),
    Case("unknown-asset-balances", cell("balances", 2, "asset", "ETH"),
         "balances.{ext}", 2, "asset", r"unknown asset.*ETH"),
    Case("unknown-asset-underlying", cell("instruments", 2, "underlying", "ETH"),
         "instruments.{ext}", 2, "underlying", r"unknown asset.*ETH"),
    Case("unknown-asset-settlement", cell("instruments", 2, "settlement", "USDT"),
         "instruments.{ext}", 2, "settlement", r"unknown asset.*USDT"),
    Case("unknown-asset-deribit-name", cell("instruments", 0, "instrument_id", "SOL-PERPETUAL"),
         "instruments.{ext}", 0, "underlying", r"unknown asset.*SOL"),
    Case("unknown-asset-insurance-fund",
         exchange(EXCHANGE_TOML.replace("BTC = 10.0", "BTC = 10.0, ETH = 5.0")),
         "exchange.toml", None, "insurance_fund.ETH", r"unknown asset.*ETH", formats=TOML_ONLY),
    # missing required values
    Case("missing-quantity", cell("positions", 1, "quantity", None),
         "positions.{ext}", 1, "quantity", r"missing"),
    Case("missing-position-account", cell("positions", 3, "account_id", None),
         "positions.{ext}", 3, "account_id", r"missing"),
    Case("missing-position-instrument", cell("positions", 0, "instrument_id", None),
         "positions.{ext}", 0, "instrument_id", r"missing"),
    Case("missing-amount", cell("balances", 0, "amount", None),
         "balances.{ext}", 0, "amount", r"missing"),
    Case("missing-balance-asset", cell("balances", 3, "asset", None),
         "balances.{ext}", 3, "asset", r"missing"),
    Case("missing-price", cell("assets", 1, "price", None),
         "assets.{ext}", 1, "price", r"missing"),
    Case("missing-haircut", cell("assets", 0, "haircut", None),
         "assets.{ext}", 0, "haircut", r"missing"),
    Case("missing-mark-price", cell("instruments", 0, "mark_price", None),
         "instruments.{ext}", 0, "mark_price", r"missing"),
    Case("missing-mark-iv", cell("instruments", 1, "mark_iv", None),
         "instruments.{ext}", 1, "mark_iv", r"missing"),
    Case("option-missing-strike", cell("instruments", 2, "strike", None),
         "instruments.{ext}", 2, "strike", r"missing"),
    Case("option-missing-type", cell("instruments", 2, "option_type", None),
         "instruments.{ext}", 2, "option_type", r"missing"),
    Case("option-missing-expiry", cell("instruments", 2, "expiry", None),
         "instruments.{ext}", 2, "expiry", r"missing"),
    # values that are not numbers
    Case("non-numeric-quantity", cell("positions", 1, "quantity", "abc"),
         "positions.{ext}", 1, "quantity", r"'abc' is not a number"),
    Case("non-numeric-amount", cell("balances", 2, "amount", "1,000"),
         "balances.{ext}", 2, "amount", r"'1,000' is not a number"),
    Case("non-numeric-price", cell("assets", 1, "price", "ninety thousand"),
         "assets.{ext}", 1, "price", r"'ninety thousand' is not a number"),
    Case("non-numeric-mark-price", cell("instruments", 0, "mark_price", "90k"),
         "instruments.{ext}", 0, "mark_price", r"'90k' is not a number"),
    Case("non-numeric-strike", cell("instruments", 2, "strike", "100k"),
         "instruments.{ext}", 2, "strike", r"'100k' is not a number"),
    Case("non-numeric-expiry", cell("instruments", 2, "expiry", "next friday"),
         "instruments.{ext}", 2, "expiry", r"next friday"),
    # NaN written as text ("nan" in a CSV cell): the message must say NaN, not "missing value"
    # (a NaN in a Parquet float column: test_nan_in_parquet_float_column)
    Case("nan-text-quantity", cell("positions", 2, "quantity", "nan"),
         "positions.{ext}", 2, "quantity", r"nan"),
    Case("nan-text-price", cell("assets", 1, "price", "NaN"),
         "assets.{ext}", 1, "price", r"nan"),
    Case("nan-text-amount", cell("balances", 1, "amount", "nan"),
         "balances.{ext}", 1, "amount", r"nan"),
    Case("nan-text-mark-iv", cell("instruments", 1, "mark_iv", "nan"),
         "instruments.{ext}", 1, "mark_iv", r"nan"),
    Case("inf-quantity", cell("positions", 4, "quantity", "inf"),
         "positions.{ext}", 4, "quantity", r"inf"),
    # out-of-range values
    Case("price-zero", cell("assets", 1, "price", 0.0),
         "assets.{ext}", 1, "price", r"> ?0"),
    Case("price-negative", cell("assets", 1, "price", -90_000.0),
         "assets.{ext}", 1, "price", r"> ?0"),
    Case("haircut-one", cell("assets", 1, "haircut", 1.0),
         "assets.{ext}", 1, "haircut", r"\[0, ?1\)"),
    Case("haircut-negative", cell("assets", 0, "haircut", -0.1),
         "assets.{ext}", 0, "haircut", r"\[0, ?1\)"),
    Case("mark-price-zero", cell("instruments", 0, "mark_price", 0.0),
         "instruments.{ext}", 0, "mark_price", r"> ?0"),
    Case("mark-iv-percent", cell("instruments", 1, "mark_iv", 55.0),
         "instruments.{ext}", 1, "mark_iv", r"percent"),
    Case("mark-iv-zero", cell("instruments", 2, "mark_iv", 0.0),
         "instruments.{ext}", 2, "mark_iv", r"> ?0"),
    Case("strike-negative", cell("instruments", 2, "strike", -1.0),
         "instruments.{ext}", 2, "strike", r"> ?0"),
    Case("contract-size-zero", cell("instruments", 2, "contract_size", 0.0),
         "instruments.{ext}", 2, "contract_size", r"> ?0"),
    Case("zero-quantity", cell("positions", 2, "quantity", 0.0),
         "positions.{ext}", 2, "quantity", r"non-?zero"),
    Case("unknown-kind", cell("instruments", 2, "kind", "swap"),
         "instruments.{ext}", 2, "kind", r"swap"),
    Case("bad-option-type", cell("instruments", 2, "option_type", "straddle"),
         "instruments.{ext}", 2, "option_type", r"straddle"),
    # expired instruments (expiry <= as_of = 2026-11-23T08:00:00Z)
    Case("expired-at-as-of", cell("instruments", 2, "expiry", "2026-11-23T08:00:00Z"),
         "instruments.{ext}", 2, "expiry", r"expire"),
    Case("expired-before-as-of", cell("instruments", 2, "expiry", "2026-11-01T08:00:00Z"),
         "instruments.{ext}", 2, "expiry", r"expire"),
    Case("expired-deribit-name", cell("instruments", 1, "instrument_id", "BTC-20NOV26-100000-P"),
         "instruments.{ext}", 1, "expiry", r"expire"),
    Case("expired-deribit-name-at-as-of", cell("instruments", 1, "instrument_id", "BTC-23NOV26-100000-P"),
         "instruments.{ext}", 1, "expiry", r"expire"),
    # duplicates
    Case("duplicate-instrument", append("instruments", INSTRUMENTS[0]),
         "instruments.{ext}", 3, "instrument_id", r"duplicate.*BTC-PERPETUAL"),
    Case("duplicate-asset", append("assets", {"asset": "BTC", "price": 91_000.0, "haircut": 0.05}),
         "assets.{ext}", 2, "asset", r"duplicate.*BTC"),
    Case("duplicate-balance", append("balances", {"account_id": "A", "asset": "USDC", "amount": 1.0}),
         "balances.{ext}", 4, "asset", r"duplicate"),
    # the second row of the pair is named, though it sorts before other rows of its account
    Case("duplicate-position", append("positions", {"account_id": "B", "instrument_id": "BTC-PERPETUAL",
                                                     "quantity": 5.0, "entry_price": None}),
         "positions.{ext}", 5, "instrument_id", r"duplicate position"),
    # missing tables and columns
    Case("missing-table-positions", drop("positions"), "positions.{ext}", None, None, r"missing table"),
    Case("missing-table-assets", drop("assets"), "assets.{ext}", None, None, r"missing table"),
    Case("missing-column-quantity", drop_column("positions", "quantity"),
         "positions.{ext}", None, "quantity", r"missing column"),
    Case("missing-column-price", drop_column("assets", "price"),
         "assets.{ext}", None, "price", r"missing column"),
    Case("missing-column-balance-asset", drop_column("balances", "asset"),
         "balances.{ext}", None, "asset", r"missing column"),
    # exchange.toml
    Case("broken-exchange-toml", exchange("as_of = 2026-11-23T08:00:00Z\nrate = \n"),
         "exchange.toml", "line 2", "8", r"TOML", formats=TOML_ONLY),
    Case("missing-exchange-toml", drop("exchange.toml"),
         "exchange.toml", None, None, r"not found", formats=TOML_ONLY),
    Case("exchange-toml-missing-as-of", exchange(EXCHANGE_TOML.replace("as_of = 2026-11-23T08:00:00Z\n", "")),
         "exchange.toml", None, "as_of", r"missing", formats=TOML_ONLY),
    Case("exchange-toml-misspelt-key",  # a misspelt [limits] table would drop the nightly limit unseen
         exchange(EXCHANGE_TOML + "[limit]\nmax_bad_debt = 0\n"),
         "exchange.toml", None, "limit", r"unknown key", formats=TOML_ONLY),
    Case("exchange-toml-misspelt-fund", exchange(EXCHANGE_TOML.replace("insurance_fund", "insurance_funds")),
         "exchange.toml", None, "insurance_funds", r"unknown key", formats=TOML_ONLY),
    Case("negative-insurance-fund", exchange(EXCHANGE_TOML.replace("USDC = 1000000.0", "USDC = -1000000.0")),
         "exchange.toml", None, "insurance_fund.USDC", r">= ?0", formats=TOML_ONLY),
    Case("assets-header-only", lambda inp: inp.__setitem__("assets", pd.DataFrame(columns=["asset", "price", "haircut"])),
         "assets.{ext}", None, None, r"no assets", formats=("csv",)),
    Case("mm-rate-above-im-rate", lambda inp: (cell("instruments", 0, "im_rate", 0.01)(inp), cell("instruments", 0, "mm_rate", 0.05)(inp)),
         "instruments.{ext}", 0, "mm_rate", r"above the initial rate"),
    # an option's IM rate is at least option_im_floor (0.10): its mm_rate is held to that
    Case("option-mm-rate-above-im-floor", cell("instruments", 2, "mm_rate", 0.12),
         "instruments.{ext}", 2, "mm_rate", r"option_im_floor"),
    Case("im-rate-alone-below-mm", cell("instruments", 0, "im_rate", 0.005),  # the default mm rate is 0.01
         "instruments.{ext}", 0, "im_rate", r"below the maintenance rate"),
    Case("future-mm-above-im", exchange(EXCHANGE_TOML.replace("[margin]", "[margin]\nfuture_im_rate = 0.005\nfuture_mm_rate = 0.01")),
         "exchange.toml", "[margin]", "future_mm_rate", r"exceed future_im_rate", formats=TOML_ONLY),
    # a Deribit name settled in USDC by the row is a linear contract: the name's USD face value
    # (10 for BTC) is no contract size in coins, so the row must give one
    Case("deribit-name-made-linear-without-size", cell("instruments", 0, "settlement", "USDC"),
         "instruments.{ext}", 0, "contract_size", r"missing"),
    # scenario files
    Case("scenario-unknown-asset-move", scenario("eth-crash", "moves = { BTC = -0.3, ETH = -0.4 }"),
         SCENARIO_FILE, "scenario 'eth-crash'", "moves.ETH", r"unknown asset.*ETH",
         scenario=True, formats=TOML_ONLY),
    Case("scenario-unknown-asset-vol", scenario("vol-up", "vol_shift = { SOL = 0.2 }"),
         SCENARIO_FILE, "scenario 'vol-up'", "vol_shift.SOL", r"unknown asset.*SOL",
         scenario=True, formats=TOML_ONLY),
    Case("scenario-move-minus-one", scenario("btc-zero", "moves = { BTC = -1.0 }"),
         SCENARIO_FILE, "scenario 'btc-zero'", "moves.BTC", r"zero",
         scenario=True, formats=TOML_ONLY),
    Case("scenario-move-below-minus-one", scenario("btc-negative", "moves = { BTC = -1.5 }"),
         SCENARIO_FILE, "scenario 'btc-negative'", "moves.BTC", r"zero",
         scenario=True, formats=TOML_ONLY),
    Case("scenario-move-not-a-number", scenario("btc-text", 'moves = { BTC = "-30%" }'),
         SCENARIO_FILE, "scenario 'btc-text'", "moves.BTC", r"number",
         scenario=True, formats=TOML_ONLY),
    Case("scenario-not-toml-csv", scenarios("name,move\nbtc-down,-0.3\n"),
         SCENARIO_FILE, "line 1", "5", r"TOML", scenario=True, formats=TOML_ONLY),
    Case("scenario-not-toml-binary", scenarios(b"PAR1\x15\x00\x15\xff\xfe\x80\x00\x00PAR1"),
         SCENARIO_FILE, None, None, r"TOML", scenario=True, formats=TOML_ONLY),
    Case("scenario-file-missing", drop(SCENARIO_FILE),
         SCENARIO_FILE, None, None, r"not found", scenario=True, formats=TOML_ONLY),
]

# Where the file of a missing table may be named either way (there is no such file).
_EITHER_FORMAT = {"missing-table-positions", "missing-table-assets"}


def params(formats: tuple[str, ...] | None = None) -> list:
    """pytest params (case, fmt) for every case in every format it applies to."""
    out = []
    for c in CASES:
        for fmt in c.formats if formats is None else [f for f in c.formats if f in formats]:
            out.append(pytest.param(c, fmt, id=c.id if len(c.formats) == 1 else f"{c.id}-{fmt}"))
    return out


def row_label(i: int, fmt: str) -> str:
    return f"line {i + 2}" if fmt == "csv" else f"row {i + 1}"


def expected(case: Case, fmt: str) -> tuple[str, str | None, str | None]:
    """The (file, row, column) a case's error must name."""
    row = row_label(case.row, fmt) if isinstance(case.row, int) else case.row
    return case.file.format(ext=fmt), row, case.column


def location(file: str, row: str | None, column: str | None) -> str:
    """How a message names its place, as in ``positions.csv line 42, column quantity``."""
    where = file
    if row is not None:
        where += f" {row}"
    if column is not None:
        where += f", column {column}"
    return where


def make(tmp_path: Path, case: Case, fmt: str) -> tuple[Path, Path]:
    inputs = base_inputs()
    case.edit(inputs)
    return build(tmp_path, inputs, fmt)


def load_error(snap: Path, scen: Path, case: Case) -> stress.InputError:
    if case.scenario:
        good = stress.load_snapshot(snap)  # the snapshot itself is fine
        with pytest.raises(stress.InputError) as info:
            stress.load_scenarios(scen, good)
    else:
        with pytest.raises(stress.InputError) as info:
            stress.load_snapshot(snap)
    return info.value


def assert_points_at(exc: stress.InputError, file: str, row: str | None, column: str | None,
                     message: str | None = None, either_format: bool = False) -> None:
    text = str(exc)
    assert "\n" not in text, f"one message, one line: {text!r}"
    if either_format:
        stem = file.rsplit(".", 1)[0]
        assert exc.file in (stem, f"{stem}.csv", f"{stem}.parquet"), text
        file = exc.file
    assert (exc.file, exc.row, exc.column) == (file, row, column), text
    assert text.startswith(location(file, row, column)), text
    if message is not None:
        assert re.search(message, exc.message, re.IGNORECASE), text
        assert exc.message in text


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_good_snapshot_loads(tmp_path, fmt):
    snap_dir, scen_path = build(tmp_path, fmt=fmt)
    snap = stress.load_snapshot(snap_dir)
    assert snap.assets == ("BTC", "USDC")  # in name order, whatever the file's
    assert list(snap.instrument_ids) == [r["instrument_id"] for r in INSTRUMENTS]
    assert list(snap.account_ids) == ["A", "B", "C"]
    assert snap.n_positions == len(POSITIONS)
    scen = stress.load_scenarios(scen_path, snap)
    assert scen.names == ("btc-down-30", "usdc-depeg")


@pytest.mark.parametrize("balances, positions", [("csv", "large_string"), ("string", "large_string"),
                                                 ("large_string", "csv"), ("large_string", "string")])
def test_tables_whose_ids_have_different_arrow_string_types_load_the_same(tmp_path, balances, positions):
    """A CSV (or a Parquet file of ``string`` ids) beside a Parquet file of ``large_string``
    ids, as pandas may write: the accounts of both tables are one set, whatever the type."""
    from pyarrow import csv

    snap, _ = build(tmp_path)
    want = stress.load_snapshot(snap)
    for name, kind in (("balances", balances), ("positions", positions)):
        if kind != "csv":
            t = csv.read_csv(snap / f"{name}.csv")
            t = t.cast(pa.schema([pa.field(f.name, getattr(pa, kind)() if pa.types.is_string(f.type) else f.type)
                                  for f in t.schema]))
            pq.write_table(t, snap / f"{name}.parquet")
            (snap / f"{name}.csv").unlink()
    got = stress.load_snapshot(snap)
    assert list(got.account_ids) == list(want.account_ids) and got.n_positions == want.n_positions
    np.testing.assert_array_equal(got.pos_account, want.pos_account)


def _same_snapshot(got, want) -> None:
    assert list(got.account_ids) == list(want.account_ids)
    for name in ("pos_account", "pos_instrument", "pos_quantity", "balances"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ids_with_spaces_around_them_name_the_same_account_instrument_and_asset(tmp_path, fmt):
    """Ids are compared trimmed: " A " in one table and "A" in another are one account."""
    want = stress.load_snapshot(build(tmp_path / "plain", fmt=fmt)[0])
    inputs = base_inputs()
    inputs["balances"][1]["account_id"] = "  A"
    inputs["balances"][2]["asset"] = "USDC\t"
    inputs["positions"][2]["account_id"] = "A "
    inputs["positions"][0]["instrument_id"] = " BTC-PERPETUAL "
    _same_snapshot(stress.load_snapshot(build(tmp_path / "spaced", inputs, fmt)[0]), want)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_id_of_spaces_only_is_a_missing_value(tmp_path, fmt):
    inputs = base_inputs()
    inputs["positions"][3]["account_id"] = "   "
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(build(tmp_path, inputs, fmt)[0])
    assert_points_at(info.value, f"positions.{fmt}", row_label(3, fmt), "account_id", r"missing")


def test_parquet_tables_of_dictionary_encoded_ids_load_the_same(tmp_path):
    """Categorical id columns, as pandas writes them, with an unused category: the same
    snapshot as plain text columns, and the unused category is not an unknown instrument."""
    snap, _ = build(tmp_path, fmt="parquet")
    want = stress.load_snapshot(snap)
    for name, extra in (("balances", "Z"), ("positions", "ETH-PERPETUAL")):
        df = pd.read_parquet(snap / f"{name}.parquet")
        for c in [c for c in ("account_id", "asset", "instrument_id") if c in df]:
            df[c] = pd.Categorical(df[c], categories=[extra, *sorted(set(df[c]), reverse=True)])
        df.to_parquet(snap / f"{name}.parquet", index=False)
        assert pa.types.is_dictionary(pq.read_schema(snap / f"{name}.parquet").field("account_id").type)
    _same_snapshot(stress.load_snapshot(snap), want)


def test_an_unknown_instrument_in_a_dictionary_encoded_column_names_its_first_row(tmp_path):
    inputs = base_inputs()
    inputs["positions"][3]["instrument_id"] = "ETH-PERPETUAL"
    inputs["positions"][4]["instrument_id"] = "ETH-PERPETUAL"
    snap, _ = build(tmp_path, inputs, "parquet")
    df = pd.read_parquet(snap / "positions.parquet")
    df["instrument_id"] = df["instrument_id"].astype("category")
    df.to_parquet(snap / "positions.parquet", index=False)
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert_points_at(info.value, "positions.parquet", "row 4", "instrument_id", r"unknown instrument.*ETH-PERPETUAL")


def test_input_error_is_a_value_error():
    exc = stress.InputError("positions.csv", "line 42", "quantity", "'abc' is not a number")
    assert isinstance(exc, ValueError)
    assert str(exc) == "positions.csv line 42, column quantity: 'abc' is not a number"


@pytest.mark.parametrize("case, fmt", params())
def test_bad_input(tmp_path, case, fmt):
    snap, scen = make(tmp_path, case, fmt)
    exc = load_error(snap, scen, case)
    assert_points_at(exc, *expected(case, fmt), case.message, either_format=case.id in _EITHER_FORMAT)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_first_bad_row_is_reported_deep_in_the_file(tmp_path, fmt):
    """The 41st data row is CSV line 42 and Parquet row 41; a later bad row is not reported."""
    inputs = base_inputs()
    inputs["balances"] += [{"account_id": f"X{i:02d}", "asset": "USDC", "amount": 1e5} for i in range(60)]
    inputs["positions"] = [
        {"account_id": f"X{i:02d}", "instrument_id": "BTC-PERPETUAL",
         "quantity": 10.0 if i % 2 else -10.0, "entry_price": 90_000.0}
        for i in range(60)
    ]
    inputs["positions"][40]["quantity"] = "abc"
    inputs["positions"][50]["quantity"] = "def"
    snap, _ = build(tmp_path, inputs, fmt)
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    row = "line 42" if fmt == "csv" else "row 41"
    assert_points_at(info.value, f"positions.{fmt}", row, "quantity", r"'abc' is not a number")
    if fmt == "csv":
        assert str(info.value) == "positions.csv line 42, column quantity: 'abc' is not a number"


def _rewrite_parquet_column(path: Path, column: str, i: int, value: float) -> None:
    """Put a real (non-null) float value, e.g. NaN, into one cell of a Parquet float column."""
    table = pq.read_table(path)
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    mask = table.column(column).is_null().to_numpy(zero_copy_only=False)
    values[i] = value
    mask[i] = False
    col = pa.array(values, type=pa.float64(), mask=mask, from_pandas=False)
    table = table.set_column(table.schema.get_field_index(column), column, col)
    pq.write_table(table, path)


@pytest.mark.parametrize(
    "table, i, column",
    [
        ("positions", 2, "quantity"),
        ("assets", 1, "price"),
        ("assets", 0, "haircut"),
        ("balances", 3, "amount"),
        ("instruments", 1, "mark_iv"),
        ("instruments", 0, "mark_price"),
        ("instruments", 2, "strike"),
    ],
)
def test_nan_in_parquet_float_column(tmp_path, table, i, column):
    snap, _ = build(tmp_path, fmt="parquet")
    path = snap / f"{table}.parquet"
    _rewrite_parquet_column(path, column, i, float("nan"))
    assert pq.read_table(path).schema.field(column).type == pa.float64()
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert_points_at(info.value, f"{table}.parquet", f"row {i + 1}", column, r"nan")


@pytest.mark.parametrize("table, column, values", [
    ("balances", "amount", lambda n: pa.array([[1.0]] * n)),
    ("positions", "account_id", lambda n: pa.array([["A"]] * n)),
    ("instruments", "expiry", lambda n: pa.array([{"y": 2027}] * n)),
    ("assets", "asset", lambda n: pa.array([{"a": "USDC"}] * n)),
])
def test_a_parquet_column_of_lists_or_structs_is_an_input_error_naming_it(tmp_path, table, column, values):
    # one value a row is read: a nested column is named, not a traceback from Arrow's cast
    snap, _ = build(tmp_path, fmt="parquet")
    path = snap / f"{table}.parquet"
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, values(t.num_rows)), path)
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert (info.value.file, info.value.column) == (f"{table}.parquet", column)
    assert "expected one text or number a row" in str(info.value)


def test_csv_numbers_in_every_spelling_read_as_python_reads_them(tmp_path):
    # Exponents, signs, bare points, surrounding spaces, and a value one ulp above 1: each
    # must come out as Python's correctly rounded float() of the text.
    texts = ["1e3", " -1.0000000000000002 ", "+.5", "-3.", "0.1"]
    inputs = base_inputs()
    for row, text in zip(inputs["positions"], texts):
        row["quantity"] = text
    snap, _ = build(tmp_path, inputs, "csv")
    loaded = stress.load_snapshot(snap)
    np.testing.assert_array_equal(np.sort(loaded.pos_quantity), np.sort([float(x) for x in texts]))


def test_nan_in_optional_parquet_column(tmp_path):
    snap, _ = build(tmp_path, fmt="parquet")
    _rewrite_parquet_column(snap / "positions.parquet", "entry_price", 1, float("nan"))
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert_points_at(info.value, "positions.parquet", "row 2", "entry_price", r"nan")


def test_expired_parquet_timestamp_column(tmp_path):
    """Expiry as a real Parquet timestamp column (Deribit-named rows left empty)."""
    inputs = base_inputs()
    for r in inputs["instruments"]:
        r["expiry"] = pd.NaT if r["expiry"] is None else pd.Timestamp(r["expiry"])
    inputs["instruments"][2]["expiry"] = pd.Timestamp("2026-11-22T08:00:00Z")
    snap, _ = build(tmp_path, inputs, "parquet")
    assert pa.types.is_timestamp(pq.read_table(snap / "instruments.parquet").schema.field("expiry").type)
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert_points_at(info.value, "instruments.parquet", "row 3", "expiry", r"expire")


def test_good_parquet_timestamp_expiry_loads(tmp_path):
    inputs = base_inputs()
    for r in inputs["instruments"]:
        r["expiry"] = pd.NaT if r["expiry"] is None else pd.Timestamp(r["expiry"])
    snap, _ = build(tmp_path, inputs, "parquet")
    assert stress.load_snapshot(snap).n_positions == len(POSITIONS)


def test_missing_snapshot_folder(tmp_path):
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(tmp_path / "nope")
    assert "nope" in str(info.value)


# --------------------------------------------------------------------------------------------
# Hand-edited CSV files: the line named must be the line in the file


def test_csv_line_numbers_count_blank_lines(tmp_path):
    """A blank line left in a hand-edited CSV still counts: the bad cell is on line 4."""
    snap, _ = build(tmp_path)
    path = snap / "positions.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("-1000.0", "abc")  # B's perpetual, line 3 before the blank line
    lines.insert(2, "")  # line 3 is now blank, the bad row is line 4
    path.write_text("\n".join(lines) + "\n")
    assert path.read_text().splitlines()[3].startswith("B,BTC-PERPETUAL,abc")
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert_points_at(info.value, "positions.csv", "line 4", "quantity", r"'abc' is not a number")


def test_csv_line_numbers_count_line_breaks_inside_quoted_fields(tmp_path):
    """A free-text column whose quoted cell spans two lines pushes every later row down one
    line: B's bad quantity, data row 2, starts on line 4."""
    snap, _ = build(tmp_path)
    path = snap / "positions.csv"
    lines = path.read_text().splitlines()
    lines[0] += ",note"
    lines[1] += ',"hedge for\nthe desk"'
    lines[2] = lines[2].replace("-1000.0", "abc") + ",plain"
    lines[3:] = [line + "," for line in lines[3:]]
    path.write_text("\n".join(lines) + "\n")
    assert path.read_text().splitlines()[3].startswith("B,BTC-PERPETUAL,abc")
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert_points_at(info.value, "positions.csv", "line 4", "quantity", r"'abc' is not a number")


def test_csv_trailing_blank_lines_are_harmless(tmp_path):
    snap, _ = build(tmp_path)
    path = snap / "positions.csv"
    path.write_text(path.read_text() + "\n\n")
    assert stress.load_snapshot(snap).n_positions == len(POSITIONS)


def test_csv_row_with_too_many_fields_names_its_line(tmp_path):
    snap, _ = build(tmp_path)
    path = snap / "positions.csv"
    lines = path.read_text().splitlines()
    lines[2] += ",7"  # line 3 has 5 fields under a 4-column header
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    exc = info.value
    assert exc.file == "positions.csv"
    assert exc.row == "line 3", str(exc)
    assert str(exc).startswith("positions.csv line 3"), str(exc)


def test_csv_row_with_too_many_fields_after_a_two_line_cell_names_its_first_line(tmp_path):
    snap, _ = build(tmp_path)
    path = snap / "positions.csv"
    lines = path.read_text().splitlines()
    lines[0] += ",note"
    lines[1] += ',"two\nlines"'  # data row 1 spans lines 2 and 3
    lines[2] += ",x,7"  # data row 2, on line 4, has 6 fields under a 5-column header
    lines[3:] = [line + "," for line in lines[3:]]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert (info.value.file, info.value.row) == ("positions.csv", "line 4"), str(info.value)


def _header_only(path: Path) -> None:
    path.write_text(path.read_text().splitlines()[0] + "\n")


def test_a_column_named_twice_in_a_header_is_an_input_error(tmp_path):
    snap, _ = build(tmp_path)
    path = snap / "balances.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["account_id,asset,amount,amount"] + [f"{line},1" for line in lines[1:]]) + "\n")
    with pytest.raises(stress.InputError) as err:
        stress.load_snapshot(snap)
    assert (err.value.file, err.value.row, err.value.column) == ("balances.csv", "line 1", "amount")
    assert "twice" in err.value.message


@pytest.mark.parametrize("emptied, file, words", [
    (("instruments", "positions"), "instruments.csv", "no instruments"),
    (("balances", "positions"), "balances.csv", "no accounts"),
])
def test_a_snapshot_without_instruments_or_accounts_is_an_input_error(tmp_path, emptied, file, words):
    # both once crashed inside the engine (exit 1, a traceback) while `validate` said all was well
    snap, _ = build(tmp_path)
    for table in emptied:
        _header_only(snap / f"{table}.csv")
    with pytest.raises(stress.InputError) as err:
        stress.load_snapshot(snap)
    assert err.value.file == file and words in err.value.message


def test_a_byte_order_mark_leaves_the_first_column_text(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark: the first column must still
    be read as text, so an id such as 007 is not read as the number 7 (which split one account
    in two: its positions under '007' and its balances under '7')."""
    inputs = base_inputs()
    for r in inputs["balances"] + inputs["positions"]:
        r["account_id"] = {"A": "007", "B": "0.50", "C": "C"}[r["account_id"]]
    snap, _ = build(tmp_path, inputs)
    plain = stress.load_snapshot(snap)
    for name in ("balances", "positions", "assets"):
        path = snap / f"{name}.csv"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    marked = stress.load_snapshot(snap)
    assert list(marked.account_ids) == ["0.50", "007", "C"]
    _same_snapshot(marked, plain)


def test_a_byte_order_mark_before_exchange_toml_is_not_an_error(tmp_path):
    snap, _ = build(tmp_path)
    path = snap / "exchange.toml"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert stress.load_snapshot(snap).as_of == stress.load_snapshot(build(tmp_path / "plain")[0]).as_of


@pytest.mark.parametrize("what", ["positions.csv", "exchange.toml", SCENARIO_FILE])
def test_a_folder_where_a_file_belongs_is_an_input_error(tmp_path, what):
    snap, scen = build(tmp_path)
    path = scen if what == SCENARIO_FILE else snap / what
    path.unlink()
    path.mkdir()
    with pytest.raises(stress.InputError, match="folder, not a file") as info:
        stress.load_scenarios(scen, stress.load_snapshot(snap))
    assert info.value.file == what


def test_a_parquet_column_named_twice_is_one_message(tmp_path):
    snap, _ = build(tmp_path, fmt="parquet")
    path = snap / "assets.parquet"
    t = pq.read_table(path)
    pq.write_table(pa.Table.from_arrays(t.columns + [t.column("haircut")], names=t.column_names + ["haircut"]), path)
    with pytest.raises(stress.InputError) as info:
        stress.load_snapshot(snap)
    assert (info.value.file, info.value.column) == ("assets.parquet", "haircut")
    assert "twice" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("history", [None, "date,BTC\n2026-01-01,90000\n2026-01-02,-1\n"])
def test_the_var_models_price_history_is_checked_when_the_snapshot_loads(tmp_path, history):
    """Not first in the middle of a run, where an error would come too late for ``stress
    validate`` and after the run's output had begun."""
    inputs = base_inputs()
    inputs["exchange"] = EXCHANGE_TOML.replace("[margin]", '[margin]\nmodel = "var"\nvar_history = "hist.csv"')
    snap, _ = build(tmp_path, inputs)
    if history is not None:
        (snap / "hist.csv").write_text(history)
    with pytest.raises(stress.InputError, match="not found" if history is None else "> 0"):
        stress.load_snapshot(snap)


def test_a_column_name_with_spaces_around_it_is_named_in_the_message(tmp_path):
    snap, _ = build(tmp_path)
    path = snap / "positions.csv"
    path.write_text(path.read_text().replace("account_id,instrument_id", "account_id, instrument_id", 1))
    with pytest.raises(stress.InputError, match=r"missing column.*' instrument_id'"):
        stress.load_snapshot(snap)


def test_rows_whose_rates_keep_initial_above_maintenance_margin_load(tmp_path):
    """An option's im_rate alone below the default option_mm_rate is fine (its IM is floored at
    option_im_floor, above MM); so is a Deribit option name settled in USDC by its row, whose
    size from the name, 1 coin, is a linear contract's size too."""
    inputs = base_inputs()
    inputs["instruments"][2]["im_rate"] = 0.05
    inputs["instruments"].append({"instrument_id": "BTC-25DEC26-120000-C", **_NAMED_ONLY, "settlement": "USDC",
                                  "mark_price": None, "mark_iv": 0.6})
    snap = stress.load_snapshot(build(tmp_path, inputs)[0])
    i = list(snap.instrument_ids).index("BTC-25DEC26-120000-C")
    assert snap.instruments.contract_size[i] == 1.0 and not snap.instruments.inverse[i]


def test_validate_without_a_scenario_file_checks_the_snapshot_against_the_default_set(tmp_path):
    # stress run without --scenarios takes the default set (4-step paths): a lag of 4 steps
    # fails there, so validate must say so too rather than report ok
    from typer.testing import CliRunner

    from stress import sample
    from stress.cli import app

    sample.write(tmp_path / "s", accounts=30)
    toml = (tmp_path / "s" / "exchange.toml").read_text().replace("[liquidation]\n", "[liquidation]\noracle_lag_steps = 4\n")
    assert "oracle_lag_steps = 4" in toml
    (tmp_path / "s" / "exchange.toml").write_text(toml)
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "s")])
    assert r.exit_code == 2 and "oracle_lag_steps" in r.output
