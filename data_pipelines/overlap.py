"""`stmem overlap DATA_DIR_A DATA_DIR_B`: records two prepared datasets share, by content hash.

Why: the same recording travels under different names (PTB-XL's `06000_hr` is CinC 2021's `HR06000`), so a
pretraining set built from the CinC collection silently contains PTB-XL evaluation records. Names cannot catch
that; the hash of the samples (see `builder_base.content_hash`) can. Reads each folder's records.jsonl index, or
scans the examples when a folder has none. `stmem overlap A A` (one dataset against itself) lists its internal
duplicates instead: records filed under two names with the same samples.

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


def same_dataset(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
  """True when both paths name one prepared dataset (however each was spelled)."""
  return os.path.realpath(builder_base.prepared_dir(a)) == os.path.realpath(builder_base.prepared_dir(b))


def find_duplicates(folder: str | os.PathLike[str]) -> list[list[dict[str, Any]]]:
  """Groups of records of one dataset that share a content hash (each group sorted, groups by first record id)."""
  return list(builder_base.internal_duplicates(record_index(folder)).values())


def format_duplicates(groups: list[list[dict[str, Any]]], folder: str | os.PathLike[str], limit: int = 50) -> str:
  if not groups:
    return f"overlap: no two records of {folder} share their samples (by content hash)"
  extra = sum(len(g) - 1 for g in groups)
  lines = [f"overlap: {extra} record(s) of {folder} repeat another's samples ({len(groups)} group(s)):"]
  for g in groups[:limit]:
    lines.append("  " + " == ".join(f"{r['source']}/{r['record_id']} [{r['split']}]" for r in g)
                 + f"  sha1 {g[0]['content_hash'][:12]}")
  if len(groups) > limit:
    lines.append(f"  ... and {len(groups) - limit} more groups (--json lists all)")
  if any(len({r["split"] for r in g}) > 1 for g in groups):
    lines.append("  Some repeat across splits: the same recording is trained on and tested on.")
  lines.append("  Keep one record of each group (or group them as one patient) before evaluating.")
  return "\n".join(lines)


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


def report(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> tuple[str, int]:
  """(the printed report, how many records are shared or repeated) for two datasets, or one against itself."""
  if same_dataset(a, b):
    groups = find_duplicates(a)
    return format_duplicates(groups, a), sum(len(g) - 1 for g in groups)
  pairs = find_overlap(a, b)
  return format_report(pairs, a, b), len(pairs)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="stmem overlap", description=__doc__.split("\n")[0])
  p.add_argument("data_dir_a")
  p.add_argument("data_dir_b")
  p.add_argument("--json", action="store_true", help="print every shared pair as JSON")
  p.add_argument("--fail_on_overlap", action="store_true",
                 help="exit 1 when any record is shared (for A A: when any record repeats another)")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if not args.json:
      text, found = report(args.data_dir_a, args.data_dir_b)
      print(text)
    elif same_dataset(args.data_dir_a, args.data_dir_b):
      groups = find_duplicates(args.data_dir_a)
      found = sum(len(g) - 1 for g in groups)
      print(json.dumps({"duplicated": found, "groups": groups}, indent=1))
    else:
      pairs = find_overlap(args.data_dir_a, args.data_dir_b)
      found = len(pairs)
      print(json.dumps({"shared": found, "pairs": pairs}, indent=1))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 1 if found and args.fail_on_overlap else 0


if __name__ == "__main__":
  sys.exit(main())
