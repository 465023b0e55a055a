"""FedBuff: J. Nguyen, K. Malik, H. Zhan, A. Yousefpour, M. Rabbat, M. Malek, D. Huba, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022 — buffered asynchronous aggregation on the simulated clock
(`systems`, `systems.buffer_size` > 0).

Z = `concurrency` clients train at once, each from the model version it downloaded. When one uploads, a new
client (drawn uniformly among those online and not in flight, `systems.check_in`) downloads the current model
and starts; the upload that fills the buffer is replaced after the server's step, from the new model. Every
B = `buffer_size` arrivals the server steps, version v → v + 1:

  Δ_k = w_start,k − w_k,   τ_k = v − v_start,k,   s(τ) = (1 + τ)^−a   (a = `staleness_exponent`, 0.5 the paper's)
  u_k = w_v − s(τ_k)·Δ_k   (u_k = w_k when τ_k = 0)
  w_{v+1} = the round's server steps on the uploads u_k (FedAvg: server_opt(w_v, Σ_k n_k u_k / Σ_k n_k))

so with SGD at learning rate η the server takes w − η·Σ_k (n_k / Σ n) s(τ_k) Δ_k, the paper's step with the
arrivals weighted by their examples (the paper averages them unweighted, 1/B): at B = Z = C, a = 0 and every
client from the same version this is synchronous FedAvg. An algorithm's server steps see the rebased uploads
u_k as ordinary ones (FedSND distils them); BatchNorm statistics are not rebased (u_k takes w_k's). A client
that starts at version v takes sync round v's key for its id, with the number of its earlier starts at v folded
in when it starts again. A client drawn while none is online starts at its check-in; if that is after the
buffer's server step, it downloads the new model.

The B arrivals of a buffer run as one client phase over their own start models: the state holds the Z models in
flight, memory Z × P beside the global model (`InFlight.params`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import models, sampling, systems

BUFFER_STREAM = 1 << 20  # the draws of who starts next: fold_in(rng, BUFFER_STREAM), then the start's number


class InFlight(NamedTuple):
  """The clients in flight: ids [Z] int32 (K: an empty slot), version [Z] int32 the model version each
  downloaded, repeat [Z] int32 its earlier starts at that version, start [Z] and finish [Z] float32 the
  simulated times it downloads and its upload arrives, params [Z, P] the model it downloaded, started [] int32
  starts so far."""

  ids: jax.Array
  version: jax.Array
  repeat: jax.Array
  start: jax.Array
  finish: jax.Array
  params: Any
  started: jax.Array


class Buffer(NamedTuple):
  """A buffer's arrivals: ids [B] int32, version [B] int32 the version each started from, repeat [B] int32
  its earlier starts at that version, params [B, P] its start model, and the clock after the last of them (time
  of that arrival, the flight refilled)."""

  ids: jax.Array
  version: jax.Array
  repeat: jax.Array
  params: Any
  clock: systems.ClockState


def empty(params, concurrency: int, num_clients: int) -> InFlight:
  """No client in flight yet: slots are filled on the first buffer (`arrive`)."""
  slots = lambda a: jnp.zeros((concurrency, *a.shape), a.dtype)
  zeros, never = jnp.zeros((concurrency,), jnp.int32), jnp.full((concurrency,), jnp.inf, jnp.float32)
  return InFlight(jnp.full((concurrency,), num_clients, jnp.int32), zeros, zeros, never, never,
                  jax.tree.map(slots, params), jnp.zeros((), jnp.int32))


def _start(flight: InFlight, starts, slot, t, version, params, duration, key, availability):
  """A new client in `slot` from time t (or its next check-in): drawn among the online clients not in flight.
  starts: [K] int32 each client's starts at `version` so far."""
  num_clients = duration.shape[0]
  ids = flight.ids.at[slot].set(num_clients)  # the slot's last client may start again
  eligible = ~jnp.zeros((num_clients + 1,), bool).at[ids].set(True)[:num_clients]
  start, pool = systems.check_in(availability, t, eligible, 1)
  scores = jnp.where(pool, jax.random.uniform(jax.random.fold_in(key, flight.started), (num_clients,)), -1.0)
  cid = jnp.argmax(scores).astype(jnp.int32)
  return InFlight(ids.at[slot].set(cid), flight.version.at[slot].set(version),
                  flight.repeat.at[slot].set(starts[cid]), flight.start.at[slot].set(start),
                  flight.finish.at[slot].set(start + duration[cid]),
                  jax.tree.map(lambda a, p: a.at[slot].set(p), flight.params, params),
                  flight.started + 1), starts.at[cid].add(1)


