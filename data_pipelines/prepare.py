"""`stmem prepare NAME --manual_dir DIR --data_dir OUT`: build one dataset into ArrayRecord shards + contract.json.

  stmem prepare ludb --manual_dir ~/data/ludb --data_dir ~/prepared
  stmem prepare cinc --manual_dir ~/data/challenge-2021 --data_dir ~/prepared --sources georgia,ptb-xl
  stmem prepare ptbxl --manual_dir ~/data/ptb-xl --data_dir ~/prepared --task superdiagnostic \
      --check_overlap ~/prepared/cinc
  stmem prepare generic --manual_dir ~/mine --data_dir ~/prepared --array ecgs.npy --metadata_csv meta.csv \
      --source_fs 500 --leads 12 --layout NTL

  stmem prepare generic --manual_dir ~/training2017 --data_dir ~/prepared --lead_map ECG=I \
      --labels_csv REFERENCE.csv --pad_short true --source cinc2017 --splits train=0.7,validation=0.1,test=0.2

Options after the common ones (`--task`, `--sources`, `--codes`, `--splits`, `--array`, `--lead_map`...) are the
builder's own keyword arguments, passed as text: `stmem prepare NAME --help` lists them. Bad records are skipped and
listed in quarantine.jsonl with their reason, never silently; `--strict` stops at the first one instead, naming the
file. The closing summary counts what was written, skipped, padded and duplicated, with a histogram of lengths.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import sys
from typing import Any

from data_pipelines.record import RecordError
from data_pipelines.contract import Contract

BUILDERS = ("ptbxl", "cinc", "ludb", "code15", "generic")


def builder_class(name: str) -> type:
  """The Builder of `data_pipelines/<name>/<name>_dataset_builder.py`."""
  if name not in BUILDERS:
    raise SystemExit(f"unknown dataset {name!r}; datasets are {', '.join(BUILDERS)}")
  return importlib.import_module(f"data_pipelines.{name}.{name}_dataset_builder").Builder


def builder_options(cls: type) -> dict[str, tuple[str, Any]]:
  """{option: (one-line meaning, default)} of a builder: its own `OPTIONS` and the ones every builder takes."""
  params = inspect.signature(cls.__init__).parameters
  for base in cls.__mro__:
    if "COMMON_OPTIONS" in vars(base):
      params = {**inspect.signature(base.__init__).parameters, **params}
  meanings = {**cls.OPTIONS, **cls.COMMON_OPTIONS}
  return {k: (meanings[k], params[k].default if k in params else None) for k in meanings}


def _datasets_help() -> str:
  lines = ["datasets (`stmem prepare NAME --help` lists a dataset's own options):"]
  for name in BUILDERS:
    doc = (importlib.import_module(f"data_pipelines.{name}.{name}_dataset_builder").__doc__ or "").strip()
    lines.append(f"  {name:<8} {doc.splitlines()[0] if doc else ''}")
  return "\n".join(lines)


def _parser(name: str | None = None) -> argparse.ArgumentParser:
  """The common options; with `name` (a known builder), its own options too, so that `--help` lists them."""
  p = argparse.ArgumentParser(prog="stmem prepare", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=_datasets_help() if name is None else None)
  p.add_argument("name", help=f"dataset: {', '.join(BUILDERS)}")
  p.add_argument("--manual_dir", required=True, help="the folder you downloaded the dataset into")
  p.add_argument("--data_dir", required=True, help="where prepared datasets go (<data_dir>/<name>/<version>/)")
  p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of quarantining it")
  p.add_argument("--filter_stage", choices=("per_crop", "offline"), default="per_crop",
                 help="band-pass each crop when read (as the reference) or once per record here")
  p.add_argument("--fs", type=float, default=250.0, help="sampling rate of the prepared data (Hz)")
  p.add_argument("--record_seconds", type=float, default=10.0, help="length of each stored window (s)")
  p.add_argument("--window_seconds", type=float, default=9.0, help="length of the crops a model sees (s)")
  p.add_argument("--highpass_hz", type=float, default=0.67, help="<= 0 disables the high-pass")
  p.add_argument("--lowpass_hz", type=float, default=40.0, help="<= 0 disables the low-pass")
  p.add_argument("--check_overlap", action="append", default=[], metavar="OTHER_DATA_DIR",
                 help="after building, report records shared (by content hash) with another prepared dataset")
  p.add_argument("--overwrite", action="store_true", help="replace an existing prepared copy")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  if name is not None:
    group = p.add_argument_group(f"options of {name} (text; see data_pipelines/{name}/{name}_dataset_builder.py)")
    for key, (meaning, default) in builder_options(builder_class(name)).items():
      shown = "" if default in (None, inspect.Parameter.empty) else f" (default: {default})"
      group.add_argument(f"--{key}", dest=f"builder__{key}", metavar="VALUE", nargs="?", const="true",
                         default=argparse.SUPPRESS, help=meaning.replace("%", "%%") + shown)
  return p


def _builder_options(extra: list[str]) -> dict[str, str]:
  """`--key value` / `--key=value` pairs -> {key: value}; a bare `--flag` means "true"."""
  out: dict[str, str] = {}
  i = 0
  while i < len(extra):
    token = extra[i]
    if not token.startswith("--"):
      raise SystemExit(f"unexpected argument {token!r} (builder options are --key value)")
    key, eq, value = token[2:].partition("=")
    if not eq:
      if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
        value = extra[i + 1]
        i += 1
      else:
        value = "true"
    out[key.replace("-", "_")] = value
    i += 1
  return out


def contract_from_args(args: argparse.Namespace) -> Contract:
  fs = float(args.fs)
  return Contract(fs=fs, window=int(round(args.window_seconds * fs)), record_samples=int(round(args.record_seconds * fs)),
                  highpass_hz=args.highpass_hz if args.highpass_hz and args.highpass_hz > 0 else None,
                  lowpass_hz=args.lowpass_hz if args.lowpass_hz and args.lowpass_hz > 0 else None,
                  filter_stage=args.filter_stage)


def summary_lines(name: str, folder: str, stats: dict[str, Any]) -> list[str]:
  lines = [f"{name}: prepared into {folder}",
           f"  records read:      {stats['records_read']}",
           f"  records written:   {stats['records_written']}",
           f"  examples written:  {stats['examples_written']} "
           + "(" + ", ".join(f"{k} {v}" for k, v in sorted(stats["examples_per_split"].items())) + ")",
           f"  quarantined:       {stats['quarantined']}"]
  for reason, count in stats["quarantined_by_reason"].items():
    lines.append(f"    {reason}: {count}")
  if stats["quarantined"]:
    lines.append(f"  see {os.path.join(folder, 'quarantine.jsonl')} for each skipped file and why")
  if stats.get("records_padded"):
    lines.append(f"  zero-padded:       {stats['records_padded']} record(s) shorter than one window (--pad_short; "
                 "`valid_samples` marks the padding)")
  lengths = stats.get("length_seconds") or {}
  if lengths.get("bins"):
    lines.append(f"  record lengths:    {lengths['min']:g}-{lengths['max']:g} s (median {lengths['median']:g} s): "
                 + ", ".join(f"{k} {v}" for k, v in lengths["bins"].items()))
  if stats.get("label_counts"):
    kind = f" ({stats['label_kind']})" if stats.get("label_kind") else ""
    lines.append(f"  labels{kind}: " + ", ".join(f"{k} {v}" for k, v in stats["label_counts"].items()))
  dup = stats.get("duplicate_records", 0)
  lines.append(f"  duplicates:        {dup} record(s) repeat the samples of another (by content hash)"
               + (": " + "; ".join(" = ".join(g) for g in stats.get("duplicate_groups", [])[:5]) if dup else ""))
  return lines


def main(argv: list[str] | None = None) -> int:
  """Build one dataset; 0 on success, 1 when --strict met a bad record, 2 on a usage or setup error."""
  argv = list(sys.argv[1:] if argv is None else argv)
  name = next((a for a in argv if not a.startswith("-")), None)
  args, extra = _parser(name if name in BUILDERS else None).parse_known_args(argv)
  options = {k[len("builder__"):]: v for k, v in vars(args).items() if k.startswith("builder__")}
  options.update(_builder_options(extra))
  import tensorflow_datasets as tfds

  from data_pipelines import builder_base
  cls = builder_class(args.name)
  contract = contract_from_args(args)
  if not os.path.isdir(args.manual_dir):
    print(f"error: --manual_dir {args.manual_dir} is not a folder", file=sys.stderr)
    return 2
  tfds.disable_progress_bar()  # our own bar counts records; tfds's counts examples and shuffling.
  try:
    builder = cls(data_dir=args.data_dir, manual_dir=args.manual_dir, contract=contract, strict=args.strict,
                  show_progress=not args.quiet, **options)
  except TypeError as e:
    print(f"error: {args.name} does not take these options {sorted(options)}: {e}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  folder = os.fspath(builder.data_dir)
  existing = os.path.join(folder, "contract.json")
  if os.path.exists(os.path.join(folder, "dataset_info.json")):
    if args.overwrite:
      shutil.rmtree(folder)
      builder = cls(data_dir=args.data_dir, manual_dir=args.manual_dir, contract=contract, strict=args.strict,
                    show_progress=not args.quiet, **options)
    else:
      old = Contract.from_json(open(existing).read()) if os.path.exists(existing) else None
      if old != contract:
        print(f"error: {folder} already holds {args.name} prepared under another contract; pass --overwrite or "
              f"another --data_dir", file=sys.stderr)
        return 2
      print(f"{args.name}: already prepared in {folder} under the same contract (--overwrite rebuilds it)")
      return _overlaps(folder, args.check_overlap)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
  except RecordError as e:
    print(f"error: bad record (--strict): {e}", file=sys.stderr)
    return 1
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except AssertionError as e:  # tfds's writer refuses a split left empty (every record in it quarantined)
    if "No examples were yielded" not in str(e):
      raise
    stats = builder.stats.to_dict()
    print(f"error: {e}; every record of that split was quarantined: {stats['quarantined_by_reason']}",
          file=sys.stderr)
    return 1
  stats = json.loads(open(os.path.join(folder, "summary.json")).read())
  print("\n".join(summary_lines(args.name, folder, stats)))
  return _overlaps(folder, args.check_overlap)


def _overlaps(folder: str, others: list[str]) -> int:
  if not others:
    return 0
  from data_pipelines import overlap
  for other in others:
    print(overlap.format_report(overlap.find_overlap(folder, other), folder, other))
  return 0


if __name__ == "__main__":
  sys.exit(main())
