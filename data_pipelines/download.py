"""`stmem download NAME [--to DIR]`: fetch a public ECG dataset from its publisher and verify every file.

  stmem download --list                        the datasets, their size, licence and citation
  stmem download ludb                          LUDB 1.0.1 into ~/stmem_data/ludb (or $STMEM_DATA/ludb)
  stmem download cinc2021 --sources cpsc_2018,georgia --to /data/ecg
  stmem download code15 --jobs 4               CODE-15% (Zenodo), its zip parts unpacked to exams_part*.hdf5
  stmem download ptbxl --mirror http://mirror.example.org/physionet

Files go to `<DIR>/<dataset folder>/` in the publisher's layout (the folder the raw readers and `stmem prepare` read).
Transfers run in parallel into `NAME.part` files, resumed with HTTP range requests after a cut (run the command again
to resume an interrupted download), and each file is checked against the checksum its publisher ships
(PhysioNet's `SHA256SUMS.txt`, the MD5 of each file of a Zenodo record, read from the Zenodo API) before it takes its
name. A file that fails its checksum is fetched once more, then refused. Verified files are recorded in
`.stmem-download.json` in the dataset folder, so a re-run fetches nothing already there.
Only the standard library (urllib) and tqdm are used.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

from data_pipelines.errors import DataError, UsageError

PHYSIONET = "https://physionet.org"
ZENODO = "https://zenodo.org"
ENV_ROOT = "STMEM_DATA"            # overrides the default data root
DEFAULT_ROOT = "~/stmem_data"
MANIFEST = ".stmem-download.json"  # the files of a dataset folder already verified
CHUNK = 1 << 20
RETRIES = 3                        # resumptions of a cut transfer within one run
TIMEOUT_S = 60.0
PHYSIONET_CITATION = ("Goldberger A. et al. PhysioBank, PhysioToolkit, and PhysioNet. Circulation 101(23):e215-e220, "
                      "2000")
# The collection's sources, as its `training/` folder names them (the same names as the cinc builder's `sources`).
CINC2021_SOURCES = ("cpsc_2018", "cpsc_2018_extra", "st_petersburg_incart", "ptb", "ptb-xl", "georgia",
                    "chapman_shaoxing", "ningbo")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One downloadable dataset: where its publisher keeps it, what it costs, and how to cite it.

  `publisher` is "physionet" (files under `<root>/files/<slug>/<version>/`, checksums in `SHA256SUMS.txt` there) or
  "zenodo" (record `slug`: listing with MD5s at `<root>/api/records/<slug>`, files at
  `<root>/records/<slug>/files/<key>`). `include`: glob patterns of the files to fetch (empty: all listed).
  `unpack`: patterns of archives extracted into the folder once verified (then deleted unless asked to keep them).
  """
  name: str
  title: str
  folder: str
  publisher: str
  slug: str
  version: str
  size: str
  licence: str
  citation: str
  page: str
  include: tuple[str, ...] = ()
  unpack: tuple[str, ...] = ()
  prepare: str = ""  # the `stmem prepare` builder of the folder, if one reads it as downloaded

  @property
  def root(self) -> str:
    return PHYSIONET if self.publisher == "physionet" else ZENODO


