"""Client-level differential privacy: clipping and Gaussian noise on the server (central) or on every upload
(local), and privacy accounting with Google's dp-accounting (never a home-made accountant).

Central DP, trusted server (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018), as an `Aggregator`:
  Δ_k = w_k − w,   Δ̃_k = Δ_k · min(1, S / ‖Δ_k‖)   (L2 norm over the whole update)
  w ← w + (Σ_k Δ̃_k + N(0, σ²S²·I)) / C            (uniform weights: example counts would be a release)
Adaptive clipping to a target quantile γ (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021), the clipped count itself noised:
  b̄ = (Σ_k 1[‖Δ_k‖ ≤ S] + N(0, σ_b²)) / C,   S ← S · exp(−η·(b̄ − γ))
Local DP: every client clips its update and adds N(0, σ²S²·I) before uploading (`local_noise`); the server
sees only noised updates, so whatever it does with them (FedSND's synthesis and distillation included) is
post-processing.

Accounting (`Accountant`, dp-accounting's RDP or PLD accountant). dp-accounting's GaussianDpEvent(z) is the
unit-sensitivity Gaussian of multiplier z; its PLD accountant doubles the sensitivity under REPLACE_ONE, its RDP
accountant does not (`gaussian`). Fixed-size sampling: the server samples C of K clients without replacement, so
with K public the neighbouring relation is "replace one client", under which the clipped sum has L2 sensitivity
2S: a round is SampledWithoutReplacementDpEvent(K, C, GaussianDpEvent(σ/2)) (Wang, Balle, Kasiviswanathan,
AISTATS 2019; RDP only: dp-accounting's PLD does not support it), composed with GaussianDpEvent(σ_b) for the
adaptive clipped count (bits in {0, 1}: sensitivity 1 under either relation; Andrew et al. centre the bits at
±½, sensitivity ½ under add-or-remove, so ours charges the count more than the paper: conservative). Poisson
sampling (`client_sampling=poisson`, each client in with probability q = C/K, the sum divided by the fixed C):
"add or remove one client", sensitivity S, PoissonSampledDpEvent(q, GaussianDpEvent(σ)), with RDP or PLD
(tighter). A Poisson round has room for a cap of clients (`algorithm.cohort_cap`); with probability p a round
samples more and leaves some out, which the Poisson analysis does not cover. By coupling the capped run with the
uncapped one (they differ with probability ≤ T·p over T rounds, on either neighbour), the capped run is
(ε, δ_M(ε) + (1 + e^ε)·T·p)-DP, δ_M the accountant's: `Accountant` reports the smallest ε whose total is ≤ δ.
Local DP gets no amplification from sampling (the server knows who uploaded): each upload is the replace-one
Gaussian (sensitivity 2S, std σS), and a client is charged for every round (the worst case).

What DP covers is the model update. What the runs log besides (`train_loss`, from raw per-client losses, and
metrics computed with example counts) is not private; under DP the experiment loop leaves it out of
metrics.jsonl (`loop.PRIVATE_METRICS`). Example counts themselves are uploaded in the clear, but no
DP aggregator reads them (uniform weights).
"""

import math
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp

from fedsnd_jax import aggregation, models, tree_math
from fedsnd_jax.aggregation import Aggregate, Aggregator
from fedsnd_jax.errors import require
from fedsnd_jax.rounds import AlgorithmInfo, Federation, MechanismParts, MechanismSpec
from fedsnd_jax.sampling import cohort_cap
from fedsnd_jax.shapes import Params

# Andrew et al.'s suggestions: clip-norm learning rate 0.2, clipped-count noise C/20.
DEFAULT_CLIP_LEARNING_RATE = 0.2


class AdaptiveClipping(NamedTuple):
  """Adaptive clipping: target quantile γ, count noise σ_b (in clients), geometric learning rate η."""

  target_quantile: float = 0.5
  count_stddev: float = 0.0
  learning_rate: float = DEFAULT_CLIP_LEARNING_RATE


class ClipState(NamedTuple):
  """clip_norm: float32 [], the S the next round clips to."""

  clip_norm: jax.Array


def clip(stacked: Params, clip_norm) -> tuple[Params, jax.Array]:
  """Scales every client's [P] update to norm ≤ S. Returns (clipped [C, P], norms before clipping [C])."""
  norms = tree_math.norms(stacked)
  factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
  return jax.tree.map(lambda x: x * factor.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), stacked), norms


