"""SNOMED-CT labels of the PhysioNet/CinC 2020/2021 collection: `# Dx:` codes -> multi-hot over a code list."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np

from data_pipelines import tables

# Codes the Challenge scored as one class (its published scoring rule): each maps to the first code of its pair.
EQUIVALENT_CODES = {
  "59118001": "713427006",   # right bundle branch block -> complete right bundle branch block
  "63593006": "284470004",   # supraventricular premature beats -> premature atrial contraction
  "17338001": "427172004",   # ventricular premature beats -> premature ventricular contractions
  "164909002": "733534002",  # left bundle branch block -> complete left bundle branch block
}


@dataclasses.dataclass(frozen=True)
class Dx:
  code: str
  name: str
  abbreviation: str
  scored: bool


def parse_dx(text: str | Iterable[str]) -> list[str]:
  """`# Dx:` value (`"164934002,426783006"`) or a list -> codes as strings, in order, without blanks."""
  parts = text.split(",") if isinstance(text, str) else list(text)
  return [str(p).strip() for p in parts if str(p).strip()]


def load_dx_mapping(path: str | os.PathLike[str]) -> dict[str, Dx]:
  """`dx_mapping.csv` (snomed_code, dx_name, abbreviation, scored) -> {code: Dx}."""
  out = {}
  for i, row in enumerate(tables.read_dicts(path)[1]):
    try:
      code = str(row["snomed_code"]).strip()
      out[code] = Dx(code=code, name=row["dx_name"].strip(), abbreviation=row["abbreviation"].strip(),
                     scored=str(row.get("scored", "0")).strip() in ("1", "1.0", "True", "true"))
    except tables.ROW_ERRORS as e:
      raise tables.row_error(path, i, e) from None
  return out


def scored_codes(mapping: dict[str, Dx], merge_equivalent: bool = True) -> list[str]:
  """The scored codes in file order; with `merge_equivalent`, one code per Challenge class."""
  codes = [c for c, d in mapping.items() if d.scored]
  if merge_equivalent:
    codes = [c for c in codes if c not in EQUIVALENT_CODES]
  return codes


def multi_hot(codes: Iterable[str], code_list: Sequence[str], merge_equivalent: bool = False) -> np.ndarray:
  """float32 (len(code_list),): 1 where a code is present; codes outside the list are ignored."""
  index = {c: i for i, c in enumerate(code_list)}
  out = np.zeros((len(code_list),), np.float32)
  for code in parse_dx(codes) if isinstance(codes, str) else codes:
    code = str(code).strip()
    if merge_equivalent:
      code = EQUIVALENT_CODES.get(code, code)
    if code in index:
      out[index[code]] = 1.0
  return out


def names(codes: Iterable[str], mapping: dict[str, Dx], abbreviate: bool = True) -> list[str]:
  """Readable names of codes (abbreviations by default); an unmapped code stays a code."""
  out = []
  for code in codes:
    d = mapping.get(str(code))
    out.append(str(code) if d is None else (d.abbreviation if abbreviate else d.name))
  return out