DATASETS: dict[str, Dataset] = {d.name: d for d in (
  Dataset("ptbxl", "PTB-XL 1.0.3: 21,799 12-lead 10 s ECGs at 500 and 100 Hz, SCP-ECG statements", "ptbxl",
          "physionet", "ptb-xl", "1.0.3", "about 3 GB", "CC BY 4.0",
          "Wagner P. et al. PTB-XL, a large publicly available electrocardiography dataset. Sci Data 7:154, 2020; "
          "PhysioNet doi:10.13026/kfzx-aw45", "https://physionet.org/content/ptb-xl/1.0.3/", prepare="ptbxl"),
  Dataset("ludb", "LUDB 1.0.1: 200 12-lead 10 s ECGs at 500 Hz, rhythm, axis, hypertrophy and wave annotations",
          "ludb", "physionet", "ludb", "1.0.1", "about 0.1 GB", "ODC-By 1.0",
          "Kalyakulina A. et al. LUDB: a new open-access validation tool for electrocardiogram delineation "
          "algorithms. IEEE Access 8, 2020; PhysioNet doi:10.13026/eegm-h675",
          "https://physionet.org/content/ludb/1.0.1/", prepare="ludb"),
  Dataset("cinc2021", "PhysioNet/CinC Challenge 2021 training set: 88,253 12-lead ECGs from eight sources "
          "(--sources chooses some), SNOMED-CT labels", "cinc2021", "physionet", "challenge-2021", "1.0.3",
          "about 9 GB (all eight sources)", "CC BY 4.0",
          "Reyna M. et al. Will two do? Varying dimensions in electrocardiography: the PhysioNet/Computing in "
          "Cardiology Challenge 2021. CinC 48, 2021; PhysioNet doi:10.13026/34va-7q14",
          "https://physionet.org/content/challenge-2021/1.0.3/", prepare="cinc"),
  Dataset("cinc2017", "PhysioNet/CinC Challenge 2017 training set: 8,528 single-lead AliveCor ECGs at 300 Hz, "
          "normal / AF / other / noisy", "cinc2017", "physionet", "challenge-2017", "1.0.0", "about 0.1 GB",
          "ODC-By 1.0",
          "Clifford G. et al. AF classification from a short single lead ECG recording: the PhysioNet/Computing in "
          "Cardiology Challenge 2017. CinC 44, 2017", "https://physionet.org/content/challenge-2017/1.0.0/",
          include=("training2017.zip", "REFERENCE-v3.csv"), unpack=("*.zip",)),
  Dataset("code15", "CODE-15%: 345,779 12-lead exams at 400 Hz from 233,770 Brazilian patients, six "
          "abnormality labels (Zenodo record 4916206, 18 zip parts + exams.csv)", "code15", "zenodo", "4916206",
          "1.0", "about 30 GB (zips; about the same again unpacked)", "CC BY 4.0",
          "Ribeiro A. H. et al. CODE-15%: a large scale annotated dataset of 12-lead ECGs. Zenodo "
          "doi:10.5281/zenodo.4916206, 2021", "https://zenodo.org/records/4916206", unpack=("*.zip",),
          prepare="code15"),
)}
ALIASES = {"cinc": "cinc2021", "ptb-xl": "ptbxl", "code-15": "code15"}


def data_root() -> str:
  """The default folder datasets are downloaded into: `$STMEM_DATA`, else `~/stmem_data` (as written, `~` kept)."""
  return os.environ.get(ENV_ROOT) or DEFAULT_ROOT


def dataset(name: str) -> Dataset:
  key = ALIASES.get(name, name)
  if key not in DATASETS:
    raise UsageError(f"unknown dataset {name!r}; datasets are {', '.join(DATASETS)} (stmem download --list)")
  return DATASETS[key]


def command_for(folder: str, root: str | None = None) -> str | None:
  """The `stmem download` command that writes `<root>/<folder>` (a dataset's folder), or None for an unknown one."""
  found = next((d for d in DATASETS.values() if d.folder == folder), None)
  if found is None:
    return None
  to = "" if root is None or os.path.expanduser(root) == os.path.expanduser(data_root()) else f" --to {root}"
  return f"stmem download {found.name}{to}"


# ------------------------------------------------------------------------------------------------ checksum lists


@dataclasses.dataclass(frozen=True)
class Remote:
  """A file to fetch: its path in the dataset folder, its URL, the publisher's checksum, its size if published."""
  path: str
  url: str
  algorithm: str  # "sha256" or "md5"
  digest: str
  size: int | None = None


def _safe_path(path: str, where: str) -> str:
  """A relative path inside the dataset folder; a listing naming anything else is refused."""
  norm = os.path.normpath(path.replace("\\", "/"))
  if os.path.isabs(norm) or norm.startswith("..") or norm in ("", "."):
    raise DataError(f"{where} lists {path!r}, a path outside the dataset folder; refusing the listing")
  return norm


