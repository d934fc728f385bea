"""Will a pretraining config fit, and what does a step cost? Compiled ahead of time, nothing allocated.

The step is `stmem.steps.pretrain_step`, the one `stmem pretrain` runs, with the same mesh and shardings, lowered
with sharded shapes (`steps.abstract_args`) and compiled either for the local devices or for a TPU topology
described by libtpu on any host (`jax.experimental.topologies.get_topology_desc`; the `[tpu]` extra). XLA's
memory analysis of the compiled program gives each device's argument, output, temporary and total bytes, which are
held against the chip's memory (or a stated budget). When the step does not fit, `fit` searches the smallest
gradient-accumulation count, then a stronger rematerialisation, that does. The fine-tuning update is compiled
the same way: `stmem.steps.finetune_step`, the step `stmem finetune` runs. The embedding forward planned is
`stmem.steps.embed_forward` (one 12-lead crop in, pooled features out, batch-sharded: the forward `stmem bench`
times), not the program `stmem embed` compiles, which also returns per-lead (and per-patch) features averaged
over the evaluation crops and replicates its outputs to process 0.

FLOPs per step are analytic (`stmem.metrics`); XLA's own count of the compiled program is shown beside them,
but it counts a scanned block once, so it reads several times too low for a deep model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stmem import metrics
from stmem import sharding as sharding_lib
from stmem import steps
from stmem.models import Classifier, encoder_model


class DoesNotFit(ValueError):
  """The compiled step needs more memory per device than the device has (or config.memory_budget_gb allows); the
  programs refuse it before the first step, with the fix, and exit with status 2."""


GiB = 2 ** 30

# Memory per chip by `device_kind` prefix (the longest match wins), bytes: HBM of the part as sold (TPU v5e 16 GiB,
# v4 32 GiB, v5p 95 GiB, v6e 32 GiB; H100 80 GB, H200 141 GB, B200 180 GB, A100 40 or 80 GB).
DEVICE_MEMORY = {
  "TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5": 95 * GiB, "TPU v5p": 95 * GiB,
  "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB,
  "NVIDIA H100": 80 * 10 ** 9, "NVIDIA H200": 141 * 10 ** 9, "NVIDIA B200": 180 * 10 ** 9,
  "NVIDIA A100-SXM4-40GB": 40 * 10 ** 9, "NVIDIA A100": 80 * 10 ** 9,
}
# Share of a chip's memory a step's buffers may plan for: the runtime keeps some for itself and for fragmentation,
# the program's code and the input pipeline's prefetched batches are outside XLA's buffer plan, and the TPU compiler
# accepted a base step planned at 15.85 of v5e's 16 GiB that would leave no slack at all. A stated budget
# (config.memory_budget_gb) is taken as it is.
USABLE_FRACTION = 0.95
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
REMAT_ORDER = ("none", "dots", "block")  # weakest to strongest: each keeps less for the backward pass
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


# What libtpu reads from the environment when it describes a topology, and why the planner sets it: libtpu guards
# real chips with a lock file, but compiling for an abstract topology touches no chip, and the lock would refuse a
# second planner on the same host; without worker hostnames libtpu looks for a TPU VM's metadata. A value the user
# set is kept.
LIBTPU_ENVIRONMENT = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost"}


@contextlib.contextmanager
def _libtpu_environment():
  """LIBTPU_ENVIRONMENT set (where unset) while libtpu describes a topology, and the environment put back after."""
  added = {k: v for k, v in LIBTPU_ENVIRONMENT.items() if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


# What libtpu prints on stderr when it describes a topology on a host that is no TPU VM: it looks for this host's own
# chips first, says it found none, and goes on to describe the topology asked for, which these lines do not concern.
LIBTPU_HOST_NOISE = ("Failed to find host bounds for accelerator type", "could not determine TPU accelerator type")


@contextlib.contextmanager
def _without_libtpu_host_noise():
  """stderr (the file descriptor, which libtpu writes to) passed on when the block ends, less LIBTPU_HOST_NOISE."""
  sys.stderr.flush()
  with tempfile.TemporaryFile() as held:
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      text = held.read().decode(errors="replace")
      kept = [line for line in text.splitlines(keepends=True) if not any(n in line for n in LIBTPU_HOST_NOISE)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def devices_for(topology: str) -> list:
  """'local': this process's devices; otherwise a TPU topology name ('v5e:4x4', 'v4:2x2x1', 'v5p:2x2x1') as
  abstract devices to compile for, from libtpu (`pip install 'stmem[tpu]'`)."""
  if topology == "local":
    return jax.devices()
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover -- part of jax
    raise RuntimeError(f"this jax has no jax.experimental.topologies: {e}") from e
  try:
    with _libtpu_environment(), _without_libtpu_host_noise():
      devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
      if len({tuple(d.coords) for d in devices}) < len(devices):
        # Two TensorCores per chip (v4) are two devices by default; jobs run them as one ("megacore"), and
        # jax.make_mesh wants one device per chip.
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                    chip_config_name="megacore").devices)
    return devices
  except Exception as e:  # noqa: BLE001 -- libtpu missing or the name unknown: say which
    raise ValueError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {str(e)[:200]}); install the "
                     f"TPU compiler with `pip install 'stmem[tpu]'` and name a topology such as v5e:4x4, v4:2x2x1 "
                     f"or v5p:2x2x1, or use --topology local") from e


def device_memory(devices, budget_gb: float = 0.0) -> int | None:
  """Bytes one device may use: the stated budget, else USABLE_FRACTION of the chip's memory (table, or what the
  runtime reports), else None (a CPU: host memory is shared with everything else and is no device budget)."""
  if budget_gb:
    return int(budget_gb * GiB)
  kind = devices[0].device_kind
  matches = [name for name in DEVICE_MEMORY if kind.startswith(name)]
  if matches:
    return int(DEVICE_MEMORY[max(matches, key=len)] * USABLE_FRACTION)
  try:
    stats = devices[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 -- abstract and CPU devices have none
    stats = {}
  if "bytes_limit" in stats and devices[0].platform != "cpu":
    return int(stats["bytes_limit"] * USABLE_FRACTION)
  return None


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collective operations in a compiled program's HLO and the bytes of their results, by kind. An operation in a
  loop body (the block scan, micro-batches) is listed once, as XLA writes it, not once per iteration."""
  out: dict[str, dict[str, int]] = {}
  pattern = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    nbytes = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                 for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)) if dt in _DTYPE_BYTES)
    entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += nbytes
  return out


