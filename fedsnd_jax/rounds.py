"""The interfaces of a round: what an algorithm and a mechanism plug into the round driver (`driver.py`), and
the round's typed state, context and output.

An algorithm supplies only what differs between methods (`RoundParts`: the clients' local loss, its typed
state, what the sampled clients receive besides the global model, its named server steps and its state update
after aggregation), registered by an `AlgorithmSpec`; a mechanism supplies `MechanismParts` (an aggregator, an
upload transform, an attack, a data transform, an accountant), registered by a `MechanismSpec`. One round is

  sample C of K clients → client phase (any client_map) → the algorithm's server steps, the aggregator's
  step among them → the server optimiser's step towards the aggregate → round counter + 1.
"""

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import client
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.shapes import Diagnostics, Params, PRNGKey

# The aggregator's randomness this round is fold_in(server_key, AGGREGATOR_STREAM), an upload transform's
# fold_in(client_key, UPLOAD_STREAM); algorithms and clients fold in small integers of their own.
AGGREGATOR_STREAM = 1 << 16
UPLOAD_STREAM = 1 << 16
ATTACK_STREAM = 1 << 17


class LocalSchedule(NamedTuple):
  """A client's local work per round: `epochs` passes over its own data, or exactly `steps` steps when
  steps > 0, in batches of `batch_size`. Clients with fewer examples than the largest mask their extra steps."""

  batch_size: int = 32
  epochs: int = 1
  steps: int = 0

  def num_steps(self, max_count: int) -> int:
    """S, the round's static step count for clients of at most `max_count` examples: `steps` if > 0, else
    epochs × ceil(max_count / B)."""
    return self.steps if self.steps > 0 else self.epochs * -(-max_count // self.batch_size)

  def steps_taken(self, counts):
    """[C] int32 non-masked local steps of clients with `counts` [C] examples."""
    if self.steps > 0:
      return jnp.full_like(counts, self.steps)
    return self.epochs * -(-counts // self.batch_size)


class Federation(NamedTuple):
  """What an algorithm's builder may read about the run besides its own hyperparameters.

  Attributes:
    num_clients: K; clients_per_round: C.
    schedule: the clients' local work per round.
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
    uploads: per-client state of the upload pipeline (compression's error-feedback memory [K, P]), or None.
    clock: the simulated clock (`systems.ClockState`: its time, FedBuff's clients in flight), or None.
  """

  params: Params
  opt_state: Any
  round: jax.Array
  rng: PRNGKey
  algorithm: Any
  aggregator: Any
  uploads: Any = None
  clock: Any = None


class RoundContext(NamedTuple):
  """What every server step may read; fixed for the round.

  Attributes:
    round: int32 [], this round's index (0-based).
    params: [P] the global model the clients received.
    state: the algorithm's state at the start of the round.
    ids: [C] int32 sorted ids of the sampled clients.
    own: the sampled clients' per-client state [C, ...] (`RoundParts.client_inputs`), or None.
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


def _aggregate_only(round_index, state):
  del round_index, state
  return (AGGREGATE,)


def _no_extra_bytes(round_index):
  del round_index
  return 0, 0


class RoundParts(NamedTuple):
  """A federated algorithm as the round driver sees it: only what differs between methods.

  Attributes:
    client_loss: the clients' per-example local loss (see `client.LossFn`); it sees
      ClientContext(received params, shared, own).
    init_state: params -> the algorithm's typed state (per-client parts stacked [K, ...]), or None.
    client_inputs: (state, ids [C]) -> (shared, own): what every sampled client receives besides the
      global model (SCAFFOLD's c) and each one's own state gathered [C, ...] (its control variate).
    server_steps: (round index (host int), the algorithm's state) -> the round's steps in order, `AGGREGATE`
      among them; steps before it may replace `carry.models`, steps after it `carry.average`. It runs on the
      host: what it reads of the state is transferred.
    after_aggregation: (context, carry) -> carry, run in the aggregation step right after the aggregator:
      per-client state updates (scattered by `context.ids`) and corrections of `carry.average`.
    extra_bytes: round index -> (up, down) bytes per sampled client beyond the model and its example count.
  """

  client_loss: client.LossFn
  init_state: Callable[[Params], Any] = _no_state
  client_inputs: Callable[[Any, jax.Array], tuple[Any, Any]] = _nothing_sent
  server_steps: Callable[[int, Any], tuple[ServerStep, ...]] = _aggregate_only
  after_aggregation: Callable[[RoundContext, ServerCarry], ServerCarry] = _unchanged
  extra_bytes: Callable[[int], tuple[int, int]] = _no_extra_bytes


def _no_model_options(hyperparameters) -> dict:
  del hyperparameters
  return {}


def _any_privacy(hyperparameters) -> tuple[str, ...]:
  del hyperparameters
  return ("central", "local", "secure_aggregation")


class AlgorithmSpec(NamedTuple):
  """A registered algorithm (`fedsnd_jax.algorithms.REGISTRY`): how to build its `RoundParts`.

  Attributes:
    build: (model, hyperparameters, federation) -> RoundParts.
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
    moved: fields of an earlier layout of its section → their place now, both relative to the section
      ({"noise_steps": "synthesis.steps"}); a config naming one is refused with the new name.
    partial_work: its server reads only the uploads' aggregation weights and step counts, so a round deadline
      may drop clients (weight 0) or cut their local steps (`systems`); False for algorithms with per-client
      state or server steps that read every sampled client's model.
    asynchronous: it runs under FedBuff (`buffered`): its clients need nothing but the model they download, and
      its server steps take uploads trained from older versions, rebased onto the current model; False for
      algorithms with per-client or server state that ties an update to the round it was sent in.
  """

  build: Callable[..., RoundParts]
  hyperparameters: type
  validate: Callable[..., None]
  section: str
  model_options: Callable[[Any], dict] = _no_model_options
  privacy: Callable[[Any], tuple[str, ...]] = _any_privacy
  moved: Mapping[str, str] = MappingProxyType({})
  partial_work: bool = False
  asynchronous: bool = False


class AlgorithmInfo(NamedTuple):
  """The run's algorithm as a mechanism's validation sees it: its registry name, the privacy mechanisms its
  releases can be covered by (`AlgorithmSpec.privacy` of its hyperparameters), whether a deadline may drop
  or cut its clients (`AlgorithmSpec.partial_work`) and whether it runs under FedBuff
  (`AlgorithmSpec.asynchronous`)."""

  name: str
  privacy: tuple[str, ...]
  partial_work: bool = False
  asynchronous: bool = False


class MechanismParts(NamedTuple):
  """What a mechanism plugs into a run (None: nothing of that kind).

  Attributes:
    aggregator: replaces the example-weighted mean (at most one mechanism of a run supplies one).
    upload_transform: (received [P], trained [P], key) -> uploaded [P], run by every client (local DP).
    attack: (uploads [C, P], ids [C], received [P], key) -> uploads [C, P], the Byzantine clients' replacement
      of their uploads after local training.
    data_transform: FederatedData -> FederatedData, applied once to the training data (label flipping).
    accountant: the run's privacy accountant (`privacy.Accountant`), for ε in the metrics.
    clock: the clients' simulated systems (`systems.Clock`): the round's simulated seconds and its deadline.
    compression: how clients compress their uploads (`compression.Settings`).
  """

  aggregator: Any = None
  upload_transform: Callable | None = None
  attack: Callable | None = None
  data_transform: Callable[[FederatedData], FederatedData] | None = None
  accountant: Any = None
  clock: Any = None
  compression: Any = None


NO_MECHANISMS = MechanismParts()


class MechanismSpec(NamedTuple):
  """A registered mechanism (`fedsnd_jax.mechanisms.REGISTRY`), as `AlgorithmSpec` is for an algorithm.

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
    (Vectorised runs, `driver.build_rounds(runs=R)`: train_loss and every diagnostic are lists over the runs.)
    eval_models: extra [P] models to evaluate, by name (e.g. `no_distill`).
    bytes_up, bytes_down: this round's traffic over all sampled clients (a dropped client's upload excluded).
    sim_time_s: the simulated seconds since the run began, at the round's end (`systems`); None without a
      simulated clock.
  """

  times: dict[str, float]
  diagnostics: dict[str, float | list]
  train_loss: float | list[float]
  eval_models: dict[str, Params]
  bytes_up: int
  bytes_down: int
  sim_time_s: float | None = None


class FederatedAlgorithm(NamedTuple):
  """init(key) -> ServerState; apply(state, data) -> (ServerState, RoundOutput)."""

  init: Callable[[PRNGKey], ServerState]
  apply: Callable[[ServerState, FederatedData], tuple[ServerState, RoundOutput]]


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
