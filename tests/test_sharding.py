"""The same update step on 1 device and on 8 fake CPU devices (data x fsdp mesh) gives the same result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmem import sharding
from stmem.models import StMem, model_config
from stmem import optim
from stmem.sharding import parse_mesh
from stmem.steps import make_train_step


def _run(mesh, accum_steps=1, steps=2):
  cfg = model_config("tiny")

  def init(key):
    return nnx.state(StMem(cfg, rngs=nnx.Rngs(key)), nnx.Param).to_pure_dict()

  abstract = jax.eval_shape(init, jax.random.key(0))
  tx = optim.adamw(abstract, schedule=optim.warmup_cosine(1e-3, 1, 10), b1=0.9, b2=0.95, weight_decay=0.01,
                   frozen=(r".*pos_embedding",))
  p_sh = sharding.tree_shardings(abstract, mesh, min_size=1024)
  o_sh = sharding.tree_shardings(jax.eval_shape(tx.init, abstract), mesh, min_size=1024)
  params = jax.jit(init, out_shardings=p_sh)(jax.random.key(0))
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: StMem(cfg, rngs=nnx.Rngs(0))))
  b_sh = sharding.batch_sharding(mesh)
  step = jax.jit(make_train_step(graphdef, tx, accum_steps), in_shardings=(p_sh, o_sh, b_sh, None, None),
                 out_shardings=(p_sh, o_sh, None, None), donate_argnums=(0, 1))
  rng = np.random.default_rng(0)
  ok = jnp.asarray(True)
  losses = []
  for i in range(steps):
    batch = {"signal": rng.standard_normal((8, 12, cfg.window)).astype(np.float32),
             "lead_ids": np.tile(np.arange(12, dtype=np.int32), (8, 1)), "lead_mask": np.ones((8, 12), bool)}
    batch["lead_mask"][1, 6:] = False
    batch = {k: jax.device_put(v, b_sh) for k, v in batch.items()}
    params, opt_state, metrics, ok = step(params, opt_state, batch, jax.random.key(i), ok)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(params), params


@pytest.fixture(scope="module")
def runs():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  one = sharding.make_mesh(parse_mesh("data:-1,fsdp:1"), devices=jax.devices()[:1])
  eight = sharding.make_mesh(parse_mesh("data:2,fsdp:4"))
  return _run(one), _run(eight)


def test_fsdp_actually_shards_parameters(runs):
  params = runs[1][2]
  qkv = params["encoder"]["blocks"]["attn"]["qkv"]["kernel"]  # (depth 2, 128, 384): blocks stacked on axis 0
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert qkv.addressable_shards[0].data.shape == (2, 128, 384 // 4)
  assert params["encoder"]["sep_embedding"].sharding.spec == jax.sharding.PartitionSpec()  # small: replicated


def test_one_device_equals_eight_devices(runs):
  (loss1, params1, _), (loss8, params8, _) = runs
  np.testing.assert_allclose(loss1, loss8, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params1)[0], jax.tree.leaves(params8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_key_bias_gets_no_gradient():
  # Its true gradient is zero (softmax is shift-invariant); the model stops it so that Adam cannot amplify float
  # noise into layout-dependent drift. Only weight decay moves it.
  grads = _gradients(sharding.make_mesh(parse_mesh("data:-1,fsdp:1"), devices=jax.devices()[:1]))
  qkv_bias = grads["encoder"]["blocks"]["attn"]["qkv"]["bias"][0]  # block 0
  width = qkv_bias.shape[0] // 3
  assert not qkv_bias[width:2 * width].any()
  assert np.abs(qkv_bias[:width]).max() > 0 and np.abs(qkv_bias[2 * width:]).max() > 0


def _tiny_with_identity_optimiser():
  """A tiny model's graphdef and parameters, and an optax-like transformation whose update is the gradient itself,
  so that a step's new params - params = the gradient."""
  cfg = model_config("tiny")
  graphdef, params = nnx.split(StMem(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  identity = type("Identity", (), {"init": lambda self, p: (), "update": lambda self, g, s, p=None: (g, s)})()
  return cfg, graphdef, nnx.to_pure_dict(params), identity


def _gradients(mesh):
  """One step's gradients (no optimiser in between) on a mesh, as numpy."""
  cfg, graphdef, params, identity = _tiny_with_identity_optimiser()
  rng = np.random.default_rng(2)
  batch = {"signal": rng.standard_normal((8, 12, cfg.window)).astype(np.float32),
           "lead_ids": np.tile(np.arange(12, dtype=np.int32), (8, 1)), "lead_mask": np.ones((8, 12), bool)}
  p_sh = sharding.tree_shardings(params, mesh, min_size=1024)
  step = jax.jit(make_train_step(graphdef, identity, 1),
                 in_shardings=(p_sh, None, sharding.batch_sharding(mesh), None, None))
  new, _, _, _ = step(jax.device_put(params, p_sh), (), batch, jax.random.key(0), jnp.asarray(True))
  return jax.tree.map(lambda n, p: np.asarray(n) - np.asarray(p), jax.device_get(new), params)


def test_one_device_equals_eight_devices_gradients():
  """The sharded step's gradients equal one device's, every element to 1e-5."""
  one = _gradients(sharding.make_mesh(parse_mesh("data:-1,fsdp:1"), devices=jax.devices()[:1]))
  eight = _gradients(sharding.make_mesh(parse_mesh("data:2,fsdp:4")))
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_gradient_accumulation_equals_the_whole_batch():
  # Compared before the optimiser, so that the accumulated gradient itself is what is checked.
  cfg, graphdef, params, identity = _tiny_with_identity_optimiser()
  rng = np.random.default_rng(1)
  batch = {"signal": jnp.asarray(rng.standard_normal((4, 12, cfg.window)), jnp.float32),
           "lead_ids": jnp.tile(jnp.arange(12), (4, 1)), "lead_mask": jnp.ones((4, 12), bool)}
  whole = jax.jit(make_train_step(graphdef, identity, 1))
  split = jax.jit(make_train_step(graphdef, identity, 2))
  key = jax.random.key(3)
  ok = jnp.asarray(True)
  p_split, _, m_split, _ = split(params, (), batch, key, ok)
  # micro-batch i is rows i, i + 2 (each device holds its share of every micro-batch), masked with fold_in(key, i):
  # reproduce both as whole batches
  halves = [whole(params, (), jax.tree.map(lambda x: x[i::2], batch), jax.random.fold_in(key, i), ok)
            for i in range(2)]
  np.testing.assert_allclose(float(m_split["loss"]), np.mean([float(h[2]["loss"]) for h in halves]), atol=1e-5)
  g_split = jax.tree.map(jnp.subtract, p_split, params)
  g_mean = jax.tree.map(lambda a, b, p: (a + b) / 2 - p, halves[0][0], halves[1][0], params)
  for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_mean)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_mesh_spec_errors():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh([("data", 2), ("fsdp", 3)])
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh([("data", -1), ("fsdp", -1)])


def test_mesh_from_config_refuses_more_devices_than_exist_as_a_usage_error():
  import ml_collections

  from data_pipelines.errors import UsageError
  n = len(jax.devices())

  def config(mesh, num_devices=0):
    return ml_collections.ConfigDict({"mesh": mesh, "num_devices": num_devices})

  assert dict(sharding.mesh_from_config(config("data:-1,fsdp:1")).shape) == {"data": n, "fsdp": 1}
  assert sharding.mesh_from_config(config("data:-1,fsdp:1", 1)).size == 1
  # The devices of a topology to compile for (stmem plan) are given: num_devices counts among them.
  assert sharding.mesh_from_config(config("data:-1", 2), devices=jax.devices()[:4]).size == 2
  with pytest.raises(UsageError, match=f"needs {2 * n} devices, {n} are available"):
    sharding.mesh_from_config(config(f"data:2,fsdp:{n}"))
  with pytest.raises(UsageError, match=f"num_devices={n + 1}: there are {n} "):
    sharding.mesh_from_config(config("data:-1", n + 1))
  with pytest.raises(UsageError, match="num_devices=5: there are 4 "):  # never silently cut to what exists
    sharding.mesh_from_config(config("data:-1", 5), devices=jax.devices()[:4])


def test_mesh_axes_are_auto_and_split_the_batch_over_every_axis():
  # Auto axes: the model code is sharding-neutral and XLA propagates from the inputs (jax.make_mesh's own default in
  # jax 0.10 is Explicit, under which the model's broadcast + concatenate fails).
  mesh = sharding.make_mesh(parse_mesh("data:2,fsdp:4"))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