def nonnegative_variances(params: Params) -> Params:
  """BatchNorm models: the running variances (`batch_stats` … `var`) clipped at 0. Noise on an update moves them
  like any parameter, and at small C a variance goes negative (NaN at evaluation); clipping is post-processing."""

  def fix(path, x):
    keys = [getattr(k, "key", None) for k in path]
    return jnp.maximum(x, 0) if models.STATISTICS in keys and keys[-1] == "var" else x

  return jax.tree_util.tree_map_with_path(fix, params)


def central_dp(clip_norm: float, noise_multiplier: float, adaptive: AdaptiveClipping | None = None,
               expected_clients: int = 0) -> Aggregator:
  """The central-DP aggregator: clip each update to S, sum, add N(0, σ²S²), divide by C (module docstring).

  Uploads of weight 0 (the empty client that pads a Poisson-sampled round) are left out of the sum and the
  clipped count; the divisor is the expected cohort C, fixed (McMahan et al.'s fixed-denominator estimator), so
  the sum's sensitivity stays S.

  Args:
    clip_norm: S (the initial S with adaptive clipping).
    noise_multiplier: σ, the noise std in units of S.
    adaptive: adaptive clipping settings, or None for a fixed S.
    expected_clients: C, the divisor (0: the number of uploads, as with fixed-size sampling).

  Diagnostics: dp_clip_norm (the S used), dp_clipped_fraction (share of updates above S, before noise: a
  diagnostic, not released), dp_update_norm (mean update norm, likewise).
  """

  def init(params):
    del params
    return ClipState(jnp.float32(clip_norm))

  def apply(models, weights, state: ClipState, reference, key):
    num = expected_clients or weights.shape[0]  # uniform weights: example counts are not privatised
    present = (weights > 0).astype(jnp.float32)
    s = state.clip_norm
    deltas = tree_math.updates(models, reference)
    clipped, norms = clip(deltas, s)
    update_key, count_key = jax.random.split(key)
    total = jax.tree.map(lambda x: jnp.tensordot(present, x, axes=1), clipped)
    noisy = jax.tree.map(jnp.add, total, tree_math.normal_like(update_key, total, noise_multiplier * s))
    average = nonnegative_variances(jax.tree.map(lambda r, t: r + t / num, reference, noisy))
    new_s = s
    if adaptive is not None:
      unclipped = jnp.sum(present * (norms <= s)) + adaptive.count_stddev * jax.random.normal(count_key)
      new_s = s * jnp.exp(-adaptive.learning_rate * (unclipped / num - adaptive.target_quantile))
    share = lambda x: jnp.sum(present * x) / jnp.maximum(jnp.sum(present), 1.0)
    diagnostics = {"dp_clip_norm": s, "dp_clipped_fraction": share(norms > s), "dp_update_norm": share(norms)}
    return Aggregate(average, ClipState(new_s.astype(jnp.float32)), diagnostics)

  return Aggregator(init, apply)


def local_noise(clip_norm: float, noise_multiplier: float):
  """A client's upload transform for local DP: (received [P], upload [P], key) -> received + clip(Δ) + noise."""

  def transform(received, upload, key):
    delta = jax.tree.map(lambda u, r: (u - r)[None], upload, received)
    clipped, _ = clip(delta, clip_norm)
    noise = tree_math.normal_like(key, received, noise_multiplier * clip_norm)
    return nonnegative_variances(jax.tree.map(lambda r, d, n: r + d[0] + n, received, clipped, noise))

  return transform


ACCOUNTANTS = ("rdp", "pld")
# The fixed-point search for ε under the cohort cap: relative step and most iterations (`_capped_epsilon`).
EPSILON_SLACK = 1e-6
EPSILON_ITERATIONS = 50


def relation(sampling: str, local: bool) -> dp_accounting.NeighboringRelation:
  """The neighbouring relation rounds are accounted under: add-or-remove one client for central DP under Poisson
  sampling, replace one client otherwise (fixed-size sampling with K public; local DP)."""
  if sampling == "poisson" and not local:
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  return dp_accounting.NeighboringRelation.REPLACE_ONE


