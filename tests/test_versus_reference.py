"""benchmarks.versus_reference: how it refuses without the reference, its arguments, and how it classifies the
operations of a profile (the timing itself needs the reference's code, which is never part of stmem)."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import reference, versus_reference
from stmem.models import layers


def test_without_a_reference_it_says_how_to_get_one_and_exits_2(capsys):
  assert versus_reference.main(["--variant", "tiny"]) == 2
  err = capsys.readouterr().err
  assert "--reference_repo" in err and "git clone https://github.com/bakqui/ST-MEM" in err and "CC BY-NC" in err


def test_a_folder_without_the_reference_models_exits_2(tmp_path, capsys):
  assert versus_reference.main(["--reference_repo", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert str(tmp_path) in err and "models/encoder/st_mem_vit.py" in err and "git clone" in err
  (tmp_path / "models" / "encoder").mkdir(parents=True)
  (tmp_path / "models" / "encoder" / "st_mem_vit.py").write_text("")
  assert reference.problem(str(tmp_path)) is None


def test_arguments():
  args = versus_reference.parse(["--reference_repo", "x", "--workloads", "embed", "--dtypes", "bfloat16",
                                 "--threads", "1", "--profile"])
  assert (args.workloads, args.dtypes, args.threads, args.profile, args.variant, args.batch, args.repeats) == (
    ["embed"], ["bfloat16"], 1, True, "base", 8, 5)
  for bad in (["--workloads", "finetune"], ["--dtypes", "float16"], ["--repeats", "0"]):
    with pytest.raises(SystemExit) as e:
      versus_reference.parse(bad)
    assert e.value.code == 2


def test_levers_name_xla_settings_for_more_stmem_runs():
  args = versus_reference.parse(["--lever", "onednn", "--lever", "mine=--xla_cpu_use_xnnpack=false --xla_cpu_ftz=true"])
  assert args.levers == {"onednn": versus_reference.LEVERS["onednn"],
                         "mine": "--xla_cpu_use_xnnpack=false --xla_cpu_ftz=true"}
  assert versus_reference.parse([]).levers == {}
  for bad in (["--lever", "fastest"], ["--lever", "mine=-O3"], ["--lever", "=--xla_cpu_ftz=true"],
              ["--lever", "stmem=--xla_cpu_ftz=true"], ["--lever", "onednn", "--lever", "onednn"]):
    with pytest.raises(SystemExit) as e:
      versus_reference.parse(bad)
    assert e.value.code == 2
  env = versus_reference._with_flags({"XLA_FLAGS": "--xla_cpu_ftz=false", "A": "1"}, "--xla_cpu_use_onednn=true")
  assert env == {"XLA_FLAGS": "--xla_cpu_ftz=false --xla_cpu_use_onednn=true", "A": "1"}
  assert versus_reference._with_flags({}, "--xla_cpu_use_onednn=true")["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"


def test_the_program_fingerprint_tells_programs_apart_but_not_their_source_lines():
  def f(x, w):
    return layers.gelu(layers.matmul(x, w)).sum()

  def g(x, w):  # the same computation, written on other lines
    y = layers.matmul(x, w)
    return layers.gelu(y).sum()

  args = (jnp.ones((64, 64)), jnp.ones((64, 64)))
  fingerprint = versus_reference.program_fingerprint
  assert fingerprint(jax.jit(f).lower(*args).compile().as_text()) == fingerprint(
    jax.jit(g).lower(*args).compile().as_text())
  # Products by XLA's own dot thunks instead of YNNPACK fusions: the `eigen` lever's setting.
  eigen = jax.jit(f).lower(*args).compile(compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
  assert fingerprint(eigen.as_text()) != fingerprint(jax.jit(f).lower(*args).compile().as_text())


def test_torch_ops_are_classified():
  c = versus_reference.torch_class
  assert [c("aten::addmm", False), c("aten::bmm", False), c("aten::_softmax_backward_data", False),
          c("aten::native_layer_norm_backward", False), c("aten::gelu", False), c("aten::_to_copy", False),
          c("aten::add", False), c("aten::mul", True)] == [
    "matmul", "attention", "attention", "norm_gelu", "norm_gelu", "layout", "other", "optimizer"]


def test_compiled_instructions_are_classified():
  """A Linear product, attention's batched product and softmax, a LayerNorm and GELU, a transpose: each instruction
  of the compiled program falls in its class."""
  def f(x, w, scale):
    h = layers._layer_norm(x, scale, scale, 1e-6)
    y = layers.gelu(layers.matmul(h, w))
    qkv = jnp.concatenate([y, y, y], -1)[None]
    return layers.attention(qkv, 2, None).sum() + y.T.sum()

  x = jnp.ones((16, 8))
  compiled = jax.jit(f).lower(x, jnp.ones((8, 8)), jnp.ones((8,))).compile()
  comps, instrs, frame_fn = versus_reference._hlo_tables(compiled.as_text())
  classes = {versus_reference.xla_class(name, comps, instrs, frame_fn) for name in instrs}
  assert {"matmul", "attention", "norm_gelu"} <= classes


def test_a_lever_whose_child_stops_is_recorded_and_the_others_go_on(monkeypatch):
  """A setting that crashes XLA (a lever child dies while compiling or while timed) is a finding of the run, not the
  end of it; the reference or stmem child stopping still ends it."""
  class FakeChild:
    def __init__(self, label, impl, spec, env):
      if label == "crashes_at_start":
        raise versus_reference.ChildStopped(label, -4, "log line\npartition compile failed\n")
      self.label, self.impl, self.info, self.runs = label, impl, {"program": env.get("XLA_FLAGS", "")}, 0

    def ask(self, command):
      self.runs += 1
      if self.label == "crashes_later" and self.runs == 2:
        raise versus_reference.ChildStopped(self.label, -11, "Segmentation fault")
      return {"seconds": {"reference": 2.0}.get(self.impl, 1.0), "cpu_seconds": 1.5}

    def close(self):
      pass

  monkeypatch.setattr(versus_reference, "_Child", FakeChild)
  monkeypatch.setattr(versus_reference, "_environment", lambda: {})
  args = versus_reference.parse(["--reference_repo", ".", "--repeats", "3", "--lever", "eigen",
                                 "--lever", "crashes_at_start=--xla_cpu_ftz=true",
                                 "--lever", "crashes_later=--xla_cpu_ftz=false"])
  row = versus_reference.compare(args, "embed", "float32", {})
  assert row["stmem_over_reference"] == 0.5 and len(row["stmem"]["times"]) == 3
  assert row["levers"]["crashes_at_start"] == {"xla_flags": "--xla_cpu_ftz=true", "status": -4,
                                               "error": "partition compile failed"}
  assert row["levers"]["crashes_later"]["status"] == -11 and "crashes_later" not in row
  assert row["levers"]["eigen"]["over_stmem"] == 1.0 and not row["levers"]["eigen"]["same_program"]

  class StmemStops(FakeChild):
    def __init__(self, label, impl, spec, env):
      if label == "stmem":
        raise versus_reference.ChildStopped(label, 1, "Traceback")
      super().__init__(label, impl, spec, env)

  monkeypatch.setattr(versus_reference, "_Child", StmemStops)
  with pytest.raises(versus_reference.ChildStopped):
    versus_reference.compare(args, "embed", "float32", {})
