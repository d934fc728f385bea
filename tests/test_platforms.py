"""The `tpu` extra stays quiet off TPU: on a host without TPU chips a `stmem` program neither loads libtpu nor prints
its initialisation errors, a user's JAX_PLATFORMS is kept, a TPU VM is left as it is, and `stmem plan` still
describes a TPU topology (the compile itself: tests/test_plan.py)."""
import os
import pathlib
import subprocess
import sys

import pytest

from stmem import platforms

from tests.helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Lines libtpu writes when it initialises on a host without TPU chips.
LIBTPU_LINES = ("TPU accelerator type", "TPU worker hostnames", "libtpu", "Source Location Trace", "InitGoogle")


def _host(tmp_path, *files: str, pci_vendor: str | None = None) -> str:
  """A fake filesystem root holding the given device files (and one PCI device of the given vendor)."""
  for f in files:
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / f).write_text("")
  if pci_vendor is not None:
    dev = tmp_path / "sys/bus/pci/devices/0000:00:04.0"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(pci_vendor + "\n")
  return str(tmp_path)


def test_a_host_without_tpu_or_gpu_runs_jax_on_the_cpu_only(tmp_path):
  root = _host(tmp_path, "dev/null", pci_vendor="0x8086")
  assert platforms.settings({}, root=root, libtpu_installed=True) == {"JAX_PLATFORMS": "cpu"}
  assert platforms.settings({}, root=root, libtpu_installed=False) == {}  # nothing to keep quiet


@pytest.mark.parametrize("files,vendor", [((), "0x1ae0"), (("dev/accel0",), None), (("dev/vfio/0",), None)])
def test_a_tpu_vm_is_left_as_it_is(tmp_path, files, vendor):
  root = _host(tmp_path, *files, pci_vendor=vendor)
  assert platforms.tpu_chips_visible(root)
  assert platforms.settings({}, root=root, libtpu_installed=True) == {}


@pytest.mark.parametrize("gpu", ["dev/nvidia0", "dev/nvidiactl", "dev/dxg", "dev/kfd"])
def test_a_gpu_host_is_left_as_it_is(tmp_path, gpu):
  root = _host(tmp_path, gpu, "dev/vfio/vfio")  # the VFIO control file alone is no TPU
  assert not platforms.tpu_chips_visible(root) and platforms.gpu_visible(root)
  assert platforms.settings({}, root=root, libtpu_installed=True) == {}


@pytest.mark.parametrize("name,value", [("JAX_PLATFORMS", ""), ("JAX_PLATFORMS", "cuda"), ("JAX_FORCE_TPU_INIT", "1")])
def test_a_users_choice_is_kept(tmp_path, name, value):
  assert platforms.settings({name: value}, root=_host(tmp_path), libtpu_installed=True) == {}


def test_apply_changes_nothing_once_jax_is_imported():
  import jax  # noqa: F401 -- imported by the test session already; the point is that it is
  env: dict[str, str] = {}
  assert platforms.apply(env) == {} and env == {}


def _stmem(args, env, **kw):
  code = "import sys; from stmem import cli; sys.argv[0] = 'stmem'; sys.exit(cli.main(sys.argv[1:]))"
  return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=ROOT,
                        timeout=300, **kw)


def _libtpu_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if any(s in line for s in LIBTPU_LINES)]


