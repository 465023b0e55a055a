"""Baselines for non-IID data on the engine's interface: FedProx, SCAFFOLD, MOON, FedDyn, FedNTD.

Each is a local loss plus, where the method needs it, server-side state and per-client state stacked
[K, ...] (float32, on the device; gathered and scattered by the sampled ids, checkpointed with the rest).
Only SCAFFOLD, MOON and FedDyn keep per-client state, one params-sized pytree per client each: for the
824k-param cnn2 and K = 1,000 that is 3.3 GB.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import algorithm, client, losses
from fedsnd_jax.algorithm import FederatedAlgorithm, LocalSchedule, ServerState
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.models import Model

BASELINES = ("fedprox", "scaffold", "moon", "feddyn", "fedntd")


class Extra(NamedTuple):
  """Algorithm state beyond params: `server` (e.g. SCAFFOLD's c) and `clients` stacked [K, ...]."""

  server: Any = None
  clients: Any = None


def _dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _sq_dist(a, b):
  return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _ce(model, params, x, y, rng):
  return losses.cross_entropy(model.apply(params, x, train=True, rng=rng), y)


def fedprox_loss(model: Model, mu: float) -> client.LossFn:
  """CE + μ/2·‖w − w_g‖² (Li et al., MLSys 2020). Added to every example, so the batch mean adds it once."""

  def loss_fn(params, x, y, rng, ctx):
    return _ce(model, params, x, y, rng) + 0.5 * mu * _sq_dist(params, ctx.received)

  return loss_fn


def scaffold_loss(model: Model) -> client.LossFn:
  """CE + ⟨w, c − c_i⟩: its gradient is SCAFFOLD's corrected g − c_i + c (Karimireddy et al., ICML 2020)."""

  def loss_fn(params, x, y, rng, ctx):
    correction = jax.tree.map(lambda c, ci: jax.lax.stop_gradient(c - ci), ctx.shared, ctx.own)
    return _ce(model, params, x, y, rng) + _dot(params, correction)

  return loss_fn


def moon_contrastive(z, z_global, z_prev, tau: float):
  """MOON's ℓ_con = −log(e^{sim(z, z_g)/τ} / (e^{sim(z, z_g)/τ} + e^{sim(z, z_prev)/τ})), cosine sim.

  Args:
    z, z_global, z_prev: [B, d] representations of the local, global and previous local model.

  Returns:
    [B].
  """

  def cos(a, b):
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)

  pos, neg = cos(z, z_global) / tau, cos(z, z_prev) / tau
  return -pos + jnp.logaddexp(pos, neg)


def moon_loss(model: Model, mu: float, tau: float) -> client.LossFn:
  """CE + μ·ℓ_con(z, z_global, z_prev) (Li, He, Song, CVPR 2021); the other two models in eval mode."""

  def loss_fn(params, x, y, rng, ctx):
    ce = _ce(model, params, x, y, rng)
    if mu == 0:
      return ce
    z = model.represent(params, x, train=True, rng=rng)
    z_global = jax.lax.stop_gradient(model.represent(ctx.received, x))
    z_prev = jax.lax.stop_gradient(model.represent(ctx.own, x))
    return ce + mu * moon_contrastive(z, z_global, z_prev, tau)

  return loss_fn


def feddyn_loss(model: Model, alpha: float) -> client.LossFn:
  """CE − ⟨∇L_k, w⟩ + α/2·‖w − w_g‖² with the client's gradient state ∇L_k (Acar et al., ICLR 2021)."""

  def loss_fn(params, x, y, rng, ctx):
    return (_ce(model, params, x, y, rng) - _dot(params, jax.lax.stop_gradient(ctx.own))
            + 0.5 * alpha * _sq_dist(params, ctx.received))

  return loss_fn


def not_true_probs(logits, labels, tau: float):
  """σ(z/τ) over the classes other than the true one (renormalised; the true class gets exactly 0).

  Args:
    logits: [B, NC]; labels: [B].

  Returns:
    [B, NC].
  """
  true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jax.nn.softmax(jnp.where(true, -jnp.inf, logits.astype(jnp.float32) / tau))


def fedntd_loss(model: Model, beta: float, tau: float) -> client.LossFn:
  """CE + β·τ²·KL(q̃_g ‖ q̃_l), q̃ the not-true distributions of the global and the local model (Lee et al.,
  NeurIPS 2022)."""

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


# server(state, uploads, ids, own, steps [C]) -> (new average params, new Extra).
ServerFn = Callable[..., tuple[Any, Extra]]


def _average(state, uploads, ids, own, steps):
  del ids, own, steps
  return algorithm.weighted_average(uploads.params, uploads.num_examples), state.clients


def _scatter(stacked, ids, values):
  return jax.tree.map(lambda a, v: a.at[ids].set(v.astype(a.dtype)), stacked, values)


