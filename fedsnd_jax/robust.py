"""Byzantine-robust aggregation rules as `Aggregator`s, jitted over the stacked uploads [C, P].

Every rule works on the updates x_k = w_k − w (w the round's global model) and returns w + rule(x); example
counts are ignored (a Byzantine client could lie about them), except that an upload of weight 0 is left out, as
if it had not arrived (FedSND's noise consensus drops an upload that way): C below is the number of uploads of
positive weight, and every rule on C uploads with some of weight 0 equals the rule on the others alone.

With f the number of Byzantine uploads a rule is built to tolerate among the C of a round, and conventions as in
ByzFL (EPFL/INRIA's reference library, whose documented outputs the tests reproduce):

  median               coordinate-wise median (Yin, Chen, Kannan, Bartlett, ICML 2018)
  trimmed_mean(f)      per coordinate, drop the f largest and f smallest values, average the rest (same)
  krum(f)              the x_i with the least mean squared distance to its C − f − 1 nearest other updates
                       (ByzFL's count; Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, sum over the
                       C − f − 2 nearest: the selected update differs only in near-ties)
  multi_krum(f)        the mean of the C − f updates with the best Krum scores
  geometric_median     smoothed Weiszfeld from 0: z ← Σ β_i x_i / Σ β_i, β_i = 1/max(ν, ‖x_i − z‖), T steps
                       (RFA: Pillutla, Kakade, Harchaoui, IEEE TSP 2022; as ByzFL, unweighted and from 0,
                       where RFA weights the clients by n_i and starts from their weighted mean)
  centered_clipping    v ← v + mean_i (x_i − v)·min(1, τ/‖x_i − v‖), L steps from the previous round's v
                       (Karimireddy, He, Jaggi, ICML 2021); v is the aggregator's state
  nearest_neighbor_mixing(f, rule)  a pre-aggregation: every x_i becomes the mean of its C − f nearest
                       updates (itself included), then `rule` (Allouah et al., AISTATS 2023)

Robust rules also discard honest clients whose data differ from the majority's: on non-IID data they cost
accuracy even without an attack (report the no-attack row).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import tree_math
from fedsnd_jax.aggregation import Aggregate, Aggregator, EmptyState, weighted_average
from fedsnd_jax.errors import require
from fedsnd_jax.rounds import AlgorithmInfo, Federation, MechanismParts, MechanismSpec
from fedsnd_jax.shapes import Params

RULES = ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping")


def _plus(reference, update):
  return jax.tree.map(lambda r, u: (r + u).astype(r.dtype), reference, update)


def sq_distances(stacked: Params) -> jax.Array:
  """[C, C] squared L2 distances between the clients' whole pytrees ([C, P] leaves)."""

  def leaf(x):
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
    sq = jnp.sum(flat**2, axis=1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)

  return sum(leaf(x) for x in jax.tree.leaves(stacked))


def present(weights) -> jax.Array:
  """[C] float32: 1 for the uploads a rule counts (weight > 0)."""
  return (weights > 0).astype(jnp.float32)


def _leading(mask, x):
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def median() -> Aggregator:
  def apply(models, weights, state, reference, key):
    del key
    keep = present(weights) > 0
    rule = lambda x: jnp.nanmedian(jnp.where(_leading(keep, x), x.astype(jnp.float32), jnp.nan), axis=0)
    return Aggregate(_plus(reference, jax.tree.map(rule, tree_math.updates(models, reference))), state, {})

  return Aggregator(lambda params: EmptyState(), apply)


def trimmed_mean(f: int) -> Aggregator:
  def apply(models, weights, state, reference, key):
    del key
    keep = present(weights)
    count = jnp.sum(keep)

    def rule(x):
      ordered = jnp.sort(jnp.where(_leading(keep > 0, x), x.astype(jnp.float32), jnp.inf), axis=0)  # absent last
      rank = jnp.arange(x.shape[0])
      inner = _leading((rank >= f) & (rank < count - f), x)
      return jnp.sum(jnp.where(inner, ordered, 0.0), axis=0) / jnp.maximum(count - 2 * f, 1.0)

    return Aggregate(_plus(reference, jax.tree.map(rule, tree_math.updates(models, reference))), state, {})

  return Aggregator(lambda params: EmptyState(), apply)


