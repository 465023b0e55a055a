"""The one round driver: a pure description of a round, transforms of it, and the executor that runs it.

`describe` turns an algorithm's `RoundParts` into a `Round` — functions over pytrees, none jitted: sampling and
what the clients receive (`prepare`), the client phase, the algorithm's server steps with the aggregator's step
among them and the server optimiser's step after the last. Poisson sampling, a Byzantine attack and
vectorised runs are transforms of a `Round` (`poisson`, `attacked`, `vectorised`), each testable alone.
`execute` jits every step, times it after blocking on its outputs (`<name>_time_s` in metrics.jsonl) and
converts what the host reads. `build_rounds` composes them.
"""

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import (
  aggregation,
  buffered,
  client,
  compression,
  federated_data,
  host_loop,
  mapping,
  models,
  systems,
)
from fedsnd_jax.errors import InputError
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.rounds import (
  AGGREGATE,
  AGGREGATOR_STREAM,
  ATTACK_STREAM,
  NO_MECHANISMS,
  UPLOAD_STREAM,
  FederatedAlgorithm,
  Federation,
  LocalSchedule,
  MechanismParts,
  RoundContext,
  RoundOutput,
  RoundParts,
  ServerCarry,
  ServerState,
  ServerStep,
  param_bytes,
)
from fedsnd_jax.sampling import SAMPLINGS, cohort_cap, round_keys, round_streams


def make_client_phase(model, loss_fn: client.LossFn, federation: Federation, num_steps: int, client_map: str,
                      chunk_size: int, upload_transform=None, traced: bool = False, own_start: bool = False):
  """Returns client_phase((params, shared, data), (ids [C], keys [C], own, limits [C])) -> stacked ClientOutput;
  with `own_start`, client_phase((shared, data), (params [C, P], ids, keys, own, limits)): each client starts
  from its own params (FedBuff's arrivals, `buffered`).

  Every client starts from the received params and takes `num_steps` step slots of the federation's schedule,
  of which it runs the first `limits[c]` non-empty ones (a client with limit 0 trains nothing and uploads weight
  0), with its client optimiser; its loss sees
  ClientContext(params, shared, own[c]), `own` being per-client state stacked [C, ...] (or None).
  `upload_transform(received, trained, key)`, if given, is what each client does to its trained params before
  uploading them (local DP noise). The `loop` map drives each client's steps from the host
  (`host_loop`) unless the phase is `traced` inside a larger
  program (vectorised runs), where it loops over jitted clients.
  """
  stepped = client_map == "loop" and not traced
  make = host_loop.make_stepped_client_update if stepped else client.make_client_update
  update = make(loss_fn, federation.client_optimizer(), federation.schedule, num_steps, calibrate=model.calibrate)
  transform = upload_transform and (jax.jit(upload_transform) if stepped else upload_transform)

  def one(params, shared, data, cid, key, own, limit):
    out = update(params, client.ClientContext(params, shared, own), cid, key, data, limit)
    if transform is None:
      return out
    return out._replace(params=transform(params, out.params, jax.random.fold_in(key, UPLOAD_STREAM)))

  if own_start:
    one = lambda shared, data, params, *per_client, one=one: one(params, shared, data, *per_client)
  if stepped:
    return host_loop.threaded_loop(one)
  return mapping.map_clients(one, client_map, chunk_size)


def server_update(server_opt, params, opt_state, average):
  """FedOpt step: the server optimiser follows the pseudo-gradient params − average.

  With SGD at learning rate 1 and no momentum this is plain FedAvg: params ← average. BatchNorm statistics
  are never stepped: they take the average's values (`server_opt` must be wrapped in
  `models.freeze_statistics`, as `build_rounds` does).
  """
  pseudo_grad = jax.tree.map(lambda p, a: p - a, params, average)
  updates, opt_state = server_opt.update(pseudo_grad, opt_state, params)
  return models.with_statistics_of(optax.apply_updates(params, updates), average), opt_state