def _build(model: Model, loss_fn: client.LossFn, *, init_extra: Callable[[Any], Extra],
           server_fn: ServerFn, per_round_extra_bytes: int, num_clients, clients_per_round,
           schedule: LocalSchedule, client_opt, server_opt=None, client_map="vmap",
           chunk_size=8) -> FederatedAlgorithm:
  """A round: gather each sampled client's state, train, then `server_fn` aggregates and updates state."""
  server_opt = server_opt or optax.sgd(1.0)
  client_phase = algorithm.make_client_phase(model, loss_fn, client_opt, schedule, client_map, chunk_size)
  sample = algorithm.make_sampler(num_clients, clients_per_round)

  @jax.jit
  def gather(extra: Extra, ids):
    return jax.tree.map(lambda a: a[ids], extra.clients)

  @jax.jit
  def server_phase(state: ServerState, uploads: client.ClientOutput, ids, own, data: FederatedData):
    count = data.counts[ids]
    steps = (jnp.full_like(count, schedule.num_steps) if schedule.local_steps > 0
             else schedule.local_epochs * -(-count // schedule.batch_size))  # non-masked local steps
    average, extra = server_fn(state, uploads, ids, own, steps)
    return algorithm.finish_round(server_opt, state, average, uploads, extra)

  def init(key) -> ServerState:
    state = algorithm.init_state(model, server_opt, key)
    return state._replace(clients=init_extra(state.params))

  def apply(state: ServerState, data: FederatedData):
    timer = algorithm.PhaseTimer()
    ids, keys, _ = sample(state.rng, state.round)
    own = gather(state.clients, ids)
    shared = (state.params, state.clients.server, data)
    uploads = timer.lap("client_time_s", client_phase(shared, (ids, keys, own)))
    state, train_loss = timer.lap("server_time_s", server_phase(state, uploads, ids, own, data))
    model_bytes = algorithm.param_bytes(state.params)
    return state, {**timer.times, "train_loss": float(train_loss),
                   "bytes_up": clients_per_round * (model_bytes + 4 + per_round_extra_bytes),
                   "bytes_down": clients_per_round * (model_bytes + per_round_extra_bytes)}

  return FederatedAlgorithm(init, apply)


def _zeros_like(params):
  return jax.tree.map(jnp.zeros_like, params)


def _stacked(params, num_clients):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)).copy(), params)


def build_baseline(name: str, model: Model, *, mu: float = 0.01, tau: float = 0.5, alpha: float = 0.01,
                   beta: float = 1.0, client_step: float = 0.01, **common) -> FederatedAlgorithm:
  """Builds one of BASELINES on the FedAvg engine.

  Args:
    name: fedprox | scaffold | moon | feddyn | fedntd.
    model: the model pair (MOON needs `represent`).
    mu: FedProx's μ, or MOON's μ. tau: MOON's τ, or FedNTD's τ. alpha: FedDyn's α. beta: FedNTD's β.
    client_step: the clients' effective step size η (SCAFFOLD's option II control update divides by K_i·η;
      the paper's clients use plain SGD, so with heavy-ball momentum β pass lr / (1 − β), its long-run step).
    common: num_clients, clients_per_round, schedule, client_opt, server_opt, client_map, chunk_size.
  """
  num_clients = common["num_clients"]
  model_bytes = algorithm.param_bytes(jax.eval_shape(model.init, jax.random.key(0)))
  none = dict(init_extra=lambda params: Extra(), server_fn=_average, per_round_extra_bytes=0)
  if name == "fedprox":
    return _build(model, fedprox_loss(model, mu), **none, **common)
  if name == "fedntd":
    return _build(model, fedntd_loss(model, beta, tau), **none, **common)
  if name == "moon":
    def moon_server(state, uploads, ids, own, steps):
      average, _ = _average(state, uploads, ids, own, steps)
      return average, Extra(clients=_scatter(state.clients.clients, ids, uploads.params))

    return _build(model, moon_loss(model, mu, tau), server_fn=moon_server, per_round_extra_bytes=0,
                  init_extra=lambda params: Extra(clients=_stacked(params, num_clients)), **common)
  if name == "scaffold":
    def scaffold_server(state, uploads, ids, own, steps):
      # Option II: c_i⁺ = c_i − c + (w_g − w_i) / (K_i·η); c ← c + (|S|/N)·mean_i(c_i⁺ − c_i).
      c = state.clients.server
      scale = 1.0 / (steps.astype(jnp.float32) * client_step)
      new_ci = jax.tree.map(
          lambda ci, cs, wg, wi: ci - cs[None] + (wg[None] - wi) * scale.reshape((-1,) + (1,) * (wi.ndim - 1)),
          own, c, state.params, uploads.params)
      delta_c = jax.tree.map(lambda n, o: jnp.mean(n - o, axis=0), new_ci, own)
      frac = ids.shape[0] / num_clients
      new_c = jax.tree.map(lambda cs, d: cs + frac * d, c, delta_c)
      average, _ = _average(state, uploads, ids, own, steps)
      return average, Extra(new_c, _scatter(state.clients.clients, ids, new_ci))

    return _build(model, scaffold_loss(model), server_fn=scaffold_server, per_round_extra_bytes=model_bytes,
                  init_extra=lambda params: Extra(_zeros_like(params), _stacked(_zeros_like(params), num_clients)),
                  **common)
  if name == "feddyn":
    def feddyn_server(state, uploads, ids, own, steps):
      # ∇L_k ← ∇L_k − α(w_k − w_g); h ← h − α·(1/K)·Σ_k (w_k − w_g); w ← mean_k w_k − h/α.
      delta = jax.tree.map(lambda wi, wg: wi - wg[None], uploads.params, state.params)
      new_grad = jax.tree.map(lambda g, d: g - alpha * d, own, delta)
      h = jax.tree.map(lambda h, d: h - alpha * jnp.sum(d, axis=0) / num_clients, state.clients.server, delta)
      average, _ = _average(state, uploads, ids, own, steps)
      if alpha > 0:  # α = 0 switches the server correction off too (its α → 0 limit is not FedAvg).
        average = jax.tree.map(lambda a, hh: a - hh / alpha, average, h)
      return average, Extra(h, _scatter(state.clients.clients, ids, new_grad))

    return _build(model, feddyn_loss(model, alpha), server_fn=feddyn_server, per_round_extra_bytes=0,
                  init_extra=lambda params: Extra(_zeros_like(params), _stacked(_zeros_like(params), num_clients)),
                  **common)
  raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