@dataclasses.dataclass
class Report:
  """One program compiled for one device set; bytes are per device, FLOPs per step for the whole mesh."""
  program: str
  topology: str
  device_kind: str
  devices: int
  mesh: dict[str, int]
  batch_size: int
  accum_steps: int
  remat: str
  dtype: str
  budget_bytes: int | None
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  total_bytes: int | None = None
  fits: bool | None = None
  flops_analytic: float | None = None
  flops_xla_per_device: float | None = None
  collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  compile_seconds: float | None = None
  error: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  m = m[0] if isinstance(m, (list, tuple)) else m
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
          "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes), "total_bytes": int(total)}


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- not every backend reports it
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


# What XLA says when a program does not fit: TPU "Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm."
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds? the memory")
_USED = re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm"
                   r"|required for HLO temporaries \(([\d.]+)([KMGT])?\) exceeds")


def _compile(report: Report, lowered_fn) -> Report:
  """Compile `lowered_fn()` and fill the report; a compile that fails for lack of memory is a verdict, not an error."""
  start = time.perf_counter()
  try:
    compiled = lowered_fn().compile()
  except Exception as e:  # noqa: BLE001
    report.compile_seconds = time.perf_counter() - start
    text = str(e)
    if not _OOM.search(text):
      raise
    report.fits = False
    used = _USED.search(text)
    if used:  # a lower bound on the total: what the compiler had counted when it gave up
      unit = {"K": 2 ** 10, "M": 2 ** 20, "G": GiB, "T": 2 ** 40, None: 1}
      value, suffix = (used.group(1), used.group(2)) if used.group(1) else (used.group(5), used.group(6))
      report.total_bytes = int(float(value) * unit[suffix])
    report.error = "does not fit: " + text.strip().splitlines()[0][:300]
    return report
  report.compile_seconds = time.perf_counter() - start
  for k, v in _memory(compiled).items():
    setattr(report, k, v)
  report.fits = None if report.budget_bytes is None else report.total_bytes <= report.budget_bytes
  report.flops_xla_per_device = _xla_flops(compiled)
  report.collectives = collectives(compiled.as_text() or "")
  return report


