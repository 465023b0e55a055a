"""FedDyn: D. A. E. Acar, Y. Zhao, R. Matas, M. Mattina, P. Whatmough, V. Saligrama, "Federated Learning
Based on Dynamic Regularization", ICLR 2021.

  client k:  minimise CE(f(x; w), y) − ⟨∇L_k, w⟩ + α/2 · ‖w − w_g‖²,   then ∇L_k ← ∇L_k − α·(w_k − w_g)
  server:    h ← h − α · (1/K) · Σ_{k∈S} (w_k − w_g);   w ← mean_{k∈S} w_k − h/α

BatchNorm statistics are not corrected by h/α: they are averaged, never stepped.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import client, models, tree_math
from fedsnd_jax.errors import check_range
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AlgorithmSpec, Federation, RoundContext, RoundParts, ServerCarry
from fedsnd_jax.shapes import Params


class Hyperparameters(NamedTuple):
  alpha: float = 0.01  # α; the paper searches α ∈ {0.1, 0.01, 0.001}


class FedDynState(NamedTuple):
  """h [P]: the server's state; grads [K, P]: every client's gradient state ∇L_k."""

  h: Params
  grads: Params


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del federation
  check_range(hp, "feddyn", non_negative=("alpha",))


def dynamic_loss(model: Model, alpha: float) -> client.LossFn:
  """CE − ⟨∇L_k, w⟩ + α/2·‖w − w_g‖² with the client's gradient state ∇L_k (`ctx.own`)."""
  ce = client.supervised_loss(model)

  def loss_fn(params, x, y, rng, ctx):
    return (ce(params, x, y, rng, ctx) - tree_math.dot(params, jax.lax.stop_gradient(ctx.own))
            + 0.5 * alpha * tree_math.sq_dist(params, ctx.received))

  return loss_fn


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  alpha, num_clients = hp.alpha, federation.num_clients

  def init_state(params):
    zeros = tree_math.zeros_like(params)
    return FedDynState(zeros, tree_math.stacked(zeros, num_clients))

  def after_aggregation(context: RoundContext, carry: ServerCarry) -> ServerCarry:
    state = context.state
    delta = tree_math.updates(context.uploads.params, context.params)
    new_grads = jax.tree.map(lambda g, d: g - alpha * d, context.own, delta)
    h = jax.tree.map(lambda h, d: h - alpha * jnp.sum(d, axis=0) / num_clients, state.h, delta)
    average = carry.average
    if alpha > 0:  # α = 0 switches the server correction off too (its α → 0 limit is not FedAvg).
      average = models.with_statistics_of(jax.tree.map(lambda a, hh: a - hh / alpha, average, h), average)
    return carry._replace(average=average,
                          state=FedDynState(h, tree_math.scatter(state.grads, context.ids, new_grads)))

  return RoundParts(dynamic_loss(model, alpha), init_state,
                   lambda state, ids: (None, tree_math.gather(state.grads, ids)),
                   after_aggregation=after_aggregation)


# The server's h and each client's gradient state are computed from individual updates, not from a privatised
# or securely summed aggregate.
SPEC = AlgorithmSpec(build, Hyperparameters, validate, "feddyn", privacy=lambda hp: ())
