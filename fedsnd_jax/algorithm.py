"""The plug-in interface every algorithm implements, and the one round driver that runs them all (DESIGN §3).

A plug-in (`Algorithm`) supplies only what differs between methods: the clients' local loss, its typed
state, what the sampled clients receive besides the global model, its named server steps and its state
update after aggregation. `build_rounds` turns it into `FederatedAlgorithm(init, apply)`; one round is

  sample C of K clients → client phase (any client_map) → the algorithm's server steps, the aggregator's
  step among them → the server optimiser's step towards the aggregate → round counter + 1.

Every step is one jitted call, timed after blocking on its outputs (`<name>_time_s` in metrics.jsonl).
"""

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import aggregation, client, federated_data, mapping, models
from fedsnd_jax.errors import InputError
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.shapes import Diagnostics, Params, PRNGKey

# The aggregator's randomness this round is fold_in(server_key, AGGREGATOR_STREAM), an upload transform's
# fold_in(client_key, UPLOAD_STREAM); algorithms and clients fold in small integers of their own.
AGGREGATOR_STREAM = 1 << 16
UPLOAD_STREAM = 1 << 16
ATTACK_STREAM = 1 << 17


class LocalSchedule(NamedTuple):
  """Static local schedule: B, S, and whether S comes from epochs or a fixed step count."""

  batch_size: int
  num_steps: int
  local_epochs: int
  local_steps: int

  def steps_taken(self, counts):
    """[C] int32 non-masked local steps of clients with `counts` [C] examples."""
    if self.local_steps > 0:
      return jnp.full_like(counts, self.num_steps)
    return self.local_epochs * -(-counts // self.batch_size)


class Federation(NamedTuple):
  """What a plug-in's builder may read about the run besides its own hyperparameters.

  Attributes:
    num_clients: K; clients_per_round: C.
    schedule: the local schedule.
    client_lr, client_momentum, weight_decay: the clients' SGD (`client.client_optimizer`).
    input_shape: one example's shape; num_classes: NC.
    sampling: how a round's clients are drawn, one of SAMPLINGS (`round_keys`).
  """

  num_clients: int
  clients_per_round: int
  schedule: LocalSchedule
  client_lr: float
  client_momentum: float
  weight_decay: float
  input_shape: tuple[int, ...]
  num_classes: int
  sampling: str = "fixed"

  def client_optimizer(self) -> optax.GradientTransformation:
    return client.client_optimizer(self.client_lr, self.client_momentum, self.weight_decay)


class ServerState(NamedTuple):
  """Everything a run needs to continue; an immutable pytree of arrays.

  Attributes:
    params: [P] global model params.
    opt_state: the server optimiser's state.
    round: int32 [], rounds completed.
    rng: typed PRNG key; round r uses fold_in(rng, r).
    algorithm: the algorithm's own typed state (e.g. `ScaffoldState`), or None.
    aggregator: the aggregator's state.
  """

  params: Params
  opt_state: Any
  round: jax.Array
  rng: PRNGKey
  algorithm: Any
  aggregator: Any


class RoundContext(NamedTuple):
  """What every server step may read; fixed for the round.

  Attributes:
    round: int32 [], this round's index (0-based).
    params: [P] the global model the clients received.
    state: the algorithm's state at the start of the round.
    ids: [C] int32 sorted ids of the sampled clients.
    own: the sampled clients' per-client state [C, ...] (`Algorithm.client_inputs`), or None.
    uploads: the clients' uploads, stacked [C].
    steps: [C] int32 local steps each client took (padding steps excluded).
    key: the round's server key.
    data: the federated training data (server steps may only read what clients upload from it).
  """

  round: jax.Array
  params: Params
  state: Any
  ids: jax.Array
  own: Any
  uploads: client.ClientOutput
  steps: jax.Array
  key: PRNGKey
  data: FederatedData


class ServerCarry(NamedTuple):
  """What server steps hand on; each returns an updated copy.

  Attributes:
    models: [C, P] what the aggregator combines: the uploads, unless a step replaced them (FedSND's
      distilled students).
    weights: [C] their aggregation weights: the example counts, unless a step changed them (0 leaves a client
      out, e.g. FedSND's noise consensus).
    average: [P] the aggregate once the aggregation step has run, else None; steps after it may change it.
    state: the algorithm's new state.
    aggregator: the aggregator's new state.
    work: whatever one step hands the next (FedSND's noise pool), else None.
    eval_models: extra [P] models to evaluate beside the new global one, by name.
  """

  models: Params
  weights: jax.Array
  average: Params | None
  state: Any
  aggregator: Any
  work: Any
  eval_models: dict[str, Params]


# step(context, carry) -> (carry, diagnostics); jitted by the driver.
ServerStepFn = Callable[[RoundContext, ServerCarry], tuple[ServerCarry, Diagnostics]]


class ServerStep(NamedTuple):
  """A named server step (`<name>_time_s` in the metrics). `AGGREGATE` marks where aggregation runs."""

  name: str
  fn: ServerStepFn | None


AGGREGATE = ServerStep("aggregate", None)


def _no_state(params):
  del params


def _nothing_sent(state, ids):
  del state, ids
  return None, None


def _unchanged(context, carry):
  del context
  return carry


def _aggregate_only(round_index):
  del round_index
  return (AGGREGATE,)


def _no_extra_bytes(round_index):
  del round_index
  return 0, 0


class Algorithm(NamedTuple):
  """A federated algorithm as the round driver sees it: only what differs between methods.

  Attributes:
    client_loss: the clients' per-example local loss (see `client.LossFn`); it sees
      ClientContext(received params, shared, own).
    init_state: params -> the algorithm's typed state (per-client parts stacked [K, ...]), or None.
    client_inputs: (state, ids [C]) -> (shared, own): what every sampled client receives besides the
      global model (SCAFFOLD's c) and each one's own state gathered [C, ...] (its control variate).
    server_steps: round index (host int) -> the round's steps in order, `AGGREGATE` among them; steps
      before it may replace `carry.models`, steps after it `carry.average`.
    after_aggregation: (context, carry) -> carry, run in the aggregation step right after the aggregator:
      per-client state updates (scattered by `context.ids`) and corrections of `carry.average`.
    extra_bytes: round index -> (up, down) bytes per sampled client beyond the model and its example count.
  """

  client_loss: client.LossFn
  init_state: Callable[[Params], Any] = _no_state
  client_inputs: Callable[[Any, jax.Array], tuple[Any, Any]] = _nothing_sent
  server_steps: Callable[[int], tuple[ServerStep, ...]] = _aggregate_only
  after_aggregation: Callable[[RoundContext, ServerCarry], ServerCarry] = _unchanged
  extra_bytes: Callable[[int], tuple[int, int]] = _no_extra_bytes


def _no_model_options(hyperparameters) -> dict:
  del hyperparameters
  return {}


def _any_privacy(hyperparameters) -> tuple[str, ...]:
  del hyperparameters
  return ("central", "local", "secure_aggregation")


class Plugin(NamedTuple):
  """A registered algorithm (`fedsnd_jax.algorithms.REGISTRY`).

  Attributes:
    build: (model, hyperparameters, federation) -> Algorithm.
    hyperparameters: the NamedTuple class of its hyperparameters; its defaults are the paper's (cited).
    validate: (hyperparameters, federation) -> None; raises InputError naming `section.field`. It may run
      before the data is loaded (the binaries check every sweep cell first): then the federation's schedule,
      input_shape and num_classes are None.
    section: the config section holding its hyperparameters (`--config.<section>.<field>`).
    model_options: hyperparameters -> extra `models.build_model` arguments (MOON's projection head).
    privacy: hyperparameters -> the privacy mechanisms its releases can be covered by: "central" DP (all the
      server learns is the clipped, noised aggregate of model updates), "local" DP (every upload noised by its
      client; the server may use individual models) and "secure_aggregation" (the server learns only the sum
      of the updates). Default: all three.
  """

  build: Callable[..., Algorithm]
  hyperparameters: type
  validate: Callable[..., None]
  section: str
  model_options: Callable[[Any], dict] = _no_model_options
  privacy: Callable[[Any], tuple[str, ...]] = _any_privacy


class AlgorithmInfo(NamedTuple):
  """The run's algorithm as a mechanism's validation sees it: its registry name, and the privacy mechanisms its
  releases can be covered by (`Plugin.privacy` of its hyperparameters)."""

  name: str
  privacy: tuple[str, ...]


class MechanismParts(NamedTuple):
  """What a mechanism plugs into a run (None: nothing of that kind).

  Attributes:
    aggregator: replaces the example-weighted mean (at most one mechanism of a run supplies one).
    upload_transform: (received [P], trained [P], key) -> uploaded [P], run by every client (local DP).
    attack: (uploads [C, P], ids [C], received [P], key) -> uploads [C, P], the Byzantine clients' replacement
      of their uploads after local training.
    data_transform: FederatedData -> FederatedData, applied once to the training data (label flipping).
    accountant: the run's privacy accountant (`privacy.Accountant`), for ε in the metrics.
  """

  aggregator: Any = None
  upload_transform: Callable | None = None
  attack: Callable | None = None
  data_transform: Callable[[FederatedData], FederatedData] | None = None
  accountant: Any = None


class MechanismSpec(NamedTuple):
  """A registered mechanism (`fedsnd_jax.mechanisms.REGISTRY`), like `Plugin` for an algorithm.

  Attributes:
    section: its config section (`--config.<section>.<field>`).
    settings: the NamedTuple class of its settings; the defaults leave it off.
    enabled: settings -> whether it is on.
    validate: (settings, federation, AlgorithmInfo) -> None; raises InputError naming `section.field`. Runs
      before the data is loaded (the federation's schedule, input_shape and num_classes may be None), whether
      the mechanism is on or not.
    build: (settings, federation, seed) -> MechanismParts, for a mechanism that is on; the federation is
      complete.
  """

  section: str
  settings: type
  enabled: Callable[[Any], bool]
  validate: Callable[..., None]
  build: Callable[..., MechanismParts]


class RoundOutput(NamedTuple):
  """What a round reports besides the new state.

  Attributes:
    times: seconds of each phase (`client_time_s`, `<step>_time_s`, and their server sum `server_time_s`).
    diagnostics: the server steps' and the aggregator's values, as host floats (lists for per-client ones).
    train_loss: the uploads' example-weighted mean training loss.
    (Vectorised runs, `build_rounds(runs=R)`: train_loss and every diagnostic are lists over the runs.)
    eval_models: extra [P] models to evaluate, by name (e.g. `no_distill`).
    bytes_up, bytes_down: this round's traffic over all sampled clients.
  """

  times: dict[str, float]
  diagnostics: dict[str, float | list]
  train_loss: float | list[float]
  eval_models: dict[str, Params]
  bytes_up: int
  bytes_down: int


class FederatedAlgorithm(NamedTuple):
  """init(key) -> ServerState; apply(state, data) -> (ServerState, RoundOutput)."""

  init: Callable[[PRNGKey], ServerState]
  apply: Callable[[ServerState, FederatedData], tuple[ServerState, RoundOutput]]


SAMPLINGS = ("fixed", "poisson")
# Poisson sampling's cohort cap: the chance a round samples more clients than the cap (they are then left out).
# DP accounting charges (1 + e^ε)·rounds·overflow to δ (`privacy.Accountant`), so it must be far below δ/e^ε:
# 10⁻¹⁵ costs 3·10⁻¹⁰ of δ at ε = 9 over 30 rounds, and a few more slots than 10⁻⁹ (40 against 32 for 10 of 100).
COHORT_OVERFLOW = 1e-15


def binomial_tail(n: int, p: float, m: int) -> float:
  """P[X > m] for X ~ Binomial(n, p)."""
  if m >= n:
    return 0.0
  log_q = math.log1p(-p) if p < 1 else -math.inf
  terms = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * log_q
           if k < n or p < 1 else 0.0 for k in range(m + 1, n + 1))
  return min(1.0, sum(math.exp(t) for t in terms))


