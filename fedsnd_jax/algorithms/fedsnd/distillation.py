"""FedSND's server side, part 2: cross-client distillation on the other clients' noise (docs/design.md §4).

Every uploaded model j is a student (vmapped over j) that learns, for D steps, on batches drawn only
from the pool of the other clients' pseudo-samples, with loss T²·KL(p ‖ σ(f(x̃; w_j')/T)). Teachers are
the uploaded models, fixed, so the result does not depend on client order (`pool.NoisePool`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import losses, models
from fedsnd_jax.algorithms.fedsnd.pool import NoisePool
from fedsnd_jax.algorithms.fedsnd.synthesis import NoiseSpace
from fedsnd_jax.errors import check_range, require

TEACHER_WEIGHTINGS = ("none", "class_count", "confidence")
TARGETS = ("clients", "global")


class Settings(NamedTuple):
  """Cross-client distillation (`fedsnd.distillation.*`).

  Attributes:
    steps: D optimiser steps per student; batch: Bd; lr: Adam's learning rate.
    lr_decay: the step size of round r is multiplied by decay**r.
    teacher_weighting: none | class_count (teachers weighted by how much of the sample's target class they
      have seen; uploads label histograms) | confidence.
    target: clients (each uploaded model, the paper) | global (the aggregate, FedDF style).
    student_train_mode: students with dropout (default eval mode).
  """

  steps: int = 5
  batch: int = 64
  lr: float = 1e-3
  lr_decay: float = 1.0
  teacher_weighting: str = "none"
  target: str = "clients"
  student_train_mode: bool = False


def validate(settings: Settings, section: str) -> None:
  for field, allowed in (("teacher_weighting", TEACHER_WEIGHTINGS), ("target", TARGETS)):
    value = getattr(settings, field)
    require(value in allowed, f"{section}.{field}", f"unknown value {value!r}; allowed: {', '.join(allowed)}")
  check_range(settings, section, positive=("batch", "lr", "lr_decay"), non_negative=("steps",))


class Plan(NamedTuple):
  """This round's distillation, as the schedule decides it.

  Attributes:
    scale: [] float32 multiplying every update (0 when the regime gate is closed; the step-size decay).
    steps: int32 [] steps to take this round under the regime-aware budget, or None: all `most`.
    most: the steps drawn (batches sampled) per student.
  """

  scale: jax.Array
  steps: jax.Array | None
  most: int


def soft_targets(probs, owners, student, weighting: str, histograms=None, labels=None, trusted=None):
  """The soft label each pool sample carries for one student.

  none:        the owner's own p_k (the paper's reading).
  class_count: Σ_t a_t·p_t over teachers t ≠ student, a_t = n_{t,ỹ} / Σ_t' n_{t',ỹ} for the sample's target
               label ỹ: the teachers that have seen the class the noise was made to show speak for it.
  confidence:  Σ_t m_t·p_t / Σ_t m_t over t ≠ student, m_t = max_c p_t(c) on that sample.

  Args:
    probs: [C, CQ, NC] from `pool.teacher_probs`. owners: [CQ] int positions. student: int position (or −1 for
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
  σ(f(x̃; w)/T) when already known (a teacher's row of `pool.teacher_probs`): no forward pass then."""
  logits = space.apply(params, pool) if probs is None else temperature * jnp.log(jnp.maximum(probs, 1e-30))
  kl = losses.kl_divergence(targets, logits, temperature)
  return temperature**2 * jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def distill(space: NoiseSpace, params, x, targets, idx, key, settings: Settings, temperature: float,
            plan: Plan | None = None):
  """D optimiser steps of T²·mean KL(targets ‖ σ(f(x̃; w)/T)) on the given pool batches.

  Args:
    params: the student's starting params.
    x: [CQ, *shape] pseudo-samples. targets: [CQ, NC] soft labels.
    idx: [D, Bd] pool indices of each step's batch.
    key: dropout key (`student_train_mode` only).
    settings: Adam's learning rate (fresh state; BatchNorm statistics stay frozen, `models.freeze_statistics`)
      and whether the student runs with dropout.
    plan: the round's step-size factor and steps to take, at most D (None: all D at factor 1); the steps past
      `plan.steps` are skipped (not vmapped over students, so they cost nothing).

  Returns:
    the distilled params.
  """
  optimizer, train_mode = optax.adam(settings.lr), settings.student_train_mode
  step_scale, num_steps = (1.0, None) if plan is None else (plan.scale, plan.steps)

  def step(carry, batch, step_key):
    params, opt_state = carry

    def objective(p):
      logits = space.apply(p, x[batch], train=train_mode, rng=step_key if train_mode else None)
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


def distill_one(space: NoiseSpace, pool: NoisePool, student: int, params, key, settings: Settings,
                temperature: float, plan: Plan, start_probs=None):
  """Distils `params` on the pool without the noise of position `student` (−1: on all of it). start_probs:
  [CQ, NC] σ(f(x̃; params)/T) when known (`params` is an uploaded model: its row of `pool.probs`).

  Returns:
    (params, KL before, KL after, how often the soft target's argmax is the sample's label).
  """
  targets = soft_targets(pool.probs, pool.owners, student, settings.teacher_weighting, pool.histograms,
                         pool.labels, pool.trusted)
  valid, teachers = pool.owners != student, jnp.arange(pool.probs.shape[0]) != student
  if pool.trusted is not None:
    valid, teachers = valid & pool.trusted[pool.owners], teachers & pool.trusted
  usable = jnp.any(valid) & jnp.any(teachers)  # no other trusted noise or teacher: the student keeps its params
  valid = valid.astype(jnp.float32)
  batch_key, train_key = jax.random.split(key)
  idx = sample_batches(batch_key, pool.owners, student, plan.most, settings.batch, pool.trusted)
  def steps(p):
    return distill(space, p, pool.x, targets, idx, train_key, settings, temperature, plan)

  # A closed gate (scale 0) would step by 0: skip the steps (the predicate is not vmapped, so this stays a cond).
  new = jax.lax.cond(plan.scale > 0, steps, lambda p: p, params)
  new = jax.tree.map(lambda n, p: jnp.where(usable, n, p), new, params)
  before = mean_kl(space, params, pool.x, targets, valid, temperature, start_probs)
  after = mean_kl(space, new, pool.x, targets, valid, temperature)
  right = jnp.sum((jnp.argmax(targets, -1) == pool.labels) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return new, before, after, right


def distill_clients(space: NoiseSpace, pool: NoisePool, order, ids, key, settings: Settings, temperature: float,
                    plan: Plan):
  """Every uploaded model, a student on the other clients' noise (vmapped); teachers stay the uploads.

  Every random draw is keyed by client id. Returns ([C, P] students in the given order, diagnostics).
  """
  sorted_ids = ids[order]

  def student(j, params, cid):
    return distill_one(space, pool, j, params, jax.random.fold_in(key, cid), settings, temperature, plan,
                       pool.probs[j])

  new, before, after, right = jax.vmap(student)(jnp.arange(sorted_ids.shape[0]), pool.teachers, sorted_ids)
  inverse = jnp.argsort(order)
  return jax.tree.map(lambda a: a[inverse], new), {
      "kl_before": jnp.mean(before), "kl_after": jnp.mean(after), "soft_target_accuracy": jnp.mean(right)}


def distill_global(space: NoiseSpace, pool: NoisePool, start, key, settings: Settings, temperature: float,
                   plan: Plan):
  """The aggregate `start` [P], a student on all the noise with every teacher (FedDF style)."""
  new, before, after, right = distill_one(space, pool, -1, start, key, settings, temperature, plan)
  return new, {"kl_before": before, "kl_after": after, "soft_target_accuracy": right}
