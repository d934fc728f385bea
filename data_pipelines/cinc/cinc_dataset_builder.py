"""The PhysioNet/CinC Challenge 2020/2021 collection: WFDB headers + MATLAB v4 `.mat` signals, SNOMED-CT `# Dx:`.

Any subset of the collection's sources can be built (`sources=georgia,ptb-xl`); the source of a record is told by
its file name prefix, which the Challenge made unique per source, so the folder layout does not matter (the
official `training/<source>/gNN/` tree and a flat folder both work).

Labels: multi-hot over a SNOMED code list (`codes`): `scored` (default: the Challenge's scored classes from
dx_mapping.csv, equivalent codes merged as the Challenge scored them), `all` (every code of dx_mapping.csv), or a
comma-separated list of codes. Splits: there is no official one, so a deterministic hash of the patient id decides
(`splits`, default train 0.8 / validation 0.1 / test 0.1). The collection gives no patient ids; the record id
stands in for the patient, which groups nothing: a patient with several records may straddle splits.
"""
from __future__ import annotations

import re
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines import builder_base
from data_pipelines.labels import snomed
from data_pipelines.readers import read_wfdb
from data_pipelines.record import Record

SOURCES = ("cpsc_2018", "cpsc_2018_extra", "st_petersburg_incart", "ptb", "ptb-xl", "georgia", "chapman_shaoxing",
           "ningbo")
_PREFIX = re.compile(r"^(HR|JS|A|Q|I|S|E)(\d+)$")
_CHAPMAN_LAST = 10646  # Chapman-Shaoxing is JS00001-JS10646 in the 2021 release; Ningbo follows.


def source_of(record_id: str) -> str | None:
  """The collection's source of a record, from its id prefix (`E07500` -> georgia), or None if unrecognised."""
  m = _PREFIX.match(record_id)
  if not m:
    return None
  prefix, number = m.group(1), int(m.group(2))
  if prefix == "JS":
    return "chapman_shaoxing" if number <= _CHAPMAN_LAST else "ningbo"
  return {"A": "cpsc_2018", "Q": "cpsc_2018_extra", "I": "st_petersburg_incart", "S": "ptb", "HR": "ptb-xl",
          "E": "georgia"}[prefix]


def _parse_sources(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
  if spec in (None, "", "all"):
    return SOURCES
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  bad = [s for s in names if s not in SOURCES]
  if bad:
    raise ValueError(f"unknown CinC source(s) {bad}; sources are {list(SOURCES)}")
  return tuple(names)


class Builder(builder_base.StmemBuilder):
  """PhysioNet/CinC 2020/2021 12-lead ECGs with SNOMED-CT multi-hot labels and a patient-hash split."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the PhysioNet/CinC Challenge 2021 training data (https://physionet.org/content/challenge-2021/) and "
    "pass the folder holding the records (any depth) and dx_mapping.csv as --manual_dir.")
  OPTIONS = {
    "sources": "comma-separated sources to build (e.g. georgia,ptb-xl; default every source found)",
    "codes": "SNOMED labels: scored (the Challenge's scored classes), all, or CODE,CODE",
    "splits": "patient-hashed split fractions, e.g. train=0.8,validation=0.1,test=0.1",
  }

  def __init__(self, *, sources: str | None = None, codes: str = "scored", splits: str | None = None,
               **kwargs: Any):
    manual = kwargs.get("manual_dir")
    if manual is None:
      raise ValueError("cinc: pass manual_dir= (the code list is read from its dx_mapping.csv)")
    self.sources = _parse_sources(sources)
    self.fractions = builder_base.parse_fractions(splits)
    self.merge_equivalent = codes == "scored"
    if codes in ("scored", "all"):
      found = builder_base.rglob(manual, "dx_mapping*.csv")
      if not found:
        raise ValueError(f"cinc: no dx_mapping.csv under {manual}; pass codes=CODE,CODE,... instead")
      mapping = snomed.load_dx_mapping(found[0])
      self.label_names = tuple(snomed.scored_codes(mapping) if codes == "scored" else list(mapping))
    else:
      self.label_names = tuple(snomed.parse_dx(codes))
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual(dl_manager)
    headers = builder_base.rglob(root, "*.hea")
    chosen: dict[str, list[str]] = {name: [] for name in self.fractions}
    for h in headers:
      rid = builder_base.epath.Path(h).stem
      if source_of(rid) not in self.sources:
        continue
      chosen[builder_base.hash_split(rid, self.fractions)].append(h)
    return {name: self._generate(paths, name) for name, paths in builder_base.non_empty(chosen).items()}

  def _generate(self, paths: list[str], split: str):
    def describe(record: Record) -> dict[str, Any]:
      return {"labels": snomed.multi_hot(record.metadata.get("dx", []), self.label_names,
                                         merge_equivalent=self.merge_equivalent),
              "age": record.metadata.get("age"), "sex": record.metadata.get("sex"),
              "source": f"cinc/{source_of(record.record_id)}"}

    items = builder_base.read_each(paths, lambda p: read_wfdb(p, source="cinc", lead_map=self.lead_map))
    return self.generate(items, split, describe, total=len(paths))
