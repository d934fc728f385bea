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
