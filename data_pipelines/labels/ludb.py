"""LUDB labels from `ludb.csv`: one row per record, cells holding several findings on separate lines.

Task helpers return 1 / 0, or None where a record does not belong to the task (e.g. a vertical axis in the
normal-vs-left axis task).
"""
from __future__ import annotations

import dataclasses
import os

from data_pipelines import tables

_AXIS_PREFIX = "electric axis of the heart:"


@dataclasses.dataclass(frozen=True)
class LudbLabels:
  record_id: str
  sex: str | None
  age: float | None
  rhythms: tuple[str, ...]
  axis: str | None  # normal, left axis deviation, right axis deviation, vertical, horizontal
  conduction: tuple[str, ...]
  extrasystoles: tuple[str, ...]
  hypertrophies: tuple[str, ...]
  pacing: tuple[str, ...]
  ischemia: tuple[str, ...]
  repolarization: tuple[str, ...]
  other: tuple[str, ...]


def _lines(cell: str | None) -> tuple[str, ...]:
  return tuple(line.strip() for line in (cell or "").splitlines() if line.strip())


def _age(text: str) -> float | None:
  text = text.strip().strip("<>+").strip()
  try:
    return float(text)
  except ValueError:
    return None


def load_ludb(path: str | os.PathLike[str]) -> dict[str, LudbLabels]:
  """`ludb.csv` -> {record id ("1".."200"): LudbLabels}."""
  out = {}
  for i, row in enumerate(tables.read_dicts(path)[1]):
    try:
      out.update(_row(row))
    except tables.ROW_ERRORS as e:
      raise tables.row_error(path, i, e) from None
  return out


def _row(row: dict[str, str]) -> dict[str, LudbLabels]:
  record_id = row["ID"].strip()
  axis_lines = _lines(row.get("Electric axis of the heart"))
  axis = None
  if axis_lines:
    axis = axis_lines[0]
    if axis.lower().startswith(_AXIS_PREFIX):
      axis = axis[len(_AXIS_PREFIX):].strip()
    axis = axis.lower()
  sex = (row.get("Sex") or "").strip().upper()
  return {record_id: LudbLabels(
    record_id=record_id, sex=sex if sex in ("M", "F") else None, age=_age(row.get("Age") or ""),
    rhythms=_lines(row.get("Rhythms")), axis=axis, conduction=_lines(row.get("Conduction abnormalities")),
    extrasystoles=_lines(row.get("Extrasystolies")), hypertrophies=_lines(row.get("Hypertrophies")),
    pacing=_lines(row.get("Cardiac pacing")), ischemia=_lines(row.get("Ischemia")),
    repolarization=_lines(row.get("Non-specific repolarization abnormalities")),
    other=_lines(row.get("Other states")))}


def af_or_flutter(labels: LudbLabels) -> int:
  """1 if the rhythm is atrial fibrillation or atrial flutter."""
  return int(any(r.lower().startswith(("atrial fibrillation", "atrial flutter")) for r in labels.rhythms))


def sinus_rhythm(labels: LudbLabels) -> int:
  """1 if any listed rhythm is sinus (rhythm, bradycardia, tachycardia, arrhythmia, irregular sinus rhythm)."""
  return int(any("sinus" in r.lower() for r in labels.rhythms))


def lvh(labels: LudbLabels) -> int:
  """1 if left ventricular hypertrophy is listed (overload alone does not count)."""
  return int(any(h.lower() == "left ventricular hypertrophy" for h in labels.hypertrophies))


def axis_left_vs_normal(labels: LudbLabels) -> int | None:
  """1 for left axis deviation, 0 for a normal axis, None for any other or missing axis."""
  return {"left axis deviation": 1, "normal": 0}.get(labels.axis or "")
