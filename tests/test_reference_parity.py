"""The model computes the reference implementation's function: the fixture's weights, converted, give its outputs."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmem import reference_weights as convert
from stmem.models import StMem, model_config

TOL = 1e-4


@pytest.fixture(scope="module")
def converted(reference_fixture):
  conv = convert.from_reference({k: v for k, v in reference_fixture.items() if k.startswith("param/")})
  model = StMem(model_config("tiny"), rngs=nnx.Rngs(123))
  assert convert.apply(model, conv) == []
  return model, reference_fixture


def _ids(batch, n):
  return jnp.tile(jnp.arange(n), (batch, 1))


def test_converter_knows_every_reference_name(reference_fixture):
  conv = convert.from_reference({k: v for k, v in reference_fixture.items() if k.startswith("param/")})
  assert conv.unknown == []
  # The reference lists its shared patch embedding twice; the second copy is recognised as an alias.
  assert sorted(conv.aliases) == sorted(k[len("param/"):] for k in reference_fixture
                                        if k.startswith("param/to_patch_embedding."))


def test_pretraining_outputs_match(converted):
  model, ref = converted
  series = jnp.asarray(ref["input/series"])
  out = model(series, _ids(2, 12), noise=jnp.asarray(ref["input/mask_noise"]))
  assert abs(float(out["loss"]) - float(ref["output/pretrain_loss"])) <= TOL
  assert np.abs(np.asarray(out["pred"]) - ref["output/pretrain_pred"]).max() <= TOL
  np.testing.assert_array_equal(np.asarray(out["mask"]), ref["output/pretrain_mask"])
  np.testing.assert_array_equal(np.asarray(out["ids_restore"]), ref["output/ids_restore"])
  latent = np.asarray(out["latent"]).reshape(ref["output/encoder_latent_masked"].shape)
  assert np.abs(latent - ref["output/encoder_latent_masked"]).max() <= TOL


@pytest.mark.parametrize("name,num_leads", [("12lead", 12), ("leadI", 1), ("limb6", 6)])
def test_pooled_features_match(converted, name, num_leads):
  model, ref = converted
  series = jnp.asarray(ref["input/series"])[:, :num_leads]
  pooled = model.encoder.features(series, _ids(2, num_leads))["pooled"]
  assert np.abs(np.asarray(pooled) - ref[f"output/encoder_features_{name}"]).max() <= TOL


def test_round_trip_to_reference_names(converted):
  model, ref = converted
  flat = {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  back = convert.to_reference(flat)
  assert set(back) == {k[len("param/"):] for k in ref if k.startswith("param/")}
  for name, value in back.items():
    np.testing.assert_array_equal(value, ref["param/" + name])


def test_unknown_and_missing_names_are_reported(reference_fixture):
  state = {k: v for k, v in reference_fixture.items() if k.startswith("param/")}
  state["param/encoder.block7.attn.fn.to_qkv.weight"] = np.zeros((3, 3), np.float32)
  state["param/some_new_thing"] = np.zeros(3, np.float32)
  del state["param/decoder_norm.bias"]
  conv = convert.from_reference(state)
  assert "some_new_thing" in conv.unknown
  model = StMem(model_config("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError) as err:
    convert.apply(model, conv)
  msg = str(err.value)
  assert "some_new_thing" in msg and "decoder_norm.bias" in msg and "encoder.block7.attn.fn.to_qkv.weight" in msg


def test_encoder_only_names_load_into_an_encoder(reference_fixture):
  state = {k[len("param/encoder."):]: v for k, v in reference_fixture.items() if k.startswith("param/encoder.")}
  conv = convert.from_reference(state)
  assert conv.encoder_only and conv.unknown == []
  model = StMem(model_config("tiny"), rngs=nnx.Rngs(0))
  convert.apply(model.encoder, conv)
  series = jnp.asarray(reference_fixture["input/series"])
  pooled = model.encoder.features(series, _ids(2, 12))["pooled"]
  assert np.abs(np.asarray(pooled) - reference_fixture["output/encoder_features_12lead"]).max() <= TOL


def test_npz_reader_refuses_pickles(tmp_path):
  path = tmp_path / "evil.npz"
  np.savez(path, **{"param/x": np.array([object()], dtype=object)})
  from data_pipelines.errors import DataError
  with pytest.raises(DataError, match="pickled"):
    convert.load_reference_file(path)