class RoundInputs(NamedTuple):
  """What `prepare` hands the round: ids [C] int32 sorted sampled clients, keys [C] their keys, the server's
  key, what every client receives (shared) and each one's own state [C, ...], and steps [C] int32 the local
  steps each takes (its schedule's, or fewer where a deadline stops it: `timed`). On the simulated clock also
  the clock when the round's clients start (`timed`) or after its last arrival (`buffered`); under FedBuff the
  models the clients started from, received [C, P], and how many versions old they are, staleness [C] int32
  (None: every client receives the global model)."""

  ids: jax.Array
  keys: jax.Array
  server_key: jax.Array
  shared: Any
  own: Any
  steps: jax.Array
  clock: Any = None
  received: Any = None
  staleness: Any = None


class ClockReport(NamedTuple):
  """What the clock tells the host about a round: the simulated seconds since the run began at its end, and
  how many clients uploaded (a dropped client's upload never left it) and downloaded (FedBuff's starts)."""

  time_s: float
  uploaded: int
  downloaded: int


class Round(NamedTuple):
  """One round as functions over pytrees, before anything is jitted (`execute`).

  Attributes:
    init: key -> ServerState (vectorised: [R] keys -> stacked states).
    prepare: (state, data) -> RoundInputs.
    clients: num_steps -> the client phase ((params, shared, data), (ids, keys, own)) -> uploads [C]
      (`make_client_phase`), built once per step count the data gives.
    corrupt: (uploads, ids, received params, server key) -> uploads, or None (no attack).
    server_steps: (round index (host int), the algorithm's state) -> the algorithm's steps in order, `AGGREGATE`
      among them.
    step: (ServerStep, last) -> (state, context, carry) -> (carry, diagnostics); the last step also applies the
      server optimiser and returns ((new state, train loss, eval models), diagnostics).
    schedule: the clients' local work (the step count comes from the data: `LocalSchedule.num_steps`).
    pad: data -> the data the round runs on (Poisson sampling's empty client).
    cohort: ids -> (clients that took part, diagnostics about it), on the host.
    traffic: (round index, cohort) -> (bytes up, bytes down) of the round.
    slots: C, the uploads a round has room for; sampling: one of SAMPLINGS; runs: R vectorised runs, or 0.
    clock: (state, round index, inputs) -> (inputs with the steps the clients finish, the clock after the
      round, diagnostics, `ClockReport`), or None (no simulated clock: `timed`, `fedbuff`).
    compress: (state, uploads, inputs) -> (uploads as the server reconstructs them, new `ServerState.uploads`),
      or None (uploads sent whole: `compressed`).
    rebase: (state, inputs, uploads) -> uploads, FedBuff's stale uploads rebased onto the global model
      (`buffered`), or None.
  """

  init: Callable
  prepare: Callable
  clients: Callable[[int], Callable]
  corrupt: Callable | None
  server_steps: Callable[[int, Any], tuple[ServerStep, ...]]
  step: Callable[[ServerStep, bool], Callable]
  schedule: LocalSchedule
  pad: Callable[[FederatedData], FederatedData]
  cohort: Callable[[jax.Array], tuple[int, dict]]
  traffic: Callable[[int, int], tuple[int, int]]
  slots: int
  sampling: str = "fixed"
  runs: int = 0
  clock: Callable | None = None
  compress: Callable | None = None
  rebase: Callable | None = None


