"""How the server combines the round's uploads: an `Aggregator(init, apply)`, in the optax style.

  init(params [P]) -> state
  apply(models [C, P], weights [C], state, reference [P], key) -> Aggregate(params [P], state, diagnostics)

Pure and jittable over the stacked uploads. `weights` are the clients' example counts; `reference` is the
round's global model, the point every update is measured from (clipping for differential privacy and robust
rules act on updates models − reference); `key` is the round's aggregation key (privacy noise, randomised
pre-aggregation); `state` carries what must persist across rounds (an adaptive clipping norm, a privacy
ledger, a robust rule's centre); `diagnostics` are scalars for metrics.jsonl (e.g. the share of clipped
updates). Every algorithm runs its uploads through one aggregator, chosen independently of the algorithm.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from fedsnd_jax.shapes import Diagnostics, Params


class Aggregate(NamedTuple):
  """An aggregator's output: the combined params [P], its new state, and its diagnostics."""

  params: Params
  state: Any
  diagnostics: Diagnostics


def _no_protocol_bytes(clients_per_round: int) -> int:
  del clients_per_round
  return 0


class Aggregator(NamedTuple):
  """init(params) -> state; apply(models [C, P], weights [C], state, reference [P], key) -> Aggregate.

  protocol_bytes(C): what each client sends per round besides its model (secure aggregation's keys and shares).
  """

  init: Callable[[Params], Any]
  apply: Callable[..., Aggregate]
  protocol_bytes: Callable[[int], int] = _no_protocol_bytes


class EmptyState(NamedTuple):
  """The state of a stateless aggregator."""


def weighted_average(stacked, weights):
  """Σ_k (w_k / Σ_i w_i) · x_k over the leading axis of every leaf.

  Args:
    stacked: pytree of [C, ...] leaves.
    weights: [C] non-negative (e.g. example counts).
  """
  chex.assert_tree_shape_prefix(stacked, weights.shape)
  w = weights.astype(jnp.float32)
  w = w / jnp.maximum(jnp.sum(w), 1e-12)
  return jax.tree.map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype), stacked)


def _or_reference(average, weights, reference):
  """The average, or the reference where every weight is 0 (an empty Poisson-sampled round)."""
  empty = jnp.sum(weights) <= 0
  return jax.tree.map(lambda a, r: jnp.where(empty, r, a), average, reference)


def weighted_mean() -> Aggregator:
  """FedAvg's rule: w ← Σ_k (n_k / Σ_i n_i) · w_k (McMahan et al., AISTATS 2017). Stateless."""

  def apply(models, weights, state, reference, key):
    del key
    return Aggregate(_or_reference(weighted_average(models, weights), weights, reference), state, {})

  return Aggregator(lambda params: EmptyState(), apply)


def unweighted_mean() -> Aggregator:
  """w ← mean of the uploads of weight > 0: every client counts alike (under DP, where example counts are not
  released); the empty client of Poisson sampling (weight 0) not at all. Stateless."""

  def apply(models, weights, state, reference, key):
    del key
    present = (weights > 0).astype(jnp.float32)
    return Aggregate(_or_reference(weighted_average(models, present), present, reference), state, {})

  return Aggregator(lambda params: EmptyState(), apply)
