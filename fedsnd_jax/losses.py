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


def kl_divergence(teacher_probs, student_logits, temperature):
  """KL(p ‖ σ(z/T)) = Σ_c p_c (log p_c − log σ(z/T)_c), 0 where p_c = 0.

  Args:
    teacher_probs: [B, NC] probabilities (already tempered).
    student_logits: [B, NC].
    temperature: T.

  Returns:
    [B] float32 (not yet multiplied by T²).
  """
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  log_p = jnp.log(jnp.where(teacher_probs > 0, teacher_probs, 1.0))
  return jnp.sum(jnp.where(teacher_probs > 0, teacher_probs * (log_p - log_q), 0.0), axis=-1)


def tempered_softmax(logits, temperature):
  """σ(z/T) in float32. logits: [..., NC]."""
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature)