def describe(parts: RoundParts, model: models.Model, federation: Federation, server_opt,
             aggregator: aggregation.Aggregator, clients: Callable[[int], Callable]) -> Round:
  """The round of an algorithm's parts with fixed-size sampling (C of K), no attack, one run."""
  num_clients, slots = federation.num_clients, federation.clients_per_round
  model_bytes = param_bytes(jax.eval_shape(model.init, jax.random.key(0)))

  def init(key) -> ServerState:
    """Fresh model params from split(key)[0]; the run's PRNG stream is split(key)[1]."""
    init_key, run_key = jax.random.split(key)
    params = model.init(init_key)
    return ServerState(params, server_opt.init(params), jnp.zeros((), jnp.int32), run_key,
                       parts.init_state(params), aggregator.init(params))

  def prepare(state: ServerState, data: FederatedData, cap: int = 0, eligible=None) -> RoundInputs:
    ids, keys, server_key = round_keys(state.rng, state.round, num_clients, slots, cap, eligible)
    shared, own = parts.client_inputs(state.algorithm, ids)
    return RoundInputs(ids, keys, server_key, shared, own, federation.schedule.steps_taken(data.counts[ids]))

  def aggregate(context: RoundContext, carry: ServerCarry):
    key = jax.random.fold_in(context.key, AGGREGATOR_STREAM)
    out = aggregator.apply(carry.models, carry.weights, carry.aggregator, context.params, key)
    carry = carry._replace(average=out.params, aggregator=out.state)
    return parts.after_aggregation(context, carry), out.diagnostics

  def step(server_step: ServerStep, last: bool):
    fn = aggregate if server_step is AGGREGATE else server_step.fn

    def run(state: ServerState, context: RoundContext, carry: ServerCarry):
      carry, diagnostics = fn(context, carry)
      if not last:
        return carry, diagnostics
      params, opt_state = server_update(server_opt, state.params, state.opt_state, carry.average)
      new = ServerState(params, opt_state, state.round + 1, state.rng, carry.state, carry.aggregator,
                        state.uploads, state.clock)
      train_loss = aggregation.weighted_average(context.uploads.loss, context.uploads.num_examples)
      return (new, train_loss, carry.eval_models), diagnostics

    run.__name__ = f"{server_step.name}{'_and_server_update' if last else ''}"
    return run

  def traffic(round_index: int, cohort: int) -> tuple[int, int]:
    extra_up, extra_down = parts.extra_bytes(round_index)
    extra_up += aggregator.protocol_bytes(cohort)
    return cohort * (model_bytes + 4 + extra_up), cohort * (model_bytes + extra_down)

  return Round(init, prepare, clients, None, parts.server_steps, step, federation.schedule, lambda data: data,
               lambda ids: (slots, {}), traffic, slots)


def poisson(r: Round, parts: RoundParts, model: models.Model, federation: Federation) -> Round:
  """Poisson sampling: every client in with probability C/K, the round padded to the cohort cap with the empty
  client (no examples: it trains nothing and weighs 0). Refused for algorithms that would see the empty client
  (per-client state, server steps of their own)."""
  stateful = jax.eval_shape(lambda: parts.init_state(model.init(jax.random.key(0)))) is not None
  if stateful or parts.server_steps(0, None) != (AGGREGATE,):
    raise InputError("client_sampling", "poisson sampling pads rounds with an empty client, which an algorithm "
                     "with per-client state or its own server steps would see; use fixed")
  cap = cohort_cap(federation.num_clients, federation.clients_per_round)[0]
  padded: dict[int, tuple[FederatedData, FederatedData]] = {}

  def pad(data: FederatedData) -> FederatedData:
    """The data with the empty client, built once per data object (not every round)."""
    if id(data) not in padded or padded[id(data)][0] is not data:
      padded.clear()
      padded[id(data)] = (data, federated_data.with_empty_client(data))
    return padded[id(data)][1]

  def cohort(ids) -> tuple[int, dict]:
    size = int(jnp.sum(ids < federation.num_clients))
    return size, {"cohort_size": size}

  return r._replace(prepare=lambda state, data: r.prepare(state, data, cap), pad=pad, cohort=cohort, slots=cap,
                    sampling="poisson")


def attacked(r: Round, attack: Callable) -> Round:
  """The Byzantine clients replace their uploads after local training (`attacks.model_attack`), with the
  round's attack key fold_in(server_key, ATTACK_STREAM)."""

  def corrupt(uploads, ids, received, server_key):
    return uploads._replace(params=attack(uploads.params, ids, received,
                                          jax.random.fold_in(server_key, ATTACK_STREAM)))

  return r._replace(corrupt=corrupt)


def compressed(r: Round, settings: compression.Settings, model: models.Model, num_clients: int) -> Round:
  """Clients send compressed updates (`compression`), optionally with error feedback, whose per-client memory
  is `ServerState.uploads`; the round's upload bytes are the compressed ones."""
  like = compression.trainable(jax.eval_shape(model.init, jax.random.key(0)))
  compressor = compression.make(settings, like)
  size, tensors = sum(math.prod(x.shape) for x in jax.tree.leaves(like)), len(jax.tree.leaves(like))
  saved = param_bytes(like) - compressor.bytes(size, tensors)

  def init(key) -> ServerState:
    state = r.init(key)
    return state._replace(uploads=compression.init_state(compressor, state.params, num_clients))

  def compress(state: ServerState, uploads: client.ClientOutput, inputs: RoundInputs):
    params, memory = compression.compress_uploads(compressor, state.params, uploads.params, uploads.num_examples,
                                                  state.uploads, inputs.ids, inputs.keys)
    return uploads._replace(params=params), memory

  def traffic(round_index: int, cohort: int) -> tuple[int, int]:
    up, down = r.traffic(round_index, cohort)
    return up - cohort * saved, down

  return r._replace(init=init, compress=compress, traffic=traffic)