def test_stmem_on_this_cpu_host_prints_no_libtpu_lines(tmp_path):
  """A program that starts JAX's backends (a mesh wider than the host: a usage error once the devices are counted),
  run as a user runs it (no JAX_PLATFORMS): no libtpu line. The same command with JAX_PLATFORMS= (JAX's own choice,
  which a user may ask for) shows that this host does print them when libtpu initialises."""
  if not platforms._libtpu_installed():
    pytest.skip("libtpu (the tpu extra) is not installed: nothing to keep quiet")
  if platforms.tpu_chips_visible() or platforms.gpu_visible():
    pytest.skip("this host has an accelerator: the behaviour under test is a CPU host's")
  env = {k: v for k, v in os.environ.items() if k not in platforms.USER_CHOICES}
  env.update(PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags(1),
             # libtpu keeps quiet while another process on the host holds its lock file; this makes every start
             # initialise it, as on a host where nothing else runs
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  args = ["pretrain", "--config", "pretrain:tiny", "--config.mesh=data:64", "--workdir", str(tmp_path / "run")]

  helped = _stmem(["probe", "--help"], env)
  assert helped.returncode == 0 and "usage: stmem probe" in helped.stdout
  assert _libtpu_lines(helped.stderr) == []

  quiet = _stmem(args, env)
  assert quiet.returncode == 2 and "needs 64 devices" in quiet.stderr, quiet.stderr[-2000:]
  assert _libtpu_lines(quiet.stderr) == [], quiet.stderr

  loud = _stmem(args, {**env, "JAX_PLATFORMS": ""})
  assert loud.returncode == 2 and "needs 64 devices" in loud.stderr, loud.stderr[-2000:]
  assert _libtpu_lines(loud.stderr), "with JAX's own choice libtpu initialises here and says so"


def test_describing_a_tpu_topology_on_this_host_prints_no_libtpu_lines():
  """`stmem plan --topology v5e:2x2` loads libtpu by itself; its search for this host's own chips says nothing."""
  if not platforms._libtpu_installed():
    pytest.skip("libtpu (the tpu extra) is not installed")
  code = ("from stmem import memory_plan; d = memory_plan.devices_for('v5e:2x2'); "
          "print(len(d), d[0].device_kind)")
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0 and out.stdout.split() == ["4", "TPU", "v5", "lite"], out.stderr[-2000:]
  assert _libtpu_lines(out.stderr) == [], out.stderr


ZEN1_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n\n"
ZEN4_CPUINFO = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n\n"


def test_the_cpus_bfloat16_products_are_read_from_cpuinfo():
  assert platforms.cpu_has_bf16_products(ZEN1_CPUINFO) is False
  assert platforms.cpu_has_bf16_products(ZEN4_CPUINFO) is True
  assert platforms.cpu_has_bf16_products(ARM_CPUINFO) is True
  assert platforms.cpu_has_bf16_products("processor\t: 0\n") is None  # no feature line: unknown


def test_bfloat16_on_a_cpu_without_bf16_products_gets_a_line_of_advice_and_nothing_else_does():
  advice = platforms.bf16_advice("cpu", "bfloat16", ZEN1_CPUINFO)
  assert "--config.model.dtype=float32" in advice and "AVX512_BF16" in advice
  assert platforms.bf16_advice("cpu", "bfloat16", ZEN4_CPUINFO) is None
  assert platforms.bf16_advice("cpu", "float32", ZEN1_CPUINFO) is None
  assert platforms.bf16_advice("gpu", "bfloat16", ZEN1_CPUINFO) is None  # an accelerator's own business
  assert platforms.bf16_advice("cpu", "bfloat16", "") is None              # unknown CPU: no claim


def test_pretraining_in_bfloat16_on_such_a_cpu_says_so_in_its_log(tmp_path, monkeypatch, capfd):
  from configs import pretrain as pretrain_config
  from stmem.programs import pretrain
  monkeypatch.setattr(platforms, "cpu_has_bf16_products", lambda cpuinfo=None: False)
  c = pretrain_config.get_config("tiny")
  c.batch_size, c.total_steps, c.warmup_steps, c.log_every = 8, 1, 1, 1
  c.mesh, c.num_devices, c.model.dtype = "data:-1,fsdp:1", 1, "bfloat16"
  c.data.num_synthetic, c.checkpoint.every, c.checkpoint.async_save = 8, 1, False
  c.evals = type(c.evals)()
  pretrain.run(c, tmp_path / "run")
  err = capfd.readouterr().err
  assert "model.dtype=bfloat16 on a CPU without bfloat16 product instructions" in err
