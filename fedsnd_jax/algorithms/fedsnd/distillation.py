"""FedSND's server side, part 2: cross-client distillation on the other clients' noise (DESIGN §2.4).

Every uploaded model j is a student (vmapped over j) that learns, for D steps, on batches drawn only
from the pool of the other clients' pseudo-samples, with loss T²·KL(p ‖ σ(f(x̃; w_j')/T)). Teachers are
the uploaded models, fixed, so the result does not depend on client order. Position t in the C axis is
the t-th uploaded client; `owners[i]` is the position of the client whose noise sample i is.
"""

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import losses, models
from fedsnd_jax.algorithms.fedsnd.noise import NoiseSpace

TEACHER_WEIGHTINGS = ("none", "class_count", "confidence")


def teacher_probs(space: NoiseSpace, teachers, pool, temperature: float):
  """σ(f(x̃_i; w_t)/T) of every teacher t on every pool sample i.

  Args:
    teachers: stacked params [C, P]. pool: [CQ, *shape].

  Returns:
    [C, CQ, NC].
  """
  return jax.vmap(lambda p: losses.tempered_softmax(space.apply(p, pool), temperature))(teachers)


def soft_targets(probs, owners, student, weighting: str, histograms=None, labels=None, trusted=None):
  """The soft label each pool sample carries for one student.

  none:        the owner's own p_k (the paper's reading).
  class_count: Σ_t a_t·p_t over teachers t ≠ student, a_t = n_{t,ỹ} / Σ_t' n_{t',ỹ} for the sample's target
               label ỹ: the teachers that have seen the class the noise was made to show speak for it.
  confidence:  Σ_t m_t·p_t / Σ_t m_t over t ≠ student, m_t = max_c p_t(c) on that sample.

  Args:
    probs: [C, CQ, NC] from `teacher_probs`. owners: [CQ] int positions. student: int position (or −1 for
      "no student": every teacher counts, as for distilling into the global model).
    weighting: one of TEACHER_WEIGHTINGS. histograms: [C, NC] label counts and labels: [CQ] target labels
      (class_count only).
    trusted: [C] bool, teachers allowed to speak (noise consensus), or None for all. Samples of an untrusted
      owner are left out by `sample_batches` instead.

  Returns:
    [CQ, NC] rows summing to 1 (class_count, confidence: rows of 0 where no teacher is left to speak, e.g. the
    student is the only trusted one; `_distill_one` then takes no step).
  """
  num_teachers = probs.shape[0]
  others = (jnp.arange(num_teachers) != student).astype(jnp.float32)  # [C]
  if trusted is not None:
    others = others * trusted.astype(jnp.float32)
  if weighting == "none":
    return probs[owners, jnp.arange(owners.shape[0])]
  if weighting == "class_count":
    counts = histograms.astype(jnp.float32)[:, labels] * others[:, None]  # [C, CQ]
    total = jnp.sum(counts, axis=0, keepdims=True)
    weights = jnp.where(total > 0, counts / jnp.maximum(total, 1.0), others[:, None] / jnp.maximum(jnp.sum(others),
                                                                                                   1.0))
  elif weighting == "confidence":
    conf = jnp.max(probs, axis=-1) * others[:, None]  # [C, CQ]
    weights = conf / jnp.maximum(jnp.sum(conf, axis=0, keepdims=True), 1e-30)
  else:
    raise ValueError(f"unknown teacher weighting {weighting!r}; allowed: {', '.join(TEACHER_WEIGHTINGS)}")
  return jnp.einsum("tp,tpc->pc", weights, probs)


def sample_batches(key, owners, student, steps: int, batch_size: int, trusted=None):
  """[D, Bd] pool indices drawn uniformly (with replacement) among samples not owned by `student` (nor by an
  untrusted owner, `trusted` [C] bool)."""
  usable = owners != student
  if trusted is not None:
    usable = usable & trusted[owners]
  logits = jnp.where(usable, 0.0, -jnp.inf)
  return jax.random.categorical(key, logits, shape=(steps, batch_size)).astype(jnp.int32)


def mean_kl(space: NoiseSpace, params, pool, targets, weights, temperature: float, probs=None):
  """T²·Σ_i weights_i·KL(targets_i ‖ σ(f(x̃_i; w)/T)) / Σ weights (eval mode). weights: [CQ]. probs: [CQ, NC]
  σ(f(x̃; w)/T) when already known (a teacher's row of `teacher_probs`): no forward pass then."""
  logits = space.apply(params, pool) if probs is None else temperature * jnp.log(jnp.maximum(probs, 1e-30))
  kl = losses.kl_divergence(targets, logits, temperature)
  return temperature**2 * jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def distill(space: NoiseSpace, params, pool, targets, idx, key, *, optimizer, temperature: float,
            train_mode: bool = False, step_scale=1.0, num_steps=None):
  """D optimiser steps of T²·mean KL(targets ‖ σ(f(x̃; w)/T)) on the given pool batches.

  Args:
    params: the student's starting params.
    pool: [CQ, *shape] pseudo-samples. targets: [CQ, NC] soft labels.
    idx: [D, Bd] pool indices of each step's batch.
    key: dropout key (train_mode only).
    optimizer: optax transformation (fresh state); BatchNorm statistics stay frozen (`models.freeze_statistics`).
    train_mode: run the student with dropout.
    step_scale: scalar multiplying every update (a decaying distillation step size).
    num_steps: int32 [] steps to take, at most D (None: all D); the rest are skipped (not vmapped over
      students, so they cost nothing).

  Returns:
    the distilled params.
  """

  def step(carry, batch, step_key):
    params, opt_state = carry

    def objective(p):
      logits = space.apply(p, pool[batch], train=train_mode, rng=step_key if train_mode else None)
      return temperature**2 * jnp.mean(losses.kl_divergence(targets[batch], logits, temperature))

    grads = jax.grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: u * step_scale, updates)
    return optax.apply_updates(params, updates), opt_state

  def scanned(carry, inputs):
    i, batch, step_key = inputs
    if num_steps is None:
      return step(carry, batch, step_key), None
    return jax.lax.cond(i < num_steps, lambda c: step(c, batch, step_key), lambda c: c, carry), None

  keys = jax.random.split(key, idx.shape[0])
  optimizer = models.freeze_statistics(optimizer)
  (params, _), _ = jax.lax.scan(scanned, (params, optimizer.init(params)), (jnp.arange(idx.shape[0]), idx, keys))
  return params
