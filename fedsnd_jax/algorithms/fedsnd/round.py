"""FedSND's round: client self-distillation, then the server's noise synthesis and cross-client distillation.

Round (docs/design.md §1): sampled clients train locally (self-distillation for FedSD and FedSND, else plain CE;
`self_distillation.py`); the server synthesises noise per uploaded model (§3, step `synthesis`,
`synthesis.py`), distils every uploaded model on the other clients' noise (§4, step `distill`,
`distillation.py`) and aggregates the distilled models (§1). With `distillation.target=global` it aggregates
the uploads first and distils the aggregate instead. `schedule.py` decides which rounds distil and how much
server work each runs; `consensus.py` leaves suspicious uploads out. The variants are fields of the
`Hyperparameters` sections.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsnd_jax import aggregation, client
from fedsnd_jax.algorithms.fedsnd import consensus, distillation, schedule, self_distillation, synthesis
from fedsnd_jax.algorithms.fedsnd.consensus import Settings as Consensus
from fedsnd_jax.algorithms.fedsnd.distillation import Settings as Distillation
from fedsnd_jax.algorithms.fedsnd.pool import NoisePool, agreement, noise_pool, regime_signals
from fedsnd_jax.algorithms.fedsnd.schedule import Settings as Schedule
from fedsnd_jax.algorithms.fedsnd.self_distillation import Settings as SelfDistillation
from fedsnd_jax.algorithms.fedsnd.synthesis import Settings as Synthesis
from fedsnd_jax.errors import InputError, check_range, require
from fedsnd_jax.federated_data import label_histograms
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AGGREGATE, Federation, RoundContext, RoundParts, ServerCarry, ServerStep

PARTS = {"self_distillation": self_distillation, "synthesis": synthesis, "distillation": distillation,
         "schedule": schedule, "consensus": consensus}


class Hyperparameters(NamedTuple):
  """FedSND's settings by concern (`--config.fedsnd.<part>.<field>`), each documented beside its code; the client
  side is FedSD's, the server side FedND's.

  Attributes:
    self_distillation: the client loss (`self_distillation.Settings`).
    synthesis: the server's noise synthesis (`synthesis.Settings`).
    distillation: the server's cross-client distillation (`distillation.Settings`).
    schedule: which rounds distil and how much server work each runs (`schedule.Settings`).
    consensus: noise consensus, a defence against Byzantine uploads (`consensus.Settings`).
    temperature: T, of the client's and the server's distillation.
  """

  self_distillation: SelfDistillation = SelfDistillation()
  synthesis: Synthesis = Synthesis()
  distillation: Distillation = Distillation()
  schedule: Schedule = Schedule()
  consensus: Consensus = Consensus()
  temperature: float = 2.0

  @property
  def uploads_histograms(self) -> bool:
    return self.synthesis.targets == "histogram" or self.distillation.teacher_weighting == "class_count"


# The flat fields of earlier versions → their place (`fedsnd.noise_steps` is now `fedsnd.synthesis.steps`).
MOVED = {
    "self_distill": "self_distillation.mode",
    **{f: f"self_distillation.{f}" for f in ("lambda_mutual", "lambda_prev", "confidence_gate")},
    **{f"noise_{f}": f"synthesis.{f}" for f in ("samples", "steps", "stop_ce", "lr", "l2", "projection",
                                                 "warm_start", "targets")},
    "adversarial": "synthesis.adversarial", "bn_prior": "synthesis.bn_prior",
    **{f"distill_{f}": f"distillation.{f}" for f in ("steps", "batch", "lr", "lr_decay", "target")},
    "teacher_weighting": "distillation.teacher_weighting",
    "student_train_mode": "distillation.student_train_mode",
    **{f: f"schedule.{f}" for f in ("distill_rounds", "distill_agreement", "gate_partial_participation",
                                     "full_server_below", "full_noise_steps", "full_distill_steps")},
    "noise_consensus": "consensus.enabled", "consensus_threshold": "consensus.threshold",
}


class ServerMemory(NamedTuple):
  """What FedSND's server keeps between rounds.

  Attributes:
    noise: warm-start noise [M, Q, *shape], and seen: [M] bool (made before); a row is a client (M = K, warm start
      `client`) or a position in the round (M = C, warm start `round`). None without a warm start.
    agreement: [] the teacher agreement of the last round that measured its gate (distilled or not; 0 before the
      first), for `schedule.full_server_below`; None without it.
    gate: [] bool whether that round's gate opened (True before the first), for `schedule.recheck_every`; None
      without it.
  """

  noise: jax.Array | None
  seen: jax.Array | None
  agreement: jax.Array | None
  gate: jax.Array | None = None


def validate(hp: Hyperparameters, federation: Federation, *, server_side: bool = True) -> None:
  for part, module in PARTS.items():
    module.validate(getattr(hp, part), f"fedsnd.{part}")
  check_range(hp, "fedsnd", positive=("temperature",))
  if server_side:
    require(federation.clients_per_round >= 2, "clients_per_round",
            f"the server distils on the other clients' noise, so it needs ≥ 2, got {federation.clients_per_round}")


class Server:
  """FedSND's server steps for one model and federation: `synthesise`, then `distill_uploads` before the
  aggregation or `distill_aggregate` after it (`steps`)."""

  def __init__(self, model: Model, hp: Hyperparameters, federation: Federation):
    self.hp, self.num_classes = hp, federation.num_classes
    self.space = synthesis.noise_space(model, federation.input_shape)
    self.rows = {"client": federation.num_clients, "round": federation.clients_per_round}.get(
        hp.synthesis.warm_start)  # rows of warm-start noise, None without a warm start
    self.threshold = schedule.gate_threshold(hp.schedule, federation)
    synthesising = ServerStep("synthesis", self.synthesise)
    self.distilling = ((synthesising, ServerStep("distill", self.distill_uploads), AGGREGATE)
                       if hp.distillation.target == "clients" else
                       (synthesising, AGGREGATE, ServerStep("distill", self.distill_aggregate)))
    # noise consensus outlives distillation: the server still synthesises noise to score the uploads
    self.undistilled = (synthesising, AGGREGATE) if hp.consensus.enabled else (AGGREGATE,)

  def init_state(self, params):
    del params
    budgeted, rechecks = schedule.budgeted(self.hp.schedule), self.hp.schedule.recheck_every > 0
    if self.rows is None and not budgeted and not rechecks:
      return None
    shape = (self.rows, self.hp.synthesis.samples, *self.space.shape)
    noise_rows = (None, None) if self.rows is None else (jnp.zeros(shape, jnp.float32),
                                                         jnp.zeros((self.rows,), bool))
    return ServerMemory(*noise_rows, jnp.float32(0.0) if budgeted else None, jnp.bool_(True) if rechecks else None)

  def full_server(self, state: ServerMemory | None):
    return schedule.full_server(self.hp.schedule, None if state is None else state.agreement)

  def targets(self, ctx: RoundContext, keys):
    """[C, Q] the noise's target labels, and the label histograms [C, NC] when the server needs them."""
    hp, q = self.hp, self.hp.synthesis.samples
    histograms = label_histograms(ctx.data, ctx.ids, self.num_classes) if hp.uploads_histograms else None
    if hp.synthesis.targets == "histogram":
      draw = lambda k, h: synthesis.histogram_targets(jax.random.fold_in(k, 1), h, q)
      return jax.vmap(draw)(keys, histograms), histograms
    return jnp.tile(synthesis.balanced_targets(q, self.num_classes), (ctx.ids.shape[0], 1)), histograms

  def start(self, ctx: RoundContext, keys, full):
    """[C, Q, *shape] where synthesis starts: the warm start where there is one (not in a full-server round),
    else Gaussian noise; and the memory rows of the round's uploads (None without a warm start)."""
    q, space = self.hp.synthesis.samples, self.space
    init = jax.vmap(lambda p, k: space.init_scale(p) * jax.random.normal(k, (q, *space.shape)))(
        ctx.uploads.params, keys)
    if self.rows is None:
      return init, None
    memory, at = ctx.state, ctx.ids if self.hp.synthesis.warm_start == "client" else jnp.arange(ctx.ids.shape[0])
    seen = memory.seen.at[at].get(mode="fill", fill_value=False) & ~full  # Poisson's extra slots: never seen
    return jnp.where(seen.reshape((-1,) + (1,) * (init.ndim - 1)), memory.noise.at[at].get(mode="clip"), init), at

  def synthesise(self, ctx: RoundContext, carry: ServerCarry):
    """Noise for every upload, in a NoisePool; under noise consensus the flagged uploads get weight 0 here, before
    any aggregation or distillation."""
    hp, ids, uploads = self.hp, ctx.ids, ctx.uploads
    synth_key = jax.random.fold_in(ctx.key, 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(synth_key, i))(ids)
    labels, histograms = self.targets(ctx, keys)
    full = self.full_server(ctx.state)
    init, at = self.start(ctx, keys, full)
    steps = schedule.synthesis_steps(hp.schedule, hp.synthesis.steps, full)
    made, stats = jax.vmap(lambda p, k, y, x0: synthesis.synthesize(
        self.space, p, k, y, hp.synthesis, steps=steps, init=x0, student_params=ctx.params,
        temperature=hp.temperature))(uploads.params, keys, labels, init)
    # A client a deadline dropped uploaded the model it received, untrained: it keeps its noise row, and is
    # never a teacher nor owner of noise, nor judged by noise consensus.
    trained = ctx.steps > 0
    state, kept = carry.state, True if hp.consensus.enabled else self.measures(ctx)  # consensus: every round
    if at is not None:
      state = _where(kept, keep_noise(state, at, made, trained), state)
    pool, order = noise_pool(self.space, uploads.params, made, labels, ids, hp.temperature, histograms)
    present = trained[order]
    pool, flags, trusted = consensus.judge(pool, hp.consensus, order, ids, present)
    weights = carry.weights if trusted is None else carry.weights * trusted
    pool = pool._replace(trusted=present if pool.trusted is None else pool.trusted & present)
    diagnostics = {"full_server": full.astype(jnp.float32)} if schedule.budgeted(hp.schedule) else {}
    diagnostics |= {"teacher_ce_initial": jnp.mean(stats.ce_initial), "teacher_ce": jnp.mean(stats.ce_final),
                   "teacher_noise_accuracy": jnp.mean(stats.accuracy), "noise_norm": jnp.mean(stats.norm),
                   "noise_steps_taken": jnp.mean(stats.steps.astype(jnp.float32)),
                   "data_norm": jnp.mean(jax.vmap(self.space.norm)(uploads.params))}
    return carry._replace(state=state, weights=weights, work=(pool, order)), {**_unmeasured(kept, diagnostics),
                                                                            **flags}

  def measures(self, ctx: RoundContext):
    """bool [] whether this round measures the gate under `schedule.recheck_every` (host True without it). A run
    reaches a server step where it does not only in a vectorised round where another run does: what such a
    step computes is then dropped (`_where`) and its diagnostics are NaN."""
    s = self.hp.schedule
    return True if s.recheck_every == 0 else schedule.rechecks_in(s, ctx.round, ctx.state.gate)

  def plan(self, ctx: RoundContext, pool: NoisePool, average):
    """This round's distillation plan, and the signals the schedule decided it from, for the diagnostics."""
    teacher_agreement = agreement(pool)
    plan, gate = schedule.plan(self.hp.schedule, self.hp.distillation, self.threshold, ctx.round,
                               teacher_agreement, self.full_server(ctx.state))
    return plan, {"teacher_agreement": teacher_agreement, "distill_gate": gate,
                  **regime_signals(self.space, pool, average)}

  def distilled(self, ctx: RoundContext, carry: ServerCarry, signals: dict, diagnostics: dict, **models):
    """The carry after a distillation step (`models`: its distilled `models` or `average`), the state remembering
    this round's agreement and gate; all of it kept only where the run measures the gate (`measures`)."""
    state = carry.state
    if schedule.budgeted(self.hp.schedule):
      state = state._replace(agreement=signals["teacher_agreement"])
    if self.hp.schedule.recheck_every:
      state = state._replace(gate=signals["distill_gate"] > 0)
    measured = self.measures(ctx)
    kept = _where(measured, {**models, "state": state}, {k: getattr(carry, k) for k in (*models, "state")})
    return carry._replace(**kept, work=None), _unmeasured(measured, {**diagnostics, **signals})

  def distill_uploads(self, ctx: RoundContext, carry: ServerCarry):
    pool, order = carry.work
    undistilled = aggregation.weighted_average(ctx.uploads.params, carry.weights)  # flagged uploads weigh 0
    plan, signals = self.plan(ctx, pool, undistilled)
    students, diagnostics = distillation.distill_clients(self.space, pool, order, ctx.ids,
                                                         jax.random.fold_in(ctx.key, 1), self.hp.distillation,
                                                         self.hp.temperature, plan)
    carry = carry._replace(eval_models={"no_distill": undistilled})
    return self.distilled(ctx, carry, signals, diagnostics, models=students)

  def distill_aggregate(self, ctx: RoundContext, carry: ServerCarry):
    pool, _ = carry.work
    plan, signals = self.plan(ctx, pool, carry.average)
    new, diagnostics = distillation.distill_global(self.space, pool, carry.average, jax.random.fold_in(ctx.key, 1),
                                                   self.hp.distillation, self.hp.temperature, plan)
    carry = carry._replace(eval_models={"no_distill": carry.average})
    return self.distilled(ctx, carry, signals, diagnostics, average=new)

  def steps(self, round_index: int, state: ServerMemory | None):
    """The round's steps; under `schedule.recheck_every` a round after a closed gate does not distil, but for
    every recheck_every-th (the last gate is read from the state on the host; vectorised runs distil when any
    of them does, `measures`)."""
    s = self.hp.schedule
    if not schedule.distills_in(s, round_index):
      return self.undistilled
    if s.recheck_every and not np.any(schedule.rechecks_in(s, round_index, np.asarray(state.gate))):
      return self.undistilled
    return self.distilling

  def extra_bytes(self, round_index: int):
    """Label histograms, uploaded when the server needs them."""
    synthesises = schedule.distills_in(self.hp.schedule, round_index) or self.hp.consensus.enabled
    return (self.num_classes * 4 if self.hp.uploads_histograms and synthesises else 0), 0