def _per_client_bits(r: Round, round_index: int) -> tuple[float, float]:
  """Bits each client uploads and downloads (secure aggregation's bytes grow with the cohort: of a full one)."""
  up, down = r.traffic(round_index, r.slots)
  return 8.0 * up / r.slots, 8.0 * down / r.slots


def timed(r: Round, clock: systems.Clock, num_clients: int) -> Round:
  """The round on a simulated clock (`systems`): it starts when enough clients are online (`systems.check_in`)
  and samples among them; each sampled client's download, local steps and upload take the seconds of its
  profile; a deadline stops the clients that cannot finish (dropped, or uploading the steps they finished). The
  round lasts until its last client or the deadline."""
  timing = jax.jit(lambda ids, steps, up_bits, down_bits: systems.round_timing(clock, ids, steps, up_bits,
                                                                               down_bits))

  def init(key) -> ServerState:
    return r.init(key)._replace(clock=systems.ClockState(jnp.zeros((), jnp.float32)))

  def prepare(state: ServerState, data: FederatedData) -> RoundInputs:
    if clock.availability is None:
      return r.prepare(state, data)._replace(clock=state.clock)
    start, online = systems.check_in(clock.availability, state.clock.time, jnp.ones((num_clients,), bool),
                                     r.slots)
    return r.prepare(state, data, eligible=online)._replace(clock=systems.ClockState(start))

  def time_round(state: ServerState, round_index: int, inputs: RoundInputs):
    t = timing(inputs.ids, inputs.steps, *_per_client_bits(r, round_index))
    after = systems.ClockState(inputs.clock.time + t.seconds)
    begun, start, end, dropped, partial = jax.device_get((state.clock.time, inputs.clock.time, after.time,
                                                         t.dropped, t.partial))  # one transfer
    about = {"round_sim_s": float(end - begun), "waited_s": float(start - begun),
             "dropped_clients": int(dropped), "partial_clients": int(partial)}
    return inputs._replace(steps=t.steps), after, about, ClockReport(float(end), r.slots - int(dropped), r.slots)

  return r._replace(init=init, prepare=prepare, clock=time_round)


def fedbuff(r: Round, clock: systems.Clock, parts: RoundParts, federation: Federation) -> Round:
  """FedBuff on the simulated clock (`buffered`): a round is one buffer of `clock.buffer_size` arrivals, each
  trained from the model its client downloaded (a client phase over their own start models) and rebased onto
  the global model by its staleness before the algorithm's server steps."""
  size, num_clients = clock.buffer_size, federation.num_clients
  up_bits, down_bits = _per_client_bits(r, 0)

  def init(key) -> ServerState:
    state = r.init(key)
    flight = buffered.empty(state.params, clock.concurrency, num_clients)
    return state._replace(clock=systems.ClockState(jnp.zeros((), jnp.float32), flight))

  def prepare(state: ServerState, data: FederatedData) -> RoundInputs:
    _, duration = systems.client_seconds(clock.profiles, federation.schedule.steps_taken(data.counts), up_bits,
                                         down_bits)
    buf = buffered.arrive(state.clock, state.round, state.params, duration, state.rng, clock.availability, size)
    order = jnp.argsort(buf.ids)
    ids, versions = buf.ids[order], buf.version[order]
    keys = jax.vmap(lambda v, i, again: buffered.client_key(state.rng, v, i, again))(versions, ids,
                                                                                    buf.repeat[order])
    server_key = round_streams(state.rng, state.round)[2]
    shared, own = parts.client_inputs(state.algorithm, ids)
    return RoundInputs(ids, keys, server_key, shared, own, federation.schedule.steps_taken(data.counts[ids]),
                       buf.clock, jax.tree.map(lambda a: a[order], buf.params), state.round - versions)

  def arrivals(state: ServerState, round_index: int, inputs: RoundInputs):
    del round_index
    flight = inputs.clock.flight
    begun, end, staleness, started, oldest = jax.device_get((
        state.clock.time, inputs.clock.time, inputs.staleness, flight.started - state.clock.flight.started,
        jnp.min(jnp.where(flight.ids < num_clients, flight.version, state.round + 1))))  # one transfer
    about = {"round_sim_s": float(end - begun), "staleness": staleness.tolist(),
             "mean_staleness": float(staleness.mean()), "version_lag": int(state.round) + 1 - int(oldest)}
    return inputs, inputs.clock, about, ClockReport(float(end), size, int(started))

  def rebase(state: ServerState, inputs: RoundInputs, uploads: client.ClientOutput) -> client.ClientOutput:
    return uploads._replace(params=buffered.rebase(state.params, inputs.received, uploads.params,
                                                   inputs.staleness, clock.staleness_exponent))

  return r._replace(init=init, prepare=prepare, clock=arrivals, rebase=rebase, slots=size,
                    cohort=lambda ids: (size, {}))


