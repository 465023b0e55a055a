"""FedProx: T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020.

  client k:  minimise CE(f(x; w), y) + μ/2 · ‖w − w_g‖²   from w = w_g, the received global model
  server:    FedAvg's weighted mean
"""

from typing import NamedTuple

from fedsnd_jax import client, tree_math
from fedsnd_jax.errors import check_range
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AlgorithmSpec, Federation, RoundParts


class Hyperparameters(NamedTuple):
  mu: float = 0.01  # μ; the paper tunes μ ∈ {0.001, 0.01, 0.1, 1}


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del federation
  check_range(hp, "fedprox", non_negative=("mu",))


def proximal_loss(model: Model, mu: float) -> client.LossFn:
  """CE + μ/2·‖w − w_g‖², the proximal term added to every example (so the batch mean adds it once)."""
  ce = client.supervised_loss(model)

  def loss_fn(params, x, y, rng, ctx):
    return ce(params, x, y, rng, ctx) + 0.5 * mu * tree_math.sq_dist(params, ctx.received)

  return loss_fn


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  del federation
  return RoundParts(proximal_loss(model, hp.mu))


SPEC = AlgorithmSpec(build, Hyperparameters, validate, "fedprox", partial_work=True, asynchronous=True)