def gaussian(noise_multiplier: float, sensitivity: float, kind: str,
             neighbours: dp_accounting.NeighboringRelation) -> dp_accounting.GaussianDpEvent:
  """The GaussianDpEvent of noise std σ·S on a sum of sensitivity `sensitivity`·S, for accountant `kind`.

  dp-accounting's RDP accountant reads GaussianDpEvent(z) as sensitivity 1 whatever the relation; its PLD
  accountant as sensitivity 2 under REPLACE_ONE. A replace-one sensitivity of 2S is therefore z = σ/2 for RDP and
  z = σ for PLD.
  """
  doubled = kind == "pld" and neighbours == dp_accounting.NeighboringRelation.REPLACE_ONE
  return dp_accounting.GaussianDpEvent(noise_multiplier * (2 if doubled else 1) / sensitivity)


def round_event(num_clients: int, clients_per_round: int, noise_multiplier: float, count_stddev: float = 0.0,
                local: bool = False, sampling: str = "fixed", kind: str = "rdp") -> dp_accounting.DpEvent:
  """One round's DpEvent for one client, for accountant `kind` (module docstring).

  Fixed-size sampling and local DP: the replace-one relation (sensitivity 2S). Poisson sampling with rate
  q = C/K (central DP): PoissonSampledDpEvent(q, GaussianDpEvent(σ)) under add-or-remove-one, where the clipped
  sum has sensitivity S (Abadi et al., CCS 2016; McMahan et al., ICLR 2018).
  """
  neighbours = relation(sampling, local)
  replace = neighbours == dp_accounting.NeighboringRelation.REPLACE_ONE
  event = gaussian(noise_multiplier, 2.0 if replace else 1.0, kind, neighbours)
  if count_stddev > 0:  # the clipped count: sensitivity 1 under either relation
    event = dp_accounting.ComposedDpEvent([event, gaussian(count_stddev, 1.0, kind, neighbours)])
  if local:
    return event
  if not replace:
    return dp_accounting.PoissonSampledDpEvent(clients_per_round / num_clients, event)
  return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, event)


def make_accountant(kind: str, neighbours: dp_accounting.NeighboringRelation) -> dp_accounting.PrivacyAccountant:
  """A fresh dp-accounting accountant: RDP or PLD (PLD does not support sampling without replacement)."""
  if kind == "pld":
    return dp_accounting.pld.PLDAccountant(neighboring_relation=neighbours)
  if kind == "rdp":
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=neighbours)
  raise ValueError(f"unknown accountant {kind!r}; allowed: {', '.join(ACCOUNTANTS)}")


def overflow_chance(num_clients: int, clients_per_round: int, sampling: str) -> float:
  """p: the chance a round's sampled cohort exceeds its cap (Poisson sampling; 0 for fixed-size)."""
  return cohort_cap(num_clients, clients_per_round)[1] if sampling == "poisson" else 0.0


def _overflow_charge(epsilon: float, failure: float) -> float:
  """(1 + e^ε)·failure: what the cohort cap's overflow (chance `failure` over the run) costs of δ at ε."""
  return (1 + math.exp(min(epsilon, 700.0))) * failure


def _capped_epsilon(accountant: dp_accounting.PrivacyAccountant, delta: float, failure: float) -> float:
  """The smallest ε (to a relative EPSILON_SLACK) with δ_M(ε) + (1 + e^ε)·failure ≤ δ (module docstring).

  Fixed-point iteration from ε_M(δ): a guess g gives ε = ε_M(δ − (1 + e^g)·failure); once ε ≤ g, δ_M(ε) ≤
  δ − (1 + e^g)·failure ≤ δ − (1 + e^ε)·failure, so ε holds. ∞ when no ε does.
  """
  guess = accountant.get_epsilon(delta)
  for _ in range(EPSILON_ITERATIONS):
    budget = delta - _overflow_charge(guess, failure)
    if budget <= 0:
      return math.inf
    epsilon = accountant.get_epsilon(budget)
    if epsilon <= guess:
      return float(epsilon)
    guess = epsilon * (1 + EPSILON_SLACK)
  return math.inf


