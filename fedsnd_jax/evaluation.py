"""Jitted, batched evaluation of the global model on a held-out set."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsnd_jax import losses
from fedsnd_jax.data import normalize
from fedsnd_jax.models import Model


class EvalData(NamedTuple):
  """A held-out set on the device, padded to whole batches.

  Attributes:
    x: [M, B, ...] inputs; y: [M, B] labels; mask: [M, B] bool (False on padding);
    mean, std: [ch] normalisation.
  """

  x: jax.Array
  y: jax.Array
  mask: jax.Array
  mean: jax.Array
  std: jax.Array


def to_eval_data(x, y, mean, std, batch_size: int = 500) -> EvalData:
  n = len(y)
  batch_size = min(batch_size, n)
  m = -(-n // batch_size)
  pad = m * batch_size - n
  xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape((m, batch_size, *x.shape[1:]))
  yp = np.concatenate([y, np.zeros(pad, y.dtype)]).reshape((m, batch_size))
  mask = (np.arange(m * batch_size) < n).reshape((m, batch_size))
  return EvalData(*(jnp.asarray(a) for a in (xp, yp, mask, mean, std)))


def make_evaluator(model: Model):
  """Returns jitted evaluate(params, data: EvalData) -> (accuracy, mean CE loss), eval mode (no dropout)."""

  @jax.jit
  def evaluate(params, data: EvalData):
    def batch(carry, inputs):
      x, y, mask = inputs
      logits = model.apply(params, normalize(x, data.mean, data.std))
      correct = jnp.sum((jnp.argmax(logits, -1) == y) & mask)
      loss = jnp.sum(jnp.where(mask, losses.cross_entropy(logits, y), 0.0))
      return carry, (correct, loss)

    _, (correct, loss) = jax.lax.scan(batch, None, (data.x, data.y, data.mask))
    n = jnp.sum(data.mask)
    return jnp.sum(correct) / n, jnp.sum(loss) / n

  return evaluate