def parse_sha256sums(text: str, where: str = "SHA256SUMS.txt") -> dict[str, str]:
  """`<hex>  <path>` lines (the format of `sha256sum`; `*` marks binary mode) -> {path: hex}."""
  out = {}
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    digest, _, path = line.partition(" ")
    path = path.strip().lstrip("*")
    if len(digest) != 64 or not path:
      raise DataError(f"{where}: not a SHA-256 listing (line {line[:80]!r})")
    out[_safe_path(path, where)] = digest.lower()
  return out


def parse_zenodo_record(text: str, where: str = "Zenodo record") -> dict[str, tuple[str, str, int | None]]:
  """The files of a Zenodo record (its API JSON, either the list or the `entries` form) -> {key: (algo, hex, size)}."""
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not the JSON of a Zenodo record ({e})") from e
  files = record.get("files", [])
  if isinstance(files, dict):
    files = list((files.get("entries") or {}).values())
  out = {}
  for f in files:
    key, checksum = f.get("key") or f.get("filename"), f.get("checksum", "")
    algorithm, _, digest = checksum.partition(":")
    if not key or algorithm not in ("md5", "sha256") or not digest:
      raise DataError(f"{where}: file entry without a key or an md5/sha256 checksum ({str(f)[:120]})")
    out[_safe_path(key, where)] = (algorithm, digest.lower(), f.get("size"))
  return out


def _base(ds: Dataset, mirror: str | None) -> str:
  return (mirror or ds.root).rstrip("/")


def listing_url(ds: Dataset, mirror: str | None = None) -> str:
  base = _base(ds, mirror)
  if ds.publisher == "physionet":
    return f"{base}/files/{ds.slug}/{ds.version}/SHA256SUMS.txt"
  return f"{base}/api/records/{ds.slug}"


def file_url(ds: Dataset, path: str, mirror: str | None = None) -> str:
  base, quoted = _base(ds, mirror), urllib.parse.quote(path)
  if ds.publisher == "physionet":
    return f"{base}/files/{ds.slug}/{ds.version}/{quoted}"
  return f"{base}/records/{ds.slug}/files/{quoted}"


def _listing_file(ds: Dataset) -> str:
  """Where the checksum listing is kept in the dataset folder (so a re-run needs no request)."""
  return "SHA256SUMS.txt" if ds.publisher == "physionet" else f"zenodo-{ds.slug}.json"


def wanted(ds: Dataset, listing: str, sources: Sequence[str] = ()) -> list[Remote]:
  """The files of `ds` to fetch, from its publisher's listing text (SHA256SUMS.txt or the Zenodo record JSON)."""
  if ds.publisher == "physionet":
    files = {p: ("sha256", h, None) for p, h in parse_sha256sums(listing, listing_url(ds)).items()}
  else:
    files = parse_zenodo_record(listing, listing_url(ds))
  paths = list(files)
  if ds.include:
    paths = [p for p in paths if any(fnmatch.fnmatch(p, pat) for pat in ds.include)]
  if sources:
    # a subset of the collection: its top-level files and the chosen sources' folders under training/
    paths = [p for p in paths if "/" not in p or any(p.startswith(f"training/{s}/") for s in sources)]
  if not paths:
    raise DataError(f"{listing_url(ds)} lists none of the files of {ds.name}; is it the right listing (--mirror)?")
  return [Remote(p, file_url(ds, p), *files[p]) for p in sorted(paths)]


def check_sources(ds: Dataset, sources: str | Sequence[str] | None) -> tuple[str, ...]:
  """The chosen sources of a collection (cinc2021 only), refusing unknown ones (UsageError)."""
  if not sources:
    return ()
  chosen = tuple(s.strip() for s in (sources.split(",") if isinstance(sources, str) else sources) if s.strip())
  if ds.name != "cinc2021":
    raise UsageError(f"--sources chooses sources of cinc2021; {ds.name} has none")
  unknown = [s for s in chosen if s not in CINC2021_SOURCES]
  if unknown:
    raise UsageError(f"unknown cinc2021 source(s) {', '.join(unknown)}; sources are {', '.join(CINC2021_SOURCES)}")
  return chosen


