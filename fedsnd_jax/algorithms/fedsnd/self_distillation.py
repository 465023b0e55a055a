"""FedSND's client side: self-distillation against local over-fitting (docs/design.md §2)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import losses
from fedsnd_jax.client import LossFn
from fedsnd_jax.errors import check_range, require
from fedsnd_jax.models import Model

MODES = ("none", "dropout", "previous", "both")


class Settings(NamedTuple):
  """Client self-distillation (`fedsnd.self_distillation.*`).

  Attributes:
    mode: which terms are on: none | dropout | previous | both.
    lambda_mutual: λ_mutual, the two dropout views distil each other. The paper's reading is 1; the default is
      0 (one forward pass), because the views' mutual KL slows local training while a model under-fits (the
      `paper` candidate of `python -m benchmarks.tuning --defaults` measures it).
    lambda_prev: λ_prev, the received global model as teacher, against forgetting the classes a client does
      not hold.
    confidence_gate: weight each example's self-distillation terms by their teacher's probability of the true
      label (ours; the terms fade while a model under-fits).
  """

  mode: str = "both"
  lambda_mutual: float = 0.0
  lambda_prev: float = 0.1
  confidence_gate: bool = True


def validate(settings: Settings, section: str) -> None:
  require(settings.mode in MODES, f"{section}.mode",
          f"unknown value {settings.mode!r}; allowed: {', '.join(MODES)}")
  check_range(settings, section, non_negative=("lambda_mutual", "lambda_prev"))


def self_distillation_loss(model: Model, settings: Settings, temperature: float) -> LossFn:
  """Local loss with two dropout views distilling each other and the received model as teacher.

  L = ½[CE(z₁, y) + CE(z₂, y)] + λ_m·T²·½[KL(σ(z₁/T) ‖ σ(z₂/T)) + KL(σ(z₂/T) ‖ σ(z₁/T))]
      + λ_p·T²·KL(σ(f(x; w⁰)/T) ‖ σ(z₁/T)),
  z_i = f(x; w, ξ_i) with independent dropout keys, w⁰ the round's received params (`context.received`)
  in eval mode under stop_gradient, T the temperature. `settings.mode` switches terms off (none | dropout |
  previous | both). With λ_m = 0 there is one forward pass, z₁ with the whole `rng`, and the CE term is CE(z₁, y):
  all terms off is FedAvg's loss exactly.

  The confidence gate (ours): every KL term of an example is weighted by its teacher's probability of the true
  label, under stop_gradient — g_m = ½[σ(z₁)_y + σ(z₂)_y] for the mutual term, g_p = σ(f(x; w⁰))_y for the
  previous-model term — so a teacher speaks only where it is right: while the local or the received model
  still under-fits, its soft labels would brake learning, and the terms fade towards plain CE.

  Returns:
    loss_fn(params, x [B, ...], y [B], rng, context) -> [B].
  """
  lam_m = settings.lambda_mutual if settings.mode in ("dropout", "both") else 0.0
  lam_p = settings.lambda_prev if settings.mode in ("previous", "both") else 0.0
  confidence_gate = settings.confidence_gate
  t2 = temperature**2

  def loss_fn(params, x, y, rng, context):
    if lam_m > 0:
      k1, k2 = jax.random.split(rng)
      z1 = model.apply(params, x, train=True, rng=k1)
      z2 = model.apply(params, x, train=True, rng=k2)
      p1, p2 = losses.tempered_softmax(z1, temperature), losses.tempered_softmax(z2, temperature)
      loss = 0.5 * (losses.cross_entropy(z1, y) + losses.cross_entropy(z2, y))
      gate = _true_class_probability(z1, z2, y) if confidence_gate else 1.0
      loss += lam_m * t2 * 0.5 * gate * (losses.kl_divergence(p1, z2, temperature)
                                         + losses.kl_divergence(p2, z1, temperature))
    else:
      z1 = model.apply(params, x, train=True, rng=rng)
      loss = losses.cross_entropy(z1, y)
    if lam_p > 0:
      teacher = jax.lax.stop_gradient(model.apply(context.received, x))
      gate = _true_class_probability(teacher, teacher, y) if confidence_gate else 1.0
      loss += lam_p * t2 * gate * losses.kl_divergence(losses.tempered_softmax(teacher, temperature), z1,
                                                       temperature)
    return loss

  return loss_fn


def _true_class_probability(z1, z2, y):
  """½[σ(z₁)_y + σ(z₂)_y] under stop_gradient. z1, z2: [B, NC]; y: [B] → [B]."""
  p = 0.5 * (jax.nn.softmax(z1.astype(jnp.float32)) + jax.nn.softmax(z2.astype(jnp.float32)))
  return jax.lax.stop_gradient(jnp.take_along_axis(p, y[:, None].astype(jnp.int32), axis=-1)[:, 0])
