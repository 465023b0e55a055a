"""FedSND's round: client self-distillation, then the server's noise synthesis and cross-client distillation.

Round (DESIGN §2.1): sampled clients train locally (self-distillation for FedSD and FedSND, else plain CE);
the server synthesises noise per uploaded model (§2.3, step `synthesis`), distils every uploaded model on
the other clients' noise (§2.4, step `distill`) and aggregates the distilled models (§2.5). With
`distill_target=global` it aggregates the uploads first and distils the aggregate instead. Variants of §2.6
are fields of `Hyperparameters`.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import aggregation, client
from fedsnd_jax.algorithms.fedsnd import distillation, noise
from fedsnd_jax.algorithms.fedsnd.self_distillation import SELF_DISTILL_MODES, self_distillation_loss
from fedsnd_jax.errors import InputError, check_range, require
from fedsnd_jax.federated_data import label_histograms
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AGGREGATE, Federation, RoundContext, RoundParts, ServerCarry, ServerStep
from fedsnd_jax.shapes import Params

NOISE_TARGETS = ("balanced", "histogram")
WARM_STARTS = ("none", "client", "round")
DISTILL_TARGETS = ("clients", "global")


class Hyperparameters(NamedTuple):
  """FedSND's settings, client side (fedsd, fedsnd) and server side (fednd, fedsnd).

  Attributes:
    self_distill: which self-distillation terms are on: none | dropout | previous | both (§2.2).
    lambda_mutual: λ_mutual, the two dropout views distil each other. The paper's reading is 1; the default is
      0 (one forward pass): at 1 it cost 2.2–2.8 points on a model that under-fits and 1.1 on the README's
      main job, on the validation split (benchmarks/tuning.py; RESULTS §8).
    lambda_prev: λ_prev, the received global model as teacher; with it alone FedSD gained 4–13 points on
      cross-device Fashion-MNIST (RESULTS §8).
    confidence_gate: weight each example's self-distillation terms by their teacher's probability of the true
      label (ours; the terms fade while a model under-fits).
    temperature: T, of the client's and the server's distillation.
    noise_samples: Q pseudo-samples per uploaded model.
    noise_steps: G Adam steps on the inputs (at most); noise_lr: its learning rate. The default server (warm
      start `round`, G = 10, D = 5) is the cheap one of benchmarks/server_cost.py, and the safest FedSND default
      on the validation split: never more than 0.28 points below tuned FedAvg over the project's six settings,
      where the former server (Gaussian start, G 100, D 20; 50, 10 on Fashion-MNIST) lost up to 2.28 (RESULTS §10).
    noise_stop_ce: stop a model's synthesis early once its mean CE on its targets is ≤ this (0 = never): with a
      warm start that already fits, few or no steps run. Steps taken are logged as `noise_steps_taken`.
    noise_l2: β of the L2 prior on the inputs.
    noise_projection: rescale every sample to a real sample's norm after every step (§2.6).
    noise_warm_start: where synthesis starts: none (Gaussian) | client (the noise made for the same client at its
      last participation; Gaussian the first time) | round (the previous round's noise at the same position in
      the round: for cross-device runs, where a client rarely comes back; with every client in every round the
      two are the same, positions being sorted client ids).
    noise_targets: balanced (default) | histogram (drawn from the client's label histogram, uploaded).
    adversarial: weight of the hard-sample term (maximise teacher–global-model disagreement).
    bn_prior: weight of the BatchNorm-statistics prior (DeepInversion; BatchNorm models only).
    distill_steps: D optimiser steps per student; distill_batch: Bd; distill_lr: Adam learning rate.
    distill_lr_decay: the step size of round r is multiplied by decay**r.
    distill_rounds: distil only in the first R_d rounds (0 = every round).
    distill_agreement: the regime-aware schedule (ours): distil in a round only while the teachers agree on
      less than this share of each other's noise (`teacher_agreement`; 1 = every round). Agreement is what
      the server sees, without data, of how much the uploads still know that the others do not; each round's
      decision is logged as `distill_gate`.
    gate_partial_participation: apply that gate also when fewer clients take part in a round than the
      federation has (default on). Off, cross-device runs distil every round: +2.0 validation points at α 0.1,
      +7.0 final on test, but −3.7 final on test at α 0.5, so not the default (RESULTS §11).
    full_server_below: the regime-aware server budget (ours): the first round, and every round after one whose
      teacher agreement was below this, run the full server — synthesis from a Gaussian start for
      `full_noise_steps` steps and `full_distill_steps` distillation steps — and the others the cheap one (the
      warm start, `noise_steps`, `distill_steps`); 0 = never. Low agreement is the regime where each upload
      knows what the others do not (near-single-class clients) and fitted noise pays; the decision is logged
      as `full_server`.
    teacher_weighting: none | class_count (teachers weighted by how much of the sample's target class they
      have seen; uploads label histograms) | confidence.
    distill_target: clients (each uploaded model, the paper) | global (the aggregate, FedDF style).
    student_train_mode: students with dropout (default eval mode).
    noise_consensus: score every upload by how often it gives the other clients' noise its target label, and
      leave out the outliers (below median − threshold·MAD, MAD ≥ 0.05) as teachers, as owners of noise, from the
      teacher agreement that opens the regime gate, and from the aggregate (`consensus`), in every mode: with
      `distill_target=global` (they are left out before aggregating), with the gate closed, and after
      `distill_rounds` (the server still synthesises noise to score the uploads, and only distils no more). A
      defence against Byzantine uploads (ours).
    consensus_threshold: that threshold, in robust standard deviations (1.4826·MAD).
  """

  self_distill: str = "both"
  lambda_mutual: float = 0.0  # the paper's reading: 1.0; off by default (issue 13, benchmarks/tuning.py)
  lambda_prev: float = 0.1
  confidence_gate: bool = True
  temperature: float = 2.0
  noise_samples: int = 64
  noise_steps: int = 10
  noise_stop_ce: float = 0.0
  noise_lr: float = 0.05
  noise_l2: float = 0.0
  noise_projection: bool = False
  noise_warm_start: str = "round"
  noise_targets: str = "balanced"
  adversarial: float = 0.0
  bn_prior: float = 0.0
  distill_steps: int = 5
  distill_batch: int = 64
  distill_lr: float = 1e-3
  distill_lr_decay: float = 1.0
  distill_rounds: int = 0
  distill_agreement: float = 0.85
  gate_partial_participation: bool = True
  full_server_below: float = 0.0
  full_noise_steps: int = 50
  full_distill_steps: int = 10
  teacher_weighting: str = "none"
  distill_target: str = "clients"
  student_train_mode: bool = False
  noise_consensus: bool = False
  consensus_threshold: float = 3.0

  @property
  def uploads_histograms(self) -> bool:
    return self.noise_targets == "histogram" or self.teacher_weighting == "class_count"


class ServerMemory(NamedTuple):
  """What FedSND's server keeps between rounds.

  Attributes:
    noise: warm-start noise [M, Q, *shape], and seen: [M] bool (made before); a row is a client (M = K, warm start
      `client`) or a position in the round (M = C, warm start `round`). None without a warm start.
    agreement: [] the teacher agreement of the last round that synthesised noise, whether its gate opened or not
      (0 before the first), for `full_server_below`; None without it.
  """

  noise: jax.Array | None
  seen: jax.Array | None
  agreement: jax.Array | None


def validate(hp: Hyperparameters, federation: Federation, *, server_side: bool = True) -> None:
  for field, allowed in (("self_distill", SELF_DISTILL_MODES), ("noise_targets", NOISE_TARGETS),
                         ("noise_warm_start", WARM_STARTS),
                         ("teacher_weighting", distillation.TEACHER_WEIGHTINGS),
                         ("distill_target", DISTILL_TARGETS)):
    value = getattr(hp, field)
    require(value in allowed, f"fedsnd.{field}", f"unknown value {value!r}; allowed: {', '.join(allowed)}")
  check_range(hp, "fedsnd", positive=("temperature", "noise_samples", "noise_lr", "distill_batch", "distill_lr",
                                      "distill_lr_decay", "consensus_threshold", "distill_agreement"),
              non_negative=("lambda_mutual", "lambda_prev", "noise_steps", "noise_stop_ce", "noise_l2",
                            "adversarial", "bn_prior", "distill_steps", "distill_rounds", "full_server_below",
                            "full_noise_steps", "full_distill_steps"))
  if server_side:
    require(federation.clients_per_round >= 2, "clients_per_round",
            f"the server distils on the other clients' noise, so it needs ≥ 2, got {federation.clients_per_round}")


class NoisePool(NamedTuple):
  """The round's noise in client-id order, flattened: what cross-client distillation reads.

  Attributes:
    teachers: [C, P] uploaded models. x: [CQ, *shape] pseudo-samples. labels: [CQ] their target labels.
    owners: [CQ] the position (in `teachers`) of the model each sample was made for.
    probs: [C, CQ, NC] every teacher's tempered softmax on every sample.
    histograms: [C, NC] label counts (class_count weighting only), else None.
    trusted: [C] bool, the uploads noise consensus keeps; scores: [C] their consensus scores (None without it).
  """

  teachers: Params
  x: jax.Array
  labels: jax.Array
  owners: jax.Array
  probs: jax.Array
  histograms: jax.Array | None
  trusted: jax.Array | None = None
  scores: jax.Array | None = None


def noise_pool(space: noise.NoiseSpace, teachers, pool, labels, ids, hp: Hyperparameters, histograms=None):
  """Puts the round's noise in client-id order (so permuting the clients permutes results alike).

  Args:
    teachers: [C, P]. pool: [C, Q, *shape]. labels: [C, Q]. ids: [C]. histograms: [C, NC] or None.

  Returns:
    (NoisePool, order [C]: the sorting permutation of `ids`).
  """
  chex.assert_shape(pool, (*labels.shape, *space.shape))
  chex.assert_tree_shape_prefix(teachers, ids.shape)
  order = jnp.argsort(ids)
  take = lambda tree: jax.tree.map(lambda a: a[order], tree)
  teachers, pool, labels = take(teachers), pool[order], labels[order]
  histograms = None if histograms is None else histograms[order]
  num, per = labels.shape
  flat = pool.reshape((num * per, *pool.shape[2:]))
  probs = distillation.teacher_probs(space, teachers, flat, hp.temperature)
  pool = NoisePool(teachers, flat, labels.reshape(-1), jnp.repeat(jnp.arange(num), per), probs, histograms)
  if hp.noise_consensus:
    pool = pool._replace(**dict(zip(("trusted", "scores"), consensus(pool, hp.consensus_threshold), strict=True)))
  return pool, order


def _others(pool: NoisePool):
  """[C, CQ] float32: 1 where pool sample i is not teacher t's own noise."""
  return (jnp.arange(pool.probs.shape[0])[:, None] != pool.owners[None, :]).astype(jnp.float32)


def teacher_scores(pool: NoisePool, samples=None):
  """[C]: how often each teacher's argmax on the other clients' noise is that noise's target label.

  samples: [CQ] float32 weights of the pool samples counted (None: all)."""
  votes = jnp.argmax(pool.probs, -1) == pool.labels[None, :]  # [C, CQ]
  others = _others(pool) if samples is None else _others(pool) * samples[None, :]
  return jnp.sum(votes * others, axis=1) / jnp.maximum(jnp.sum(others, axis=1), 1.0)


def agreement(pool: NoisePool):
  """How often a teacher's argmax on another client's noise is that noise's target label: the mean of
  `teacher_scores`, over the trusted teachers and their noise only under noise consensus (an untrusted upload
  neither votes nor is voted on, so it cannot open the regime gate)."""
  if pool.trusted is None:
    return jnp.mean(teacher_scores(pool))
  trusted = pool.trusted.astype(jnp.float32)
  scores = teacher_scores(pool, trusted[pool.owners])
  return jnp.sum(scores * trusted) / jnp.maximum(jnp.sum(trusted), 1.0)


def regime_signals(space: noise.NoiseSpace, pool: NoisePool, average):
  """What the server can see, without data, of how much averaging loses this round.

  average_noise_accuracy: how often the plain weighted average of the uploads gives a pseudo-sample its
    target label, among the samples whose own teacher does (knowledge that existed in some upload);
    low when the average forgets what single clients knew (near-single-class clients).
  teacher_classes: the mean over teachers of exp(H(m_t)) / NC, m_t the teacher's mean prediction on the
    other clients' noise: the share of the classes a teacher still names off its own noise (≈ 1/NC for a
    one-class expert, ≈ 1 for a generalist).

  Args:
    pool: the round's NoisePool. average: [P] the weighted average of the uploads.

  Returns:
    {"average_noise_accuracy": [], "teacher_classes": []}.
  """
  own = pool.probs[pool.owners, jnp.arange(pool.owners.shape[0])]  # [CQ, NC]
  known = (jnp.argmax(own, -1) == pool.labels).astype(jnp.float32)
  right = jnp.argmax(space.apply(average, pool.x), -1) == pool.labels
  others = _others(pool)
  marginal = jnp.einsum("tp,tpc->tc", others, pool.probs) / jnp.sum(others, 1, keepdims=True)  # [C, NC]
  entropy = -jnp.sum(marginal * jnp.log(jnp.maximum(marginal, 1e-12)), axis=-1)
  return {"average_noise_accuracy": jnp.sum(right * known) / jnp.maximum(jnp.sum(known), 1.0),
          "teacher_classes": jnp.mean(jnp.exp(entropy)) / pool.probs.shape[-1]}


def consensus(pool: NoisePool, threshold: float):
  """Noise consensus: each upload's agreement with the others' noise, and which uploads are trusted.

  score_t = mean over the samples k ≠ t made of [argmax σ(f(x̃; w_t)) = ỹ]; an upload is an outlier when
  score_t < median − threshold·1.4826·max(MAD, 0.05) (at most half of them fall below a median).

  Returns:
    (trusted [C] bool, scores [C]).
  """
  scores = teacher_scores(pool)
  median = jnp.median(scores)
  spread = 1.4826 * jnp.maximum(jnp.median(jnp.abs(scores - median)), 0.05)
  return scores >= median - threshold * spread, scores


def _distill_one(space, pool: NoisePool, student: int, params, key, hp: Hyperparameters, step_scale,
                 start_probs=None, num_steps=None):
  """Distils `params` on the pool without the noise of position `student` (−1: on all of it). start_probs:
  [CQ, NC] σ(f(x̃; params)/T) when known (`params` is an uploaded model: its row of `pool.probs`). num_steps:
  int32 [] this round's distillation steps under the regime-aware budget (None: `distill_steps`).

  Returns:
    (params, KL before, KL after, how often the soft target's argmax is the sample's label).
  """
  targets = distillation.soft_targets(pool.probs, pool.owners, student, hp.teacher_weighting, pool.histograms,
                                      pool.labels, pool.trusted)
  valid, teachers = pool.owners != student, jnp.arange(pool.probs.shape[0]) != student
  if pool.trusted is not None:
    valid, teachers = valid & pool.trusted[pool.owners], teachers & pool.trusted
  usable = jnp.any(valid) & jnp.any(teachers)  # no other trusted noise or teacher: the student keeps its params
  valid = valid.astype(jnp.float32)
  batch_key, train_key = jax.random.split(key)
  most = hp.distill_steps if num_steps is None else max(hp.distill_steps, hp.full_distill_steps)
  idx = distillation.sample_batches(batch_key, pool.owners, student, most, hp.distill_batch, pool.trusted)
  def steps(p):
    return distillation.distill(space, p, pool.x, targets, idx, train_key, optimizer=optax.adam(hp.distill_lr),
                                temperature=hp.temperature, train_mode=hp.student_train_mode,
                                step_scale=step_scale, num_steps=num_steps)

  # A closed gate (scale 0) would step by 0: skip the steps (the predicate is not vmapped, so this stays a cond).
  new = jax.lax.cond(step_scale > 0, steps, lambda p: p, params)
  new = jax.tree.map(lambda n, p: jnp.where(usable, n, p), new, params)
  before = distillation.mean_kl(space, params, pool.x, targets, valid, hp.temperature, start_probs)
  after = distillation.mean_kl(space, new, pool.x, targets, valid, hp.temperature)
  right = jnp.sum((jnp.argmax(targets, -1) == pool.labels) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return new, before, after, right


def distill_clients(space, pool: NoisePool, order, ids, key, hp: Hyperparameters, step_scale=1.0, num_steps=None):
  """Every uploaded model, a student on the other clients' noise (vmapped); teachers stay the uploads.

  Every random draw is keyed by client id. Returns ([C, P] students in the given order, diagnostics).
  """
  sorted_ids = ids[order]

  def student(j, params, cid):
    return _distill_one(space, pool, j, params, jax.random.fold_in(key, cid), hp, step_scale, pool.probs[j],
                        num_steps)

  new, before, after, right = jax.vmap(student)(jnp.arange(sorted_ids.shape[0]), pool.teachers, sorted_ids)
  inverse = jnp.argsort(order)
  return jax.tree.map(lambda a: a[inverse], new), {
      "kl_before": jnp.mean(before), "kl_after": jnp.mean(after), "soft_target_accuracy": jnp.mean(right)}


def distill_global(space, pool: NoisePool, start, key, hp: Hyperparameters, step_scale=1.0, num_steps=None):
  """The aggregate `start` [P], a student on all the noise with every teacher (FedDF style)."""
  new, before, after, right = _distill_one(space, pool, -1, start, key, hp, step_scale, num_steps=num_steps)
  return new, {"kl_before": before, "kl_after": after, "soft_target_accuracy": right}


def build(model: Model, hp: Hyperparameters, federation: Federation, *, client_side: bool = True,
          server_side: bool = True) -> RoundParts:
  """FedSND, or its ablations FedSD (`server_side=False`) and FedND (`client_side=False`: plain CE).

  Raises:
    InputError: bn_prior without a BatchNorm model.
  """
  if server_side and hp.bn_prior > 0 and model.calibrate is None:
    raise InputError("fedsnd.bn_prior", "needs a BatchNorm model (--config.batch_norm=True)")
  loss = (self_distillation_loss(model, lambda_mutual=hp.lambda_mutual, lambda_prev=hp.lambda_prev,
                                 temperature=hp.temperature, mode=hp.self_distill,
                                 confidence_gate=hp.confidence_gate)
          if client_side else client.supervised_loss(model))
  if not server_side:
    return RoundParts(loss)
  space = noise.noise_space(model, federation.input_shape)
  num_classes, q = federation.num_classes, hp.noise_samples

  rows = {"client": federation.num_clients, "round": federation.clients_per_round}.get(hp.noise_warm_start)
  partial = federation.clients_per_round < federation.num_clients
  gate_at = hp.distill_agreement if hp.gate_partial_participation or not partial else float("inf")
  regime_budget = hp.full_server_below > 0

  def init_state(params):
    del params
    if rows is None and not regime_budget:
      return None
    noise_rows = (None, None) if rows is None else (jnp.zeros((rows, q, *space.shape), jnp.float32),
                                                    jnp.zeros((rows,), bool))
    return ServerMemory(*noise_rows, jnp.float32(0.0) if regime_budget else None)

  def full_server(state: ServerMemory | None):
    """Whether this round runs the full server (bool []), from the last distilling round's teacher agreement."""
    return state.agreement < hp.full_server_below if regime_budget else jnp.bool_(False)

  def remember(state: ServerMemory | None, teacher_agreement):
    return state._replace(agreement=teacher_agreement) if regime_budget else state

  def distill_steps(ctx: RoundContext):
    return jnp.where(full_server(ctx.state), hp.full_distill_steps, hp.distill_steps) if regime_budget else None

  def consensus_diagnostics(pool: NoisePool, order, ids):
    if not hp.noise_consensus:
      return {}, None
    trusted = pool.trusted[jnp.argsort(order)]  # back in the round's order
    return {"consensus_flagged": jnp.sum(~pool.trusted), "consensus_scores": pool.scores,
            "consensus_client_ids": ids[order], "consensus_trusted": pool.trusted}, trusted

  def synthesis(ctx: RoundContext, carry: ServerCarry):
    """Noise for every upload, in a NoisePool; under noise consensus the flagged uploads get weight 0 here, before
    any aggregation or distillation."""
    ids, uploads = ctx.ids, ctx.uploads
    synth_key = jax.random.fold_in(ctx.key, 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(synth_key, i))(ids)
    histograms = label_histograms(ctx.data, ids, num_classes) if hp.uploads_histograms else None
    if hp.noise_targets == "histogram":
      labels = jax.vmap(lambda k, h: noise.histogram_targets(jax.random.fold_in(k, 1), h, q))(keys, histograms)
    else:
      labels = jnp.tile(noise.balanced_targets(q, num_classes), (ids.shape[0], 1))
    init = jax.vmap(lambda p, k: space.init_scale(p) * jax.random.normal(k, (q, *space.shape)))(uploads.params,
                                                                                                  keys)
    full = full_server(ctx.state)
    if rows is not None:
      memory, at = ctx.state, ids if hp.noise_warm_start == "client" else jnp.arange(ids.shape[0])
      seen = memory.seen.at[at].get(mode="fill", fill_value=False) & ~full  # Poisson's extra slots: never seen
      init = jnp.where(seen.reshape((-1,) + (1,) * (init.ndim - 1)), memory.noise.at[at].get(mode="clip"), init)
    optimizer = optax.adam(hp.noise_lr)
    steps = jnp.where(full, hp.full_noise_steps, hp.noise_steps) if regime_budget else hp.noise_steps
    made, stats = jax.vmap(lambda p, k, y, x0: noise.synthesize(
        space, p, k, y, steps=steps, optimizer=optimizer, l2=hp.noise_l2,
        projection=hp.noise_projection, init=x0, adversarial=hp.adversarial, student_params=ctx.params,
        temperature=hp.temperature, bn_prior=hp.bn_prior, stop_ce=hp.noise_stop_ce))(uploads.params, keys, labels,
                                                                                       init)
    state = carry.state
    if rows is not None:
      state = state._replace(noise=memory.noise.at[at].set(made, mode="drop"),
                             seen=memory.seen.at[at].set(True, mode="drop"))
    pool, order = noise_pool(space, uploads.params, made, labels, ids, hp, histograms)
    flags, trusted = consensus_diagnostics(pool, order, ids)
    weights = carry.weights if trusted is None else carry.weights * trusted
    diagnostics = {"full_server": full.astype(jnp.float32)} if regime_budget else {}
    diagnostics |= {"teacher_ce_initial": jnp.mean(stats.ce_initial), "teacher_ce": jnp.mean(stats.ce_final),
                   "teacher_noise_accuracy": jnp.mean(stats.accuracy), "noise_norm": jnp.mean(stats.norm),
                   "noise_steps_taken": jnp.mean(stats.steps.astype(jnp.float32)),
                   "data_norm": jnp.mean(jax.vmap(space.norm)(uploads.params)), **flags}
    return carry._replace(state=state, weights=weights, work=(pool, order)), diagnostics

  def step_scale(ctx: RoundContext, pool: NoisePool, average):
    """The round's distillation step-size factor (0 when the regime-aware gate is closed), and the signals the
    decision is made from, for the round's diagnostics."""
    teacher_agreement = agreement(pool)
    gate = (teacher_agreement < gate_at).astype(jnp.float32)
    scale = gate * jnp.float32(hp.distill_lr_decay) ** ctx.round.astype(jnp.float32)
    return scale, {"teacher_agreement": teacher_agreement, "distill_gate": gate,
                   **regime_signals(space, pool, average)}

  def distill(ctx: RoundContext, carry: ServerCarry):
    pool, order = carry.work
    undistilled = aggregation.weighted_average(ctx.uploads.params, carry.weights)  # flagged uploads weigh 0
    scale, signals = step_scale(ctx, pool, undistilled)
    students, diagnostics = distill_clients(space, pool, order, ctx.ids, jax.random.fold_in(ctx.key, 1), hp, scale,
                                            distill_steps(ctx))
    return carry._replace(models=students, work=None, eval_models={"no_distill": undistilled},
                          state=remember(carry.state, signals["teacher_agreement"])), {**diagnostics, **signals}

  def distill_aggregate(ctx: RoundContext, carry: ServerCarry):
    pool, _ = carry.work
    scale, signals = step_scale(ctx, pool, carry.average)
    new, diagnostics = distill_global(space, pool, carry.average, jax.random.fold_in(ctx.key, 1), hp, scale,
                                      distill_steps(ctx))
    return carry._replace(average=new, work=None, eval_models={"no_distill": carry.average},
                          state=remember(carry.state, signals["teacher_agreement"])), {**diagnostics, **signals}

  synthesising = ServerStep("synthesis", synthesis)
  distilling = ((synthesising, ServerStep("distill", distill), AGGREGATE) if hp.distill_target == "clients" else
                (synthesising, AGGREGATE, ServerStep("distill", distill_aggregate)))

  def distills_in(round_index: int) -> bool:
    return hp.distill_rounds == 0 or round_index < hp.distill_rounds

  def server_steps(round_index: int):
    if distills_in(round_index):
      return distilling
    return (synthesising, AGGREGATE) if hp.noise_consensus else (AGGREGATE,)  # consensus outlives distillation

  def extra_bytes(round_index: int):  # label histograms, when the server needs them
    synthesises = distills_in(round_index) or hp.noise_consensus
    return (num_classes * 4 if hp.uploads_histograms and synthesises else 0), 0

  return RoundParts(loss, init_state, server_steps=server_steps, extra_bytes=extra_bytes)
