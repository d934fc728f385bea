"""Joining the JAX distributed system: `initialize()` once, before any JAX computation, in every process.

A launcher starts one process per host (or per accelerator); `initialize()` works out from the environment which
launcher that was and calls `jax.distributed.initialize` for it, or does nothing when there is one process:

  STMEM_COORDINATOR=host:port, STMEM_NUM_PROCESSES=N, STMEM_PROCESS_ID=i
      explicit: `launch/local_multiprocess.sh`, the tests, any launcher that can set per-process variables.
      Optional: STMEM_COORDINATOR_BIND=host:port (where process 0 listens; by default the coordinator's own
      address when it is a loopback one, JAX's default, every interface, otherwise).
  SLURM (srun with more than one task)   JAX reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
                                         SLURM_LOCALID itself (`launch/slurm.sbatch`).
  Open MPI (mpirun with more than one rank)   JAX reads OMPI_MCA_orte_hnp_uri and OMPI_COMM_WORLD_*.
  JAX_COORDINATOR_ADDRESS (+ JAX's own detection for the rest), or STMEM_DISTRIBUTED=1
      call `jax.distributed.initialize()` and let JAX find everything (Cloud TPU VMs: `launch/tpu_vm.sh`).
  STMEM_DISTRIBUTED=0   never initialise (one process, even inside a SLURM allocation).

STMEM_LOCAL_DEVICE_IDS=0,1,... (any launcher) names the accelerators this process drives. Under SLURM and Open MPI,
JAX otherwise gives each GPU process the single device SLURM_LOCALID / the local rank: right for one process per
GPU, wrong for one process per node.

Why bounded timeouts: a process that never arrives must fail the start-up (STMEM_INIT_TIMEOUT, default 300 s), and
a process that dies mid-run must bring the others down rather than leave them blocked forever in a collective.
The coordination service declares a process dead after STMEM_HEARTBEAT_TIMEOUT seconds without a heartbeat
(default 60) and then terminates every other process with a non-zero status; STMEM_SHUTDOWN_TIMEOUT (default 120)
bounds how long a finished process waits for the others at exit.
"""
from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import os
import sys
from collections.abc import Mapping

DEFAULT_INIT_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 60
DEFAULT_SHUTDOWN_TIMEOUT = 120


@dataclasses.dataclass(frozen=True)
class Launch:
  """What the environment says about this process's launch."""
  method: str                        # "single", "explicit", "slurm", "ompi" or "auto" (JAX detects)
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  bind_address: str | None = None

  @property
  def distributed(self) -> bool:
    return self.method != "single"


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _flag(environ: Mapping[str, str], name: str) -> bool | None:
  value = environ.get(name, "").strip().lower()
  if not value:
    return None
  if value in ("1", "true", "yes", "on"):
    return True
  if value in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"{name}={value!r}: use 1 or 0")


def _is_loopback(host: str) -> bool:
  host = host.strip("[]")
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _device_ids(environ: Mapping[str, str]) -> tuple[int, ...] | None:
  ids = environ.get("STMEM_LOCAL_DEVICE_IDS", "").strip()
  try:
    return tuple(int(i) for i in ids.split(",")) if ids else None
  except ValueError:
    raise ValueError(f"STMEM_LOCAL_DEVICE_IDS={ids!r}: expected comma-separated integers, e.g. 0,1,2,3") from None


def detect(environ: Mapping[str, str] | None = None) -> Launch:
  """Which launcher started this process, from the environment alone (no JAX call, no network)."""
  env = os.environ if environ is None else environ
  forced = _flag(env, "STMEM_DISTRIBUTED")
  if forced is False:
    return Launch("single")
  if env.get("STMEM_COORDINATOR"):
    coordinator = env["STMEM_COORDINATOR"].strip()
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"STMEM_COORDINATOR={coordinator!r}: expected host:port, e.g. 127.0.0.1:12355")
    num = _int(env, "STMEM_NUM_PROCESSES")
    pid = _int(env, "STMEM_PROCESS_ID")
    if num is None or pid is None:
      raise ValueError("STMEM_COORDINATOR is set: STMEM_NUM_PROCESSES and STMEM_PROCESS_ID must be set too")
    if not 0 <= pid < num:
      raise ValueError(f"STMEM_PROCESS_ID={pid} is not in [0, STMEM_NUM_PROCESSES={num})")
    bind = env.get("STMEM_COORDINATOR_BIND") or (coordinator if _is_loopback(host) else None)
    if num == 1 and not forced:
      return Launch("single")
    return Launch("explicit", coordinator, num, pid, _device_ids(env), bind)
  # Launchers JAX detects by itself: only worth a coordinator when there is more than one process.
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in env for v in slurm) and (_int(env, "SLURM_NTASKS", 1) > 1 or forced):
    return Launch("slurm", num_processes=_int(env, "SLURM_NTASKS"), process_id=_int(env, "SLURM_PROCID"),
                  local_device_ids=_device_ids(env))
  if "OMPI_MCA_orte_hnp_uri" in env and (_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1 or forced):
    return Launch("ompi", num_processes=_int(env, "OMPI_COMM_WORLD_SIZE"),
                  process_id=_int(env, "OMPI_COMM_WORLD_RANK"), local_device_ids=_device_ids(env))
  if forced or env.get("JAX_COORDINATOR_ADDRESS"):
    return Launch("auto", coordinator=env.get("JAX_COORDINATOR_ADDRESS") or None, local_device_ids=_device_ids(env))
  return Launch("single")


def initialize(environ: Mapping[str, str] | None = None, *, init_timeout: int | None = None,
               heartbeat_timeout: int | None = None, shutdown_timeout: int | None = None) -> Launch:
  """Join the distributed system if a multi-process launcher started us; a no-op for one process and when
  already initialised. Call before any JAX computation. Returns what was detected."""
  env = os.environ if environ is None else environ
  launch = detect(env)
  if not launch.distributed:
    return launch
  import jax
  if jax.distributed.is_initialized():
    return launch
  kwargs = {
    "initialization_timeout": init_timeout or _int(env, "STMEM_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT),
    "heartbeat_timeout_seconds": heartbeat_timeout or _int(env, "STMEM_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT),
    "shutdown_timeout_seconds": shutdown_timeout or _int(env, "STMEM_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT),
  }
  if launch.method == "explicit":
    kwargs.update(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                  process_id=launch.process_id)
    if launch.bind_address:
      kwargs["coordinator_bind_address"] = launch.bind_address
  elif launch.method in ("slurm", "ompi"):
    kwargs["cluster_detection_method"] = launch.method
  if launch.local_device_ids is not None:
    kwargs["local_device_ids"] = list(launch.local_device_ids)
  # Keyword names have moved between JAX releases: pass only those this one takes, so jax 0.10 and 0.11 both work.
  accepted = inspect.signature(jax.distributed.initialize).parameters
  dropped = sorted(k for k in kwargs if k not in accepted)
  if dropped:
    print(f"stmem.distributed: this JAX ({jax.__version__}) ignores {dropped}", file=sys.stderr)
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})
  print(f"stmem.distributed: process {jax.process_index()} of {jax.process_count()} ({launch.method}), "
        f"{jax.local_device_count()} local of {jax.device_count()} devices", file=sys.stderr, flush=True)
  return launch

