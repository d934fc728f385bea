"""The `stmem` command's huge-page allocator setting (stmem/hugepages.py): when it applies and what it sets."""
import os
import subprocess
import sys

from stmem import hugepages

PROBE = "from stmem import hugepages; hugepages.reexec_if_wanted(); import os; print(os.environ.get('GLIBC_TUNABLES', ''))"


def _env(**kw):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "STMEM_HUGEPAGES")}
  env.update(kw)
  return env


def test_by_default_and_with_an_existing_setting_the_process_is_left_alone():
  assert not hugepages.wanted(_env())  # opt-in: the library does not re-execute a user's process unasked
  assert not hugepages.wanted(_env(STMEM_HUGEPAGES="0"))
  assert not hugepages.wanted(_env(STMEM_HUGEPAGES="1", GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))


def test_the_tunable_is_added_to_the_ones_already_set():
  env = hugepages.environment(_env(GLIBC_TUNABLES="glibc.malloc.arena_max=2"))
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert hugepages.environment(_env())["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_the_process_reexecutes_itself_with_the_tunable_only_when_asked():
  asked = _env(STMEM_HUGEPAGES="1")
  out = subprocess.run([sys.executable, "-c", PROBE], env=asked, capture_output=True, text=True, check=True).stdout
  # On Linux + glibc >= 2.35 with THP in madvise mode (this project's CI machines) the child sees the tunable;
  # elsewhere it runs unchanged.
  assert out.strip() == ("glibc.malloc.hugetlb=1" if hugepages.wanted(asked) else "")
  out = subprocess.run([sys.executable, "-c", PROBE], env=_env(), capture_output=True, text=True, check=True).stdout
  assert out.strip() == ""
