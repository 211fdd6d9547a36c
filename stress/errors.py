"""The one error type a user sees for bad input."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: names the file, the row and the column at fault.

    ``row`` is a human row reference already formatted for the file's kind: ``"line 42"`` for a
    CSV file (the header is line 1), ``"row 42"`` (1-based) for a Parquet file, or a scenario
    name / TOML key path for TOML files. Any of ``row`` and ``column`` may be ``None`` when the
    fault is the whole file (a missing table) or a whole column (a missing column).
    """

    def __init__(self, file: str, row: str | None, column: str | None, message: str):
        self.file = str(file)
        self.row = row
        self.column = column
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f" {self.row}"
        if self.column is not None:
            where += f", column {self.column}"
        return f"{where}: {self.message}"
