"""PTB-XL labels: `scp_codes` of `ptbxl_database.csv` mapped to the benchmark tasks through `scp_statements.csv`.

Tasks follow the PTB-XL benchmark convention (Strodthoff et al. 2021): `all` (every statement, 71), `diagnostic`
(44), `subdiagnostic` (23 diagnostic subclasses), `superdiagnostic` (5 classes), `form` (19), `rhythm` (12); every
statement in `scp_codes` counts whatever its likelihood. Folds 1-8 train, 9 validation, 10 test.
"""
from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np

from data_pipelines import tables

TASKS = ("all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm")
VAL_FOLD, TEST_FOLD = 9, 10
PTBXL_SEX = {"0": "M", "1": "F"}  # the database documents 0 = male, 1 = female


@dataclasses.dataclass(frozen=True)
class Statement:
  code: str
  description: str
  diagnostic: bool
  form: bool
  rhythm: bool
  diagnostic_class: str | None
  diagnostic_subclass: str | None


@dataclasses.dataclass(frozen=True)
class PtbxlRow:
  ecg_id: int
  patient_id: str
  age: float | None
  sex: str | None
  scp_codes: dict[str, float]
  strat_fold: int
  filename_lr: str
  filename_hr: str

  @property
  def split(self) -> str:
    return split_of_fold(self.strat_fold)


def _flag(text: str) -> bool:
  try:
    return float(text) == 1.0
  except ValueError:
    return False


def _id(text: str) -> str:
  """Patient ids are written as floats (`15709.0`); keep the integer form so ids from other files match."""
  text = str(text).strip()
  try:
    value = float(text)
  except ValueError:
    return text
  return str(int(value)) if value.is_integer() else text


def parse_scp_codes(text: str) -> dict[str, float]:
  """The `scp_codes` cell (a Python dict written as text) -> {statement: likelihood}. Literal parsing only."""
  value = ast.literal_eval(text) if str(text).strip() else {}
  if not isinstance(value, dict):
    raise ValueError(f"scp_codes is not a dict: {text!r}")
  return {str(k): float(v) for k, v in value.items()}


def load_statements(path: str | os.PathLike[str]) -> dict[str, Statement]:
  """`scp_statements.csv` -> {code: Statement}; the code is the unnamed first column."""
  out = {}
  for i, row in enumerate(tables.read_dicts(path)[1]):
    try:
      code = row.get("") or row.get("Unnamed: 0") or next(iter(row.values()))
      diagnostic = _flag(row["diagnostic"])
      out[code] = Statement(code=code, description=row["description"], diagnostic=diagnostic,
                            form=_flag(row["form"]), rhythm=_flag(row["rhythm"]),
                            diagnostic_class=(row["diagnostic_class"] or None) if diagnostic else None,
                            diagnostic_subclass=(row["diagnostic_subclass"] or None) if diagnostic else None)
    except (*tables.ROW_ERRORS, StopIteration) as e:
      raise tables.row_error(path, i, e) from None
  return out


def load_database(path: str | os.PathLike[str]) -> dict[int, PtbxlRow]:
  """`ptbxl_database.csv` (or an excerpt with the same columns) -> {ecg_id: PtbxlRow}."""
  out = {}
  for i, row in enumerate(tables.read_dicts(path)[1]):
    try:
      ecg_id = int(float(row["ecg_id"]))
      age = row.get("age", "").strip()
      out[ecg_id] = PtbxlRow(ecg_id=ecg_id, patient_id=_id(row["patient_id"]), age=float(age) if age else None,
                             sex=PTBXL_SEX.get(_id(row.get("sex", ""))), scp_codes=parse_scp_codes(row["scp_codes"]),
                             strat_fold=int(float(row["strat_fold"])), filename_lr=row.get("filename_lr", ""),
                             filename_hr=row.get("filename_hr", ""))
    except tables.ROW_ERRORS as e:
      raise tables.row_error(path, i, e) from None
  return out


def split_of_fold(strat_fold: int) -> str:
  """The benchmark split: folds 1-8 train, 9 val, 10 test."""
  if strat_fold == TEST_FOLD:
    return "test"
  if strat_fold == VAL_FOLD:
    return "val"
  if 1 <= strat_fold <= 8:
    return "train"
  raise ValueError(f"strat_fold {strat_fold} is not in 1..10")


def task_labels(scp_codes: Iterable[str], statements: dict[str, Statement], task: str) -> list[str]:
  """The labels of one ECG under `task`, sorted; statements unknown to `statements` are ignored."""
  if task not in TASKS:
    raise ValueError(f"unknown PTB-XL task {task!r}; tasks are {TASKS}")
  out = set()
  for code in scp_codes:
    s = statements.get(code)
    if s is None:
      continue
    if task == "all":
      out.add(code)
    elif task == "diagnostic" and s.diagnostic:
      out.add(code)
    elif task == "subdiagnostic" and s.diagnostic_subclass:
      out.add(s.diagnostic_subclass)
    elif task == "superdiagnostic" and s.diagnostic_class:
      out.add(s.diagnostic_class)
    elif task == "form" and s.form:
      out.add(code)
    elif task == "rhythm" and s.rhythm:
      out.add(code)
  return sorted(out)


def task_classes(statements: dict[str, Statement], task: str) -> list[str]:
  """Every label `task` can take, sorted: the column order of its multi-hot vectors."""
  return task_labels(statements.keys(), statements, task)


def multi_hot(labels: Iterable[str], classes: Sequence[str]) -> np.ndarray:
  """float32 (len(classes),) with 1 where a label is present; labels outside `classes` are ignored."""
  index = {c: i for i, c in enumerate(classes)}
  out = np.zeros((len(classes),), np.float32)
  for label in labels:
    if label in index:
      out[index[label]] = 1.0
  return out