class Accountant:
  """ε(rounds) at δ for the mechanism above, from one of dp-accounting's accountants.

  Args:
    num_clients: K; clients_per_round: C (sampled without replacement, or the expected cohort under Poisson).
    noise_multiplier: σ of the update sum (0: no privacy, ε = ∞).
    delta: δ of the whole run's guarantee.
    count_stddev: σ_b of adaptive clipping's clipped count (0: fixed clipping, nothing else released).
    local: local DP (each upload noised by its client; no amplification by sampling).
    sampling: "fixed" or "poisson" (`algorithm.round_keys`). Under Poisson sampling the cohort cap's overflow is
      charged as (1 + e^ε)·rounds·p to δ (module docstring).
    kind: "rdp" or "pld" (PLD needs Poisson sampling or local DP).

  Raises:
    ValueError: PLD with fixed-size sampling under central DP.
  """

  def __init__(self, num_clients: int, clients_per_round: int, noise_multiplier: float, delta: float,
               count_stddev: float = 0.0, local: bool = False, sampling: str = "fixed", kind: str = "rdp"):
    self.delta = delta
    self._neighbours = relation(sampling, local)
    self._kind = kind
    self._overflow = overflow_chance(num_clients, clients_per_round, sampling)
    self._event = (round_event(num_clients, clients_per_round, noise_multiplier, count_stddev, local, sampling,
                               kind) if noise_multiplier > 0 else None)
    if self._event is not None and not make_accountant(kind, self._neighbours).supports(self._event):
      raise ValueError(f"dp-accounting's {kind} accountant does not support {type(self._event).__name__} "
                       "(PLD: use Poisson sampling or the rdp accountant)")
    self._cache: dict[int, float] = {}

  def epsilon(self, rounds: int) -> float:
    """ε after `rounds` rounds (0 rounds: 0; no noise: ∞)."""
    if rounds <= 0:
      return 0.0
    if self._event is None:
      return math.inf
    if rounds not in self._cache:
      accountant = make_accountant(self._kind, self._neighbours)
      accountant.compose(self._event, rounds)
      self._cache[rounds] = _capped_epsilon(accountant, self.delta, rounds * self._overflow)
    return self._cache[rounds]


def noise_for_epsilon(target_epsilon: float, rounds: int, num_clients: int, clients_per_round: int, delta: float,
                      count_stddev: float = 0.0, local: bool = False, sampling: str = "fixed",
                      kind: str = "rdp") -> float:
  """The smallest σ whose ε after `rounds` rounds is at most `target_epsilon` (dp-accounting's calibration, at
  δ − (1 + e^ε)·rounds·p under Poisson sampling's cohort cap).

  Raises:
    ValueError: no σ in [0.01, 10⁴] reaches it (e.g. the clipped count's own noise already spends more), or the
      cohort cap's overflow alone spends δ at that ε.
  """
  budget = delta - _overflow_charge(target_epsilon, rounds * overflow_chance(num_clients, clients_per_round,
                                                                            sampling))
  if budget <= 0:
    raise ValueError(f"ε = {target_epsilon} over {rounds} rounds: the cohort cap's overflow alone exceeds "
                     f"δ = {delta}")
  bracket = dp_accounting.ExplicitBracketInterval(1e-2, 1e4)
  if kind == "pld":  # PLD near σ = 0.01 takes tens of GB: search below RDP's answer (PLD's ε is the tighter)
    rdp = noise_for_epsilon(target_epsilon, rounds, num_clients, clients_per_round, delta, count_stddev, local,
                            sampling, "rdp")
    bracket = dp_accounting.LowerEndpointAndGuess(rdp / 2, rdp)
  try:
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(kind, relation(sampling, local)),
        lambda sigma: dp_accounting.SelfComposedDpEvent(
            round_event(num_clients, clients_per_round, sigma, count_stddev, local, sampling, kind), rounds),
        target_epsilon, budget, bracket))
  except ValueError:
    raise ValueError(f"no noise multiplier in [0.01, 1e4] reaches ε = {target_epsilon} after {rounds} rounds "
                     f"(count_stddev = {count_stddev})") from None


