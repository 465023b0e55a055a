"""MOON: Q. Li, B. He, D. Song, "Model-Contrastive Federated Learning", CVPR 2021.

  client k:  minimise CE(f(x; w), y) + μ · ℓ_con,
             ℓ_con = −log( e^{sim(z, z_g)/τ} / (e^{sim(z, z_g)/τ} + e^{sim(z, z_prev)/τ}) ),
             z, z_g, z_prev the representations of x under the local, the global and the client's previous
             local model (the latter two fixed), sim the cosine similarity
  server:    FedAvg's weighted mean; each sampled client's upload becomes its next "previous" model

The network is MOON's own: features → projection head (Dense → ReLU → Dense·256) → classifier, the
representation being the head's output (`classifier_on_projection=True`; the paper's code puts the
classifier on the head and every method in its tables uses this network). `classifier_on_projection=False`
is the SimCLR-style variant this library used before: the classifier reads the features and the head only
feeds ℓ_con.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import client, tree_math
from fedsnd_jax.errors import InputError, check_range
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AlgorithmSpec, Federation, RoundContext, RoundParts, ServerCarry
from fedsnd_jax.shapes import Params


class Hyperparameters(NamedTuple):
  mu: float = 1.0  # μ; the paper: 5 on CIFAR-10, 1 on CIFAR-100 and Tiny-ImageNet
  tau: float = 0.5  # τ; the paper's default
  projection_dim: int = 256  # the paper's 256-d projection head
  classifier_on_projection: bool = True  # MOON's network (see the module docstring)


class MoonState(NamedTuple):
  """previous [K, P]: every client's model from its last participation (the initial model before)."""

  previous: Params


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del federation
  check_range(hp, "moon", positive=("tau", "projection_dim"), non_negative=("mu",))


def model_options(hp: Hyperparameters) -> dict:
  """MOON's network: the models' projection head (`models.build_model` arguments)."""
  return dict(projection_dim=hp.projection_dim, classifier_on_projection=hp.classifier_on_projection)


def contrastive(z, z_global, z_prev, tau: float):
  """ℓ_con with cosine similarity.

  Args:
    z, z_global, z_prev: [B, d] representations of the local, global and previous local model.

  Returns:
    [B].
  """

  def cos(a, b):
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)

  pos, neg = cos(z, z_global) / tau, cos(z, z_prev) / tau
  return -pos + jnp.logaddexp(pos, neg)


def contrastive_loss(model: Model, mu: float, tau: float) -> client.LossFn:
  """CE + μ·ℓ_con(z, z_global, z_prev); the global and previous models in eval mode."""
  ce = client.supervised_loss(model)

  def loss_fn(params, x, y, rng, ctx):
    loss = ce(params, x, y, rng, ctx)
    if mu == 0:
      return loss
    z = model.represent(params, x, train=True, rng=rng)
    z_global = jax.lax.stop_gradient(model.represent(ctx.received, x))
    z_prev = jax.lax.stop_gradient(model.represent(ctx.own, x))
    return loss + mu * contrastive(z, z_global, z_prev, tau)

  return loss_fn


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  if model.represent is None:
    raise InputError("model", "moon needs a model with a representation (mlp, cnn2, simple_cnn)")

  def after_aggregation(context: RoundContext, carry: ServerCarry) -> ServerCarry:
    return carry._replace(state=MoonState(tree_math.scatter(context.state.previous, context.ids,
                                                            context.uploads.params)))

  return RoundParts(contrastive_loss(model, hp.mu, hp.tau),
                   lambda params: MoonState(tree_math.stacked(params, federation.num_clients)),
                   lambda state, ids: (None, tree_math.gather(state.previous, ids)),
                   after_aggregation=after_aggregation)


SPEC = AlgorithmSpec(build, Hyperparameters, validate, "moon", model_options)
