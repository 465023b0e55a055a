"""The round's noise as the server's distillation and its regime gate read it: every upload's pseudo-samples in
client-id order, every teacher's predictions on all of them, and what those predictions say.

Position t in the C axis is the t-th uploaded client in id order; `owners[i]` is the position of the client
whose noise sample i is.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from fedsnd_jax import losses
from fedsnd_jax.algorithms.fedsnd.synthesis import NoiseSpace
from fedsnd_jax.shapes import Params


class NoisePool(NamedTuple):
  """The round's noise in client-id order, flattened.

  Attributes:
    teachers: [C, P] uploaded models. x: [CQ, *shape] pseudo-samples. labels: [CQ] their target labels.
    owners: [CQ] the position (in `teachers`) of the model each sample was made for.
    probs: [C, CQ, NC] every teacher's tempered softmax on every sample.
    histograms: [C, NC] label counts (class_count weighting only), else None.
    trusted: [C] bool, the uploads noise consensus keeps; scores: [C] their consensus scores (None without it).
  """

  teachers: Params
  x: jax.Array
  labels: jax.Array
  owners: jax.Array
  probs: jax.Array
  histograms: jax.Array | None
  trusted: jax.Array | None = None
  scores: jax.Array | None = None


def teacher_probs(space: NoiseSpace, teachers, x, temperature: float):
  """σ(f(x̃_i; w_t)/T) of every teacher t on every pool sample i.

  Args:
    teachers: stacked params [C, P]. x: [CQ, *shape].

  Returns:
    [C, CQ, NC].
  """
  return jax.vmap(lambda p: losses.tempered_softmax(space.apply(p, x), temperature))(teachers)


def noise_pool(space: NoiseSpace, teachers, noise, labels, ids, temperature: float, histograms=None):
  """Puts the round's noise in client-id order (so permuting the clients permutes results alike).

  Args:
    teachers: [C, P]. noise: [C, Q, *shape]. labels: [C, Q]. ids: [C]. histograms: [C, NC] or None.

  Returns:
    (NoisePool, order [C]: the sorting permutation of `ids`).
  """
  chex.assert_shape(noise, (*labels.shape, *space.shape))
  chex.assert_tree_shape_prefix(teachers, ids.shape)
  order = jnp.argsort(ids)
  take = lambda tree: jax.tree.map(lambda a: a[order], tree)
  teachers, noise, labels = take(teachers), noise[order], labels[order]
  histograms = None if histograms is None else histograms[order]
  num, per = labels.shape
  flat = noise.reshape((num * per, *noise.shape[2:]))
  probs = teacher_probs(space, teachers, flat, temperature)
  return NoisePool(teachers, flat, labels.reshape(-1), jnp.repeat(jnp.arange(num), per), probs, histograms), order


def others(pool: NoisePool):
  """[C, CQ] float32: 1 where pool sample i is not teacher t's own noise."""
  return (jnp.arange(pool.probs.shape[0])[:, None] != pool.owners[None, :]).astype(jnp.float32)


def teacher_scores(pool: NoisePool, samples=None):
  """[C]: how often each teacher's argmax on the other clients' noise is that noise's target label.

  samples: [CQ] float32 weights of the pool samples counted (None: all)."""
  votes = jnp.argmax(pool.probs, -1) == pool.labels[None, :]  # [C, CQ]
  counted = others(pool) if samples is None else others(pool) * samples[None, :]
  return jnp.sum(votes * counted, axis=1) / jnp.maximum(jnp.sum(counted, axis=1), 1.0)


def agreement(pool: NoisePool):
  """How often a teacher's argmax on another client's noise is that noise's target label: the mean of
  `teacher_scores`, over the trusted teachers and their noise only under noise consensus (an untrusted upload
  neither votes nor is voted on, so it cannot open the regime gate)."""
  if pool.trusted is None:
    return jnp.mean(teacher_scores(pool))
  trusted = pool.trusted.astype(jnp.float32)
  scores = teacher_scores(pool, trusted[pool.owners])
  return jnp.sum(scores * trusted) / jnp.maximum(jnp.sum(trusted), 1.0)


def regime_signals(space: NoiseSpace, pool: NoisePool, average):
  """What the server can see, without data, of how much averaging loses this round.

  average_noise_accuracy: how often the plain weighted average of the uploads gives a pseudo-sample its
    target label, among the samples whose own teacher does (knowledge that existed in some upload);
    low when the average forgets what single clients knew (near-single-class clients).
  teacher_classes: the mean over teachers of exp(H(m_t)) / NC, m_t the teacher's mean prediction on the
    other clients' noise: the share of the classes a teacher still names off its own noise (≈ 1/NC for a
    one-class expert, ≈ 1 for a generalist).

  Args:
    pool: the round's NoisePool. average: [P] the weighted average of the uploads.

  Returns:
    {"average_noise_accuracy": [], "teacher_classes": []}.
  """
  own = pool.probs[pool.owners, jnp.arange(pool.owners.shape[0])]  # [CQ, NC]
  known = (jnp.argmax(own, -1) == pool.labels).astype(jnp.float32)
  right = jnp.argmax(space.apply(average, pool.x), -1) == pool.labels
  counted = others(pool)
  marginal = jnp.einsum("tp,tpc->tc", counted, pool.probs) / jnp.sum(counted, 1, keepdims=True)  # [C, NC]
  entropy = -jnp.sum(marginal * jnp.log(jnp.maximum(marginal, 1e-12)), axis=-1)
  return {"average_noise_accuracy": jnp.sum(right * known) / jnp.maximum(jnp.sum(known), 1.0),
          "teacher_classes": jnp.mean(jnp.exp(entropy)) / pool.probs.shape[-1]}