def vectorised(r: Round, runs: int, traced_clients: Callable[[int], Callable]) -> Round:
  """R runs as one program: every phase vmapped over a leading run axis of the state and of the data
  (`federated_data.stack`), the client phase traced (`make_client_phase(traced=True)`)."""
  if r.corrupt is not None or r.sampling != "fixed" or r.clock is not None:
    raise InputError("vectorize", "vectorised runs take fixed client sampling, no Byzantine attack and no "
                     "simulated clock (their clients and profiles differ per seed)")
  return r._replace(init=jax.vmap(r.init), prepare=jax.vmap(r.prepare),
                    compress=r.compress and jax.vmap(r.compress),
                    clients=lambda num_steps: jax.jit(jax.vmap(traced_clients(num_steps))),
                    step=lambda server_step, last: jax.vmap(r.step(server_step, last)), runs=runs)


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


def _host(diagnostics: dict, train_loss, runs: int) -> tuple[dict, float | list]:
  """Diagnostics and training loss as host floats (lists for per-client values and for vectorised runs)."""
  diagnostics = {k: float(v) if jnp.ndim(v) == 0 else jax.device_get(v).tolist() for k, v in diagnostics.items()}
  return diagnostics, jax.device_get(train_loss).tolist() if runs else float(train_loss)


def execute(r: Round) -> FederatedAlgorithm:
  """Runs a described round: one jitted call per phase and per (server step, is-last), each timed."""
  prepare = jax.jit(r.prepare)
  corrupt = r.corrupt and jax.jit(r.corrupt)
  compress = r.compress and jax.jit(r.compress)
  rebase = r.rebase and jax.jit(r.rebase)
  phases: dict[int, Callable] = {}
  steps: dict[tuple[ServerStep, bool], Callable] = {}

  def client_phase(data: FederatedData):
    num_steps = r.schedule.num_steps(data.max_count)
    if num_steps not in phases:
      phases[num_steps] = r.clients(num_steps)
    return phases[num_steps]

  def compiled(server_step: ServerStep, last: bool):
    if (server_step, last) not in steps:
      steps[server_step, last] = jax.jit(r.step(server_step, last))
    return steps[server_step, last]

  def apply(state: ServerState, data: FederatedData) -> tuple[ServerState, RoundOutput]:
    round_index = int(jnp.ravel(state.round)[0])  # (vectorised runs are all at one round)
    data = r.pad(data)
    timer = PhaseTimer()
    inputs = prepare(state, data)
    clock, about, report = state.clock, {}, None
    if r.clock is not None:
      inputs, clock, about, report = r.clock(state, round_index, inputs)
    per_client = (inputs.ids, inputs.keys, inputs.own, inputs.steps)
    if inputs.received is None:
      uploads = client_phase(data)((state.params, inputs.shared, data), per_client)
    else:  # FedBuff: each client from the model it downloaded
      uploads = rebase(state, inputs, client_phase(data)((inputs.shared, data), (inputs.received, *per_client)))
    memory = state.uploads
    if compress is not None:
      uploads, memory = compress(state, uploads, inputs)
    if corrupt is not None:
      uploads = corrupt(uploads, inputs.ids, state.params, inputs.server_key)
    uploads = timer.lap("client_time_s", uploads)
    chex.assert_tree_shape_prefix(uploads, (r.runs, r.slots) if r.runs else (r.slots,))
    context = RoundContext(state.round, state.params, state.algorithm, inputs.ids, inputs.own, uploads,
                           inputs.steps, inputs.server_key, data)
    carry = ServerCarry(uploads.params, uploads.num_examples, None, state.algorithm, state.aggregator, None, {})
    server_steps = r.server_steps(round_index, state.algorithm)
    if server_steps.count(AGGREGATE) != 1:
      raise ValueError(f"a round needs exactly one AGGREGATE step, got {[s.name for s in server_steps]}")
    diagnostics = {}
    for i, server_step in enumerate(server_steps):
      out = compiled(server_step, i == len(server_steps) - 1)(state, context, carry)
      carry, diag = timer.lap(f"{server_step.name}_time_s", out)
      diagnostics.update(diag)
    new_state, train_loss, eval_models = carry
    new_state = new_state._replace(uploads=memory, clock=clock)
    times = {**timer.times, "server_time_s": sum(timer.times[f"{s.name}_time_s"] for s in server_steps)}
    cohort, sampled = r.cohort(inputs.ids)
    diagnostics, train_loss = _host({**diagnostics, **sampled}, train_loss, r.runs)
    up, down = r.traffic(round_index, cohort)
    if report is not None:
      up, down = up * report.uploaded // cohort, down * report.downloaded // cohort
    return new_state, RoundOutput(times, {**diagnostics, **about}, train_loss, eval_models, up, down,
                                  None if report is None else report.time_s)

  return FederatedAlgorithm(r.init, apply)