def cohort_cap(num_clients: int, clients_per_round: int) -> tuple[int, float]:
  """Poisson sampling with rate q = C/K draws Binomial(K, q) clients; the round has room (static shapes) for the
  smallest cap with P[more than cap] ≤ COHORT_OVERFLOW. Returns (cap, that probability)."""
  p = clients_per_round / num_clients
  lo, hi = clients_per_round, num_clients
  while lo < hi:  # binary search: the tail falls as the cap grows
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if binomial_tail(num_clients, p, mid) <= COHORT_OVERFLOW else (mid + 1, hi)
  return lo, binomial_tail(num_clients, p, lo)


def round_keys(rng, round_index, num_clients: int, clients_per_round: int, cap: int = 0):
  """Samples the round's clients and derives their keys.

  round_key = fold_in(rng, round); (sample_key, clients_key, server_key) = split(round_key, 3). Fixed-size
  sampling (cap = 0): the C of K client ids are drawn without replacement from sample_key and sorted. Poisson
  sampling (cap > 0): every client is in with probability q = C/K independently (u_k < q, u ~ U[0, 1)^K from
  sample_key); the sampled ids, sorted, fill the first slots of `cap` and the rest hold K, the empty client
  (no examples: it trains nothing and weighs 0); if more than cap are sampled, the highest ids are left out (a
  chance of `cohort_cap`'s overflow per round). Client k's key is fold_in(clients_key, k), so it depends only on
  the seed, the round and the client id.

  Returns:
    ids: [C] (or [cap]) int32 sorted client ids.
    keys: [C] (or [cap]) typed keys.
    server_key: a typed key for the server's own randomness this round.
  """
  sample_key, clients_key, server_key = jax.random.split(jax.random.fold_in(rng, round_index), 3)
  if cap:
    sampled = jax.random.uniform(sample_key, (num_clients,)) < clients_per_round / num_clients
    ids = jnp.sort(jnp.where(sampled, jnp.arange(num_clients), num_clients))[:cap].astype(jnp.int32)
  elif clients_per_round == num_clients:
    ids = jnp.arange(num_clients, dtype=jnp.int32)
  else:
    ids = jnp.sort(jax.random.choice(sample_key, num_clients, (clients_per_round,), replace=False))
    ids = ids.astype(jnp.int32)
  return ids, jax.vmap(lambda i: jax.random.fold_in(clients_key, i))(ids), server_key


