"""FedNova: J. Wang, Q. Liu, H. Liang, G. Joshi, H. V. Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020.

Clients that take unequal numbers of local steps τ_k (unequal data under `local_epochs`, or a deadline's
partial work) pull FedAvg towards the objective of the clients that stepped most. FedNova averages each
client's update normalised by its local work:

  client k:  w_k ← τ_k steps of local SGD with momentum ρ from the global w (as FedAvg)
             a_k = Σ_{t=1..τ_k} (1 − ρ^t) / (1 − ρ)      (= τ_k without momentum; `client.local_displacement`
                                                     at lr 1: how far τ_k steps move under a unit gradient)
  server:    τ_eff = Σ_k p_k a_k,   w ← w − τ_eff · Σ_k p_k (w − w_k) / a_k,   p_k = n_k / Σ_i n_i

which is the mean of the rescaled uploads w − (τ_eff / a_k)(w − w_k), so the aggregator and the server
optimiser (server momentum: the paper's "gmf") run as for FedAvg. With equal τ_k every scale is 1: FedAvg.
As in the authors' optimiser (github.com/JYWa/FedNova, `distoptim/FedNova.py`), weight decay is part of the
gradient and does not change a_k; the proximal variant (FedNova + FedProx's μ) is not built. BatchNorm
statistics are averaged, never rescaled.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import client, models
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import (
  AGGREGATE,
  AlgorithmSpec,
  Federation,
  RoundContext,
  RoundParts,
  ServerCarry,
  ServerStep,
)


class Hyperparameters(NamedTuple):
  """FedNova has none of its own: a_k follows from the client optimiser's momentum and each client's steps."""


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del hp, federation


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  del hp
  momentum = federation.client_momentum

  def normalise(context: RoundContext, carry: ServerCarry):
    a = client.local_displacement(context.steps, 1.0, momentum)
    p = carry.weights / jnp.maximum(jnp.sum(carry.weights), 1e-12)  # (a round every client missed: all 0)
    tau_eff = jnp.sum(p * a)
    scale = jnp.where(a > 0, tau_eff / jnp.maximum(a, 1e-12), 0.0)  # a client that took no step moved nowhere

    def rescaled(w, w_k):
      s = scale.reshape((-1,) + (1,) * (w_k.ndim - 1)).astype(w_k.dtype)
      return w[None] - s * (w[None] - w_k)

    models_ = models.with_statistics_of(jax.tree.map(rescaled, context.params, carry.models), carry.models)
    return carry._replace(models=models_), {"fednova_tau_eff": tau_eff}

  return RoundParts(client.supervised_loss(model),
                    server_steps=lambda round_index, state: (ServerStep("normalise", normalise), AGGREGATE))


# The server rescales each client's own update by its step count and example weight before aggregating: not an
# aggregate that central DP or secure aggregation could cover, and under local DP the step counts and weights
# (which `local_epochs` ties to each client's example count) would be released in the clear.
SPEC = AlgorithmSpec(build, Hyperparameters, validate, "fednova", privacy=lambda hp: (), partial_work=True)