def build(model: Model, hp: Hyperparameters, federation: Federation, *, client_side: bool = True,
          server_side: bool = True) -> RoundParts:
  """FedSND, or its ablations FedSD (`server_side=False`) and FedND (`client_side=False`: plain CE).

  Raises:
    InputError: bn_prior without a BatchNorm model.
  """
  if server_side and hp.synthesis.bn_prior > 0 and model.calibrate is None:
    raise InputError("fedsnd.synthesis.bn_prior", "needs a BatchNorm model (--config.batch_norm=True)")
  loss = (self_distillation.self_distillation_loss(model, hp.self_distillation, hp.temperature)
          if client_side else client.supervised_loss(model))
  if not server_side:
    return RoundParts(loss)
  server = Server(model, hp, federation)
  return RoundParts(loss, server.init_state, server_steps=server.steps, extra_bytes=server.extra_bytes)


def keep_noise(memory: ServerMemory, at, made, trained) -> ServerMemory:
  """The memory with the round's noise `made` [C, Q, *shape] in rows `at` [C], but where a client did not train
  (`trained` [C] False: a deadline dropped it) the row keeps its noise: rows hold noise of trained models only
  (under warm start `client`, the client's own last one)."""
  old = memory.noise.at[at].get(mode="fill", fill_value=0.0)
  rows = jnp.where(trained.reshape((-1,) + (1,) * (made.ndim - 1)), made, old)
  seen = memory.seen.at[at].get(mode="fill", fill_value=False) | trained
  return memory._replace(noise=memory.noise.at[at].set(rows, mode="drop"),
                         seen=memory.seen.at[at].set(seen, mode="drop"))


def _where(measured, new, old):
  """`new` where the run measures the gate this round (`Server.measures`; host True: always), else `old`."""
  return new if measured is True else jax.tree.map(lambda a, b: jnp.where(measured, a, b), new, old)


def _unmeasured(measured, diagnostics: dict) -> dict:
  """The diagnostics, NaN where the run does not measure the gate this round (`Server.measures`)."""
  return diagnostics if measured is True else {k: jnp.where(measured, v, jnp.nan) for k, v in diagnostics.items()}