def pretrain_report(config, devices, *, topology: str = "local", accum_steps: int | None = None,
                    remat: str | None = None, budget_gb: float = 0.0) -> Report:
  """Compile the pretraining step of `config` for `devices` with the given accumulation and remat."""
  mesh = sharding_lib.mesh_from_config(config, devices)
  cfg = steps.model_cfg(config)
  cfg = cfg.replace(remat=remat or cfg.remat)
  accum = int(accum_steps or config.optim.accum_steps or 1)
  step = steps.pretrain_step(config, mesh, cfg, accum_steps=accum)
  report = Report(program="pretrain", topology=topology, device_kind=devices[0].device_kind, devices=mesh.size,
                  mesh=dict(mesh.shape), batch_size=int(config.batch_size), accum_steps=accum, remat=cfg.remat,
                  dtype=cfg.dtype, budget_bytes=device_memory(devices, budget_gb),
                  flops_analytic=metrics.pretrain_step_flops(cfg, config.batch_size, step.leads))
  return _compile(report, lambda: step.jitted.lower(*steps.abstract_args(step, config.batch_size)))


def embed_report(config, devices, *, topology: str = "local", budget_gb: float = 0.0) -> Report:
  """Compile the 12-lead embedding forward (`steps.embed_forward`: one crop, unmasked, pooled features) at the
  config's batch for `devices`."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding_lib.mesh_from_config(config, devices)
  cfg = steps.model_cfg(config)
  steps.check_platform(cfg, mesh)
  graphdef, params = steps.encoder_graphdef_and_params(cfg, abstract=True)
  shardings = sharding_lib.tree_shardings(params, mesh, min_size=config.fsdp_min_size)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  leads = 12
  batch = steps.abstract_batch(config.batch_size, leads, cfg.window, batch_sharding)
  params = steps.sharded_shapes(params, shardings)
  fn = jax.jit(steps.embed_forward(graphdef), out_shardings=NamedSharding(mesh, P(tuple(mesh.axis_names))))
  report = Report(program="embed", topology=topology, device_kind=devices[0].device_kind, devices=mesh.size,
                  mesh=dict(mesh.shape), batch_size=int(config.batch_size), accum_steps=1, remat="none",
                  dtype=cfg.dtype, budget_bytes=device_memory(devices, budget_gb),
                  flops_analytic=config.batch_size * metrics.embed_forward_flops(cfg, leads))
  return _compile(report, lambda: fn.lower(params, batch["signal"], batch["lead_ids"], batch["lead_mask"]))


def finetune_report(ft, cfg, leads: int, devices, *, topology: str = "local", budget_gb: float = 0.0,
                    num_classes: int = 5) -> Report:
  """Compile `stmem finetune`'s update step (`stmem.steps.finetune_step`: encoder + linear head, every parameter
  trained, AdamW) under the fine-tuning config `ft` for the model `cfg` on `leads` lead slots, over `devices` at
  `ft.batch_size`, with `num_classes` outputs."""
  mesh = sharding_lib.mesh_from_config(ft, devices)
  steps.check_platform(cfg, mesh)
  model = nnx.eval_shape(lambda: Classifier(encoder_model(cfg, rngs=nnx.Rngs(0)), num_classes, float(ft.drop_path),
                                            rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  params = params.to_pure_dict()
  step = steps.finetune_step(ft, mesh, graphdef, params, kind="multilabel", depth=cfg.depth)
  batch_size = int(ft.batch_size)
  batch = {**steps.abstract_batch(batch_size, leads, cfg.window, step.batch_sharding),
           "labels": jax.ShapeDtypeStruct((batch_size, num_classes), jnp.float32, sharding=step.batch_sharding)}
  args = (steps.sharded_shapes(params, step.param_shardings), steps.sharded_shapes(step.abstract_opt,
          step.opt_shardings), batch, *steps.key_and_flag(step.replicated))
  report = Report(program="finetune", topology=topology, device_kind=devices[0].device_kind, devices=mesh.size,
                  mesh=dict(mesh.shape), batch_size=batch_size, accum_steps=1, remat=cfg.remat, dtype=cfg.dtype,
                  budget_bytes=device_memory(devices, budget_gb),
                  flops_analytic=metrics.finetune_step_flops(cfg, batch_size, leads))
  return _compile(report, lambda: step.jitted.lower(*args))


def accum_candidates(config, devices: int) -> list[int]:
  """Accumulation counts that divide each device's share of the batch, smallest first."""
  per_device = config.batch_size // devices if config.batch_size % devices == 0 else 0
  return [a for a in range(1, per_device + 1) if per_device % a == 0]


