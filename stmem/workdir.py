"""Where a run writes: a local folder, or a Google Cloud Storage URL (`--workdir gs://bucket/run`).

A program turns its `--workdir` into a path here, once. A local folder stays a `pathlib.Path`, exactly as before; a
`gs://` URL becomes an `etils.epath.Path`, the path type orbax writes checkpoints through (its files go through
gcsfs, its arrays through tensorstore's gcs driver; no TensorFlow). Both have the same methods (`/`, `exists`,
`read_text`, `write_text`, `open`, `iterdir`, `glob`), so the code after this boundary does not ask which it has.
The few things an object store does not do as a disk does are here too: appending to a file (`Appender`), files
that libraries write only to local paths, figures and reports (`local_dir`), files a library keeps open and
appends to, TensorBoard's (`Mirror`), and creating a file only if it is absent, for the workdir's hold
(`GcsStore`, `stmem.workdir_hold`).

Credentials are Google's application-default ones (`gcloud auth application-default login`, a service account on
the VM). Another endpoint, an emulator: `STORAGE_EMULATOR_HOST` for the file layer (gcsfs) and
`TENSORSTORE_GCS_HTTP_URL` for the checkpoint arrays (docs/cloud.md).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Union

from data_pipelines.errors import UsageError

GCS = "gs://"
Path = Union[pathlib.Path, "epath.Path"]  # noqa: F821 - etils is imported only for a bucket


def is_remote(path) -> bool:
  """True for a `gs://` URL (a str, or the epath.Path `resolve` made of one)."""
  return os.fspath(path).startswith(GCS)


def resolve(path: str | os.PathLike[str]) -> Path:
  """The path a program writes under: a local folder as an absolute `pathlib.Path` (`~` expanded), a `gs://bucket/..`
  URL as an `etils.epath.Path`. Another URL scheme is refused (UsageError): as a local path it would silently
  become a folder named `s3:`."""
  text = os.fspath(path)
  if text.startswith(GCS):
    bucket = text[len(GCS):].split("/", 1)[0]
    if not bucket:
      raise UsageError(f"{text}: a bucket URL names its bucket, e.g. gs://my-bucket/run")
    _configure_gcsfs()
    from etils import epath
    return epath.Path(text.rstrip("/"))
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
    raise UsageError(f"{text}: stmem writes to local folders and to Google Cloud Storage (gs://) only")
  return pathlib.Path(text).expanduser().absolute()


def _configure_gcsfs() -> None:
  """gcsfs installed (the `gcs` extra), and its directory listings not cached: checkpoint arrays are written by
  tensorstore, past gcsfs, so a cached listing would not show them."""
  try:
    import fsspec
    import gcsfs  # noqa: F401
  except ImportError:
    raise UsageError("a gs:// path needs gcsfs: pip install 'stmem[gcs]'") from None
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def prepare(workdir: Path) -> None:
  """Make the workdir ready for writing. A local folder is created; a bucket has no folders (nothing to create),
  but must exist: gcsfs would otherwise create a missing bucket on the first write, or fail with a URL as its
  message."""
  if not is_remote(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    return
  import gcsfs
  bucket = os.fspath(workdir)[len(GCS):].split("/", 1)[0]
  if not gcsfs.GCSFileSystem().exists(bucket):
    raise UsageError(f"{workdir}: the bucket gs://{bucket} does not exist or this account cannot see it; create it "
                     f"(gcloud storage buckets create gs://{bucket}) or check the credentials")


class Appender:
  """Text appended to a file, one `write` at a time, each readable as soon as it returns (metrics.jsonl is read
  while a run writes it). On a disk the file is opened in append mode for each write. An object in a bucket cannot
  be appended to (gcsfs would silently overwrite it), so there the text is read once and the whole object is
  rewritten with each write: an upload replaces an object whole, so a reader or a killed run never sees half a
  line."""

  def __init__(self, path: Path):
    self.path = path
    self.remote = is_remote(path)
    self._text = (path.read_text() if path.exists() else "") if self.remote else None

  def write(self, text: str) -> None:
    if self.remote:
      self._text += text
      self.path.write_text(self._text)
    else:
      with self.path.open("a") as f:
        f.write(text)


class Mirror:
  """A local folder mirrored into a folder of a bucket, for a writer that keeps a file open and appends to it
  (TensorBoard's event files; tensorboardX's own bucket writer uploads its file again at interpreter exit, and waits
  minutes there when the endpoint is gone). `sync` uploads each file that changed since the last one (an upload
  replaces the object whole); `close` syncs and removes the local folder."""

  def __init__(self, remote: Path):
    self.remote = remote
    self.path = pathlib.Path(tempfile.mkdtemp(prefix="stmem-mirror-"))
    self._sent: dict[str, tuple[int, int]] = {}

  def sync(self) -> None:
    for f in sorted(self.path.rglob("*")):
      if not f.is_file():
        continue
      name, stat = f.relative_to(self.path).as_posix(), f.stat()
      if self._sent.get(name) != (stat.st_size, stat.st_mtime_ns):
        (self.remote / name).write_bytes(f.read_bytes())
        self._sent[name] = (stat.st_size, stat.st_mtime_ns)

  def close(self) -> None:
    try:
      self.sync()
    finally:
      shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def local_dir(folder: Path) -> Iterator[pathlib.Path]:
  """A local folder to write into, for files made by code that writes local paths only (matplotlib, reports).
  A local `folder` is itself (created); for a bucket it is a temporary folder whose files are uploaded under
  `folder`, at the same relative paths, when the block ends without an error."""
  if not is_remote(folder):
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    return
  with tempfile.TemporaryDirectory(prefix="stmem-upload-") as tmp:
    yield pathlib.Path(tmp)
    for f in sorted(pathlib.Path(tmp).rglob("*")):
      if f.is_file():
        (folder / f.relative_to(tmp).as_posix()).write_bytes(f.read_bytes())


class GcsStore:
  """The files of a workdir's hold (`stmem.workdir_hold`) in a bucket. A file is created exclusively with GCS's
  precondition `ifGenerationMatch=0`: the upload is refused when the object exists, so of two runs started at the
  same instant exactly one creates it. A write is one upload, which replaces the object whole."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self.folder = resolve(workdir)
    prepare(self.folder)  # a missing bucket said in one line here, where a run first touches it
    import fsspec
    self.fs = fsspec.filesystem("gcs")

  def _key(self, name: str) -> str:
    return os.fspath(self.folder / name)

  def create_exclusive(self, name: str, data: bytes) -> bool:
    try:
      self.fs.pipe_file(self._key(name), data, mode="create")
    except FileExistsError:  # gcsfs's word for GCS's 412, the precondition failed
      return False
    return True

  def read(self, name: str) -> bytes | None:
    try:
      return self.fs.cat_file(self._key(name))
    except FileNotFoundError:
      return None

  def write(self, name: str, data: bytes) -> None:
    self.fs.pipe_file(self._key(name), data)

  def remove(self, name: str) -> None:
    try:
      self.fs.rm_file(self._key(name))
    except FileNotFoundError:
      pass

  def where(self, name: str) -> str:
    return self._key(name)