def _traced_at_most(fn, max_traces: int | None):
  return fn if max_traces is None else chex.assert_max_traces(fn, n=max_traces)


def make_client_phase(model, loss_fn: client.LossFn, client_opt, schedule: LocalSchedule, client_map: str,
                      chunk_size: int, max_traces: int | None = None, upload_transform=None, traced: bool = False):
  """Returns client_phase((params, shared, data), (ids [C], keys [C], own)) -> stacked ClientOutput.

  Every client starts from the received params; its loss sees ClientContext(params, shared, own[c]),
  `own` being per-client state stacked [C, ...] (or None). `upload_transform(received, trained, key)`, if
  given, is what each client does to its trained params before uploading them (local DP noise). The `loop` map
  drives each client's steps from the host (`client.make_stepped_client_update`, `mapping.threaded_loop`)
  unless the phase is `traced` inside a larger program (vectorised runs), where it loops over jitted clients.
  """
  stepped = client_map == "loop" and not traced
  if stepped:
    update = client.make_stepped_client_update(loss_fn, client_opt, **schedule._asdict(),
                                               calibrate=model.calibrate,
                                               check=lambda fn: _traced_at_most(fn, max_traces))
    transform = upload_transform and jax.jit(_traced_at_most(upload_transform, max_traces))
  else:
    update = client.make_client_update(loss_fn, client_opt, **schedule._asdict(), calibrate=model.calibrate)
    transform = upload_transform

  def one(params, shared, data, cid, key, own):
    out = update(params, client.ClientContext(params, shared, own), cid, key, data)
    if transform is None:
      return out
    return out._replace(params=transform(params, out.params, jax.random.fold_in(key, UPLOAD_STREAM)))

  if stepped:
    return mapping.threaded_loop(one)
  return mapping.map_clients(_traced_at_most(one, max_traces), client_map, chunk_size)


