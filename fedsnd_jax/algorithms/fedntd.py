"""FedNTD: G. Lee, M. Jeong, Y. Shin, S. Bae, S.-Y. Yun, "Preservation of the Global Knowledge by
Not-True Distillation in Federated Learning", NeurIPS 2022.

  client k:  minimise CE(f(x; w), y) + β · τ² · KL(q̃_τ(x; w_g) ‖ q̃_τ(x; w))
             q̃_τ = softmax(z/τ) over the classes other than the true one (renormalised)
  server:    FedAvg's weighted mean
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import client, losses
from fedsnd_jax.errors import check_range
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AlgorithmSpec, Federation, RoundParts


class Hyperparameters(NamedTuple):
  beta: float = 1.0  # β; the paper uses β = 1
  tau: float = 1.0  # τ; the paper's default 1


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del federation
  check_range(hp, "fedntd", positive=("tau",), non_negative=("beta",))


def not_true_probs(logits, labels, tau: float):
  """σ(z/τ) over the classes other than the true one (renormalised; the true class gets exactly 0).

  Args:
    logits: [B, NC]; labels: [B].

  Returns:
    [B, NC].
  """
  true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jax.nn.softmax(jnp.where(true, -jnp.inf, logits.astype(jnp.float32) / tau))


def not_true_loss(model: Model, beta: float, tau: float) -> client.LossFn:
  """CE + β·τ²·KL(q̃_g ‖ q̃_l), the global model (eval mode, no gradient) as the not-true teacher."""

  def loss_fn(params, x, y, rng, ctx):
    logits = model.apply(params, x, train=True, rng=rng)
    ce = losses.cross_entropy(logits, y)
    if beta == 0:
      return ce
    teacher = not_true_probs(jax.lax.stop_gradient(model.apply(ctx.received, x)), y, tau)
    true = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    student_logits = jnp.where(true, -1e9, logits)  # the same renormalisation over not-true classes
    return ce + beta * tau**2 * losses.kl_divergence(teacher, student_logits, tau)

  return loss_fn


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  del federation
  return RoundParts(not_true_loss(model, hp.beta, hp.tau))


SPEC = AlgorithmSpec(build, Hyperparameters, validate, "fedntd", partial_work=True, asynchronous=True)
