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

Accounting (`Accountant`, dp-accounting's RDP accountant). The server samples C of K clients without
replacement, so with K public the neighbouring relation is "replace one client", under which the clipped sum
has L2 sensitivity 2S: a round is SampledWithoutReplacementDpEvent(K, C, GaussianDpEvent(σ/2)) (Wang, Balle,
Kasiviswanathan, AISTATS 2019), composed with GaussianDpEvent(σ_b) for the adaptive clipped count (bits in
{0, 1}: sensitivity 1). Local DP gets no amplification from sampling (the server knows who uploaded): each
upload is GaussianDpEvent(σ/2), and a client is charged for every round (the worst case of fixed-size
sampling).
"""

import math
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp

from fedsnd_jax import tree_math
from fedsnd_jax.aggregation import Aggregate, Aggregator
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


def central_dp(clip_norm: float, noise_multiplier: float, adaptive: AdaptiveClipping | None = None) -> Aggregator:
  """The central-DP aggregator: clip each update to S, sum, add N(0, σ²S²), divide by C (module docstring).

  Args:
    clip_norm: S (the initial S with adaptive clipping).
    noise_multiplier: σ, the noise std in units of S.
    adaptive: adaptive clipping settings, or None for a fixed S.

  Diagnostics: dp_clip_norm (the S used), dp_clipped_fraction (share of updates above S, before noise: a
  diagnostic, not released), dp_update_norm (mean update norm, likewise).
  """

  def init(params):
    del params
    return ClipState(jnp.float32(clip_norm))

  def apply(models, weights, state: ClipState, reference, key):
    num = weights.shape[0]  # uniform weights: example counts are not privatised
    s = state.clip_norm
    deltas = tree_math.updates(models, reference)
    clipped, norms = clip(deltas, s)
    update_key, count_key = jax.random.split(key)
    total = jax.tree.map(lambda x: jnp.sum(x, axis=0), clipped)
    noisy = jax.tree.map(jnp.add, total, tree_math.normal_like(update_key, total, noise_multiplier * s))
    average = jax.tree.map(lambda r, t: r + t / num, reference, noisy)
    new_s = s
    if adaptive is not None:
      unclipped = jnp.sum(norms <= s) + adaptive.count_stddev * jax.random.normal(count_key)
      new_s = s * jnp.exp(-adaptive.learning_rate * (unclipped / num - adaptive.target_quantile))
    diagnostics = {"dp_clip_norm": s, "dp_clipped_fraction": jnp.mean(norms > s),
                   "dp_update_norm": jnp.mean(norms)}
    return Aggregate(average, ClipState(new_s.astype(jnp.float32)), diagnostics)

  return Aggregator(init, apply)


def local_noise(clip_norm: float, noise_multiplier: float):
  """A client's upload transform for local DP: (received [P], upload [P], key) -> received + clip(Δ) + noise."""

  def transform(received, upload, key):
    delta = jax.tree.map(lambda u, r: (u - r)[None], upload, received)
    clipped, _ = clip(delta, clip_norm)
    noise = tree_math.normal_like(key, received, noise_multiplier * clip_norm)
    return jax.tree.map(lambda r, d, n: r + d[0] + n, received, clipped, noise)

  return transform


def round_event(num_clients: int, clients_per_round: int, noise_multiplier: float, count_stddev: float = 0.0,
                local: bool = False) -> dp_accounting.DpEvent:
  """One round's DpEvent for one client (module docstring), under the replace-one relation."""
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)  # replace-one: sensitivity 2S
  if count_stddev > 0:
    gaussian = dp_accounting.ComposedDpEvent([gaussian, dp_accounting.GaussianDpEvent(count_stddev)])
  if local:
    return gaussian
  return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)


def _rdp_accountant():
  return dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


class Accountant:
  """ε(rounds) at δ for the mechanism above, from dp-accounting's RDP accountant.

  Args:
    num_clients: K; clients_per_round: C (sampled without replacement).
    noise_multiplier: σ of the update sum (0: no privacy, ε = ∞).
    delta: δ.
    count_stddev: σ_b of adaptive clipping's clipped count (0: fixed clipping, nothing else released).
    local: local DP (each upload noised by its client; no amplification by sampling).
  """

  def __init__(self, num_clients: int, clients_per_round: int, noise_multiplier: float, delta: float,
               count_stddev: float = 0.0, local: bool = False):
    self.delta = delta
    self._event = (round_event(num_clients, clients_per_round, noise_multiplier, count_stddev, local)
                   if noise_multiplier > 0 else None)
    self._cache: dict[int, float] = {}

  def epsilon(self, rounds: int) -> float:
    """ε after `rounds` rounds (0 rounds: 0; no noise: ∞)."""
    if rounds <= 0:
      return 0.0
    if self._event is None:
      return math.inf
    if rounds not in self._cache:
      accountant = _rdp_accountant()
      accountant.compose(self._event, rounds)
      self._cache[rounds] = float(accountant.get_epsilon(self.delta))
    return self._cache[rounds]


def noise_for_epsilon(target_epsilon: float, rounds: int, num_clients: int, clients_per_round: int, delta: float,
                      count_stddev: float = 0.0, local: bool = False) -> float:
  """The smallest σ whose ε after `rounds` rounds is at most `target_epsilon` (dp-accounting's calibration).

  Raises:
    ValueError: no σ in [0.01, 10⁴] reaches it (e.g. the clipped count's own noise already spends more).
  """
  try:
    return float(dp_accounting.calibrate_dp_mechanism(
        _rdp_accountant, lambda sigma: dp_accounting.SelfComposedDpEvent(
            round_event(num_clients, clients_per_round, sigma, count_stddev, local), rounds),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(1e-2, 1e4)))
  except ValueError:
    raise ValueError(f"no noise multiplier in [0.01, 1e4] reaches ε = {target_epsilon} after {rounds} rounds "
                     f"(count_stddev = {count_stddev})") from None