# ------------------------------------------------------------------------------------------------ transfers


class _Stopped(Exception):
  """The download stops (another transfer failed, or the user interrupted): a transfer ends where it is."""


class _Cut(Exception):
  """A transfer ended before its last byte (a dropped connection): resumed with a range request."""


def _open(url: str, start: int = 0):
  headers = {"User-Agent": "stmem-download (python urllib)"}
  if start:
    headers["Range"] = f"bytes={start}-"
  return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _network_error(url: str, e: BaseException) -> DataError:
  if isinstance(e, urllib.error.HTTPError):
    hint = "; is the --mirror address right?" if e.code == 404 else ""
    return DataError(f"{url}: HTTP {e.code} {e.reason}{hint}")
  reason = getattr(e, "reason", e)
  host = urllib.parse.urlsplit(url).netloc
  return DataError(f"cannot reach {host} ({reason}); check the network, or use --mirror; run again to resume")


def read_text(url: str) -> str:
  try:
    with _open(url) as response:
      return response.read().decode("utf-8")
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    raise _network_error(url, e) from e


def _transfer(url: str, part: str, progress: Callable[[int], None]) -> None:
  """Append the rest of `url` to `part` (a range request when part has bytes); _Cut when the body ends early."""
  have = os.path.getsize(part) if os.path.exists(part) else 0
  try:
    response = _open(url, have)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # nothing after `have`: the part is complete (or longer; the checksum will tell)
      return
    raise
  with response:
    if have and response.status != 206:  # the server ignored the range: start over
      progress(-have)
      have = 0
    length = response.headers.get("Content-Length")
    expected = have + int(length) if length is not None else None
    written = have
    with open(part, "ab" if have else "wb") as f:
      while True:
        try:
          chunk = response.read(CHUNK)
        except (http.client.IncompleteRead, ConnectionError, socket.timeout) as e:
          raise _Cut(str(e)) from e
        if not chunk:
          break
        f.write(chunk)
        written += len(chunk)
        progress(len(chunk))
  if expected is not None and written < expected:
    raise _Cut(f"{written} of {expected} bytes")


def file_digest(path: str, algorithm: str) -> str:
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def fetch(remote: Remote, dest: str, progress: Callable[[int], None] = lambda n: None) -> None:
  """`remote` into `dest`, verified: through `dest.part`, resumed after a cut, renamed only once its checksum holds.

  A file whose checksum fails is fetched once more from scratch, then refused (DataError naming it); its part file
  is removed, so nothing unverified stays behind. A transfer that stays cut after `RETRIES` resumptions is a
  DataError too, and keeps its part file for the next run to resume.
  """
  part = dest + ".part"
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  for attempt in range(2):
    for cut in range(RETRIES + 1):
      try:
        _transfer(remote.url, part, progress)
        break
      except _Cut as e:
        if cut == RETRIES:
          raise DataError(f"{remote.path}: the transfer kept breaking off ({e}); run again to resume it") from e
        time.sleep(min(0.2 * 2 ** cut, 5.0))
      except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _network_error(remote.url, e) from e
    got = file_digest(part, remote.algorithm)
    if got == remote.digest:
      os.replace(part, dest)
      return
    size = os.path.getsize(part)
    os.remove(part)
    progress(-size)
    if attempt == 1:
      raise DataError(f"{remote.path}: {remote.algorithm} checksum mismatch twice (expected {remote.digest}, got "
                      f"{got}) from {remote.url}; not kept")


# ------------------------------------------------------------------------------------------------ the manifest


