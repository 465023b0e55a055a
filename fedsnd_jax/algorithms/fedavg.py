"""FedAvg: H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS 2017.

  client k:  w_k ← local SGD on mean CE(f(x; w_k), y) over its own data, from the global w
  server:    w ← Σ_k (n_k / Σ_i n_i) · w_k

The server step is the driver's (the aggregator, then the server optimiser: with momentum this is FedAvgM,
Hsu et al. 2019; with Adam, FedAdam of Reddi et al., ICLR 2021).
"""

from typing import NamedTuple

from fedsnd_jax import client
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AlgorithmSpec, Federation, RoundParts


class Hyperparameters(NamedTuple):
  """FedAvg has none of its own (client lr, epochs and the server optimiser are the run's)."""


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del hp, federation


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  del hp, federation
  return RoundParts(client.supervised_loss(model))


SPEC = AlgorithmSpec(build, Hyperparameters, validate, "fedavg", partial_work=True, asynchronous=True)