def build_rounds(parts: RoundParts, model: models.Model, federation: Federation, *, server_opt=None,
                 mechanisms: MechanismParts = NO_MECHANISMS, client_map: str = "vmap", chunk_size: int = 8,
                 runs: int = 0) -> FederatedAlgorithm:
  """The round driver: turns an algorithm's parts into `FederatedAlgorithm(init, apply)`.

  Args:
    parts: the algorithm's parts; model: the model pair.
    federation: K, C, the local schedule, the client optimiser and how clients are sampled ("fixed": C of K
      without replacement; "poisson": each client with probability C/K, `poisson`).
    server_opt: optimiser on the pseudo-gradient w − aggregate; None is SGD at lr 1 (plain FedAvg).
    mechanisms: what the run's mechanisms plug in: the aggregator (None: the example-weighted mean), the
      clients' upload transform (local DP noise), the Byzantine attack, the simulated clock and upload
      compression.
    client_map: one of `mapping.CLIENT_MAPS`; chunk_size: clients per chunk for `chunked`.
    runs: R > 0 runs R federations as one program (vectorised sweeps, `vectorised`): a round's train_loss and
      diagnostics are then lists over runs and its eval_models stacked. Runs may differ in seed and partition,
      not in anything the driver closes over (fixed sampling, no attack, not `sharded`).
  """
  if federation.sampling not in SAMPLINGS:
    raise InputError("client_sampling", f"unknown {federation.sampling!r}; allowed: {', '.join(SAMPLINGS)}")
  if runs and client_map == "sharded":
    raise InputError("vectorize", "vectorised runs take a client_map other than sharded")
  server_opt = models.freeze_statistics(server_opt or optax.sgd(1.0))
  aggregator = mechanisms.aggregator or aggregation.weighted_mean()

  clock = mechanisms.clock

  def clients(traced: bool) -> Callable[[int], Callable]:
    own_start = clock is not None and clock.buffer_size > 0
    return lambda num_steps: make_client_phase(model, parts.client_loss, federation, num_steps, client_map,
                                               chunk_size, mechanisms.upload_transform, traced, own_start)

  r = describe(parts, model, federation, server_opt, aggregator, clients(False))
  if federation.sampling == "poisson":
    r = poisson(r, parts, model, federation)
  if mechanisms.compression is not None:
    r = compressed(r, mechanisms.compression, model, federation.num_clients)
  if mechanisms.attack is not None:
    r = attacked(r, mechanisms.attack)
  if clock is not None:
    r = fedbuff(r, clock, parts, federation) if clock.buffer_size else timed(r, clock, federation.num_clients)
  if runs:
    r = vectorised(r, runs, clients(True))
  return execute(r)
