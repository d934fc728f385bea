"""`stmem prepare NAME --manual_dir DIR --data_dir OUT`: build one dataset into ArrayRecord shards + contract.json.

  stmem prepare ludb --manual_dir ~/data/ludb --data_dir ~/prepared
  stmem prepare ludb --download --data_dir ~/prepared     (fetches LUDB into ~/stmem_data/ludb first)
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
import signal
import sys
import tempfile
from typing import Any

from data_pipelines import contract as contract_lib
from data_pipelines import errors, inputs
from data_pipelines.contract import Contract
from data_pipelines.errors import DataError, UsageError
from data_pipelines.record import RecordError

BUILDERS = ("ptbxl", "cinc", "ludb", "code15", "generic")


def builder_class(name: str) -> type:
  """The Builder of `data_pipelines/<name>/<name>_dataset_builder.py`."""
  if name not in BUILDERS:
    raise UsageError(f"unknown dataset {name!r}; datasets are {', '.join(BUILDERS)}")
  return importlib.import_module(f"data_pipelines.{name}.{name}_dataset_builder").Builder


def builder_options(cls: type) -> dict[str, tuple[str, Any]]:
  """{option: (one-line meaning, default)} of a builder: its own `OPTIONS` and the ones every builder takes."""
  defaults = builder_option_defaults(cls)
  meanings = {**cls.OPTIONS, **cls.COMMON_OPTIONS}
  return {k: (meanings[k], defaults.get(k)) for k in meanings}


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
  p.add_argument("--manual_dir", default=None,
                 help="the folder you downloaded the dataset into (with --download: where to download it; default "
                      "<data root>/<dataset folder>, the data root being $STMEM_DATA or ~/stmem_data)")
  p.add_argument("--download", action="store_true",
                 help="first fetch and verify the dataset into --manual_dir (as `stmem download`; resumes, and "
                      "fetches nothing already verified)")
  p.add_argument("--mirror", default=None, metavar="URL", help="with --download: a mirror of the publisher")
  p.add_argument("--data_dir", required=True, help="where prepared datasets go (<data_dir>/<name>/<version>/)")
  p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of quarantining it")
  p.add_argument("--filter_stage", choices=("per_crop", "offline"), default="offline",
                 help="band-pass once per record here (default: about 6x less input-pipeline work per sample) or each "
                      "crop when read (per_crop, as the reference)")
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
      raise UsageError(f"unexpected argument {token!r} (builder options are --key value)")
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
  """The contract the options ask for, refusing (UsageError, naming the option) one that would give a dataset no
  program can read: a rate <= 0, a window longer than the stored record, a filter edge at or above Nyquist."""
  fs = float(args.fs)
  if not fs > 0:
    raise UsageError(f"--fs {args.fs:g}: the sampling rate must be above 0 Hz")
  for option, value in (("--record_seconds", args.record_seconds), ("--window_seconds", args.window_seconds)):
    if not value > 0:
      raise UsageError(f"{option} {value:g}: must be above 0 s")
  if args.window_seconds > args.record_seconds:
    raise UsageError(f"--window_seconds {args.window_seconds:g} is longer than --record_seconds "
                     f"{args.record_seconds:g}: a crop is cut from a stored record; choose a shorter window")
  highpass = args.highpass_hz if args.highpass_hz and args.highpass_hz > 0 else None
  lowpass = args.lowpass_hz if args.lowpass_hz and args.lowpass_hz > 0 else None
  nyquist = fs / 2
  for option, value in (("--highpass_hz", highpass), ("--lowpass_hz", lowpass)):
    if value is not None and value >= nyquist:
      raise UsageError(f"{option} {value:g} is at or above the Nyquist rate {nyquist:g} Hz of --fs {fs:g}; "
                       f"choose below {nyquist:g} (or 0 to disable the filter)")
  if highpass is not None and lowpass is not None and highpass >= lowpass:
    raise UsageError(f"--highpass_hz {highpass:g} is not below --lowpass_hz {lowpass:g}: the band would be empty")
  contract = Contract(fs=fs, window=int(round(args.window_seconds * fs)),
                      record_samples=int(round(args.record_seconds * fs)), highpass_hz=highpass, lowpass_hz=lowpass,
                      filter_stage=args.filter_stage)
  if contract.window < contract.patch_size:
    raise UsageError(f"--window_seconds {args.window_seconds:g} at --fs {fs:g} gives {contract.window} samples, "
                     f"fewer than one {contract.patch_size}-sample patch")
  return contract


def builder_option_defaults(cls: type) -> dict[str, Any]:
  """The builder's keyword options and their defaults: its `__init__`'s and its bases', and the options every builder
  takes (`StmemBuilder.COMMON_OPTIONS`: lead_map, pad_short)."""
  from data_pipelines.builder_base import StmemBuilder
  out: dict[str, Any] = {}
  for klass in cls.__mro__:
    if not issubclass(klass, StmemBuilder):
      break
    for p in inspect.signature(klass.__init__).parameters.values():
      if p.kind is p.KEYWORD_ONLY and (klass is not StmemBuilder or p.name in StmemBuilder.COMMON_OPTIONS):
        out.setdefault(p.name, p.default)
    if klass is StmemBuilder:
      break
  return out


def check_builder_options(name: str, cls: type, options: dict[str, str]) -> dict[str, Any]:
  """The options with defaults filled in; a UsageError names only the options this builder does not take."""
  known = builder_option_defaults(cls)
  unknown = [k for k in options if k not in known]
  if unknown:
    raise UsageError(f"stmem prepare {name} does not take {', '.join('--' + k for k in unknown)}; its options are "
                     f"{', '.join('--' + k for k in known) or '(none)'} (stmem prepare --help for the common ones)")
  return {**known, **options}


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
                 + ", ".join(f"{k} {v}" for k, v in lengths["bins"]))
  if stats.get("records_with_flat_leads"):
    by_lead = ", ".join(f"{lead} {n}" for lead, n in stats["flat_leads_by_lead"].items())
    lines.append(f"  flat leads masked: {stats['records_with_flat_leads']} record(s) written with a constant lead "
                 f"marked absent ({by_lead}; each in records.jsonl)")
  if stats.get("records_with_notes"):
    lines.append(f"  read leniently:    {stats['records_with_notes']} record(s), e.g. {stats['first_note']} "
                 "(each in records.jsonl)")
  if stats.get("label_counts"):
    kind = f" ({stats['label_kind']})" if stats.get("label_kind") else ""
    present = {k: v for k, v in stats["label_counts"].items() if v}
    absent = [k for k, v in stats["label_counts"].items() if not v]
    lines.append(f"  labels{kind}: " + (", ".join(f"{k} {v}" for k, v in present.items()) or "no record has one"))
    if absent:  # a label column no record carries: named once, not listed as a count of 0
      shown = ", ".join(absent[:8]) + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
      lines.append(f"  labels without a record: {len(absent)} ({shown}); their columns stay, all zero")
  lines += [f"  note: {n}" for n in stats.get("notes", ())]
  dup = stats.get("duplicate_records", 0)
  lines.append(f"  duplicates:        {dup} record(s) repeat the samples of another (by content hash)"
               + (": " + "; ".join(" = ".join(g) for g in stats.get("duplicate_groups", [])[:5]) if dup else ""))
  return lines


def main(argv: list[str] | None = None) -> int:
  """Build one dataset; 0 on success, 1 when --strict met a bad record; UsageError / DataError otherwise (exit codes
  2 and 1 through `stmem`).

  The build happens in a staging folder inside --data_dir and moves into place only when complete: a failure, an
  interrupt or an --overwrite that does not finish leaves the previous dataset untouched and nothing half-written.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  name = next((a for a in argv if not a.startswith("-")), None)
  args, extra = _parser(name if name in BUILDERS else None).parse_known_args(argv)
  # ---- everything the command line can get wrong, before the (slow) tfds import
  options = {k[len("builder__"):]: v for k, v in vars(args).items() if k.startswith("builder__")}
  options.update(_builder_options(extra))
  contract = contract_from_args(args)
  data_dir = errors.require_dir(args.data_dir, "--data_dir", must_exist=False)
  for other in args.check_overlap:
    errors.require_dir(other, "--check_overlap")
  cls = builder_class(args.name)
  all_options = check_builder_options(args.name, cls, options)
  if args.download:
    args.manual_dir = _download(args.name, args.manual_dir, options.get("sources"), args.mirror, args.quiet)
  elif args.manual_dir is None:
    raise UsageError("give --manual_dir (the folder the dataset was downloaded into), or --download to fetch it")
  manual = errors.require_dir(args.manual_dir, "--manual_dir")
  fingerprint = inputs.fingerprint(args.name, manual, all_options, data_dir)

  import tensorflow_datasets as tfds

  from data_pipelines import builder_base
  tfds.disable_progress_bar()  # our own bar counts records; tfds's counts examples and shuffling.
  created = not os.path.exists(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
  staging = ""
  try:
    for line in builder_base.clear_interrupted(data_dir, args.name):
      print(f"{args.name}: {line}", file=sys.stderr)
    staging = tempfile.mkdtemp(prefix=builder_base.staging_prefix(args.name), dir=data_dir)
    try:
      builder = cls(data_dir=staging, manual_dir=manual, contract=contract, strict=args.strict,
                    show_progress=not args.quiet, **options)
    except (ValueError, TypeError) as e:
      if isinstance(e, errors.UserError):
        raise
      raise UsageError(f"stmem prepare {args.name}: {e}") from e
    folder = os.path.join(data_dir, os.path.relpath(os.fspath(builder.data_dir), staging))
    if os.path.exists(os.path.join(folder, "dataset_info.json")) and not args.overwrite:
      _same_inputs(args.name, folder, contract, fingerprint)
      print(f"{args.name}: already prepared in {folder} from the same inputs and contract (--overwrite rebuilds it)")
      return _overlaps(folder, args.check_overlap)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    except RecordError as e:
      _keep_report(folder, builder)
      if not args.strict:
        raise
      print(f"error: bad record (--strict): {e}", file=sys.stderr)
      return 1
    except AssertionError as e:  # tfds's writer refuses a split left empty (every record in it quarantined)
      if "No examples were yielded" not in str(e):
        raise
      raise _unusable(manual, folder, builder) from e
    except BaseException as e:
      if isinstance(e, Exception) and errors.no_space(e) is not None:
        raise _no_room(args.name, data_dir, folder, errors.no_space(e)) from e
      _keep_report(folder, builder)
      raise
    if builder.stats.records_written == 0:
      raise _unusable(manual, folder, builder)
    try:
      inputs.write(builder.data_dir, fingerprint)
      builder_base.swap_into_place(builder.data_dir, folder)
    except OSError as e:
      if errors.no_space(e) is None:
        raise
      raise _no_room(args.name, data_dir, folder, errors.no_space(e)) from e
  finally:
    if staging:
      shutil.rmtree(staging, ignore_errors=True)
    if created and not os.listdir(data_dir):  # a failed first build leaves no empty --data_dir behind
      os.rmdir(data_dir)
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  stats = json.loads(open(os.path.join(folder, "summary.json")).read())
  print("\n".join(summary_lines(args.name, folder, stats)))
  return _overlaps(folder, args.check_overlap)


def _download(name: str, manual_dir: str | None, sources: str | None, mirror: str | None, quiet: bool) -> str:
  """`--download`: fetch and verify builder `name`'s dataset into `manual_dir` (default: its folder under the data
  root); returns that folder."""
  from data_pipelines import download
  found = next((d for d in download.DATASETS.values() if d.prepare == name), None)
  if found is None:
    raise UsageError(f"stmem prepare {name} --download: {name} reads your own files; there is nothing to download "
                     f"(downloadable: {', '.join(d.prepare for d in download.DATASETS.values() if d.prepare)})")
  folder = manual_dir or os.path.join(os.path.expanduser(download.data_root()), found.folder)
  result = download.download(found.name, folder, sources=sources, mirror=mirror, quiet=quiet)
  print(f"{found.name}: {result.files} file(s) verified in {result.folder} ({result.fetched} fetched)")
  return folder


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
  """SIGTERM ends the build like Ctrl-C: through the `finally` that removes the staging folder (`errors.Interrupted`,
  not a bare KeyboardInterrupt: see there why)."""
  raise errors.Interrupted("SIGTERM")


def _unusable(manual: str, folder: str, builder: Any) -> DataError:
  """The error of a build where a split (or everything) came out empty: no record found, or all quarantined."""
  stats = builder.stats.to_dict()
  if not stats["records_read"]:
    return DataError(f"no record found under --manual_dir {manual}: is it the folder the {builder.name} download "
                     "went into?")
  report = _keep_report(folder, builder)
  return DataError(f"no usable record for a split under --manual_dir {manual}: {stats['records_read']} read, "
                   f"{stats['quarantined']} quarantined {stats['quarantined_by_reason']}; see {report}")


def _no_room(name: str, data_dir: str, folder: str, reason: str) -> DataError:
  """The error of a build that found no room (a full disk, a quota, a file-size limit). The build wrote only into its
  staging folder, which the caller removes: a dataset already in `folder` is the one that was there before."""
  kept = (f"the dataset already in {folder} is intact" if os.path.exists(os.path.join(folder, "dataset_info.json"))
          else "nothing was kept")
  return DataError(f"{reason} while writing the {name} dataset in {data_dir} (its staging folder is removed); {kept}; "
                   "free space and run again")


def _keep_report(folder: str, builder: Any) -> str | None:
  """The quarantine report of a failed build, kept beside the dataset folder (the staging folder is deleted)."""
  from data_pipelines import builder_base
  return builder_base.write_failed_report(folder, builder.stats)


def _same_inputs(name: str, folder: str, contract: Contract, fingerprint: dict[str, Any]) -> None:
  """Refuse (UsageError) a re-run whose contract or inputs differ from those the existing dataset was built from."""
  existing = os.path.join(folder, "contract.json")
  old = contract_lib.read(existing) if os.path.exists(existing) else None
  diffs = []
  if old is None:
    diffs.append("it has no contract.json")
  elif old != contract:
    diffs += [f"contract {k}: was {v!r}, now {contract.to_dict()[k]!r}" for k, v in old.to_dict().items()
              if contract.to_dict()[k] != v]
  recorded = inputs.read(folder)
  if recorded is not None:
    diffs += inputs.differences(recorded, fingerprint)
  if diffs:
    raise UsageError(f"{folder} already holds {name} prepared differently: {'; '.join(diffs)}. "
                     "Pass --overwrite to rebuild it, or choose another --data_dir")


def _overlaps(folder: str, others: list[str]) -> int:
  if not others:
    return 0
  from data_pipelines import overlap
  for other in others:
    print(overlap.report(folder, other)[0])
  return 0


if __name__ == "__main__":
  sys.exit(main())