def _counted_distances(stacked: Params, keep) -> jax.Array:
  """[C, C] squared distances to the uploads in `keep` (1 = counted); +∞ to the others."""
  return jnp.where(keep[None, :] > 0, sq_distances(stacked), jnp.inf)


def krum_scores(stacked: Params, f: int, weights=None) -> jax.Array:
  """[C] mean squared distance of each update to its C − f − 1 nearest other updates (+∞ for weight 0)."""
  num = jax.tree.leaves(stacked)[0].shape[0]
  keep = jnp.ones(num) if weights is None else present(weights)
  count = jnp.sum(keep)
  ordered = jnp.sort(_counted_distances(stacked, keep), axis=1)
  column = jnp.arange(num)[None, :]
  used = (column >= 1) & (column < count - f)  # column 0: the distance to itself
  scores = jnp.sum(jnp.where(used, ordered, 0.0), axis=1) / jnp.maximum(count - f - 1, 1.0)
  return jnp.where(keep > 0, scores, jnp.inf)


def _selection(f: int, keep) -> Aggregator:
  """Averages the `keep(C)` updates with the lowest Krum scores."""

  def apply(models, weights, state, reference, key):
    del key
    updates = tree_math.updates(models, reference)
    scores = krum_scores(updates, f, weights)
    rank = jnp.argsort(jnp.argsort(scores))
    chosen = (rank < keep(jnp.sum(present(weights)))).astype(jnp.float32)
    return Aggregate(_plus(reference, weighted_average(updates, chosen)), state,
                     {"robust_selected_score": jnp.min(scores)})

  return Aggregator(lambda params: EmptyState(), apply)


def krum(f: int) -> Aggregator:
  return _selection(f, lambda num: 1)


def multi_krum(f: int) -> Aggregator:
  return _selection(f, lambda num: num - f)


def _weighted_sum(stacked, w):
  return jax.tree.map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype), stacked)


def geometric_median(nu: float = 0.1, steps: int = 3) -> Aggregator:
  def apply(models, weights, state, reference, key):
    del key
    updates = tree_math.updates(models, reference)
    keep = present(weights)

    def step(z, _):
      beta = keep / jnp.maximum(tree_math.norms(jax.tree.map(lambda x, zz: x - zz[None], updates, z)), nu)
      return weighted_average(updates, beta), None

    z, _ = jax.lax.scan(step, jax.tree.map(lambda x: jnp.zeros_like(x[0]), updates), None, length=steps)
    return Aggregate(_plus(reference, z), state, {})

  return Aggregator(lambda params: EmptyState(), apply)


class CenterState(NamedTuple):
  """center [P]: centered clipping's v, the previous round's aggregate update (zeros at first)."""

  center: Params


def centered_clipping(tau: float, steps: int = 1) -> Aggregator:
  def apply(models, weights, state: CenterState, reference, key):
    del key
    updates = tree_math.updates(models, reference)
    keep = present(weights)
    count = jnp.maximum(jnp.sum(keep), 1.0)

    def step(v, _):
      diff = jax.tree.map(lambda x, vv: x - vv[None], updates, v)
      factor = jnp.minimum(1.0, tau / jnp.maximum(tree_math.norms(diff), 1e-12))
      moved = _weighted_sum(diff, keep * factor / count)
      return jax.tree.map(jnp.add, v, moved), jnp.sum(keep * (factor < 1.0)) / count

    v, clipped = jax.lax.scan(step, state.center, None, length=steps)
    return Aggregate(_plus(reference, v), CenterState(v), {"robust_clipped_fraction": clipped[-1]})

  return Aggregator(lambda params: CenterState(jax.tree.map(jnp.zeros_like, params)), apply)