class Settings(NamedTuple):
  """Client-level differential privacy, config section `dp` (off while clip_norm is 0).

  Central DP by default: the server clips every model update to S, sums, adds N(0, (σS)²) and divides by C.

  Attributes:
    clip_norm: S, the L2 clip of a client's whole update; 0 = no differential privacy.
    noise_multiplier: σ, the noise std in units of S.
    adaptive_clip: adapt S to the target_quantile of update norms (Andrew et al., NeurIPS 2021; central only).
    target_quantile: γ, the share of updates S should leave unclipped.
    clip_count_stddev: σ_b, the noise on the unclipped count; 0 = clients_per_round / 20 (the paper's).
    clip_learning_rate: η of the geometric update S ← S·exp(−η(b̄ − γ)) (the paper's 0.2).
    delta: δ of the run's (ε, δ) guarantee; ε at this δ is in every metrics record and in summary.json.
    accountant: rdp | pld (dp-accounting's; PLD is tighter and needs client_sampling=poisson or local).
    target_epsilon: > 0: stop before a round would spend more (exit 0, summary.json says so).
    local: local DP: every client clips and noises its own update (no trusted server).
  """

  clip_norm: float = 0.0
  noise_multiplier: float = 1.0
  adaptive_clip: bool = False
  target_quantile: float = 0.5
  clip_count_stddev: float = 0.0
  clip_learning_rate: float = DEFAULT_CLIP_LEARNING_RATE
  delta: float = 1e-5
  accountant: str = "rdp"
  target_epsilon: float = 0.0
  local: bool = False


def enabled(s: Settings) -> bool:
  return s.clip_norm > 0


def validate(s: Settings, federation: Federation, algorithm: AlgorithmInfo) -> None:
  """Raises InputError naming `dp.<field>` (or `algorithm`) for settings no DP run here can take."""
  for field in ("clip_norm", "noise_multiplier", "clip_count_stddev", "target_epsilon"):
    require(getattr(s, field) >= 0, f"dp.{field}", f"must be ≥ 0, got {getattr(s, field)}")
  if not enabled(s):
    return
  require(0 < s.delta < 1, "dp.delta", f"must be in (0, 1), got {s.delta}")
  require(0 < s.target_quantile < 1, "dp.target_quantile", f"must be in (0, 1), got {s.target_quantile}")
  require(s.clip_learning_rate > 0, "dp.clip_learning_rate", f"must be > 0, got {s.clip_learning_rate}")
  require(not (s.local and s.adaptive_clip), "dp.adaptive_clip",
          "adaptive clipping is central DP's (the server sets S from a noised count); not with dp.local")
  require(s.target_epsilon == 0 or s.noise_multiplier > 0, "dp.target_epsilon",
          "needs dp.noise_multiplier > 0 (without noise ε is infinite)")
  require(s.accountant in ACCOUNTANTS, "dp.accountant",
          f"unknown accountant {s.accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
  require(s.accountant == "rdp" or s.local or federation.sampling == "poisson", "dp.accountant",
          "dp-accounting's PLD accountant does not support sampling without replacement; use "
          "client_sampling=poisson or dp.accountant=rdp")
  require(bool(algorithm.privacy), "algorithm", f"{algorithm.name} releases more than its model update in the "
          "clear, which no DP mode here covers (see its module); run it with dp.clip_norm=0")
  mode = "local" if s.local else "central"
  require(mode in algorithm.privacy, "dp.local", f"{algorithm.name} can be covered by "
          f"{' or '.join(algorithm.privacy)} DP only, not {mode} (see its module); set --config.dp.local="
          f"{not s.local}")


def build(s: Settings, federation: Federation, seed: int) -> MechanismParts:
  """Central DP's aggregator, or local DP's unweighted mean and upload noise; the run's accountant."""
  del seed
  count_stddev = 0.0
  if s.local:
    parts = MechanismParts(aggregation.unweighted_mean(), local_noise(s.clip_norm, s.noise_multiplier))
  else:
    adaptive = None
    if s.adaptive_clip:
      count_stddev = s.clip_count_stddev or federation.clients_per_round / 20
      adaptive = AdaptiveClipping(s.target_quantile, count_stddev, s.clip_learning_rate)
    parts = MechanismParts(central_dp(s.clip_norm, s.noise_multiplier, adaptive, federation.clients_per_round))
  accountant = Accountant(federation.num_clients, federation.clients_per_round, s.noise_multiplier, s.delta,
                          count_stddev, s.local, federation.sampling, s.accountant)
  return parts._replace(accountant=accountant)


SPEC = MechanismSpec("dp", Settings, enabled, validate, build)
