"""`stmem overlap DATA_DIR_A DATA_DIR_B`: records two prepared datasets share, by content hash.

Why: the same recording travels under different names (PTB-XL's `06000_hr` is CinC 2021's `HR06000`), so a
pretraining set built from the CinC collection silently contains PTB-XL evaluation records. Names cannot catch
that; the hash of the samples (see `builder_base.content_hash`) can. Reads each folder's records.jsonl index, or
scans the examples when a folder has none.

Exit status 0, or 1 with `--fail_on_overlap` when anything is shared (for scripts and CI).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any

from data_pipelines import builder_base


def record_index(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """One dict per record (split, record_id, patient_id, source, content_hash) of a prepared dataset."""
  try:
    return builder_base.load_index(folder)
  except FileNotFoundError:
    pass
  import tensorflow_datasets as tfds
  path = builder_base.prepared_dir(folder)
  builder = tfds.builder_from_directory(os.fspath(path))
  seen: dict[tuple[str, str], dict[str, Any]] = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      ex = source[i]
      key = (split, _text(ex["content_hash"]))
      if key not in seen:
        seen[key] = {"split": split, "record_id": _text(ex["record_id"]), "patient_id": _text(ex["patient_id"]),
                     "source": _text(ex["source"]), "content_hash": key[1]}
  return list(seen.values())


def _text(v: Any) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def find_overlap(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Pairs of records with equal content hashes: [{"content_hash", "a": record, "b": record}], sorted by a's id."""
  by_hash: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for r in record_index(b):
    by_hash[r["content_hash"]].append(r)
  out = []
  for r in record_index(a):
    for other in by_hash.get(r["content_hash"], ()):
      out.append({"content_hash": r["content_hash"], "a": r, "b": other})
  return sorted(out, key=lambda d: (d["a"]["record_id"], d["b"]["record_id"]))


def format_report(pairs: list[dict[str, Any]], a: str | os.PathLike[str], b: str | os.PathLike[str],
                  limit: int = 50) -> str:
  if not pairs:
    return f"overlap: no record of {a} is in {b} (by content hash)"
  splits = collections.Counter((p["a"]["split"], p["b"]["split"]) for p in pairs)
  lines = [f"overlap: {len(pairs)} record(s) of {a} are also in {b}:"]
  lines += [f"  {sa} (A) <-> {sb} (B): {n}" for (sa, sb), n in sorted(splits.items())]
  for p in pairs[:limit]:
    ra, rb = p["a"], p["b"]
    lines.append(f"  {ra['source']}/{ra['record_id']} [{ra['split']}] == {rb['source']}/{rb['record_id']} "
                 f"[{rb['split']}]  sha1 {p['content_hash'][:12]}")
  if len(pairs) > limit:
    lines.append(f"  ... and {len(pairs) - limit} more (--json lists all)")
  lines.append("  Remove these from the pretraining or fine-tuning set before evaluating on the other.")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="stmem overlap", description=__doc__.split("\n")[0])
  p.add_argument("data_dir_a")
  p.add_argument("data_dir_b")
  p.add_argument("--json", action="store_true", help="print every shared pair as JSON")
  p.add_argument("--fail_on_overlap", action="store_true", help="exit 1 when any record is shared")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    pairs = find_overlap(args.data_dir_a, args.data_dir_b)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps({"shared": len(pairs), "pairs": pairs}, indent=1))
  else:
    print(format_report(pairs, args.data_dir_a, args.data_dir_b))
  return 1 if pairs and args.fail_on_overlap else 0


if __name__ == "__main__":
  sys.exit(main())
