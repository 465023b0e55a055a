"""Per-example losses; masking and reduction happen at the call site."""

import jax
import jax.numpy as jnp


def cross_entropy(logits, labels):
  """CE(z, y) = −log σ(z)_y.

  Args:
    logits: [B, NC].
    labels: [B] int.

  Returns:
    [B] float32.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def masked_mean(values, mask):
  """Σ values·mask / max(Σ mask, 1) over all axes; 0 when nothing is valid.

  Args:
    values: [...] float.
    mask: [...] bool, the same shape.
  """
  w = mask.astype(values.dtype)
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)
