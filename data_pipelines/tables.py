"""CSV tables of the datasets (label tables, exams.csv, metadata CSVs) read into rows, or refused in one line.

Why one place: every table is user-supplied or downloaded text, and a damaged one (not UTF-8, a NUL byte, a cell
beyond the csv module's field limit, a missing column, a word where a number belongs) must be refused as a
`DataError` naming the file and the row, not met as a KeyError or ValueError from deep inside a builder.
"""
from __future__ import annotations

import csv
import os

from data_pipelines.errors import DataError

# What parsing one row's cells can raise: a missing column (KeyError), a short row's None cell (TypeError,
# AttributeError), a bad number (ValueError, OverflowError for int(inf)), a bad literal (SyntaxError, MemoryError,
# RecursionError from ast.literal_eval).
ROW_ERRORS = (KeyError, ValueError, TypeError, AttributeError, OverflowError, SyntaxError, MemoryError, RecursionError)


def read_rows(path: str | os.PathLike[str]) -> list[list[str]]:
  """Every row of a CSV file as lists of cells (a UTF-8 byte-order mark is skipped); DataError naming the file
  when it is not readable CSV text."""
  path = os.fspath(path)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      return list(csv.reader(f))
  except (UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: not a readable CSV file ({type(e).__name__}: {str(e)[:200]})") from None


def read_dicts(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
  """(column names, rows as {column: cell}) of a CSV with a header row; DataError naming the file when it is not
  readable CSV text. Cells missing from a short row are "" (never None); cells beyond the header are dropped."""
  rows = read_rows(path)
  if not rows:
    return [], []
  columns = rows[0]
  return columns, [{c: (r[i] if i < len(r) else "") for i, c in enumerate(columns)} for r in rows[1:] if r]


def row_error(path: str | os.PathLike[str], index: int, e: BaseException) -> DataError:
  """The DataError for data row `index` (0-based, after the header) of a table that `read_dicts` read."""
  what = f"no column {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:200]}"
  return DataError(f"{os.fspath(path)}: data row {index + 1}: {what}")