def _restamp(flight: InFlight, starts, slot, version, params):
  """A client that checks in only after the server's step downloads the new model."""
  cid = flight.ids[slot]
  return flight._replace(version=flight.version.at[slot].set(version),
                         repeat=flight.repeat.at[slot].set(starts[cid]),
                         params=jax.tree.map(lambda a, p: a.at[slot].set(p), flight.params, params)
                         ), starts.at[cid].add(1)


def arrive(clock: systems.ClockState, version, params, duration, rng, availability, buffer_size: int) -> Buffer:
  """Fills the empty slots at the clock's time, then takes `buffer_size` arrivals in the order of their finish
  times, each slot refilled as its client uploads, but for the last: its slot stays empty until the server has
  stepped (the next buffer fills it from the new model).

  Args:
    clock: the clock with its flight. version: [] int32 the current model version. params: [P] the current
      model. duration: [K] each client's simulated seconds from download to upload. rng: the run's key.
    availability: `systems.Availability` or None (always online).
  """
  key, num_clients = jax.random.fold_in(rng, BUFFER_STREAM), duration.shape[0]
  begin = lambda f, c, slot, t: _start(f, c, slot, t, version, params, duration, key, availability)

  def fill(slot, carry):
    flight, starts = carry
    empty_slot, late = flight.ids[slot] == num_clients, flight.start[slot] > clock.time
    return jax.lax.switch(empty_slot + 2 * (late & ~empty_slot), [
        lambda f, c: (f, c), lambda f, c: begin(f, c, slot, clock.time),
        lambda f, c: _restamp(f, c, slot, version, params)], flight, starts)

  starts = jnp.zeros((num_clients,), jnp.int32)  # every start of this call is at `version`
  flight, starts = jax.lax.fori_loop(0, clock.flight.ids.shape[0], fill, (clock.flight, starts))
  like = jax.tree.map(lambda a: jnp.zeros((buffer_size, *a.shape[1:]), a.dtype), flight.params)
  nothing = jnp.zeros((buffer_size,), jnp.int32)
  arrived = (nothing, nothing, nothing, like, clock.time)

  def vacate(f, c, slot, t):
    del t
    return f._replace(ids=f.ids.at[slot].set(num_clients), finish=f.finish.at[slot].set(jnp.inf)), c

  def one(j, carry):
    flight, starts, (ids, versions, repeats, models, _) = carry
    slot = jnp.argmin(flight.finish)
    t = flight.finish[slot]
    taken = (ids.at[j].set(flight.ids[slot]), versions.at[j].set(flight.version[slot]),
             repeats.at[j].set(flight.repeat[slot]),
             jax.tree.map(lambda m, a: m.at[j].set(a[slot]), models, flight.params), t)
    flight, starts = jax.lax.cond(j < buffer_size - 1, begin, vacate, flight, starts, slot, t)
    return flight, starts, taken

  flight, _, (ids, versions, repeats, models, t) = jax.lax.fori_loop(0, buffer_size, one,
                                                                     (flight, starts, arrived))
  return Buffer(ids, versions, repeats, models, systems.ClockState(t, flight))


def staleness_weight(tau, exponent: float):
  """s(τ) = (1 + τ)^−a."""
  return (1.0 + tau.astype(jnp.float32)) ** -exponent


def rebase(current, start, trained, tau, exponent: float):
  """u_k = w − s(τ_k)·(w_start,k − w_k) for each arrival (exactly w_k when τ_k = 0).

  Args:
    current: [P] the model now. start, trained: [B, P]. tau: [B] int32 versions stale.
  """
  weight = staleness_weight(tau, exponent)

  def one(w, s, t):
    scale = weight.reshape((-1,) + (1,) * (s.ndim - 1))
    fresh = (tau == 0).reshape(scale.shape)
    return jnp.where(fresh, t, (w[None] - scale * (s - t)).astype(t.dtype))

  return jax.vmap(models.with_statistics_of)(jax.tree.map(one, current, start, trained), trained)


def client_key(rng, version, client_id, repeat):
  """A client starting at `version`: sync round `version`'s key for its id (`sampling.round_keys`), with its
  `repeat` earlier starts at that version folded in when it starts again."""
  key = jax.random.fold_in(sampling.round_streams(rng, version)[1], client_id)
  again = jax.random.fold_in(key, repeat)
  return jax.random.wrap_key_data(jnp.where(repeat > 0, jax.random.key_data(again), jax.random.key_data(key)))
