"""Meshes and shardings from config, and the one way parameters reach the devices.

`config.mesh` is a string of `axis:size` pairs, one size may be -1 (all remaining devices), e.g. "data:-1,fsdp:1":
data-parallel by default, FSDP when the fsdp axis is above 1; `config.num_devices` (0: every device of every
process) says how many devices the mesh spans. Every program builds its mesh with `mesh_from_config`, so a mesh that
needs more devices than exist is the same one-line usage error everywhere. Parameters and optimiser state are
sharded FSDP-style: each array above `min_size` elements is split along its largest dimension that the fsdp axis
size divides; smaller arrays are replicated. The batch is split over every mesh axis (data and fsdp together).
Parameters are put in their shardings by `place`: created there by a function, or copied there from host arrays.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def parse_mesh(spec: str) -> list[tuple[str, int]]:
  """'data:-1,fsdp:2' -> [('data', -1), ('fsdp', 2)]."""
  axes = []
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    axes.append((name, int(size or -1)))
  return axes


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of a program's config: `config.mesh` over the first `config.num_devices` of `devices` (default: every
  device of every process; `stmem plan` passes the devices of a topology it compiles for)."""
  return make_mesh(parse_mesh(config.mesh), devices=program_devices(config.get("num_devices", 0), devices))


def program_devices(num_devices: int = 0, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
  """The devices a program runs on, from its `config.num_devices`: 0 every device, k the first k (single-process
  runs only). Asking for more than there are is a usage error, not a silently smaller run."""
  from data_pipelines.errors import UsageError
  available = list(jax.devices() if devices is None else devices)
  num_devices = int(num_devices or 0)
  if not num_devices:
    return available
  if devices is None and jax.process_count() > 1:
    raise UsageError(f"--config.num_devices={num_devices} applies to one process; with {jax.process_count()} "
                     f"processes every device of every process is used: leave it at 0")
  if not 0 < num_devices <= len(available):
    raise UsageError(f"--config.num_devices={num_devices}: there are {len(available)} "
                     f"{available[0].platform} device(s); use 0 (all) or 1-{len(available)}")
  return available[:num_devices]


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {list(axes)}: at most one axis may have size -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {list(axes)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    from data_pipelines.errors import UsageError  # a config the user chose: one line from `stmem`, with the fix
    raise UsageError(f"mesh {list(axes)} needs {math.prod(sizes)} devices, {len(devices)} are available (config "
                     f"`mesh`); on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(sizes)} "
                     "gives that many fake devices")
  # jax.make_mesh orders the devices by their physical topology (rings and tori on TPU, NVLink islands on GPU), which
  # a plain reshape of jax.devices() does not. Auto axes: the model is written sharding-neutral and XLA propagates
  # from the inputs' shardings (make_mesh's default in jax 0.10 is Explicit axes).
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices)


def fsdp_spec(shape: Sequence[int], axis_size: int, fsdp_axis: str = "fsdp", min_size: int = 2 ** 14) -> P:
  """Split the largest dimension divisible by the fsdp axis size; replicate small or indivisible arrays."""
  if axis_size <= 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = fsdp_axis
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, fsdp_axis: str = "fsdp", min_size: int = 2 ** 14):
  """NamedShardings for every array in a tree (parameters or optimiser state) under the FSDP rule."""
  size = mesh.shape.get(fsdp_axis, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size, fsdp_axis, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over every mesh axis; a global batch must be divisible by the device count."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place(tree_or_fn, shardings, *args):
  """Parameters (or optimiser state) as global arrays in `shardings` (one for all, or a tree of them); each device
  holds only its slice, and this works across processes.

  Given a function, its result is created directly in the shardings (`jax.jit` with `out_shardings`, called on
  `args`): no device ever holds more than its slice, nor the host the whole. Given a tree of host arrays (read from
  a checkpoint, a new head), each device receives its slice of them."""
  if callable(tree_or_fn):
    return jax.jit(tree_or_fn, out_shardings=shardings)(*args)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _place(x, shardings), tree_or_fn)
  return jax.tree.map(_place, tree_or_fn, shardings)


def _place(x, sharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:  # already there (an evaluator's copy of live parameters)
    return x
  return jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i])
