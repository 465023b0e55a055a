"""Compressed uploads, optionally with error feedback: a client sends a compressed model update.

Config section `compression` (off while kind is none). A sampled client k with update Δ_k = w_k − w (its trained
model minus the one it received) sends c_k = C(v_k) and the server reconstructs its upload as w + c_k, with

  feedback=none:  v_k = Δ_k
  feedback=ef:    v_k = Δ_k + e_k,   e_k ← v_k − c_k           (error feedback: Seide et al. 2014; Karimireddy
                                                               et al., ICML 2019: the residual is sent later)
  feedback=ef21:  v_k = Δ_k − g_k,   g_k ← g_k + c_k, upload w + g_k    (EF21: Richtárik, Sokolov, Fatkhullin,
                                                               NeurIPS 2021; the server holds g_k too)

e_k and g_k are per-client state [K, P] that only a client that uploads changes. EF21's server aggregates the
sampled clients' g_k, not the mean over all K clients of its full-participation analysis (partial participation
with that average is EF21-PP; here the sampled cohort's estimators are averaged as FedAvg averages models).

Compressors C over the update flattened to P values (`bytes` is exactly what is sent, besides the example
count; P₀ = 4·P bytes uncompressed):
  topk   the k = ⌈ratio·P⌉ largest |v_i|, values and int32 indices: 8k bytes (biased, contractive).
  randk  k = ⌈ratio·P⌉ coordinates drawn from the client's key, scaled by P/k (unbiased), values and the 4-byte
         seed the server redraws the indices from: 4k + 4 bytes.
  qsgd   QSGD (Alistarh et al., NeurIPS 2017) with s = levels: ‖v‖·sign(v_i)·ξ_i/s, ξ_i stochastic rounding of
         s|v_i|/‖v‖ (unbiased), one norm per tensor: P·(1 + ⌈log₂(s + 1)⌉) bits + 4 bytes per tensor.
  sign   scaled sign (Karimireddy et al. 2019): (‖v‖₁/n)·sign(v_i) for each tensor of n values: P bits + 4 bytes
         per tensor.
(top-k and rand-k never count more than the dense 4P.) Error feedback needs a contractive compressor
(‖C(v) − v‖² ≤ (1 − δ)‖v‖²): with feedback on, rand-k is not rescaled and QSGD is scaled by 1/(1 + ω), ω =
min(n/s², √n/s) for each tensor of n values; unbiased and rescaled, their residuals would grow without bound.

Compression runs on the server side of the simulation, on the uploads stacked [C, P] (the client phase stays
one compiled program), after a client's local DP noise (post-processing) and before a Byzantine client replaces
its upload. BatchNorm statistics are sent uncompressed.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedsnd_jax import models
from fedsnd_jax.errors import require
from fedsnd_jax.rounds import AlgorithmInfo, Federation, MechanismParts, MechanismSpec

KINDS = ("none", "topk", "randk", "qsgd", "sign")
FEEDBACKS = ("none", "ef", "ef21")
COMPRESSION_STREAM = 1 << 18  # a client's compression key: fold_in(its round key, COMPRESSION_STREAM)


class Settings(NamedTuple):
  """Compressed uploads, config section `compression` (off while kind is none).

  Attributes:
    kind: one of KINDS (module docstring).
    ratio: the share of the P values topk and randk send, in (0, 1].
    levels: s, QSGD's quantisation levels (≥ 1).
    feedback: one of FEEDBACKS: none, error feedback (ef) or EF21.
  """

  kind: str = "none"
  ratio: float = 0.01
  levels: int = 16
  feedback: str = "none"


class Compressor(NamedTuple):
  """What the round driver needs (`driver.compressed`).

  Attributes:
    compress: (v [P] flat float32, key) -> the decompressed C(v) [P].
    bytes: P, number of tensors -> bytes a client sends for its update.
    feedback: one of FEEDBACKS.
  """

  compress: Callable
  bytes: Callable[[int, int], int]
  feedback: str


def _k(ratio: float, size: int) -> int:
  return min(size, max(1, math.ceil(ratio * size)))


def top_k(ratio: float):
  def compress(v, key):
    del key
    _, idx = jax.lax.top_k(jnp.abs(v), _k(ratio, v.size))
    return jnp.zeros_like(v).at[idx].set(v[idx])

  return compress


def random_k(ratio: float, unbiased: bool):
  """Rand-k: scaled by P/k it is unbiased; unscaled it is contractive (what error feedback needs)."""

  def compress(v, key):
    # the k largest of P uniform draws: a uniform k-subset in one partial sort (`jax.random.choice` without
    # replacement shuffles all P, ~9× slower on CPU); float32 ties, ~P/2²³ at the cut, go to the lower index
    k = _k(ratio, v.size)
    _, idx = jax.lax.top_k(jax.random.uniform(key, (v.size,)), k)
    return jnp.zeros_like(v).at[idx].set(v[idx] * (v.size / k if unbiased else 1.0))

  return compress


def qsgd(levels: int, unbiased: bool):
  """QSGD; with `unbiased` off, scaled by 1/(1 + ω), ω = min(n/s², √n/s) its variance bound (Alistarh et al.,
  Lemma 3.1), which makes it contractive (what error feedback needs)."""

  def compress(v, key):
    norm = jnp.linalg.norm(v)
    scaled = levels * jnp.abs(v) / jnp.maximum(norm, 1e-30)
    lower = jnp.floor(scaled)
    xi = lower + (jax.random.uniform(key, v.shape) < scaled - lower)
    omega = min(v.size / levels**2, math.sqrt(v.size) / levels)
    return norm * jnp.sign(v) * xi / levels / (1.0 if unbiased else 1.0 + omega)

  return compress


def scaled_sign(v, key):
  del key
  return jnp.mean(jnp.abs(v)) * jnp.sign(v)


def per_tensor(compress, like):
  """A compressor of the flat update (`ravel_pytree` of `like`) applied tensor by tensor (QSGD's and sign's
  norms are per tensor)."""
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(like)]
  splits = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]

  def flat(v, key):
    keys = jax.random.split(key, len(sizes))
    return jnp.concatenate([compress(part, k) for part, k in zip(jnp.split(v, splits), keys, strict=True)])

  return flat


def make(s: Settings, params) -> Compressor:
  """The compressor of settings `s` for updates of the model `params` (their trainable part)."""
  like = trainable(params)
  unbiased = s.feedback == "none"
  if s.kind == "topk":  # (a client sends its update dense when that is smaller)
    return Compressor(top_k(s.ratio), lambda size, tensors: min(8 * _k(s.ratio, size), 4 * size), s.feedback)
  if s.kind == "randk":
    return Compressor(random_k(s.ratio, unbiased), lambda size, tensors: min(4 * _k(s.ratio, size) + 4, 4 * size),
                      s.feedback)
  if s.kind == "qsgd":
    bits = 1 + math.ceil(math.log2(s.levels + 1))
    return Compressor(per_tensor(qsgd(s.levels, unbiased), like),
                      lambda size, tensors: -(-size * bits // 8) + 4 * tensors, s.feedback)
  if s.kind == "sign":
    return Compressor(per_tensor(scaled_sign, like), lambda size, tensors: -(-size // 8) + 4 * tensors, s.feedback)
  raise ValueError(f"unknown compression.kind {s.kind!r}")


def trainable(params):
  """The params a client's update compresses: all but BatchNorm statistics."""
  return {k: v for k, v in params.items() if k != models.STATISTICS} if models.has_statistics(params) else params


