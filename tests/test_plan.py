"""`stmem plan`: the production pretraining step compiled ahead of time for a TPU topology from this CPU host (libtpu,
the `[tpu]` extra), its per-device memory and FLOPs, the fit verdict and the accum/remat search; `stmem pretrain`
refusing a step that the planner says cannot fit."""
import json

import pytest

from configs import pretrain as pretrain_config
from data_pipelines.errors import UsageError
from stmem import memory_plan as plan
from stmem.programs import plan as plan_program
from stmem.programs import pretrain

TOPOLOGY = "v5e:2x2"  # 4 chips of 16 GiB
BATCH = 8             # 2 ECGs per chip: the TPU compile time grows with the batch (17 s here against 70 s at 64)


def _config(**model):
  c = pretrain_config.get_config("tiny")
  c.batch_size = BATCH
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


@pytest.fixture(scope="module")
def devices():
  try:
    return plan.devices_for(TOPOLOGY)
  except ValueError as e:  # libtpu absent: CI installs the [tpu] extra, so this fails there rather than skipping
    import os
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      pytest.fail(str(e))
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def cli_report(devices, tmp_path_factory):
  """`stmem plan` for the tiny config as it is, on v5e:2x2: its printed table and its JSON."""
  path = tmp_path_factory.mktemp("plan") / "plan.json"
  import contextlib
  import io
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = plan_program.main(["--config", "configs/pretrain.py:tiny", f"--config.batch_size={BATCH}",
                            "--topology", TOPOLOGY, "--programs", "pretrain", "--no-fit", "--json", str(path)])
  return rc, out.getvalue(), json.loads(path.read_text())


