"""A folder of raw records -> every example a builder would write, in memory instead of on disk.

Why through the builder itself: the raw path of the downstream programs must be the prepared path, not a copy of
it. The builder's own `_split_generators` finds the records, reads them (`builder_base.read_each`), labels them
(its `describe`), cuts every window (`record_examples`, content hash included) and quarantines what it cannot use;
here its examples are stacked into arrays rather than serialised into ArrayRecord shards. A dataset read this way
and the same dataset prepared under the same contract give the same examples, in the same order within a split.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import numpy as np

from data_pipelines import prepare
from data_pipelines.contract import Contract

TEXT_KEYS = ("record_id", "patient_id", "source", "content_hash")


@dataclasses.dataclass(frozen=True)
class Examples:
  """Stacked examples of one folder: `arrays` (signal (N, L, T), lead_mask, labels, ids, split, ...), the label
  names, and the records skipped (`quarantine`: one dict per record: path, reason, detail)."""
  arrays: dict[str, np.ndarray]
  label_names: tuple[str, ...]
  quarantine: tuple[dict[str, str], ...]


def read_examples(name: str, folder: str | os.PathLike[str], contract: Contract, **options: Any) -> Examples:
  """Every example builder `name` makes of `folder` under `contract`, all splits, in the builder's order.

  `options` are the builder's keyword arguments (as `stmem prepare NAME --key value` passes them). Raises
  FileNotFoundError when the folder is missing, ValueError when no record is usable (naming the reasons).
  """
  if name not in prepare.BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; datasets are {', '.join(prepare.BUILDERS)}")
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} is not a folder of {name} records")
  with tempfile.TemporaryDirectory(prefix="stmem-in-memory-") as tmp:  # tfds wants a data_dir; nothing is written
    builder = prepare.builder_class(name)(data_dir=tmp, manual_dir=folder, contract=contract, show_progress=False, **options)
    generators = builder._split_generators(None)  # noqa: SLF001 - the builder's own record -> examples path
    columns: dict[str, list[Any]] = {}
    for split, examples in generators.items():
      for _, ex in examples:
        for k, v in ex.items():
          columns.setdefault(k, []).append(v)
        columns.setdefault("split", []).append(split)
  errors = tuple({"path": e.path, "reason": e.reason, "detail": e.detail} for e in builder.stats.errors)
  if not columns:
    reasons = sorted({e["reason"] for e in errors})
    raise ValueError(f"{folder}: no usable {name} record ({len(errors)} skipped: {', '.join(reasons) or 'none found'})")
  arrays = {k: np.asarray(v, dtype=str) if k in TEXT_KEYS + ("split",) else np.stack([np.asarray(x) for x in v])
            for k, v in columns.items()}
  return Examples(arrays, tuple(builder.label_names), errors)
