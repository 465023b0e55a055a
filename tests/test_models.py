import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsnd_jax import host_loop
from fedsnd_jax import models as M
from fedsnd_jax.errors import InputError

# Hand-counted parameter totals (weights + biases; GroupNorm has scale + bias per channel).
# cnn2 on 28×28×1: conv 3·3·1·32+32 = 320, conv 3·3·32·64+64 = 18,496, dense 7·7·64·256+256 = 803,072,
#   dense 256·10+10 = 2,570 → 824,458.
# simple_cnn on 32×32×3: 456 + 2,416 + (5·5·16·120+120 = 48,120) + 10,164 + 850 → 62,006.
# mlp on 8×8×1: 64·200+200 + 200·200+200 + 200·10+10 → 55,210.
COUNTS = [("mlp", (8, 8, 1), 55_210), ("cnn2", (28, 28, 1), 824_458), ("simple_cnn", (32, 32, 3), 62_006)]


@pytest.mark.parametrize("name, shape, count", COUNTS)
def test_output_shape_and_param_count(name, shape, count):
  model = M.build_model(name, shape, 10)
  params = model.init(jax.random.key(0))
  assert M.num_params(params) == count
  assert model.apply(params, jnp.zeros((3, *shape))).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet8", "resnet18"])
def test_resnets(name):
  model = M.build_model(name, (32, 32, 3), 10)
  params = jax.eval_shape(model.init, jax.random.key(0))
  n = M.num_params(params)
  # ResNet-18 (CIFAR stem) has ≈ 11.2M params; ResNet-8 (16/32/64 wide) ≈ 78k.
  assert (10.9e6 < n < 11.5e6) if name == "resnet18" else (60e3 < n < 100e3)
  if name == "resnet8":
    out = model.apply(model.init(jax.random.key(0)), jnp.ones((2, 32, 32, 3)))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "cnn2", "simple_cnn", "resnet8", "text_mean", "text_conv"])
def test_dropout_only_in_train_mode(name):
  text = name.startswith("text")
  shape = (12,) if text else {"simple_cnn": (32, 32, 3), "resnet8": (16, 16, 3)}.get(name, (28, 28, 1))
  model = M.build_model(name, shape, 5, dropout=0.5, vocab_size=30 if text else 0)
  params = model.init(jax.random.key(0))
  x = (jax.random.randint(jax.random.key(1), (4, *shape), 1, 30) if text
       else jax.random.normal(jax.random.key(1), (4, *shape)))
  eval_a, eval_b = model.apply(params, x), model.apply(params, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.apply(params, x, train=True, rng=jax.random.key(2))
  train_b = model.apply(params, x, train=True, rng=jax.random.key(3))
  assert not np.allclose(train_a, train_b)


def test_text_model_starts_from_embeddings():
  model = M.build_model("text_mean", (6,), 4, vocab_size=20)
  params = model.init(jax.random.key(0))
  tokens = jnp.array([[3, 4, 5, 0, 0, 0]])
  e = params["embed"]["embedding"][jnp.array([[3, 4, 5]])]  # only the real tokens
  np.testing.assert_allclose(model.apply(params, tokens), model.apply_embedded(params, e), rtol=1e-5)


def test_unknown_model_and_text_model_on_images():
  with pytest.raises(InputError, match="^model: unknown model 'vgg'"):
    M.build_model("vgg", (8, 8, 1), 10)
  with pytest.raises(InputError, match="^model: text_conv needs a text dataset"):
    M.build_model("text_conv", (8, 8, 1), 10)


def test_batch_norm_calibration_sets_batch_statistics():
  model = M.build_model("cnn2", (8, 8, 1), 3, batch_norm=True)
  params = model.init(jax.random.key(0))
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (64, 8, 8, 1))
  new = model.calibrate(params, x)
  # The first BatchNorm sees conv1(x); its stored mean must be that activation's per-channel mean.
  conv = params["params"]["Conv_0"]
  act = jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
  np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["mean"], act.mean((0, 1, 2)), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["var"], act.var((0, 1, 2)), rtol=1e-3,
                             atol=1e-5)
  # Eval mode normalises with the stored statistics, so calibration changes eval outputs.
  assert not np.allclose(model.apply(params, x), model.apply(new, x))


def test_batch_norm_only_where_offered():
  with pytest.raises(InputError, match="^batch_norm: "):
    M.build_model("mlp", (8, 8, 1), 3, batch_norm=True)


@pytest.mark.parametrize("padding, kernel", [("SAME", (3, 3)), ("VALID", (5, 5)), ("SAME", (4, 2))])
def test_im2col_conv_matches_flax_conv(padding, kernel):
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  ref = nn.Conv(5, kernel, padding=padding)
  ours = M.Im2colConv(5, kernel, padding)
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda mod: lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x)))
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


@pytest.mark.parametrize("name, shape", [("cnn2", (28, 28, 1)), ("simple_cnn", (32, 32, 3))])
def test_model_conv_impls_share_params_and_outputs(name, shape):
  xla = M.build_model(name, shape, 10, conv_impl="xla")
  im2col = M.build_model(name, shape, 10, conv_impl="im2col")
  params = xla.init(jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(im2col.init(jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, *shape))
  np.testing.assert_allclose(im2col.apply(params, x), xla.apply(params, x), rtol=1e-4, atol=1e-4)


def test_conv_impl_default_per_backend():
  assert host_loop.default_conv_impl("cpu") == host_loop.default_conv_impl("gpu") == "im2col"
  assert host_loop.default_conv_impl("tpu") == host_loop.default_conv_impl("cpu", top_level_step=True) == "xla"
  assert host_loop.default_conv_impl("gpu", top_level_step=True) == "im2col"


def test_auto_conv_is_xlas_only_in_a_top_level_step_on_cpu():
  model = M.build_model("cnn2", (28, 28, 1), 10, conv_impl="auto")
  params = model.init(jax.random.key(0))
  x = jnp.zeros((2, 28, 28, 1))

  def convolutions(fn):
    return str(jax.make_jaxpr(fn)(params, x)).count("conv_general_dilated")

  def step(p, x):
    with host_loop.top_level_step():
      return model.apply(p, x)

  assert convolutions(model.apply) == 0 and convolutions(step) == 2  # (this suite runs on CPU)
  assert host_loop.conv_impl_here("cpu") == "im2col"  # the mark ends with its block
