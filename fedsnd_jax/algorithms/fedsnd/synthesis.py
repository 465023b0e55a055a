"""FedSND's server side, part 1: adaptive noise synthesis, one pseudo-sample set per uploaded model
(docs/design.md §3).

Only the inputs are optimised; the model is fixed and in eval mode. vmap `synthesize` over the stacked
uploaded models.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import losses
from fedsnd_jax.errors import check_range, require
from fedsnd_jax.models import Model
from fedsnd_jax.shapes import Params

TARGETS = ("balanced", "histogram")
WARM_STARTS = ("none", "client", "round")


class Settings(NamedTuple):
  """Noise synthesis (`fedsnd.synthesis.*`).

  Attributes:
    samples: Q pseudo-samples per uploaded model.
    steps: G Adam steps on the inputs (at most); lr: their learning rate. The default server (warm start
      `round`, G = 10, distillation D = 5) is the cheap one of benchmarks/server_cost.py; `python -m
      benchmarks.tuning --defaults` ranks it against a Gaussian-start server (G 50, D 10) by the worst case of
      its validation gain over tuned FedAvg.
    stop_ce: stop a model's synthesis early once its mean CE on its targets is ≤ this (0 = never): with a warm
      start that already fits, few or no steps run. Steps taken are logged as `noise_steps_taken`.
    l2: β of the L2 prior on the inputs.
    projection: rescale every sample to a real sample's norm after every step.
    warm_start: where synthesis starts: none (Gaussian) | client (the noise made for the same client at its
      last participation; Gaussian the first time) | round (the previous round's noise at the same position in
      the round: for cross-device runs, where a client rarely comes back; with every client in every round the
      two are the same, positions being sorted client ids).
    targets: balanced (default) | histogram (drawn from the client's label histogram, uploaded).
    adversarial: weight of the hard-sample term (maximise teacher–global-model disagreement).
    bn_prior: weight of the BatchNorm-statistics prior (DeepInversion; BatchNorm models only).
  """

  samples: int = 64
  steps: int = 10
  stop_ce: float = 0.0
  lr: float = 0.05
  l2: float = 0.0
  projection: bool = False
  warm_start: str = "round"
  targets: str = "balanced"
  adversarial: float = 0.0
  bn_prior: float = 0.0


def validate(settings: Settings, section: str) -> None:
  for field, allowed in (("targets", TARGETS), ("warm_start", WARM_STARTS)):
    value = getattr(settings, field)
    require(value in allowed, f"{section}.{field}", f"unknown value {value!r}; allowed: {', '.join(allowed)}")
  check_range(settings, section, positive=("samples", "lr"),
              non_negative=("steps", "stop_ce", "l2", "adversarial", "bn_prior"))


class NoiseSpace(NamedTuple):
  """Where pseudo-samples live and how a model reads them.

  Attributes:
    shape: one sample's shape: the normalised input shape, or (L, d) embeddings for text models.
    apply: (params, x [Q, *shape], train=False, rng=None) -> logits [Q, NC].
    init_scale: params -> std of the Gaussian start (1 for standardised inputs).
    norm: params -> the norm a real sample has in this space (√d for d standardised features).
    calibrate: BatchNorm models only: `Model.calibrate`, for the BatchNorm-statistics prior.
  """

  shape: tuple[int, ...]
  apply: Callable[..., jax.Array]
  init_scale: Callable[[Params], jax.Array]
  norm: Callable[[Params], jax.Array]
  calibrate: Callable[[Params, jax.Array], Params] | None = None


def noise_space(model: Model, input_shape) -> NoiseSpace:
  """Normalised input space for image/vector models; embedding space after the token lookup for text."""
  if model.apply_embedded is None:
    d = math.prod(input_shape)
    return NoiseSpace(tuple(input_shape), model.apply, lambda p: jnp.float32(1.0),
                      lambda p: jnp.float32(math.sqrt(d)), model.calibrate)
  table_shape = jax.eval_shape(lambda: model.embed_table(model.init(jax.random.key(0)))).shape
  length = input_shape[0]
  return NoiseSpace((length, table_shape[1]), model.apply_embedded,
                    lambda p: jnp.std(model.embed_table(p)),
                    lambda p: math.sqrt(length) * jnp.mean(jnp.linalg.norm(model.embed_table(p), axis=-1)))


def balanced_targets(num_samples: int, num_classes: int):
  """[Q] labels 0, 1, …, NC−1, 0, 1, … (every class equally often, up to one)."""
  return jnp.arange(num_samples, dtype=jnp.int32) % num_classes


def histogram_targets(key, histogram, num_samples: int):
  """[Q] labels drawn from a client's label histogram [NC] (needs the client to upload it)."""
  logits = jnp.log(jnp.maximum(histogram.astype(jnp.float32), 0.0))
  return jax.random.categorical(key, logits, shape=(num_samples,)).astype(jnp.int32)


def project(x, norm):
  """Scales every sample x_i ([Q, ...]) to ‖x_i‖ = norm."""
  axes = tuple(range(1, x.ndim))
  return x * (norm / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True)), 1e-12))


