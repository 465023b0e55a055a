"""Conditional generators of the data-free distillation peers (FedGen's in feature space, FedFTG's in input
space) and the diversity loss both train them with.

A generator maps noise ε [B, E] and labels y [B] to outputs [B, *out_shape]:

  [ε ‖ onehot(y)] → (Dense → BatchNorm → ReLU) per hidden width → Dense → reshape

BatchNorm always normalises by the batch's own statistics (no running averages are kept, so the params are
the whole state); it has a learnt scale and bias, as in FedGen's generator.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedsnd_jax.shapes import Params

NOISES = ("uniform", "normal")


class _ConditionalMLP(nn.Module):
  num_classes: int
  out_shape: tuple[int, ...]
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, eps, labels):
    h = jnp.concatenate([eps, jax.nn.one_hot(labels, self.num_classes, dtype=eps.dtype)], axis=-1)
    for i, width in enumerate(self.hidden):
      h = nn.Dense(width, name=f"Dense_{i}")(h)
      h = (h - jnp.mean(h, 0)) * jax.lax.rsqrt(jnp.var(h, 0) + 1e-5)
      h = nn.relu(h * self.param(f"scale_{i}", nn.initializers.ones, (width,))
                  + self.param(f"bias_{i}", nn.initializers.zeros, (width,)))
    return nn.Dense(math.prod(self.out_shape), name="out")(h).reshape((-1, *self.out_shape))


class Generator(NamedTuple):
  """A conditional generator as pure functions.

  Attributes:
    init: key -> params.
    apply: (params, eps [B, E], labels [B] int) -> [B, *out_shape].
    noise: (key, batch) -> eps [batch, E].
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array, jax.Array], jax.Array]
  noise: Callable[[jax.Array, int], jax.Array]


def conditional_mlp(num_classes: int, out_shape: Sequence[int], *, noise_dim: int, hidden: Sequence[int],
                    noise: str = "uniform") -> Generator:
  """The generator above; ε ~ U[0, 1)^E (FedGen's code) or N(0, I) (FedFTG's paper)."""
  if noise not in NOISES:
    raise ValueError(f"unknown noise {noise!r}; allowed: {', '.join(NOISES)}")
  module = _ConditionalMLP(num_classes, tuple(out_shape), tuple(hidden))

  def init(key):
    return module.init(key, jnp.zeros((2, noise_dim)), jnp.zeros((2,), jnp.int32))["params"]

  def apply(params, eps, labels):
    return module.apply({"params": params}, eps, labels)

  def draw(key, batch: int):
    if noise == "uniform":
      return jax.random.uniform(key, (batch, noise_dim))
    return jax.random.normal(key, (batch, noise_dim))

  return Generator(init, apply, draw)


def diversity_loss(eps, outputs):
  """exp(−mean_ij d_ε(i, j)·d_o(i, j)): small when outputs of different noise differ (mode seeking).

  d_ε is the mean squared and d_o the mean absolute difference per feature, over all pairs i, j of the batch
  (the form FedGen's code uses; FedFTG's L_div is the same idea).

  Args:
    eps: [B, E] the noise. outputs: [B, ...] what the generator made of it.

  Returns:
    [] float32.
  """
  flat = outputs.reshape((outputs.shape[0], -1)).astype(jnp.float32)
  d_out = jnp.mean(jnp.abs(flat[:, None] - flat[None]), axis=-1)
  d_eps = jnp.mean(jnp.square(eps[:, None] - eps[None]), axis=-1)
  return jnp.exp(-jnp.mean(d_eps * d_out))
