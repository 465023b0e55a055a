"""FedSND (Zheng et al., arXiv 2306.14443) and its ablations FedSD (client part) and FedND (server part).

Round (DESIGN §2.1): sampled clients train locally (self-distillation for FedSD/FedSND, else plain CE);
the server synthesises noise per uploaded model (§2.3), distils every uploaded model on the other
clients' noise (§2.4) and aggregates (§2.5). Variants of §2.6 are the fields of `NoiseDistillation`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import algorithm, client, distillation, noise
from fedsnd_jax.algorithm import FederatedAlgorithm, LocalSchedule, ServerState
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.models import Model

NOISE_TARGETS = ("balanced", "histogram")
DISTILL_TARGETS = ("clients", "global")


class NoiseDistillation(NamedTuple):
  """Static settings of the server's noise synthesis and cross-client distillation.

  Attributes:
    noise_samples: N pseudo-samples per uploaded model.
    noise_steps: G Adam steps on the inputs; noise_lr: its learning rate.
    noise_l2: β of the L2 prior on the inputs.
    noise_projection: rescale every sample to a real sample's norm after every step (§2.6).
    noise_warm_start: start each client's noise from what it had at its last participation.
    noise_targets: balanced (default) | histogram (drawn from the client's label histogram, uploaded).
    adversarial: weight of the hard-sample term (maximise teacher–global-model disagreement).
    bn_prior: weight of the BatchNorm-statistics prior (DeepInversion; BatchNorm models only).
    distill_steps: D optimiser steps per student; distill_batch: B_d; distill_lr: Adam learning rate.
    distill_lr_decay: the step size of round r is multiplied by decay**r.
    distill_rounds: distil only in the first R_d rounds (0 = every round).
    teacher_weighting: none | class_count (teachers weighted by how much of the sample's target class they
      have seen; uploads label histograms) | confidence.
    distill_target: clients (each uploaded model, the paper) | global (the average, FedDF style).
    student_train_mode: students with dropout (default eval mode).
    temperature: T.
  """

  noise_samples: int = 64
  noise_steps: int = 100
  noise_lr: float = 0.05
  noise_l2: float = 0.0
  noise_projection: bool = False
  noise_warm_start: bool = False
  noise_targets: str = "balanced"
  adversarial: float = 0.0
  bn_prior: float = 0.0
  distill_steps: int = 20
  distill_batch: int = 64
  distill_lr: float = 1e-3
  distill_lr_decay: float = 1.0
  distill_rounds: int = 0
  teacher_weighting: str = "none"
  distill_target: str = "clients"
  student_train_mode: bool = False
  temperature: float = 2.0

  @property
  def uploads_histograms(self) -> bool:
    return self.noise_targets == "histogram" or self.teacher_weighting == "class_count"


class NoiseMemory(NamedTuple):
  """Per-client warm-start noise: noise [K, N, *shape], seen [K] bool (participated before)."""

  noise: jax.Array
  seen: jax.Array


def client_histograms(data: FederatedData, ids, num_classes: int):
  """[C, NC] label counts of the given clients, from their rows of the index table."""

  def one(cid):
    valid = jnp.arange(data.max_count) < data.counts[cid]
    labels = data.y[data.index[cid]]
    return jnp.sum(jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * valid[:, None], axis=0)

  return jax.vmap(one)(ids)


def cross_distill(space: noise.NoiseSpace, teachers, counts, pool, labels, ids, key, settings: NoiseDistillation,
                  histograms=None, step_scale=1.0):
  """Distils every uploaded model (or their average) on the other clients' noise.

  Inputs are put in client-id order first and results returned in the given order, and every random
  draw is keyed by client id, so permuting the clients permutes the results the same way.

  Args:
    space: the noise space. teachers: stacked uploaded params [C, ...]. counts: [C] example counts.
    pool: [C, N, *shape] each client's noise. labels: [C, N] its target labels. ids: [C] client ids.
    key: the round's server key. settings: static settings. histograms: [C, NC] (class_count only).
    step_scale: scalar multiplying every distillation update.

  Returns:
    (params, diagnostics): params stacked [C, ...] distilled students for distill_target=clients, or
    the distilled average (a single params pytree) for distill_target=global.
  """
  order = jnp.argsort(ids)
  inverse = jnp.argsort(order)
  take = lambda tree: jax.tree.map(lambda a: a[order], tree)
  teachers, counts, pool, labels, ids = take(teachers), counts[order], pool[order], labels[order], ids[order]
  histograms = None if histograms is None else histograms[order]
  num, per = labels.shape
  flat_pool = pool.reshape((num * per, *pool.shape[2:]))
  flat_labels = labels.reshape(-1)
  owners = jnp.repeat(jnp.arange(num), per)
  temperature = settings.temperature
  probs = distillation.teacher_probs(space, teachers, flat_pool, temperature)  # [C, P, NC]
  votes = jnp.argmax(probs, -1) == flat_labels[None, :]  # [C, P]
  not_owner = jnp.arange(num)[:, None] != owners[None, :]
  agreement = jnp.sum(votes * not_owner) / jnp.maximum(jnp.sum(not_owner), 1)
  optimizer = optax.adam(settings.distill_lr)
  run = lambda params, targets, idx, k: distillation.distill(
      space, params, flat_pool, targets, idx, k, optimizer=optimizer, temperature=temperature,
      train_mode=settings.student_train_mode, step_scale=step_scale)
  batches = lambda k, student: distillation.sample_batches(k, owners, student, settings.distill_steps,
                                                           settings.distill_batch)

  if settings.distill_target == "global":
    average = algorithm.weighted_average(teachers, counts)
    targets = distillation.soft_targets(probs, owners, -1, settings.teacher_weighting, histograms, flat_labels)
    ones = jnp.ones(owners.shape[0])
    batch_key, train_key = jax.random.split(key)
    new = run(average, targets, batches(batch_key, -1), train_key)
    kl_before = distillation.mean_kl(space, average, flat_pool, targets, ones, temperature)
    kl_after = distillation.mean_kl(space, new, flat_pool, targets, ones, temperature)
    target_accuracy = jnp.mean(jnp.argmax(targets, -1) == flat_labels)
  else:
    def student(j, params, cid):
      targets = distillation.soft_targets(probs, owners, j, settings.teacher_weighting, histograms, flat_labels)
      batch_key, train_key = jax.random.split(jax.random.fold_in(key, cid))
      new = run(params, targets, batches(batch_key, j), train_key)
      valid = (owners != j).astype(jnp.float32)
      before = distillation.mean_kl(space, params, flat_pool, targets, valid, temperature)
      after = distillation.mean_kl(space, new, flat_pool, targets, valid, temperature)
      right = jnp.sum((jnp.argmax(targets, -1) == flat_labels) * valid) / jnp.sum(valid)
      return new, before, after, right

    new, before, after, right = jax.vmap(student)(jnp.arange(num), teachers, ids)
    new = jax.tree.map(lambda a: a[inverse], new)
    kl_before, kl_after, target_accuracy = jnp.mean(before), jnp.mean(after), jnp.mean(right)
  return new, {"teacher_agreement": agreement, "kl_before": kl_before, "kl_after": kl_after,
               "soft_target_accuracy": target_accuracy}


def build_fedsnd(model: Model, input_shape, num_classes: int, *, num_clients: int, clients_per_round: int,
                 schedule: LocalSchedule, client_opt: optax.GradientTransformation,
                 client_loss: client.LossFn | None = None, server: NoiseDistillation | None = None,
                 server_opt: optax.GradientTransformation | None = None, client_map: str = "vmap",
                 chunk_size: int = 8) -> FederatedAlgorithm:
  """FedSND, or its ablations: FedSD (`server=None`) and FedND (`client_loss=None`, plain CE).

  Args:
    model: the model pair (with dropout, for self-distillation).
    input_shape: one example's shape; num_classes: NC.
    num_clients, clients_per_round, schedule, client_opt, server_opt, client_map, chunk_size: as FedAvg.
    client_loss: the clients' local loss (see `self_distillation_loss`); None is CE (FedAvg's).
    server: noise-distillation settings; None aggregates the uploads as FedAvg does.
  """
  server_opt = server_opt or optax.sgd(1.0)
  client_phase = algorithm.make_client_phase(model, client_loss or client.supervised_loss(model), client_opt,
                                             schedule, client_map, chunk_size)
  sample = algorithm.make_sampler(num_clients, clients_per_round)
  space = noise.noise_space(model, input_shape)

  @jax.jit
  def aggregate_phase(state: ServerState, uploads: client.ClientOutput):
    average = algorithm.weighted_average(uploads.params, uploads.num_examples)
    return algorithm.finish_round(server_opt, state, average, uploads)

  @jax.jit
  def synthesis_phase(state: ServerState, uploads, ids, server_key, data: FederatedData):
    synth_key = jax.random.fold_in(server_key, 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(synth_key, i))(ids)
    n = server.noise_samples
    histograms = client_histograms(data, ids, num_classes) if server.uploads_histograms else None
    if server.noise_targets == "histogram":
      labels = jax.vmap(lambda k, h: noise.histogram_targets(jax.random.fold_in(k, 1), h, n))(keys, histograms)
    else:
      labels = jnp.tile(noise.balanced_targets(n, num_classes), (ids.shape[0], 1))
    gaussian = jax.vmap(lambda p, k: space.init_scale(p) * jax.random.normal(k, (n, *space.shape)))(
        uploads.params, keys)
    init = gaussian
    if server.noise_warm_start:
      memory = state.clients
      init = jnp.where(memory.seen[ids].reshape((-1,) + (1,) * (gaussian.ndim - 1)), memory.noise[ids], gaussian)
    optimizer = optax.adam(server.noise_lr)
    pool, stats = jax.vmap(lambda p, k, y, x0: noise.synthesize(
        space, p, k, y, steps=server.noise_steps, optimizer=optimizer, l2=server.noise_l2,
        projection=server.noise_projection, init=x0, adversarial=server.adversarial,
        student_params=state.params, temperature=server.temperature, bn_prior=server.bn_prior))(
            uploads.params, keys, labels, init)
    clients = None
    if server.noise_warm_start:
      clients = NoiseMemory(state.clients.noise.at[ids].set(pool), state.clients.seen.at[ids].set(True))
    diag = {"teacher_ce_initial": jnp.mean(stats.ce_initial), "teacher_ce": jnp.mean(stats.ce_final),
            "teacher_noise_accuracy": jnp.mean(stats.accuracy), "noise_norm": jnp.mean(stats.norm),
            "data_norm": jnp.mean(jax.vmap(space.norm)(uploads.params))}
    return pool, labels, histograms, clients, diag

  @jax.jit
  def distill_phase(state: ServerState, uploads, ids, server_key, pool, labels, histograms, clients):
    scale = jnp.float32(server.distill_lr_decay) ** state.round.astype(jnp.float32)
    distilled, diag = cross_distill(space, uploads.params, uploads.num_examples, pool, labels, ids,
                                    jax.random.fold_in(server_key, 1), server, histograms, scale)
    raw_average = algorithm.weighted_average(uploads.params, uploads.num_examples)
    average = (distilled if server.distill_target == "global"
               else algorithm.weighted_average(distilled, uploads.num_examples))
    state, train_loss = algorithm.finish_round(server_opt, state, average, uploads, clients)
    return state, train_loss, raw_average, diag

  def init(key) -> ServerState:
    clients = None
    if server is not None and server.noise_warm_start:
      n = server.noise_samples
      clients = NoiseMemory(jnp.zeros((num_clients, n, *space.shape), jnp.float32),
                            jnp.zeros((num_clients,), bool))
    return algorithm.init_state(model, server_opt, key, clients)

  def distills_in(round_index: int) -> bool:
    return (server is not None and clients_per_round >= 2
            and (server.distill_rounds == 0 or round_index < server.distill_rounds))

  def apply(state: ServerState, data: FederatedData):
    timer = algorithm.PhaseTimer()
    ids, keys, server_key = sample(state.rng, state.round)
    uploads = timer.lap("client_time_s", client_phase((state.params, None, data), (ids, keys, None)))
    model_bytes = algorithm.param_bytes(state.params)
    out = {"bytes_up": clients_per_round * (model_bytes + 4), "bytes_down": clients_per_round * model_bytes}
    if distills_in(int(state.round)):
      pool, labels, histograms, clients, synth_diag = timer.lap(
          "synthesis_time_s", synthesis_phase(state, uploads, ids, server_key, data))
      state, train_loss, raw_average, distill_diag = timer.lap(
          "distill_time_s", distill_phase(state, uploads, ids, server_key, pool, labels, histograms, clients))
      timer.times["server_time_s"] = timer.times["synthesis_time_s"] + timer.times["distill_time_s"]
      out.update({k: float(v) for k, v in {**synth_diag, **distill_diag}.items()})
      out["eval_params"] = {"no_distill": raw_average}
      if server.uploads_histograms:
        out["bytes_up"] += clients_per_round * num_classes * 4
    else:
      state, train_loss = timer.lap("server_time_s", aggregate_phase(state, uploads))
    return state, {**timer.times, "train_loss": float(train_loss), **out}

  return FederatedAlgorithm(init, apply)