def init_state(compressor: Compressor, params, num_clients: int):
  """Per-client feedback state [K, P] (e_k or g_k), zeros; None without feedback."""
  if compressor.feedback == "none":
    return None
  return jnp.zeros((num_clients, ravel_pytree(trainable(params))[0].size), jnp.float32)


def compress_uploads(compressor: Compressor, received, uploads, weights, state, ids, keys):
  """The sampled clients' uploads [C, P] as the server reconstructs them, and the new feedback state.

  Args:
    received: [P] the round's global params; uploads: [C, P] the clients' trained params.
    weights: [C] aggregation weights (a client with weight 0 uploaded nothing: its state stays).
    state: [K, P] feedback state or None; ids: [C] sampled ids; keys: [C] the clients' round keys.
  """
  flat_received, unravel = ravel_pytree(trainable(received))
  flat = jax.vmap(lambda u: ravel_pytree(trainable(u))[0])(uploads)
  delta = flat - flat_received[None]
  ckeys = jax.vmap(lambda k: jax.random.fold_in(k, COMPRESSION_STREAM))(keys)
  if compressor.feedback == "none":
    sent = jax.vmap(compressor.compress)(delta, ckeys)
  else:
    own = state[ids]
    v = delta + own if compressor.feedback == "ef" else delta - own
    c = jax.vmap(compressor.compress)(v, ckeys)
    sent, new_own = (c, v - c) if compressor.feedback == "ef" else (own + c, own + c)
    state = state.at[ids].set(jnp.where((weights > 0)[:, None], new_own, own))
  rebuilt = jax.vmap(lambda d: unravel(flat_received + d))(sent)
  if models.has_statistics(received):
    rebuilt = {**rebuilt, models.STATISTICS: uploads[models.STATISTICS]}
  return rebuilt, state


def enabled(s: Settings) -> bool:
  return s.kind != "none"


def validate(s: Settings, federation: Federation, algorithm: AlgorithmInfo) -> None:
  """Raises InputError naming `compression.<field>`."""
  del federation, algorithm
  require(s.kind in KINDS, "compression.kind", f"unknown {s.kind!r}; allowed: {', '.join(KINDS)}")
  require(s.feedback in FEEDBACKS, "compression.feedback",
          f"unknown {s.feedback!r}; allowed: {', '.join(FEEDBACKS)}")
  require(0 < s.ratio <= 1, "compression.ratio", f"must be in (0, 1], got {s.ratio}")
  require(s.levels >= 1, "compression.levels", f"must be ≥ 1, got {s.levels}")
  require(enabled(s) or s.feedback == "none", "compression.feedback",
          "error feedback needs a compressor (compression.kind)")


def build(s: Settings, federation: Federation, seed: int) -> MechanismParts:
  del federation, seed
  return MechanismParts(compression=s)


SPEC = MechanismSpec("compression", Settings, enabled, validate, build)