class Manifest:
  """The verified files of a dataset folder: {path: {"digest", "size", "mtime_ns", "unpacked"}}, saved atomically."""

  def __init__(self, folder: str):
    self.path = os.path.join(folder, MANIFEST)
    self.lock = threading.Lock()
    try:
      self.files: dict[str, dict[str, Any]] = json.loads(open(self.path).read()).get("files", {})
    except (OSError, ValueError):
      self.files = {}

  def done(self, remote: Remote, dest: str) -> bool:
    """Verified before: recorded with the same checksum, and either unpacked or unchanged on disk since."""
    entry = self.files.get(remote.path)
    if not entry or entry.get("digest") != f"{remote.algorithm}:{remote.digest}":
      return False
    if entry.get("unpacked"):
      return True
    try:
      st = os.stat(dest)
    except OSError:
      return False
    return st.st_size == entry.get("size") and st.st_mtime_ns == entry.get("mtime_ns")

  def record(self, remote: Remote, dest: str, unpacked: bool = False) -> None:
    with self.lock:
      entry = {"digest": f"{remote.algorithm}:{remote.digest}", "unpacked": unpacked}
      if os.path.exists(dest):
        st = os.stat(dest)
        entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
      self.files[remote.path] = entry
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"files": self.files}, f, indent=0, sort_keys=True)
      os.replace(tmp, self.path)


def unpack(archive: str, folder: str) -> None:
  """Extract a verified zip into `folder` through a staging folder, so no member is half-written under its name."""
  staging = tempfile.mkdtemp(prefix=".unpack-", dir=folder)
  try:
    with zipfile.ZipFile(archive) as z:
      for member in z.namelist():
        _safe_path(member, archive)
      z.extractall(staging)
    for name in os.listdir(staging):
      target = os.path.join(folder, name)
      if os.path.isdir(target) and os.path.isdir(os.path.join(staging, name)):
        shutil.copytree(os.path.join(staging, name), target, dirs_exist_ok=True)
      else:
        os.replace(os.path.join(staging, name), target)
  except zipfile.BadZipFile as e:
    raise DataError(f"{archive}: not a readable zip ({e}) although its checksum matched") from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ one dataset


@dataclasses.dataclass
class Result:
  folder: str
  files: int
  fetched: int
  bytes: int


def download(name: str, folder: str, *, sources: str | Sequence[str] | None = None, mirror: str | None = None,
             jobs: int = 8, keep_archives: bool = False, quiet: bool = False) -> Result:
  """Fetch and verify dataset `name` into `folder` (the dataset's own folder); returns what was done."""
  ds = dataset(name)
  chosen = check_sources(ds, sources)
  if jobs < 1:
    raise UsageError(f"--jobs {jobs}: give 1 or more parallel transfers")
  folder = os.path.expanduser(folder)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise UsageError(f"{folder} is a file; give a folder to download into")
  created = not os.path.exists(folder)
  os.makedirs(folder, exist_ok=True)
  try:
    return _download(ds, folder, chosen, mirror, jobs, keep_archives, quiet)
  finally:
    if created and not os.listdir(folder):  # a first run that fetched nothing leaves no empty folder behind
      os.rmdir(folder)