def server_update(server_opt, params, opt_state, average):
  """FedOpt step: the server optimiser follows the pseudo-gradient params − average.

  With SGD at learning rate 1 and no momentum this is plain FedAvg: params ← average. BatchNorm statistics
  are never stepped: they take the average's values (`server_opt` must be wrapped in
  `models.freeze_statistics`, as `build_rounds` does).
  """
  pseudo_grad = jax.tree.map(lambda p, a: p - a, params, average)
  updates, opt_state = server_opt.update(pseudo_grad, opt_state, params)
  return models.with_statistics_of(optax.apply_updates(params, updates), average), opt_state


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


def build_rounds(plugin: Algorithm, model: models.Model, *, num_clients: int, clients_per_round: int,
                 schedule: LocalSchedule, client_opt: optax.GradientTransformation,
                 server_opt: optax.GradientTransformation | None = None,
                 aggregator: aggregation.Aggregator | None = None, upload_transform=None, attack=None,
                 client_map: str = "vmap", chunk_size: int = 8, sampling: str = "fixed",
                 max_traces: int | None = None, runs: int = 0) -> FederatedAlgorithm:
  """The round driver: turns a plug-in into `FederatedAlgorithm(init, apply)`.

  Args:
    plugin: the algorithm's parts.
    model: the model pair.
    num_clients: K; clients_per_round: C ≤ K, sampled without replacement each round, or the expected cohort
      with Poisson sampling.
    schedule: the local schedule (see `client_batches`).
    client_opt: the clients' optax optimiser (fresh state every round).
    server_opt: optimiser on the pseudo-gradient w − aggregate; None is SGD at lr 1 (plain FedAvg).
    aggregator: how uploads are combined; None is the example-weighted mean.
    upload_transform: (received [P], trained [P], key) -> uploaded [P], run by every client under the client
      map (e.g. `privacy.local_noise`); None uploads the trained params.
    attack: (uploads [C, P], ids [C], received [P], key) -> uploads [C, P], the Byzantine clients' replacement of
      their uploads after local training (`attacks.model_attack`); part of the client phase.
    client_map: one of `mapping.CLIENT_MAPS`; chunk_size: clients per chunk for `chunked`.
    sampling: "fixed" (C of K) or "poisson" (each client with probability C/K; `round_keys`). Poisson sampling
      pads the round with the empty client, so it takes an algorithm without per-client state or server steps
      beyond aggregation, and an aggregator that gives an upload of weight 0 no say (the mean, DP's).
    max_traces: a debugging check: fail (chex.assert_max_traces) when any phase is traced more often.
    runs: R > 0 runs R federations as one program (vectorised sweeps): every phase is `jax.vmap`ped over a
      leading run axis of the state (init takes [R] keys) and of the data (`federated_data.stack`); a round's
      train_loss and diagnostics are then lists over runs and its eval_models stacked. Runs may differ in
      seed and partition, not in anything the driver closes over (fixed sampling, no attack, not `sharded`).
  """
  if runs and (sampling != "fixed" or attack is not None or client_map == "sharded"):
    raise InputError("vectorize", "vectorised runs take fixed client sampling, no Byzantine attack (its clients "
                     "differ per seed) and a client_map other than sharded")
  if sampling not in SAMPLINGS:
    raise InputError("client_sampling", f"unknown {sampling!r}; allowed: {', '.join(SAMPLINGS)}")
  cap = 0
  if sampling == "poisson":
    cap = cohort_cap(num_clients, clients_per_round)[0]
    stateful = jax.eval_shape(lambda: plugin.init_state(model.init(jax.random.key(0)))) is not None
    if stateful or plugin.server_steps(0) != (AGGREGATE,):
      raise InputError("client_sampling", "poisson sampling pads rounds with an empty client, which an algorithm "
                       "with per-client state or its own server steps would see; use fixed")
  slots = cap or clients_per_round
  server_opt = models.freeze_statistics(server_opt or optax.sgd(1.0))
  aggregator = aggregator or aggregation.weighted_mean()
  client_phase = make_client_phase(model, plugin.client_loss, client_opt, schedule, client_map, chunk_size,
                                   max_traces, upload_transform, traced=bool(runs))
  over_runs = jax.vmap if runs else (lambda fn: fn)
  if runs:
    client_phase = jax.jit(jax.vmap(client_phase))
  model_bytes = param_bytes(jax.eval_shape(model.init, jax.random.key(0)))

  def prepare(state: ServerState, data: FederatedData):
    ids, keys, server_key = round_keys(state.rng, state.round, num_clients, clients_per_round, cap)
    shared, own = plugin.client_inputs(state.algorithm, ids)
    return ids, keys, server_key, shared, own, schedule.steps_taken(data.counts[ids])

  def aggregate(context: RoundContext, carry: ServerCarry):
    chex.assert_tree_shape_prefix(carry.models, (slots,))  # [C, P] whatever steps came before
    key = jax.random.fold_in(context.key, AGGREGATOR_STREAM)
    out = aggregator.apply(carry.models, carry.weights, carry.aggregator, context.params, key)
    carry = carry._replace(average=out.params, aggregator=out.state)
    return plugin.after_aggregation(context, carry), out.diagnostics

  def finish(state: ServerState, context: RoundContext, carry: ServerCarry):
    params, opt_state = server_update(server_opt, state.params, state.opt_state, carry.average)
    state = ServerState(params, opt_state, state.round + 1, state.rng, carry.state, carry.aggregator)
    train_loss = aggregation.weighted_average(context.uploads.loss, context.uploads.num_examples)
    return state, train_loss, carry.eval_models

  jitted = {}
  padded_cache: dict[int, tuple[FederatedData, FederatedData]] = {}

  def padded(data: FederatedData) -> FederatedData:
    """The data with Poisson sampling's empty client, built once per data object (not every round)."""
    if id(data) not in padded_cache or padded_cache[id(data)][0] is not data:
      padded_cache.clear()
      padded_cache[id(data)] = (data, federated_data.with_empty_client(data))
    return padded_cache[id(data)][1]


  def compiled(step: ServerStep, last: bool):
    """One jitted call per (step, is-last): the last step also runs the server optimiser (`finish`)."""
    if (step, last) not in jitted:
      fn = aggregate if step is AGGREGATE else step.fn

      def run(state, context, carry):
        carry, diagnostics = fn(context, carry)
        return (finish(state, context, carry) if last else carry), diagnostics

      run.__name__ = f"{step.name}{'_and_server_update' if last else ''}"  # chex counts traces per name
      jitted[step, last] = jax.jit(over_runs(_traced_at_most(run, max_traces)))
    return jitted[step, last]

  prepare_jit = jax.jit(over_runs(_traced_at_most(prepare, max_traces)))
  corrupt = None
  if attack is not None:
    corrupt = jax.jit(_traced_at_most(lambda uploads, ids, received, key: uploads._replace(params=attack(
        uploads.params, ids, received, jax.random.fold_in(key, ATTACK_STREAM))), max_traces))

  def init_one(key) -> ServerState:
    """Fresh model params from split(key)[0]; the run's PRNG stream is split(key)[1]."""
    init_key, run_key = jax.random.split(key)
    params = model.init(init_key)
    return ServerState(params, server_opt.init(params), jnp.zeros((), jnp.int32), run_key,
                       plugin.init_state(params), aggregator.init(params))

  init = jax.vmap(init_one) if runs else init_one

  def apply(state: ServerState, data: FederatedData) -> tuple[ServerState, RoundOutput]:
    round_index = int(jnp.ravel(state.round)[0])  # (vectorised runs are all at one round)
    if cap:
      data = padded(data)
    timer = PhaseTimer()
    ids, keys, server_key, shared, own, steps = prepare_jit(state, data)
    uploads = client_phase((state.params, shared, data), (ids, keys, own))
    if corrupt is not None:
      uploads = corrupt(uploads, ids, state.params, server_key)
    uploads = timer.lap("client_time_s", uploads)
    chex.assert_tree_shape_prefix(uploads, (runs, slots) if runs else (slots,))
    context = RoundContext(state.round, state.params, state.algorithm, ids, own, uploads, steps, server_key,
                           data)
    carry = ServerCarry(uploads.params, uploads.num_examples, None, state.algorithm, state.aggregator, None, {})
    server_steps = plugin.server_steps(round_index)
    if server_steps.count(AGGREGATE) != 1:
      raise ValueError(f"a round needs exactly one AGGREGATE step, got {[s.name for s in server_steps]}")
    diagnostics = {}
    for i, step in enumerate(server_steps):
      carry, diag = timer.lap(f"{step.name}_time_s",
                              compiled(step, i == len(server_steps) - 1)(state, context, carry))
      diagnostics.update(diag)
    new_state, train_loss, eval_models = carry
    times = {**timer.times, "server_time_s": sum(timer.times[f"{s.name}_time_s"] for s in server_steps)}
    cohort = int(jnp.sum(ids < num_clients)) if cap else clients_per_round
    if cap:
      diagnostics["cohort_size"] = cohort
    extra_up, extra_down = plugin.extra_bytes(round_index)
    extra_up += aggregator.protocol_bytes(cohort)
    diagnostics = {k: float(v) if jnp.ndim(v) == 0 else jax.device_get(v).tolist() for k, v in diagnostics.items()}
    train_loss = jax.device_get(train_loss).tolist() if runs else float(train_loss)
    return new_state, RoundOutput(times, diagnostics, train_loss, eval_models,
                                  cohort * (model_bytes + 4 + extra_up), cohort * (model_bytes + extra_down))

  return FederatedAlgorithm(init, apply)
