"""Attention and products in bf16 (softmax statistics in f32), lead masks on every path, cuDNN refused off GPU, and
per-platform choices made by the lowering platform (a TPU program compiled on a CPU host carries no CPU choice)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain as pretrain_config
from stmem import reference_weights as convert, sharding, steps
from stmem.models import StMem, layers, model_config


def _reference_model(reference_fixture, dtype):
  conv = convert.from_reference({k: v for k, v in reference_fixture.items() if k.startswith("param/")})
  model = StMem(model_config("tiny", dtype=dtype), rngs=nnx.Rngs(0))
  assert convert.apply(model, conv) == []
  return model


def test_bf16_forward_on_the_reference_fixture_is_within_1_percent_of_f32(reference_fixture):
  series = jnp.asarray(reference_fixture["input/series"])
  ids = jnp.tile(jnp.arange(12), (series.shape[0], 1))
  noise = jnp.asarray(reference_fixture["input/mask_noise"])
  reference = float(reference_fixture["output/pretrain_loss"])  # the reference implementation's float32 loss
  f32 = float(_reference_model(reference_fixture, "float32")(series, ids, noise=noise)["loss"])
  bf16 = float(_reference_model(reference_fixture, "bfloat16")(series, ids, noise=noise)["loss"])
  assert abs(f32 - reference) <= 1e-4
  assert abs(bf16 - reference) / reference <= 0.01 and bf16 != f32  # bf16 really ran: not bit-equal to f32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_absent_leads_take_no_part_in_attention(dtype):
  cfg = model_config("tiny", dtype=dtype)
  model = StMem(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  signal = rng.standard_normal((2, 12, cfg.window)).astype(np.float32)
  mask = np.ones((2, 12), bool)
  mask[:, 9:] = False
  other = signal.copy()
  other[:, 9:] = 10 * rng.standard_normal(other[:, 9:].shape)  # different content in the absent slots only
  noise = jnp.asarray(rng.uniform(size=(2, 12, cfg.num_patches)), jnp.float32)
  ids = jnp.tile(jnp.arange(12), (2, 1))
  a = model(jnp.asarray(signal), ids, jnp.asarray(mask), noise=noise)
  b = model(jnp.asarray(other), ids, jnp.asarray(mask), noise=noise)
  np.testing.assert_array_equal(np.asarray(a["latent"][:, :9]), np.asarray(b["latent"][:, :9]))
  assert float(a["loss"]) == float(b["loss"])


def test_cudnn_attention_is_refused_off_gpu_with_the_fix():
  config = pretrain_config.get_config("tiny")
  config.model.attention, config.model.dtype = "cudnn", "bfloat16"
  mesh = sharding.make_mesh(sharding.parse_mesh("data:-1"), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="attention='cudnn' runs only on NVIDIA GPUs.*--config.model.attention=xla"):
    steps.pretrain_step(config, mesh, steps.model_cfg(config))
  with pytest.raises(ValueError, match="attention must be one of"):
    model_config("tiny", attention="flash")


def test_cpu_only_transposed_copy_is_chosen_by_the_lowering_platform():
  # The weight-gradient operand is copied transposed in tiles on CPU only (layers._transposed); lowered for TPU or
  # GPU from this CPU process, the program must hold the plain transpose.
  x = jax.ShapeDtypeStruct((128, 256), jnp.bfloat16)
  lowered = {p: jax.jit(layers._transposed).trace(x).lower(lowering_platforms=(p,)).as_text()
             for p in ("cpu", "tpu", "cuda")}
  assert lowered["cpu"].count("stablehlo.reshape") == 2
  assert lowered["tpu"].count("stablehlo.reshape") == 0 and lowered["cuda"].count("stablehlo.reshape") == 0
