"""What a prepared dataset was built from: the input files and the builder options, as `inputs.json` beside it.

Why: `stmem prepare` into a folder that already holds the dataset must not keep the old data when the user now asks
for other data (another `--manual_dir`, files added or changed there, another `--task`). The contract alone cannot
tell: it says how records were processed, not which records. The file fingerprint is each file's path relative to
the download folder and its size (not its bytes: hashing 100 GB on every re-run would take longer than the build,
and a changed download changes sizes or names in practice); the folder's own path is kept for the message only, so
a download that was moved still counts as the same input.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from data_pipelines.errors import DataError

INPUTS_FILE = "inputs.json"


def _files(folder: str, exclude: str | None = None) -> tuple[str, int, int]:
  """(sha1 of the sorted (relative path, size) list, file count, total bytes) of every file under `folder`, leaving
  out the folder `exclude` (the prepared data, when --data_dir is inside --manual_dir)."""
  entries = []
  exclude = os.path.realpath(exclude) if exclude else None
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != exclude)
    for name in files:
      path = os.path.join(root, name)
      try:
        size = os.stat(path).st_size
      except OSError:  # a dangling link: part of the listing, without a size
        size = -1
      entries.append((os.path.relpath(path, folder), size))
  entries.sort()
  h = hashlib.sha1()
  for rel, size in entries:
    h.update(f"{rel}\0{size}\n".encode())
  return h.hexdigest(), len(entries), sum(max(s, 0) for _, s in entries)


def fingerprint(name: str, manual_dir: str, options: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
  """The inputs of one build: dataset name, builder options (defaults filled in, as text), the download's files
  (without `data_dir`, where the output goes)."""
  digest, count, size = _files(manual_dir, data_dir)
  return {"dataset": name, "options": {k: str(v) for k, v in sorted(options.items())},
          "manual_dir": os.path.abspath(manual_dir), "files_sha1": digest, "files": count, "bytes": size}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Human-readable lines for what differs between two fingerprints (empty: the same inputs)."""
  out = []
  for key in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
    a, b = old.get("options", {}).get(key), new.get("options", {}).get(key)
    if a != b:
      out.append(f"--{key} was {a!r}, now {b!r}")
  if old.get("files_sha1") != new.get("files_sha1"):
    where = ("--manual_dir was {0[manual_dir]}, now {1[manual_dir]}" if old.get("manual_dir") != new["manual_dir"]
             else "the files under --manual_dir {1[manual_dir]} changed").format(old, new)
    out.append(f"{where} ({old.get('files')} files, {old.get('bytes')} bytes then; "
               f"{new['files']} files, {new['bytes']} bytes now)")
  return out


def read(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
  """The fingerprint recorded in `folder` (None when it has no inputs.json); DataError naming the file when it is
  not one that `fingerprint` writes (damaged or edited by hand)."""
  path = os.path.join(os.fspath(folder), INPUTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size > _MAX_BYTES:
      raise _damaged(path, f"more than {_MAX_BYTES} bytes")
    raw = f.read()
  try:
    recorded = json.loads(raw.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise _damaged(path, f"not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
  if not isinstance(recorded, dict):
    raise _damaged(path, f"a JSON {type(recorded).__name__}, not an object")
  for key, kind in _FIELDS.items():
    if not isinstance(recorded.get(key), kind) or isinstance(recorded.get(key), bool):
      raise _damaged(path, f"field {key!r} is missing or not {kind.__name__}")
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in recorded["options"].items()):
    raise _damaged(path, "its options are not all text")
  return recorded


_MAX_BYTES = 1 << 20  # a fingerprint is a few hundred bytes
_FIELDS = {"dataset": str, "options": dict, "manual_dir": str, "files_sha1": str, "files": int, "bytes": int}


def _damaged(path: str, why: str) -> DataError:
  return DataError(f"{path}: {why}; it records what the dataset beside it was built from: pass --overwrite to "
                   "rebuild the dataset (and this file)")


def write(folder: str | os.PathLike[str], inputs: dict[str, Any]) -> None:
  with open(os.path.join(os.fspath(folder), INPUTS_FILE), "w") as f:
    f.write(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
