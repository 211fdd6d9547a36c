"""Loading and validating a snapshot folder (SPEC section 1).

Everything a user can get wrong is checked here, once, with vectorised checks over whole
columns, and reported as one ``InputError`` naming the file, the row and the column. Jitted
code downstream never sees strings and never validates.

Row references: in a CSV file the header is line 1, so the first data row is "line 2" (a row
whose quoted field holds a line break is named by the line it starts on); in a Parquet file
rows are counted from 1 ("row 1" is the first row).
"""

from __future__ import annotations

import math
import re
import tomllib
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import _memory
from . import liquidation as _liquidation
from . import margin as _margin
from .errors import InputError
from .pricing import YEAR_DAYS
from .snapshot import KIND_CODES, OPTION, PERPETUAL, Instruments, Market, Snapshot, keep_account_id_column

TABLES = ("assets", "instruments", "balances", "positions")
EXCHANGE_KEYS = ("as_of", "rate", "insurance_fund", "margin", "liquidation", "limits")  # exchange.toml's top level
MAX_IV = 5.0  # above this an implied vol is most likely given in percent


# --------------------------------------------------------------------------------------------
# Tables


class _Table:
    """One table file, read with every cell it needs as text or number, plus row labels."""

    def __init__(self, path: Path, data: pa.Table):
        self.path = path
        self.name = path.name
        self.data = data
        self.is_csv = path.suffix == ".csv"

    def __len__(self) -> int:
        return self.data.num_rows

    def row(self, i: int) -> str:
        return f"line {self._csv_line(i)}" if self.is_csv else f"row {i + 1}"

    def _csv_line(self, i: int) -> int:
        """Line on which data row ``i`` starts: the header is line 1, the reader skips blank
        lines, and a quoted field may hold line breaks, so records are counted as Python's
        csv module reads them (only ever done for the one row an error names)."""
        seen = -1  # the header is record -1
        for start, fields in _csv_records(self.path):
            if fields:
                if seen == i:
                    return start
                seen += 1
        return i + 2

    def error(self, i: int | None, column: str | None, message: str) -> InputError:
        return InputError(self.name, None if i is None else self.row(int(i)), column, message)

    def has(self, column: str) -> bool:
        return column in self.data.column_names

    def raw(self, column: str) -> pa.ChunkedArray:
        col = self.data.column(column)
        if pa.types.is_nested(col.type):  # a Parquet list, struct or map: one value a row is read
            raise self.error(None, column, f"a column of {col.type} values; expected one text or number a row")
        return col

    def as_text(self, column: str, col: Any) -> Any:
        """``col`` cast to strings, or the file and column named where Arrow cannot."""
        try:
            return pc.cast(col, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise self.error(None, column, f"{col.type} values cannot be read as text: {_first_line(exc)}") from None

    def text(self, column: str, required: bool = True) -> pa.Array:
        """Column as a pyarrow string array, whitespace trimmed, null where empty."""
        if not self.has(column):
            return pa.nulls(len(self), pa.string())
        col = self.raw(column)
        if not pa.types.is_string(col.type):  # large_string too: ids of two tables are joined
            col = self.as_text(column, col)
        col = pc.utf8_trim_whitespace(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        if required and col.null_count:
            raise self.error(_first(col.is_null()), column, "missing value")
        return col

    def codes(self, column: str, required: bool = True) -> tuple[np.ndarray, pa.Array]:
        """Column as ``(codes, values)`` (``_encoded``): ``[rows]`` int32 indices into its
        distinct values, whitespace trimmed; -1 where empty (only allowed when not required)."""
        codes, values = _encoded(self.string_array(column))
        if required:
            self.check(codes < 0, column, "missing value")
        return codes, values

    def string_array(self, column: str) -> pa.Array:
        """Column as one pyarrow array of strings or dictionary-encoded strings, untrimmed."""
        if not self.has(column):
            return pa.nulls(len(self), pa.string())
        col = self.raw(column)
        col = col.unify_dictionaries().combine_chunks() if pa.types.is_dictionary(col.type) else col.combine_chunks()
        if pa.types.is_dictionary(col.type):
            return col if pa.types.is_string(col.type.value_type) else self.as_text(column, col.dictionary_decode())
        return col if pa.types.is_string(col.type) else self.as_text(column, col)

    def strings(self, column: str, required: bool = True) -> np.ndarray:
        """Column as an object array of stripped strings; None where empty."""
        return np.asarray(self.text(column, required).to_numpy(zero_copy_only=False), dtype=object)

    def numbers(self, column: str, required: bool = True) -> np.ndarray:
        """Column as float64; NaN where empty (only allowed when not required)."""
        if not self.has(column):
            return np.full(len(self), np.nan)
        col = self.raw(column)
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
            values = col.to_numpy(zero_copy_only=False).astype(np.float64)
            missing = np.asarray(col.is_null().to_numpy(zero_copy_only=False)) if col.null_count else np.zeros(len(values), bool)
            values[missing] = np.nan
            if np.isnan(values).sum() > missing.sum():
                bad = np.flatnonzero(np.isnan(values) & ~missing)[0]
                raise self.error(bad, column, "NaN is not a valid value")
        else:
            text = self.text(column, required=False)
            try:  # Arrow's parser, correctly rounded, reads a subset of what pandas reads
                parsed = pc.cast(text, pa.float64())
            except pa.ArrowInvalid:  # something it does not read: pandas says which row is bad
                parsed = None
            if parsed is not None:
                missing = np.asarray(parsed.is_null().to_numpy(zero_copy_only=False))
                values = parsed.to_numpy(zero_copy_only=False)
            else:  # 20x slower at a million rows, through Python objects
                strings = self.strings(column, required=False)
                missing = pd.isna(strings)
                values = pd.to_numeric(pd.Series(strings, dtype=object), errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan
                )
            bad = np.isnan(values) & ~missing  # 'nan' parses, and is not a number here
            if bad.any():
                i = np.flatnonzero(bad)[0]
                raise self.error(i, column, f"{text[int(i)].as_py()!r} is not a number")
        if np.isinf(values).any():
            raise self.error(np.flatnonzero(np.isinf(values))[0], column, "infinite value")
        if required and missing.any():
            raise self.error(np.flatnonzero(missing)[0], column, "missing value")
        return np.array(values, dtype=np.float64)  # a writable copy

    def check(self, bad: np.ndarray, column: str, message: str) -> None:
        """Raise for the first row where ``bad`` holds."""
        if bad.any():
            raise self.error(np.flatnonzero(bad)[0], column, message)


def _read_table(folder: Path, name: str, required: tuple[str, ...], dictionary: tuple[str, ...] = ()) -> _Table:
    """Read the table ``name`` of a snapshot ``folder``, from CSV or Parquet, with its columns
    ``required``; ``dictionary`` names the Parquet columns read as Arrow dictionaries (columns
    of few distinct strings, which the file then need not expand into one string a row)."""
    csv, parquet = folder / f"{name}.csv", folder / f"{name}.parquet"
    if csv.exists() and parquet.exists():
        raise InputError(str(folder), None, None, f"both {name}.csv and {name}.parquet exist")
    if csv.exists():
        path = csv
        data = _read_csv(path)
    elif parquet.exists():
        path = parquet
        _check_file(path)
        try:
            import pyarrow.parquet as pq

            # Arrow fails on a repeated column name it is asked to read as a dictionary, with a
            # dump of the schema: look for repeats in the schema first
            _repeated_column(path, pq.read_schema(path).names)
            data = pq.read_table(path, read_dictionary=list(dictionary))  # absent or non-text columns: ignored
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(path.name, None, None, f"not a readable Parquet file: {_first_line(exc)}") from None
    else:
        # Name the file in the format the snapshot's other tables use.
        ext = "parquet" if any((folder / f"{t}.parquet").exists() for t in TABLES) else "csv"
        raise InputError(f"{name}.{ext}", None, None, f"missing table: {folder} has no {name}.csv or {name}.parquet")
    _repeated_column(path, data.column_names)
    table = _Table(path, data)
    for column in required:
        if not table.has(column):
            near = [c for c in data.column_names if c.strip() == column]  # "a, b" headers
            hint = f" (the header has {near[0]!r}: no spaces around column names)" if near else ""
            raise InputError(path.name, None, column, "missing column" + hint)
    return table


def _repeated_column(path: Path, names: list[str]) -> None:
    """An input error at the first column name that appears twice: Arrow keeps both, and
    reading the column would fail without a message."""
    seen: set = set()
    for column in names:
        if column in seen:
            raise InputError(path.name, "line 1" if path.suffix == ".csv" else None, column, "column appears twice")
        seen.add(column)


def _first_line(exc: Exception) -> str:
    """An Arrow error's first line: some go on with the whole schema."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _csv_records(path: Path):
    """``(line, fields)`` of each record of a CSV file as Python's csv module reads it, ``line``
    the one it starts on: a quoted field may hold line breaks, and a blank line is a record
    with no fields."""
    import csv as pycsv

    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8" writes one) is not part of the first
    # column's name; Arrow drops it too, so kept here the column would miss its text type
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader, end = pycsv.reader(f), 0
        for fields in reader:  # a record starts on the line after the last one ended
            start, end = end + 1, reader.line_num
            yield start, fields


def _read_csv(path: Path) -> pa.Table:
    """Read a CSV table with every column as text (numbers are parsed, and reported with
    their line, by ``_Table.numbers``). Only empty cells count as missing: ``nan`` or ``NA``
    is a value, and an error where a number is expected."""
    from pyarrow import csv as pacsv

    _check_file(path)
    try:
        header = next((fields for _, fields in _csv_records(path)), None)
    except UnicodeDecodeError:
        raise InputError(path.name, None, None, "not a CSV text file (not UTF-8)") from None
    except OSError as exc:
        raise InputError(path.name, None, None, f"cannot be read: {exc.strerror or exc}") from None
    if not header:
        raise InputError(path.name, "line 1", None, "empty file: expected a header line")
    try:
        return pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
    except pa.ArrowInvalid as exc:
        # Find the line at fault ourselves: pyarrow's message has no line number.
        for start, fields in _csv_records(path):
            if fields and len(fields) != len(header):
                raise InputError(
                    path.name, f"line {start}", None, f"expected {len(header)} fields, found {len(fields)}"
                ) from None
        raise InputError(path.name, None, None, f"not a readable CSV table: {_first_line(exc)}") from None


def _unique(table: _Table, values: np.ndarray, column: str) -> None:
    dup = pd.Series(values).duplicated().to_numpy()
    if dup.any():
        i = np.flatnonzero(dup)[0]
        raise table.error(i, column, f"duplicate id {values[i]!r}")


def _repeats(key: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``[len(key)]`` True on every row whose integer ``key`` an earlier row already has, from
    ``order``, a stable argsort of ``key`` (which the loader needs anyway): equal keys sit
    side by side there, in row order. Hashing the keys instead (pandas) took 0.7 s at 3M rows."""
    ranked = key[order]
    dup = np.zeros(len(key), bool)
    dup[order[1:][ranked[1:] == ranked[:-1]]] = True
    return dup


def _first(mask: pa.Array) -> int:
    """Index of the first True of a boolean pyarrow array."""
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _encoded(col: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """``(codes, values)`` of a string column ``col`` (plain or dictionary-encoded): ``values``
    its distinct values, whitespace trimmed, and ``codes`` ``[rows]`` int32 indices into them,
    -1 for a null or blank cell.

    Trimming and looking up are done on the distinct values, not on every row: an instrument
    or asset column of a million rows holds a few hundred, an account column about one per
    account, and trimming every row took about a fifth of loading 1M accounts.
    """
    enc = col if pa.types.is_dictionary(col.type) else col.dictionary_encode()
    values = enc.dictionary
    if not pa.types.is_string(values.type):
        values = pc.cast(values, pa.string())
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
    trimmed = pc.utf8_trim_whitespace(values)
    trimmed = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)
    if trimmed.null_count or values.null_count or not pc.all(pc.equal(trimmed, values)).as_py():
        # some values were blank or differ only by spaces (" a" and "a"): encode them again
        again = trimmed.dictionary_encode()
        remap = np.append(pc.fill_null(again.indices, -1).to_numpy(zero_copy_only=False), -1).astype(np.int32)
        codes, values = remap[codes], again.dictionary  # a code of -1 takes remap's last, -1
    return codes, values


def _plain(col: pa.Array) -> pa.Array:
    """A string column with its dictionary encoding, if any, undone."""
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def _lookup(table: _Table, encoded: tuple[np.ndarray, pa.Array], known: Any, column: str, what: str) -> np.ndarray:
    """``[rows]`` int32 index of each row's value (``_Table.codes``) in ``known``; an unknown
    value is an input error on the first row that holds it, an empty cell gives -1."""
    codes, values = encoded
    known = pa.array([str(k) for k in known], pa.string())
    at = np.append(pc.fill_null(pc.index_in(values, value_set=known), -1).to_numpy(zero_copy_only=False), -1)
    idx = at.astype(np.int32)[codes]
    bad = (idx < 0) & (codes >= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise table.error(i, column, f"unknown {what} {values[int(codes[i])].as_py()!r}")
    return idx


# --------------------------------------------------------------------------------------------
# exchange.toml


def _as_utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    if isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=timezone.utc)
    if isinstance(value, str):
        ts = pd.to_datetime(value, utc=True, errors="coerce")
        return None if pd.isna(ts) else ts.to_pydatetime()
    return None


def _check_file(path: Path) -> None:
    """An input error unless ``path`` is a file (a folder given for one would fail later with
    an operating-system error and no file, row or column)."""
    if path.is_dir():
        raise InputError(path.name, None, None, f"{path} is a folder, not a file")


def read_toml(path: Path) -> dict:
    """Parse a TOML file; a file that is not TOML is an input error naming the line."""
    _check_file(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path.name, None, None, f"file not found: {path}") from None
    except OSError as exc:
        raise InputError(path.name, None, None, f"cannot be read: {exc.strerror or exc}") from None
    try:
        # utf-8-sig: a byte-order mark some editors write is not TOML, nor an error worth one
        return tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(path.name, None, None, "not a TOML file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        row = f"line {m.group(1)}" if m else None
        col = m.group(2) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise InputError(path.name, row, col, f"not valid TOML: {msg}") from None


def _number(file: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(file, None, key, f"{value!r} is not a finite number")
    return float(value)


# --------------------------------------------------------------------------------------------
# Deribit instrument names

_MONTHS = {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DERIBIT = re.compile(
    r"^(?P<base>[A-Z0-9]+?)(?:_(?P<quote>[A-Z0-9]+))?-"
    r"(?:(?P<perp>PERPETUAL)|(?P<day>\d{1,2})(?P<mon>[A-Z]{3})(?P<yy>\d{2})"
    r"(?:-(?P<strike>\d+(?:d\d+)?)-(?P<cp>[CP]))?)$"
)
# USD face value of one inverse future or perpetual contract, as Deribit defines them.
DERIBIT_FACE_USD = {"BTC": 10.0, "ETH": 1.0}


def parse_deribit_name(name: str) -> dict | None:
    """Terms implied by a Deribit-style instrument name, or None if it is not one.

    ``BTC-PERPETUAL`` and ``BTC-27DEC26`` are inverse (settled in BTC) with a USD face value
    per contract (10 for BTC, 1 for ETH); ``BTC-27DEC26-100000-C`` is an inverse option on 1
    BTC. ``X_USDC-...`` names are Deribit's linear USDC-settled instruments, taken here on 1 coin
    per contract. Expiry is 08:00 UTC on the named day.
    """
    m = _DERIBIT.match(name)
    if m is None:
        return None
    base, quote = m["base"], m["quote"]
    terms: dict[str, Any] = {"underlying": base, "settlement": quote or base}
    if m["perp"]:
        terms["kind"] = "perpetual"
    else:
        month = _MONTHS.get(m["mon"])
        if month is None:
            return None
        try:
            terms["expiry"] = datetime(2000 + int(m["yy"]), month, int(m["day"]), 8, tzinfo=timezone.utc)
        except ValueError:
            return None
        terms["kind"] = "option" if m["cp"] else "future"
        if m["cp"]:
            terms["strike"] = float(m["strike"].replace("d", "."))
            terms["option_type"] = "call" if m["cp"] == "C" else "put"
    if terms["kind"] == "option" or quote:
        terms["contract_size"] = 1.0
    elif base in DERIBIT_FACE_USD:
        terms["contract_size"] = DERIBIT_FACE_USD[base]
    return terms


# --------------------------------------------------------------------------------------------
# The snapshot


def load_snapshot(path: str | Path) -> Snapshot:
    """Load and validate a snapshot folder (SPEC section 1).

    Args:
      path: a folder with ``exchange.toml`` and the tables ``assets``, ``instruments``,
        ``balances`` and ``positions``, each as ``.csv`` or ``.parquet``.

    Returns:
      A ``Snapshot``. Accounts are sorted by id, assets by name and positions by (account,
      instrument), so the row order of ``balances``, ``positions`` and ``assets`` changes no
      result, to the last bit, nor the order of any per-asset column or row. Instruments keep
      their file order, which sets the order of the sums over an account's positions: a
      reordered ``instruments`` file changes results in their last bits only (up to about
      1e-12 relative was measured).

    Raises:
      InputError: naming the file, row and column of the first problem found.
    """
    snap = _load_snapshot(Path(path))
    # Arrow's allocator keeps the pages of the tables just read (about 400 MiB at 1M
    # accounts) for reuse; nothing else will read tables this run, so give them back now
    # rather than carry them through the whole stress run's peak.
    _memory.trim()
    return snap


def _load_snapshot(folder: Path) -> Snapshot:
    """``load_snapshot`` of an existing ``folder``'s tables."""
    if not folder.is_dir():
        raise InputError(str(folder), None, None, "snapshot folder not found")

    cfg = read_toml(folder / "exchange.toml")
    file = "exchange.toml"
    unknown = sorted(set(cfg) - set(EXCHANGE_KEYS))
    if unknown:  # a misspelt [limits] or insurance_fund would otherwise drop a limit or the fund
        raise InputError(file, None, unknown[0], f"unknown key (known: {', '.join(EXCHANGE_KEYS)})")
    if "as_of" not in cfg:
        raise InputError(file, None, "as_of", "missing key")
    as_of = _as_utc(cfg["as_of"])
    if as_of is None:
        raise InputError(file, None, "as_of", f"{cfg['as_of']!r} is not a date-time")
    rate = _number(file, "rate", cfg.get("rate", 0.0))
    fund_cfg = cfg.get("insurance_fund", {})
    if not isinstance(fund_cfg, dict):
        raise InputError(file, None, "insurance_fund", "must be a table of asset = amount")
    for key in ("margin", "liquidation", "limits"):
        if not isinstance(cfg.get(key, {}), dict):
            raise InputError(file, None, key, "must be a table")

    # assets
    at = _read_table(folder, "assets", ("asset", "price", "haircut"))
    if not len(at):  # else the first error would be an unknown asset in some other file
        raise at.error(None, None, "no assets: the table has a header and no rows")
    assets = at.strings("asset")
    _unique(at, assets, "asset")
    price = at.numbers("price")
    at.check(price <= 0, "price", "price must be > 0")
    haircut = at.numbers("haircut")
    at.check((haircut < 0) | (haircut >= 1), "haircut", "haircut must be in [0, 1)")
    # Assets in name order, not the file's: their order decides no value, but it orders the
    # report's per-asset columns and rows and the sums over assets, and a file's row order must
    # change no report (error messages above still name the file's rows).
    order = np.argsort(np.asarray(assets, dtype=str), kind="stable")
    assets, price, haircut = assets[order], price[order], haircut[order]
    asset_names = tuple(str(a) for a in assets)

    fund = np.zeros(len(assets))
    for name, amount in fund_cfg.items():
        if name not in asset_names:
            raise InputError(file, None, f"insurance_fund.{name}", f"unknown asset {name!r}")
        value = _number(file, f"insurance_fund.{name}", amount)
        if value < 0:  # a fund that owes would pay bad debt with a negative amount
            raise InputError(file, None, f"insurance_fund.{name}", f"{amount!r}: a fund balance must be >= 0")
        fund[asset_names.index(name)] = value

    instruments, instrument_ids, rates, it = _load_instruments(folder, asset_names, as_of)
    params = _margin.params_from_config(cfg.get("margin", {}), instruments, haircut, rates, assets=asset_names)
    _check_rates(it, instruments, params, rates)
    liq_cfg = _liquidation.config(cfg.get("liquidation", {}))  # checked here, so bad keys fail at load
    _liquidation.check_partial(liq_cfg, cfg.get("margin", {}).get("model", "standard"))
    if liq_cfg["cascade"] and cfg.get("margin", {}).get("model", "standard") in ("portfolio", "var"):
        raise InputError(file, "[liquidation]", "cascade", "cascades are modelled under the standard margin model only")
    for name in liq_cfg["impact"]:
        if name not in asset_names:
            raise InputError(file, f"[liquidation.impact.{name}]", "impact", f"unknown asset {name!r}")

    # balances and positions; their few distinct asset and instrument ids are read as Arrow
    # dictionaries where the Parquet file keeps them so, and looked up once each
    bt = _read_table(folder, "balances", ("account_id", "asset", "amount"), dictionary=("asset",))
    pt = _read_table(folder, "positions", ("account_id", "instrument_id", "quantity"), dictionary=("instrument_id",))

    # Accounts are every id in balances or positions, sorted: one hashing pass (dictionary
    # encoding) gives each row an integer code, then codes are renumbered in sorted id order
    # (no Python strings; at 1M accounts half the time of unique + two index_in lookups).
    acc_codes, ids = _encoded(pa.concat_arrays([_plain(bt.string_array("account_id")), _plain(pt.string_array("account_id"))]))
    b_idx, p_idx = acc_codes[: len(bt)], acc_codes[len(bt) :]

    bt.check(b_idx < 0, "account_id", "missing value")
    b_asset = _lookup(bt, bt.codes("asset"), asset_names, "asset", "asset")
    b_amt = bt.numbers("amount")

    pt.check(p_idx < 0, "account_id", "missing value")
    p_inst = _lookup(pt, pt.codes("instrument_id"), instrument_ids, "instrument_id", "instrument")
    p_qty = pt.numbers("quantity")
    pt.check(p_qty == 0, "quantity", "quantity must be non-zero")
    p_entry = pt.numbers("entry_price", required=False)
    pt.check(p_entry <= 0, "entry_price", "entry_price must be > 0")

    order = pc.sort_indices(ids).to_numpy()
    ids = ids.take(order)
    account_ids = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    if not len(account_ids):
        raise bt.error(None, None, "no accounts: balances and positions both have no rows")
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    b_idx, p_idx = rank[b_idx], rank[p_idx]

    # Cover 2's groups only where [liquidation] group_column names a column: extra columns are ignored
    group_column = liq_cfg["group_column"]
    if group_column and not bt.has(group_column):
        raise InputError(file, "[liquidation]", "group_column",
                         f"{group_column!r}: balances has no such column (accounts under common control)")
    account_group = _account_groups(bt, b_idx, len(account_ids), group_column) if group_column else None

    key_b = b_idx.astype(np.int64) * len(asset_names) + b_asset
    bt.check(_repeats(key_b, np.argsort(key_b, kind="stable")), "asset",
             "duplicate balance: this account already has a row for this asset")
    balances = np.zeros((len(account_ids), len(asset_names)))
    balances[b_idx, b_asset] = b_amt

    key_p = p_idx.astype(np.int64) * len(instrument_ids) + p_inst
    order = np.argsort(key_p, kind="stable")
    pt.check(_repeats(key_p, order), "instrument_id",
             "duplicate position: this account already has a row for this instrument")

    snap = Snapshot(
        as_of=as_of,
        assets=asset_names,
        instrument_ids=instrument_ids,
        account_ids=account_ids,
        market=Market(price=price, rate=np.float64(rate)),
        instruments=instruments,
        params=params,
        balances=balances,
        pos_account=p_idx[order],
        pos_instrument=p_inst[order],
        pos_quantity=p_qty[order],
        pos_entry_price=p_entry[order],
        insurance_fund=fund,
        margin_config=dict(cfg.get("margin", {})),
        liquidation_config=dict(cfg.get("liquidation", {})),
        limits=dict(cfg.get("limits", {})),
        source=str(folder),
        account_group=account_group,
    )
    keep_account_id_column(snap, ids)  # the report's id column, from Arrow's strings
    if snap.margin_config.get("model") == "var":  # its price history is input too: check it now, not mid-run
        _margin.var_windows(snap)
    return snap


def _account_groups(bt: _Table, b_idx: np.ndarray, n: int, column: str) -> np.ndarray:
    """``[n]`` the group of each account in balances' ``column`` (None where no row gives
    one): accounts under common control whose defaults count together in Cover 2. Every row
    of an account that gives a group must give the same one."""
    grp = bt.strings(column, required=False)
    given = ~pd.isna(grp)
    if not given.any():
        return np.full(n, None, dtype=object)
    codes, names = pd.factorize(pd.Series(grp[given], dtype=object))
    first = np.full(n, -1, np.int64)
    rows = np.flatnonzero(given)
    # the first group given per account (rows in file order), then any row that disagrees
    order = np.lexsort((rows, b_idx[rows]))
    acc_sorted = b_idx[rows][order]
    lead = np.r_[True, acc_sorted[1:] != acc_sorted[:-1]]
    first[acc_sorted[lead]] = codes[order][lead]
    bad = np.zeros(len(grp), bool)
    bad[rows] = codes != first[b_idx[rows]]
    bt.check(bad, column, "this account is already in another group (one group per account)")
    out = np.full(n, None, dtype=object)
    has = first >= 0
    out[has] = np.asarray(names, dtype=object)[first[has]]
    return out


def _check_rates(t: _Table, inst: Instruments, params: Any, rates: tuple[np.ndarray, np.ndarray]) -> None:
    """An input error on the first row whose own ``im_rate``/``mm_rate`` (with the rate it
    leaves to exchange.toml, or its tiers) puts maintenance above initial margin, which would
    make a position liquidatable as it opens (``margin.mm_above_initial``); an option's
    ``mm_rate`` is held to ``option_im_floor``, as ``option_mm_rate`` is in exchange.toml."""
    im, mm = rates
    is_opt = np.asarray(inst.kind) == OPTION
    # rows that set a rate: exchange.toml's own are checked there
    bad = _margin.mm_above_initial(params, inst.kind) & (~np.isnan(im) | ~np.isnan(mm))
    if bad.any():
        i = int(np.argmax(bad))
        if is_opt[i]:
            raise t.error(i, "mm_rate", "an option's mm_rate must not exceed option_im_floor in exchange.toml [margin]")
        if np.isnan(mm[i]):
            raise t.error(i, "im_rate", "im_rate below the maintenance rate exchange.toml [margin] gives it")
        raise t.error(i, "mm_rate", "mm_rate above the initial rate" + ("" if np.isnan(im[i]) else " (im_rate)"))


def _load_instruments(
    folder: Path, assets: tuple[str, ...], as_of: datetime
) -> tuple[Instruments, np.ndarray, tuple[np.ndarray, np.ndarray], _Table]:
    """Instrument terms, ids (file order), the optional ``im_rate``/``mm_rate`` columns (NaN
    where empty) and the table itself (for errors on its rows), from one read of it."""
    t = _read_table(folder, "instruments", ("instrument_id",))
    ids = t.strings("instrument_id")
    _unique(t, ids, "instrument_id")
    n = len(ids)
    if not n:  # every revaluation is [instruments, scenarios]: an exchange lists at least one
        raise t.error(None, None, "no instruments: the table has a header and no rows")

    cols = {c: t.strings(c, required=False) for c in ("kind", "underlying", "settlement", "option_type")}
    contract_size = t.numbers("contract_size", required=False)
    strike = t.numbers("strike", required=False)
    mark = t.numbers("mark_price", required=False)
    iv = t.numbers("mark_iv", required=False)
    expiry_ts = _expiries(t)

    # Fill what a Deribit-style name implies, only where the row leaves it empty.
    parsed = [parse_deribit_name(str(i)) for i in ids]
    for i, terms in enumerate(parsed):
        if terms is None:
            continue
        for c in ("kind", "underlying", "settlement", "option_type"):
            if cols[c][i] is None and c in terms:
                cols[c][i] = terms[c]
        # the name's contract size is for the contract it names: a row that settles it in
        # another asset (a linear contract) must give its own, in coins, not the USD face value
        same = str(cols["settlement"][i]).strip() == terms.get("settlement")  # filled from the name above if empty
        coins = terms.get("kind") == "option"  # an option's size, 1 coin, is one either way
        if np.isnan(contract_size[i]) and "contract_size" in terms and (same or coins):
            contract_size[i] = terms["contract_size"]
        if np.isnan(strike[i]) and "strike" in terms:
            strike[i] = terms["strike"]
        if pd.isna(expiry_ts[i]) and "expiry" in terms:
            expiry_ts[i] = pd.Timestamp(terms["expiry"])

    kind_text = cols["kind"]
    t.check(pd.isna(kind_text), "kind", "missing value (and the instrument_id is not a Deribit-style name)")
    kind_lower = np.array([k.lower() for k in kind_text], dtype=object)
    known_kind = np.isin(kind_lower, list(KIND_CODES))
    if not known_kind.all():
        i = np.flatnonzero(~known_kind)[0]
        raise t.error(i, "kind", f"unknown kind {kind_text[i]!r} (expected future, perpetual or option)")
    kind = np.array([KIND_CODES[k] for k in kind_lower], dtype=np.int32)
    is_opt, is_perp = kind == OPTION, kind == PERPETUAL

    for c in ("underlying", "settlement"):
        t.check(pd.isna(cols[c]), c, "missing value")
    underlying, settlement = (_lookup(t, _encoded(pa.array(list(cols[c]), pa.string())), assets, c, "asset")
                              for c in ("underlying", "settlement"))

    t.check(np.isnan(contract_size), "contract_size", "missing value")
    t.check(contract_size <= 0, "contract_size", "contract_size must be > 0")

    needs_expiry = ~is_perp
    t.check(needs_expiry & pd.isna(expiry_ts), "expiry", "missing value")
    as_of_ts = pd.Timestamp(as_of)
    years = np.full(n, np.inf)
    has = needs_expiry
    exp = pd.to_datetime(pd.Series(expiry_ts[has], dtype=object), utc=True)
    delta = (exp - as_of_ts).dt.total_seconds().to_numpy(dtype=np.float64)
    years[has] = delta / (YEAR_DAYS * 86400.0)
    t.check(has & (years <= 0), "expiry", f"instrument has expired (expiry <= as_of {as_of.isoformat()})")

    t.check(is_opt & np.isnan(strike), "strike", "missing value")
    t.check(is_opt & (strike <= 0), "strike", "strike must be > 0")
    opt_type = np.array([None if v is None else v.lower() for v in cols["option_type"]], dtype=object)
    t.check(is_opt & pd.isna(opt_type), "option_type", "missing value")
    bad_type = is_opt & ~np.isin(opt_type, ["call", "put"])
    if bad_type.any():
        i = np.flatnonzero(bad_type)[0]
        raise t.error(i, "option_type", f"{cols['option_type'][i]!r} is not call or put")

    t.check(~is_opt & np.isnan(mark), "mark_price", "missing value")
    t.check(~is_opt & (mark <= 0), "mark_price", "mark_price must be > 0")
    t.check(is_opt & np.isnan(iv), "mark_iv", "missing value")
    t.check(is_opt & (iv <= 0), "mark_iv", "mark_iv must be > 0")
    t.check(is_opt & (iv > MAX_IV), "mark_iv", f"mark_iv above {MAX_IV:g}: give it as a decimal (0.55 for 55%), not in percent")

    inst = Instruments(
        kind=kind,
        underlying=underlying,
        settlement=settlement,
        inverse=underlying == settlement,
        contract_size=contract_size,
        strike=np.where(is_opt, strike, 0.0),
        expiry=years,
        is_call=is_opt & (opt_type == "call"),
        mark=np.where(is_opt, 0.0, mark),
        iv=np.where(is_opt, iv, 0.0),
    )
    im = t.numbers("im_rate", required=False)
    mm = t.numbers("mm_rate", required=False)
    t.check(im < 0, "im_rate", "im_rate must be >= 0")
    t.check(mm < 0, "mm_rate", "mm_rate must be >= 0")
    return inst, ids, (im, mm), t


def _expiries(t: _Table) -> np.ndarray:
    """The ``expiry`` column as an object array of UTC Timestamps (NaT where empty)."""
    n = len(t)
    if not t.has("expiry"):
        return np.array([pd.NaT] * n, dtype=object)
    col = t.raw("expiry")
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        ts = pd.to_datetime(col.to_pandas(), utc=True)
        return np.array(list(ts), dtype=object)
    text = t.strings("expiry", required=False)
    ts = pd.to_datetime(pd.Series(text, dtype=object), utc=True, errors="coerce", format="ISO8601")
    bad = ts.isna().to_numpy() & ~pd.isna(text)
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise t.error(i, "expiry", f"{text[i]!r} is not a date-time")
    return np.array(list(ts), dtype=object)