class SynthesisStats(NamedTuple):
  """Per-model diagnostics: teacher CE on its targets before and after, accuracy, mean sample norm, and how many
  optimiser steps ran (fewer than G when `stop_ce` stopped them)."""

  ce_initial: jax.Array
  ce_final: jax.Array
  accuracy: jax.Array
  norm: jax.Array
  steps: jax.Array


def bn_statistics_loss(space: NoiseSpace, params, x):
  """DeepInversion's prior: Σ_l ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂ over BatchNorm layers l, where
  μ_l(x), σ²_l(x) are the batch statistics of layer l's input on x and μ̂_l, σ̂²_l the model's stored
  (client-calibrated) statistics (Yin et al., CVPR 2020)."""
  stored = params["batch_stats"]
  of_x = space.calibrate(params, x)["batch_stats"]
  gaps = jax.tree.map(lambda a, b: jnp.sqrt(jnp.sum((a - b) ** 2) + 1e-12), of_x, stored)
  return sum(jax.tree.leaves(gaps))


def synthesize(space: NoiseSpace, params, key, targets, settings: Settings, *, steps=None, init=None,
               student_params=None, temperature: float = 1.0):
  """Optimises pseudo-samples so that the model predicts the targets on them.

  minimise_x  mean CE(f(x; w_k), ỹ) + β·mean‖x‖² + b·R_BN(x) − a·T²·mean KL(σ(f(x; w_k)/T) ‖ σ(f(x; w_s)/T))
  for G Adam steps, from x ~ N(0, s²) (or `init`); with `projection` every sample is rescaled to the
  norm of a real sample after every step. R_BN (b = `bn_prior`, BatchNorm models) is
  `bn_statistics_loss`. The last term (a = `adversarial`, w_s = `student_params`) seeks hard samples on
  which the student disagrees with the teacher. Steps stop early once the teacher's mean CE on its targets is at
  or below `stop_ce` (tested before each step, so a warm start that already fits takes no step); under vmap
  each model stops on its own (a finished model's samples are left as they are while the others go on).

  Args:
    space: the noise space.
    params: the teacher's params w_k.
    key: PRNG key of the Gaussian start.
    targets: [Q] int labels ỹ.
    settings: β, the projection, a, b, the early exit and Adam's learning rate.
    steps: G (int, or int32 [] chosen each round; None: `settings.steps`).
    init: [Q, *shape] start instead of Gaussian.
    student_params, temperature: the hard-sample term's w_s and T.

  Returns:
    (x [Q, *shape], SynthesisStats).
  """
  steps = settings.steps if steps is None else steps
  l2, projection, adversarial = settings.l2, settings.projection, settings.adversarial
  bn_prior, stop_ce, optimizer = settings.bn_prior, settings.stop_ce, optax.adam(settings.lr)
  norm = space.norm(params)
  x = init if init is not None else space.init_scale(params) * jax.random.normal(
      key, (targets.shape[0], *space.shape))
  if projection:
    x = project(x, norm)

  def objective(x):
    logits = space.apply(params, x)
    ce = jnp.mean(losses.cross_entropy(logits, targets))
    loss = ce + l2 * jnp.mean(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1))
    if bn_prior > 0:
      loss += bn_prior * bn_statistics_loss(space, params, x)
    if adversarial > 0:
      teacher = losses.tempered_softmax(logits, temperature)
      kl = losses.kl_divergence(teacher, space.apply(student_params, x), temperature)
      loss -= adversarial * temperature**2 * jnp.mean(kl)
    return loss, ce

  def running(carry):
    step, _, _, done, _ = carry
    return (step < steps) & ~done

  def step(carry):
    i, x, opt_state, _, ce_initial = carry
    (_, ce), grads = jax.value_and_grad(objective, has_aux=True)(x)
    done = (ce <= stop_ce) if stop_ce > 0 else jnp.bool_(False)
    updates, new_state = optimizer.update(grads, opt_state, x)
    new_x = x + updates
    new_x = project(new_x, norm) if projection else new_x
    keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(done, a, b), old, new)
    ce_initial = jnp.where(i == 0, ce, ce_initial)
    return i + jnp.where(done, 0, 1), keep(x, new_x), keep(opt_state, new_state), done, ce_initial

  start = (jnp.int32(0), x, optimizer.init(x), jnp.bool_(False), jnp.float32(jnp.nan))
  taken, x, _, _, ce_initial = jax.lax.while_loop(running, step, start)
  logits = space.apply(params, x)
  ce_final = jnp.mean(losses.cross_entropy(logits, targets))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
  sample_norm = jnp.mean(jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1)))
  ce_initial = jnp.where(jnp.isnan(ce_initial), ce_final, ce_initial)
  return x, SynthesisStats(ce_initial, ce_final, accuracy, sample_norm, taken)