def test_tiny_step_compiles_for_v5e_and_reports_bytes_and_flops_per_device(cli_report):
  rc, text, data = cli_report
  assert rc == 0
  (r,) = data["reports"]
  assert r["program"] == "pretrain" and r["device_kind"] == "TPU v5 lite" and r["devices"] == 4
  assert r["mesh"] == {"data": 4, "fsdp": 1}
  for field in ("argument_bytes", "output_bytes", "temp_bytes"):
    assert r[field] > 0, field
  assert r["total_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
  assert r["alias_bytes"] > 0.5 * r["argument_bytes"]  # parameters and optimiser state donated, as in pretrain
  assert r["budget_bytes"] == int(16 * 2 ** 30 * plan.USABLE_FRACTION) and r["fits"] is True
  # The step's gradient is summed over the 4 chips: a data-parallel step has an all-reduce.
  assert r["collectives"]["all-reduce"]["count"] >= 1 and r["collectives"]["all-reduce"]["bytes"] > 0
  # Per chip, XLA counts the scanned blocks once: its figure is below the analytic quarter of the step.
  assert 0 < r["flops_xla_per_device"] < r["flops_analytic"] / 4
  line = text.splitlines()[1]
  assert f"{r['total_bytes'] / 2 ** 30:.2f}" in line and f"{r['flops_analytic'] / 1e12:.2f}" in line and "fits" in line


def test_remat_reduces_temporary_bytes():
  # On one local CPU device, `small` at batch 16: activations dominate the temporaries there. (For tiny on v5e:2x2
  # the TPU compiler's plan was already lean and block remat added buffers: 19.6 against 15.0 MB.)
  import jax
  config = _config(variant="small")
  config.batch_size = 16
  none = plan.pretrain_report(config, jax.devices()[:1], remat="none")
  block = plan.pretrain_report(config, jax.devices()[:1], remat="block")
  assert block.remat == "block" and block.argument_bytes == none.argument_bytes
  assert block.temp_bytes < 0.8 * none.temp_bytes, (block.temp_bytes, none.temp_bytes)


@pytest.fixture(scope="module")
def local_report():
  """The tiny step as configured, compiled for one local device (seconds, and in the persistent cache; a TPU
  topology compile is neither): the memory search below works alike on any device set."""
  import jax
  return plan.pretrain_report(_config(), jax.devices()[:1])


def test_accum_steps_zero_picks_a_count_the_planner_says_fits(local_report):
  import jax
  r = local_report
  fixed = r.total_bytes - r.temp_bytes
  # Room for about 60 % of the unsplit step's temporaries: one micro-batch per step cannot fit, two can.
  config = _config()
  config.optim.accum_steps = 0
  config.memory_budget_gb = (fixed + 0.6 * r.temp_bytes) / 2 ** 30
  chosen, tried = plan.fit(config, jax.devices()[:1], budget_gb=config.memory_budget_gb)
  assert tried[0].accum_steps == 1 and tried[0].fits is False
  assert chosen.fits is True and chosen.accum_steps > 1 and chosen.remat == "none"
  assert chosen.total_bytes <= chosen.budget_bytes
  assert BATCH % chosen.accum_steps == 0
  assert f"--config.optim.accum_steps={chosen.accum_steps}" in plan_program._advice(config, chosen)


def test_a_config_that_cannot_fit_is_reported_with_the_fix(local_report, capsys):
  r = local_report
  budget_gb = (r.total_bytes - r.temp_bytes) * 0.5 / 2 ** 30  # below the parameters and optimiser state alone
  rc = plan_program.main(["--config", "configs/pretrain.py:tiny", f"--config.batch_size={BATCH}",
                          "--config.num_devices=1", f"--config.memory_budget_gb={budget_gb}", "--topology", "local",
                          "--programs", "pretrain"])
  out = capsys.readouterr().out
  assert rc == 1
  assert "does not fit" in out.splitlines()[1]
  assert "pretrain does not fit" in out and "fsdp" in out and "more devices" in out


def test_pretrain_refuses_before_the_first_step_a_step_that_does_not_fit(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.mesh, config.num_devices = "data:-1,fsdp:1", 1
  config.memory_budget_gb = 0.001  # 1 MiB: far below the tiny step's plan
  with pytest.raises(pretrain.DoesNotFit, match=r"GiB per device.*accum_steps|remat"):
    pretrain.run(config, tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_the_finetuning_step_is_planned_with_finetunes_own_step(tmp_path, monkeypatch):
  # `stmem plan --programs finetune` compiles `stmem.steps.finetune_step`, the step `stmem finetune` runs
  # (spied on here: a planner with its own copy of the step fails this test), from a fine-tuning config.
  import jax
  from stmem.models import model_config
  from stmem import metrics
  from stmem import steps
  built = []
  real = steps.finetune_step
  monkeypatch.setattr(steps, "finetune_step", lambda *a, **k: built.append(k) or real(*a, **k))
  path = tmp_path / "plan.json"
  rc = plan_program.main(["--config", "finetune:test", "--config.batch_size=16", "--config.data.lead_set=I+II",
                          "--topology", "local", "--classes", "3", "--json", str(path)])
  assert rc == 0 and len(built) == 1 and built[0]["kind"] == "multilabel"
  (r,) = json.loads(path.read_text())["reports"]
  assert r["program"] == "finetune" and r["devices"] == len(jax.devices()) and r["batch_size"] == 16
  assert r["argument_bytes"] > 0 and r["temp_bytes"] > 0
  assert r["alias_bytes"] > 0.5 * r["argument_bytes"]  # parameters and optimiser state donated, as in finetune
  assert r["flops_analytic"] == metrics.finetune_step_flops(model_config("tiny"), 16, leads=2)
  if len(jax.devices()) > 1:  # the batch is split over the devices: the gradient is all-reduced
    assert r["collectives"]["all-reduce"]["count"] >= 1
  # From a pretraining config: the fine-tuning of its model on 12 leads, at the fine-tuning batch (not the
  # pretraining batch), a multiple of the devices.
  from configs import finetune as finetune_config
  batch = finetune_config.get_config().batch_size
  batch = -(-batch // len(jax.devices())) * len(jax.devices())
  rc = plan_program.main(["--config", "pretrain:tiny", "--config.batch_size=512", "--topology", "local",
                          "--programs", "finetune", "--json", str(path)])
  (r,) = json.loads(path.read_text())["reports"]
  assert rc == 0 and len(built) == 2 and r["program"] == "finetune" and r["batch_size"] == batch
  assert r["flops_analytic"] == metrics.finetune_step_flops(model_config("tiny"), batch, leads=12)
  # A fine-tuning config plans nothing else.
  assert plan_program.main(["--config", "finetune:test", "--programs", "pretrain"]) == 2


def test_a_mesh_needing_more_devices_than_exist_is_a_usage_error():
  """`stmem plan` builds its mesh as the programs do (`sharding.mesh_from_config`): more devices than the topology
  has is refused in one line, never planned on a silently smaller mesh."""
  import jax

  from stmem import programs
  n = len(jax.devices())
  for flag in (f"--config.num_devices={n + 1}", f"--config.mesh=data:{2 * n}"):
    with pytest.raises(UsageError, match="device"):
      plan_program.main(["--config", "pretrain:tiny", flag, "--topology", "local", "--no-fit", "--programs", "embed"])
    assert programs.run(["plan", "--config", "pretrain:tiny", flag, "--topology", "local", "--no-fit",
                         "--programs", "embed"]) == 2


def test_describing_a_topology_leaves_the_environment_as_it_was(devices, monkeypatch):
  """libtpu's settings are set only while it describes a topology, for a name it knows or not; a user's value is
  kept."""
  import os
  for name in plan.LIBTPU_ENVIRONMENT:
    monkeypatch.delenv(name, raising=False)
  before = dict(os.environ)
  assert plan.devices_for(TOPOLOGY)
  with pytest.raises(ValueError, match="cannot describe TPU topology"):
    plan.devices_for("v5e:nonsense")
  assert dict(os.environ) == before
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "mine")
  plan.devices_for(TOPOLOGY)
  assert os.environ["TPU_WORKER_HOSTNAMES"] == "mine" and "ALLOW_MULTIPLE_LIBTPU_LOAD" not in os.environ
