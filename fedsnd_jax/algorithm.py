"""The interface every algorithm shares, and the round pieces they share: sampling and aggregation.

An algorithm is `FederatedAlgorithm(init, apply)` returned by a builder that closes over everything
static; `apply(state, data) -> (state, diagnostics)` runs one round (DESIGN §3).
"""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import client, mapping

Params = Any


class ServerState(NamedTuple):
  """Everything a run needs to continue; an immutable pytree of arrays.

  Attributes:
    params: global model params.
    opt_state: the server optimiser's state.
    round: int32 scalar, rounds completed.
    rng: typed PRNG key; round r uses fold_in(rng, r).
    clients: per-client state stacked [K, ...] for algorithms that need it, else None.
  """

  params: Params
  opt_state: Any
  round: jax.Array
  rng: jax.Array
  clients: Any = None


class FederatedAlgorithm(NamedTuple):
  """init(key) -> ServerState; apply(state, data) -> (state, diagnostics dict of host floats)."""

  init: Callable[[jax.Array], ServerState]
  apply: Callable[..., tuple[ServerState, dict[str, float]]]


def round_keys(rng, round_index, num_clients: int, clients_per_round: int):
  """Samples the round's clients and derives their keys.

  round_key = fold_in(rng, round); (sample_key, clients_key, server_key) = split(round_key, 3); the C
  of K client ids are drawn without replacement from sample_key and sorted; client k's key is
  fold_in(clients_key, k), so it depends only on the seed, the round and the client id.

  Returns:
    ids: [C] int32 sorted client ids.
    keys: [C] typed keys.
    server_key: a typed key for the server's own randomness this round.
  """
  sample_key, clients_key, server_key = jax.random.split(jax.random.fold_in(rng, round_index), 3)
  if clients_per_round == num_clients:
    ids = jnp.arange(num_clients, dtype=jnp.int32)
  else:
    ids = jnp.sort(jax.random.choice(sample_key, num_clients, (clients_per_round,), replace=False))
    ids = ids.astype(jnp.int32)
  return ids, jax.vmap(lambda i: jax.random.fold_in(clients_key, i))(ids), server_key


class LocalSchedule(NamedTuple):
  """Static local schedule: B, S, and whether S comes from epochs or a fixed step count."""

  batch_size: int
  num_steps: int
  local_epochs: int
  local_steps: int


def make_client_phase(model, loss_fn: client.LossFn, client_opt, schedule: LocalSchedule, client_map: str,
                      chunk_size: int):
  """Returns client_phase((params, shared, data), (ids [C], keys [C], own)) -> stacked ClientOutput.

  Every client starts from the received params; its loss sees ClientContext(params, shared, own[c]),
  `own` being per-client state stacked [C, ...] (or None).
  """
  update = client.make_client_update(loss_fn, client_opt, **schedule._asdict(), calibrate=model.calibrate)

  def one(params, shared, data, cid, key, own):
    return update(params, client.ClientContext(params, shared, own), cid, key, data)

  return mapping.map_clients(one, client_map, chunk_size)


def make_sampler(num_clients: int, clients_per_round: int):
  """Jitted (rng, round) -> (ids, client keys, server key); see `round_keys`."""
  return jax.jit(lambda rng, r: round_keys(rng, r, num_clients, clients_per_round))


def init_state(model, server_opt, key, clients=None) -> ServerState:
  """Fresh model params from split(key)[0]; the run's PRNG stream is split(key)[1]."""
  init_key, run_key = jax.random.split(key)
  params = model.init(init_key)
  return ServerState(params, server_opt.init(params), jnp.zeros((), jnp.int32), run_key, clients)


def weighted_average(stacked, weights):
  """Σ_k (w_k / Σ_i w_i) · x_k over the leading axis of every leaf.

  Args:
    stacked: pytree of [C, ...] leaves.
    weights: [C] non-negative (e.g. example counts).
  """
  w = weights.astype(jnp.float32)
  w = w / jnp.maximum(jnp.sum(w), 1e-12)
  return jax.tree.map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype), stacked)


def server_update(server_opt, params, opt_state, new_average):
  """FedOpt step: the server optimiser follows the pseudo-gradient params − average.

  With SGD at learning rate 1 and no momentum this is plain FedAvg: params ← average.
  """
  pseudo_grad = jax.tree.map(lambda p, a: p - a, params, new_average)
  updates, opt_state = server_opt.update(pseudo_grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def finish_round(server_opt, state: ServerState, new_average, uploads: client.ClientOutput, clients=None):
  """The server optimiser's step towards `new_average`, the round counter + 1, and new per-client state
  (`clients`; None keeps the old). Returns (state, the uploads' example-weighted training loss)."""
  params, opt_state = server_update(server_opt, state.params, state.opt_state, new_average)
  state = state._replace(params=params, opt_state=opt_state, round=state.round + 1,
                         clients=state.clients if clients is None else clients)
  return state, weighted_average(uploads.loss, uploads.num_examples)


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


class PhaseTimer:
  """Wall-clock seconds of a round's phases; blocks on each phase's outputs so times are not async."""

  def __init__(self):
    self.times: dict[str, float] = {}
    self._start = time.perf_counter()

  def lap(self, name: str, outputs):
    jax.block_until_ready(outputs)
    now = time.perf_counter()
    self.times[name] = now - self._start
    self._start = now
    return outputs