def nearest_neighbor_mixing(f: int, rule: Aggregator) -> Aggregator:
  """Every update replaced by the mean of its C − f nearest updates (itself included), then `rule`."""

  def apply(models, weights, state, reference, key):
    keep = present(weights)
    count = jnp.sum(keep)
    neighbours = jnp.argsort(_counted_distances(models, keep), axis=1, stable=True)  # nearest first, absent last
    used = (jnp.arange(keep.shape[0]) < count - f).astype(jnp.float32) / jnp.maximum(count - f, 1.0)
    mixed = jax.tree.map(lambda x: jnp.tensordot(x[neighbours].astype(jnp.float32), used, axes=([1], [0])
                                                 ).astype(x.dtype), models)
    return rule.apply(mixed, weights, state, reference, key)

  return Aggregator(rule.init, apply, rule.protocol_bytes)


def robust_rule(rule: str, f: int, tau: float = 1.0, mixing: bool = False) -> Aggregator:
  """The named rule (one of RULES) for f Byzantine uploads, optionally behind nearest-neighbour mixing."""
  rules = {"median": median, "trimmed_mean": lambda: trimmed_mean(f), "krum": lambda: krum(f),
           "multi_krum": lambda: multi_krum(f), "geometric_median": geometric_median,
           "centered_clipping": lambda: centered_clipping(tau)}
  aggregator = rules[rule]()
  return nearest_neighbor_mixing(f, aggregator) if mixing else aggregator


def smallest_round(rule: str, f: int, mixing: bool = False) -> int:
  """The fewest clients per round the rule needs for f Byzantine uploads (Krum: C > 2f + 2; trimming: C > 2f)."""
  need = {"trimmed_mean": 2 * f + 1, "krum": 2 * f + 3, "multi_krum": 2 * f + 3}.get(rule, 1)
  return max(need, f + 1 if mixing else 1)


class Settings(NamedTuple):
  """Robust aggregation, config section `robust` (off while rule is mean and mixing is off).

  Attributes:
    rule: mean (the example-weighted mean: no robust rule) | one of RULES.
    f: Byzantine uploads per round the rule is built to tolerate.
    tau: centered_clipping's radius τ (L2 norm of an update).
    nearest_neighbor_mixing: NNM pre-aggregation before the rule (Allouah et al., AISTATS 2023).
  """

  rule: str = "mean"
  f: int = 1
  tau: float = 1.0
  nearest_neighbor_mixing: bool = False


def enabled(s: Settings) -> bool:
  return s.rule != "mean" or s.nearest_neighbor_mixing


def validate(s: Settings, federation: Federation, algorithm: AlgorithmInfo) -> None:
  """Raises InputError naming `robust.<field>` for a rule the round cannot run."""
  del algorithm
  require(s.rule == "mean" or s.rule in RULES, "robust.rule",
          f"unknown rule {s.rule!r}; allowed: mean, {', '.join(RULES)}")
  for field in ("f", "tau"):
    require(getattr(s, field) >= 0, f"robust.{field}", f"must be ≥ 0, got {getattr(s, field)}")
  require(s.rule != "centered_clipping" or s.tau > 0, "robust.tau",
          "centered clipping's radius τ must be > 0 (at 0 the aggregate never moves)")
  require(not s.nearest_neighbor_mixing or s.rule != "mean", "robust.nearest_neighbor_mixing",
          "is a pre-aggregation for a robust rule; choose a robust.rule other than mean")
  if enabled(s):
    need = smallest_round(s.rule, s.f, s.nearest_neighbor_mixing)
    require(federation.clients_per_round >= need, "robust.f", f"{s.rule}"
            f"{' with nearest-neighbour mixing' if s.nearest_neighbor_mixing else ''} for f = {s.f} needs at "
            f"least {need} clients per round, got {federation.clients_per_round}")


def build(s: Settings, federation: Federation, seed: int) -> MechanismParts:
  del federation, seed
  return MechanismParts(aggregator=robust_rule(s.rule, s.f, s.tau, s.nearest_neighbor_mixing))


SPEC = MechanismSpec("robust", Settings, enabled, validate, build)