def fit(config, devices, *, topology: str = "local", budget_gb: float = 0.0, log=None) -> tuple[Report, list[Report]]:
  """The pretraining step as configured and, when it does not fit, the smallest accum_steps (then the next remat
  setting) that does. Returns (chosen report, every report compiled on the way).

  Each try is a compile (about 100 s for base on a 2-core host), so the search estimates instead of stepping:
  temporaries shrink about in proportion to the micro-batch, so from one compile at a remat setting it predicts the
  smallest count that fits, compiles that, and doubles while the prediction was short.
  accum_steps = 0 in the config means "derive it": the search starts from 1.
  """
  log = log or (lambda *_: None)
  tried: list[Report] = []
  mesh_size = sharding_lib.mesh_from_config(config, devices).size
  candidates = accum_candidates(config, mesh_size) or [1]
  start_accum = int(config.optim.accum_steps) or 1
  first_remat = steps.model_cfg(config).remat
  for remat in REMAT_ORDER[REMAT_ORDER.index(first_remat):]:
    accum = start_accum
    while True:
      report = pretrain_report(config, devices, topology=topology, accum_steps=accum, remat=remat,
                               budget_gb=budget_gb)
      tried.append(report)
      log(report)
      if report.fits is not False:  # fits, or no budget to hold it against
        return report, tried
      if report.temp_bytes is not None and report.total_bytes - report.temp_bytes >= report.budget_bytes:
        return report, tried  # the state alone exceeds the budget: no micro-batching or recomputation helps
      bigger = [a for a in candidates if a > accum]
      if not bigger:
        break
      accum = _predict(report, bigger, accum)
  return tried[-1], tried


def _predict(report: Report, bigger: list[int], accum: int) -> int:
  """The smallest count in `bigger` whose predicted total fits, from `report` compiled at `accum`."""
  if report.temp_bytes is not None and report.budget_bytes is not None:
    fixed = report.total_bytes - report.temp_bytes
    room = report.budget_bytes - fixed
    if room > 0:
      for a in bigger:
        if report.temp_bytes * accum / a <= room:
          return a
      return bigger[-1]
  elif report.total_bytes and report.budget_bytes:  # an out-of-memory compile: only the total is known
    need = report.total_bytes / report.budget_bytes
    for a in bigger:
      if a >= accum * need:
        return a
    return bigger[-1]
  return bigger[0]


def table(reports: list[Report]) -> str:
  """A fixed-width table of reports, one line each; bytes per device in GiB, FLOPs per step in TFLOP."""
  gib = lambda v: "-" if v is None else f"{v / GiB:.2f}"  # noqa: E731
  head = (f"{'program':8} {'topology':10} {'device':12} {'n':>3} {'batch':>5} {'accum':>5} {'remat':5} "
          f"{'args':>6} {'out':>6} {'temp':>6} {'total':>6} {'budget':>6}  {'verdict':12} {'TFLOP':>7} "
          f"{'xla/dev':>7} {'coll MB':>7} {'compile':>7}")
  lines = [head]
  for r in reports:
    verdict = {True: "fits", False: "does not fit", None: "no budget"}[r.fits]
    coll = sum(c["bytes"] for c in r.collectives.values()) / 1e6
    lines.append(f"{r.program:8} {r.topology:10} {r.device_kind[:12]:12} {r.devices:>3} {r.batch_size:>5} "
                 f"{r.accum_steps:>5} {r.remat:5} {gib(r.argument_bytes):>6} {gib(r.output_bytes):>6} "
                 f"{gib(r.temp_bytes):>6} {gib(r.total_bytes):>6} {gib(r.budget_bytes):>6}  {verdict:12} "
                 f"{(r.flops_analytic or 0) / 1e12:7.2f} {(r.flops_xla_per_device or 0) / 1e12:7.3f} {coll:7.1f} "
                 f"{(r.compile_seconds or 0):6.0f}s")
  return "\n".join(lines)
