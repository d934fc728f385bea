"""Output files that appear whole or not at all.

A program writes its outputs into a hidden staging folder beside their final place and moves them there (one
`os.replace` each: atomic on one file system) only when everything succeeded. A failure, an interrupt or an empty
result leaves no 0-row file, no half-written file and no temporary folder behind, and never replaces an earlier
good output with a broken one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping


class Staging:
  """A hidden folder beside the outputs; `commit` moves files from it into place; always removed at the end.

    with Staging(out_folder) as staging:
      write(staging.path("x.parquet"))
      staging.commit({"x.parquet": final_path})
  """

  def __init__(self, beside: str | os.PathLike[str], prefix: str = ".stmem-staging-"):
    folder = os.path.abspath(os.fspath(beside) or ".")
    os.makedirs(folder, exist_ok=True)
    self.folder = tempfile.mkdtemp(prefix=prefix, dir=folder)

  def path(self, name: str) -> str:
    return os.path.join(self.folder, name)

  def commit(self, outputs: Mapping[str, str | os.PathLike[str]]) -> None:
    """Move each staged file (by name) to its final path, replacing what is there."""
    for name, final in outputs.items():
      os.replace(self.path(name), os.fspath(final))

  def remove(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)

  def __enter__(self) -> "Staging":
    return self

  def __exit__(self, *exc: object) -> None:
    self.remove()