def _download(ds: Dataset, folder: str, chosen: tuple[str, ...], mirror: str | None, jobs: int, keep_archives: bool,
              quiet: bool) -> Result:
  kept = os.path.join(folder, _listing_file(ds))
  if os.path.exists(kept):
    listing = open(kept, encoding="utf-8").read()
  else:
    listing = read_text(listing_url(ds, mirror))
    wanted(ds, listing, chosen)  # refuse a listing that is not one before keeping it
    tmp = kept + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(listing)
    os.replace(tmp, kept)
  remotes = [dataclasses.replace(r, url=file_url(ds, r.path, mirror)) for r in wanted(ds, listing, chosen)]
  manifest = Manifest(folder)
  todo = []
  for r in remotes:
    dest = os.path.join(folder, r.path)
    if manifest.done(r, dest):
      continue
    # a file already there (copied in, or verified before the manifest was lost) is re-hashed, not fetched
    if os.path.isfile(dest) and file_digest(dest, r.algorithm) == r.digest:
      manifest.record(r, dest)
      _unpack_if_archive(ds, r, dest, folder, manifest, keep_archives)
      continue
    todo.append(r)
  known = [r.size for r in todo]
  total = sum(known) if todo and all(s is not None for s in known) else None
  fetched_bytes = 0
  if todo:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet, file=sys.stderr,
               desc=f"{ds.name}: {len(todo)} file(s)")
    lock, stop = threading.Lock(), threading.Event()

    def progress(n: int) -> None:
      nonlocal fetched_bytes
      if stop.is_set():  # another file failed, or Ctrl-C: end this transfer now (its part file stays to resume)
        raise _Stopped
      with lock:
        fetched_bytes += n
        bar.update(n)

    def one(r: Remote) -> None:
      dest = os.path.join(folder, r.path)
      fetch(r, dest, progress)
      manifest.record(r, dest)
      _unpack_if_archive(ds, r, dest, folder, manifest, keep_archives)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(jobs, len(todo)))
    try:
      futures = [pool.submit(one, r) for r in todo]
      for future in concurrent.futures.as_completed(futures):
        future.result()  # the first failure stops the rest
    finally:
      stop.set()
      pool.shutdown(wait=True, cancel_futures=True)
      bar.close()
  return Result(folder, len(remotes), len(todo), fetched_bytes)


def _unpack_if_archive(ds: Dataset, r: Remote, dest: str, folder: str, manifest: Manifest,
                       keep_archives: bool) -> bool:
  if not any(fnmatch.fnmatch(r.path, pat) for pat in ds.unpack):
    return False
  unpack(dest, folder)
  if not keep_archives:
    os.remove(dest)
  manifest.record(r, dest, unpacked=True)
  return True


# ------------------------------------------------------------------------------------------------ the command


def list_lines() -> list[str]:
  lines = []
  for d in DATASETS.values():
    lines += [f"{d.name}  ({d.size}, {d.licence})", f"  {d.title}", f"  from:  {d.page}", f"  cite:  {d.citation}"]
    if d.publisher == "physionet":
      lines.append(f"         and PhysioNet: {PHYSIONET_CITATION}")
    lines.append("")
  lines.append(f"default folder: {data_root()}/<name>/ (set ${ENV_ROOT} or pass --to DIR)")
  return lines


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="stmem download", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.split("\n")[1:]))
  p.add_argument("name", nargs="?", help=f"dataset: {', '.join(DATASETS)}")
  p.add_argument("--list", action="store_true", help="list the datasets with size, licence and citation")
  p.add_argument("--to", default=None, metavar="DIR",
                 help=f"data root; the dataset goes to DIR/<name>/ (default ${ENV_ROOT} or {DEFAULT_ROOT})")
  p.add_argument("--sources", default="",
                 help=f"cinc2021 only: comma-separated sources ({', '.join(CINC2021_SOURCES)})")
  p.add_argument("--mirror", default=None, metavar="URL",
                 help=f"a base URL replacing the publisher's ({PHYSIONET} or {ZENODO}), in the same layout")
  p.add_argument("--jobs", type=int, default=8, help="parallel transfers (default 8)")
  p.add_argument("--keep_archives", action="store_true", help="keep zip files after unpacking them")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
  if args.list:
    print("\n".join(list_lines()))
    return 0
  if not args.name:
    raise UsageError("name a dataset to download (stmem download --list shows them)")
  ds = dataset(args.name)
  root = args.to or data_root()
  result = download(ds.name, os.path.join(os.path.expanduser(root), ds.folder), sources=args.sources,
                    mirror=args.mirror, jobs=args.jobs, keep_archives=args.keep_archives, quiet=args.quiet)
  print(f"{ds.name}: {result.files} file(s) verified in {result.folder} ({result.fetched} fetched, "
        f"{result.bytes / 1e6:.1f} MB; {result.files - result.fetched} already there)")
  if ds.prepare:
    print(f"  next: stmem prepare {ds.prepare} --manual_dir {result.folder} --data_dir PREPARED"
          + (f" --sources {args.sources}" if args.sources else ""))
  print(f"  cite: {ds.citation}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
