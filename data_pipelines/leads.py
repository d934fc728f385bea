"""The canonical 12 leads, their ids, the spellings found in the wild, and named lead sets.

Every other module refers to a lead by its canonical name or id from here; nothing downstream of the
readers assumes a lead's position in an array.
"""
from __future__ import annotations

from collections.abc import Sequence

from data_pipelines.errors import UsageError

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = len(LEADS)
LEAD_ID: dict[str, int] = {name: i for i, name in enumerate(LEADS)}

# Spellings seen in PhysioNet, CinC, CODE-15 and CPSC files, keyed by a case-folded form.
_ALIASES: dict[str, str] = {}
for _name in LEADS:
  _ALIASES[_name.lower()] = _name
for _roman, _name in (("di", "I"), ("dii", "II"), ("diii", "III"), ("d1", "I"), ("d2", "II"), ("d3", "III"),
                      ("lead i", "I"), ("lead ii", "II"), ("lead iii", "III"), ("mlii", "II"),
                      ("1", "I"), ("2", "II"), ("3", "III")):
  _ALIASES[_roman] = _name
for _i in range(1, 7):
  _ALIASES[f"lead v{_i}"] = f"V{_i}"

# Named lead sets accepted everywhere a lead set is asked for (`--lead_sets 12,limb6,I+II`).
LEAD_SETS: dict[str, tuple[str, ...]] = {
  "12": LEADS,
  "limb6": LEADS[:6],
  "precordial6": LEADS[6:],
  "limb3": ("I", "II", "III"),
  "I": ("I",),
  "II": ("II",),
  "V1": ("V1",),
  "I+II": ("I", "II"),
  "I+II+V2": ("I", "II", "V2"),
}


class UnknownLeadError(UsageError, ValueError):
  """A lead name that is not one of the 12 standard leads under any known spelling, or a lead set naming a lead twice
  or none (a usage error: exit code 2)."""


def canonical_name(name: str) -> str | None:
  """The canonical spelling of a lead name (`avr`, `AVR`, `aVR` -> `aVR`; `DI` -> `I`), or None if unknown."""
  return _ALIASES.get(str(name).strip().lower())


def lead_ids(names: Sequence[str]) -> list[int]:
  """Canonical ids of lead names in any accepted spelling; raises UnknownLeadError naming the bad ones."""
  out, bad = [], []
  for n in names:
    c = canonical_name(n)
    if c is None:
      bad.append(n)
    else:
      out.append(LEAD_ID[c])
  if bad:
    raise UnknownLeadError(f"unknown lead name(s) {bad}; known leads are {list(LEADS)}")
  return out


def parse_lead_set(spec: str | Sequence[str]) -> tuple[str, ...]:
  """A named set (`limb6`), a `+`-joined list (`I+II+V2`) or a sequence of names -> canonical names.

  Duplicates are refused: a lead can fill one slot only.
  """
  if isinstance(spec, str):
    if spec in LEAD_SETS:
      return LEAD_SETS[spec]
    parts = [p for p in spec.replace(",", "+").split("+") if p.strip()]
  else:
    parts = list(spec)
  try:
    names = tuple(LEADS[i] for i in lead_ids(parts))
  except UnknownLeadError as e:
    raise UnknownLeadError(f"lead set {spec if isinstance(spec, str) else '+'.join(map(str, spec))!r}: {e}") from None
  if len(set(names)) != len(names):
    raise UnknownLeadError(f"lead set {spec!r} names a lead twice")
  if not names:
    raise UnknownLeadError(f"empty lead set {spec!r}; name leads (I+II) or a set ({', '.join(LEAD_SETS)})")
  return names
