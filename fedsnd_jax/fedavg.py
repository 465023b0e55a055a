"""FedAvg (McMahan et al., 2017) with an optional server optimiser (FedOpt; Reddi et al., 2021)."""

import jax
import optax

from fedsnd_jax import algorithm, client
from fedsnd_jax.algorithm import FederatedAlgorithm, LocalSchedule, ServerState
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.models import Model


def build_fedavg(model: Model, *, num_clients: int, clients_per_round: int, schedule: LocalSchedule,
                 client_opt: optax.GradientTransformation, server_opt: optax.GradientTransformation | None = None,
                 client_map: str = "vmap", chunk_size: int = 8) -> FederatedAlgorithm:
  """FedAvg: sampled clients train locally from w; w ← server step towards Σ_k (n_k / Σ n) w_k.

  Args:
    model: the model pair.
    num_clients: K; clients_per_round: C ≤ K (sampled without replacement each round).
    schedule: the local schedule (see `client_batches`).
    client_opt: the clients' optax optimiser (fresh state every round).
    server_opt: optimiser on the pseudo-gradient w − average; None is SGD at lr 1 (plain FedAvg).
    client_map: one of `mapping.CLIENT_MAPS`; chunk_size: clients per chunk for `chunked`.
  """
  server_opt = server_opt or optax.sgd(1.0)
  client_phase = algorithm.make_client_phase(model, client.supervised_loss(model), client_opt, schedule,
                                             client_map, chunk_size)
  sample = algorithm.make_sampler(num_clients, clients_per_round)

  @jax.jit
  def server_phase(state: ServerState, uploads: client.ClientOutput):
    average = algorithm.weighted_average(uploads.params, uploads.num_examples)
    return algorithm.finish_round(server_opt, state, average, uploads)

  def apply(state: ServerState, data: FederatedData):
    timer = algorithm.PhaseTimer()
    ids, keys, _ = sample(state.rng, state.round)
    uploads = timer.lap("client_time_s", client_phase((state.params, None, data), (ids, keys, None)))
    state, train_loss = timer.lap("server_time_s", server_phase(state, uploads))
    model_bytes = algorithm.param_bytes(state.params)
    return state, {**timer.times, "train_loss": float(train_loss),
                   "bytes_up": clients_per_round * (model_bytes + 4),  # params + the int32 count
                   "bytes_down": clients_per_round * model_bytes}

  return FederatedAlgorithm(lambda key: algorithm.init_state(model, server_opt, key), apply)
