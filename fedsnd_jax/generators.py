"""Conditional generators of the data-free distillation peers (FedGen's in feature space, FedFTG's in input
space) and the diversity loss both train them with.

A generator maps noise ε [B, E] and labels y [B] to outputs [B, *out_shape]:

  [ε ‖ onehot(y)] → (Dense → BatchNorm → ReLU) per hidden width → Dense → reshape

BatchNorm has a learnt scale and bias, as in FedGen's generator (PyTorch's BatchNorm1d). In train mode it
normalises by the batch's own statistics and updates running averages (momentum 0.1 in PyTorch's convention);
in eval mode it normalises by those running averages. Eval mode is what a generator's user must call it in when
a batch can hold one label only (a client of one class): there the one-hot's contribution is constant across
the batch, and the batch's own normalisation removes it, so G(ε, y) would not depend on y.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedsnd_jax.shapes import Params

NOISES = ("uniform", "normal")
BATCH_NORM_MOMENTUM = 0.9  # flax's decay of the running averages: PyTorch's momentum 0.1


class _ConditionalMLP(nn.Module):
  num_classes: int
  out_shape: tuple[int, ...]
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, eps, labels, train: bool):
    h = jnp.concatenate([eps, jax.nn.one_hot(labels, self.num_classes, dtype=eps.dtype)], axis=-1)
    for i, width in enumerate(self.hidden):
      h = nn.Dense(width, name=f"Dense_{i}")(h)
      h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5,
                               name=f"BatchNorm_{i}")(h))
    return nn.Dense(math.prod(self.out_shape), name="out")(h).reshape((-1, *self.out_shape))


class Generator(NamedTuple):
  """A conditional generator as pure functions.

  Attributes:
    init: key -> variables {"params": ..., "batch_stats": running means and variances}.
    apply: (variables, eps [B, E], labels [B] int, train: bool) -> (outputs [B, *out_shape], variables): train
      mode normalises by the batch and returns the running averages updated; eval mode normalises by them and
      returns the variables unchanged.
    noise: (key, batch) -> eps [batch, E].
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array, jax.Array, bool], tuple[jax.Array, Params]]
  noise: Callable[[jax.Array, int], jax.Array]


def conditional_mlp(num_classes: int, out_shape: Sequence[int], *, noise_dim: int, hidden: Sequence[int],
                    noise: str = "uniform") -> Generator:
  """The generator above; ε ~ U[0, 1)^E (FedGen's code) or N(0, I) (FedFTG's paper)."""
  if noise not in NOISES:
    raise ValueError(f"unknown noise {noise!r}; allowed: {', '.join(NOISES)}")
  module = _ConditionalMLP(num_classes, tuple(out_shape), tuple(hidden))

  def init(key):
    return dict(module.init(key, jnp.zeros((2, noise_dim)), jnp.zeros((2,), jnp.int32), False))

  def apply(variables, eps, labels, train: bool):
    if not train:
      return module.apply(variables, eps, labels, False), variables
    out, updated = module.apply(variables, eps, labels, True, mutable=["batch_stats"])
    return out, {**variables, **updated}

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
