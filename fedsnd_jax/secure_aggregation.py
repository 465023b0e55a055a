"""Secure aggregation, simulated faithfully: the server learns only the sum of the surviving clients' updates.

K. Bonawitz, V. Ivanov, B. Kreuter, A. Marcedone, H. B. McMahan, S. Patel, D. Ramage, A. Segal, K. Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017. One round over the C sampled
clients u (positions 0..C−1), arithmetic in Z_R, R = 2³² (uint32 wraps):

  1. Each client clips every coordinate of its update Δ_u to [−r, r] and quantises it to
     q_u = round((Δ_u + r)·(2^b − 1)/(2r)) ∈ [0, 2^b) (b = `bits`; C·(2^b − 1) < R, so the sum cannot wrap).
  2. Key agreement: every client draws a secret sk_u and publishes g^sk_u in the group Z_p*, p = 2⁶¹ − 1 (a
     Mersenne prime); pairs derive s_uv = (g^sk_v)^sk_u = (g^sk_u)^sk_v. Each client also draws a self-mask
     seed b_u, and sends the others t-of-C Shamir shares (over GF(p)) of sk_u and of b_u.
  3. Masking: y_u = q_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv) (mod R). A seeded `dropout` share of
     the clients drops here: their y_u never arrives.
  4. Unmasking: from t shares held by survivors the server reconstructs b_u of every survivor and sk_u of every
     dropped client (hence its s_uv with every survivor v), removes those masks, and is left with
     Σ_{u survived} q_u exactly: pairwise masks between survivors cancel in the sum.
  5. Decoding: Σ Δ ≈ Σ q·2r/(2^b − 1) − n·r over the n survivors; the aggregate is w + (Σ Δ)/n. The offset
     is removed in integers (`decode`), so the result carries float32's rounding of Σ Δ itself, not of Σ q
     (which loses bits once Σ q ≥ 2²⁴, i.e. b ≥ 20 at C = 20).

The cryptographic bookkeeping (keys, Shamir shares, Lagrange reconstruction) runs on the host with exact
integers (a `jax.pure_callback`); masks are expanded on the device. Masking costs O(C²·P) PRG work per round,
as it does for the protocol's clients. Example counts are not used (an unweighted mean of the survivors).

What the simulation does not model: seeds of 32 bits for the masks' PRG (JAX's threefry keys; a deployment uses
128-bit seeds and an AES-CTR PRG), a 61-bit group for key agreement (a deployment uses elliptic-curve
Diffie–Hellman), deterministic rounding in quantisation (not stochastic), no signatures or consistency checks
(the threshold t = ⌊C/2⌋ + 1 protects against an honest-but-curious server only, not an active one), and no
network: every message arrives except the dropped clients' masked inputs.
"""

import random
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsnd_jax import tree_math
from fedsnd_jax.aggregation import Aggregate, Aggregator, EmptyState
from fedsnd_jax.errors import require
from fedsnd_jax.rounds import AlgorithmInfo, Federation, MechanismParts, MechanismSpec

PRIME = (1 << 61) - 1  # GF(p) for key agreement and Shamir sharing
GENERATOR = 3
KEY_BYTES = 32  # what a deployment sends per public key or encrypted share (X25519 / AES-GCM sized)


class Shares(NamedTuple):
  """Shamir shares (x, y) of one secret: the x are 1..C (client positions + 1)."""

  xs: list[int]
  ys: list[int]


def share(secret: int, threshold: int, num: int, rng: random.Random) -> Shares:
  """t-of-n Shamir sharing over GF(p): y_i = f(i), f of degree t − 1 with f(0) = secret."""
  coefficients = [secret % PRIME] + [rng.randrange(PRIME) for _ in range(threshold - 1)]
  xs = list(range(1, num + 1))
  return Shares(xs, [sum(c * pow(x, k, PRIME) for k, c in enumerate(coefficients)) % PRIME for x in xs])


def reconstruct(xs: list[int], ys: list[int]) -> int:
  """f(0) by Lagrange interpolation over GF(p) from t shares."""
  secret = 0
  for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if j != i:
        num = num * (-xj) % PRIME
        den = den * (xi - xj) % PRIME
    secret = (secret + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
  return secret


def threshold(num: int) -> int:
  """t = ⌊C/2⌋ + 1 shares reconstruct a secret (a majority of the round)."""
  return num // 2 + 1


def protocol_seeds(round_seed: int, num: int, dropped: int):
  """The host side of one round: the clients' seeds and what the server reconstructs from shares.

  Returns (all uint32): pair [C, C] (s_uv mod 2³², what clients mask with), self_seed [C], alive [C] (bool as
  uint32), pair_hat [C, C] (s_uv the server reconstructed, for dropped u and surviving v, else 0), self_hat [C]
  (b_u the server reconstructed for survivors, else 0).
  """
  rng = random.Random(round_seed)
  t = threshold(num)
  secret_keys = [rng.randrange(1, PRIME - 1) for _ in range(num)]
  public = [pow(GENERATOR, sk, PRIME) for sk in secret_keys]
  self_seeds = [rng.randrange(1 << 32) for _ in range(num)]
  key_shares = [share(sk, t, num, rng) for sk in secret_keys]
  seed_shares = [share(b, t, num, rng) for b in self_seeds]
  alive = [True] * num
  for u in rng.sample(range(num), dropped):
    alive[u] = False
  holders = [v for v in range(num) if alive[v]][:t]  # survivors who answer the server's unmasking request
  pair = np.zeros((num, num), np.uint32)
  for u in range(num):
    for v in range(num):
      if u != v:
        pair[u, v] = pow(public[v], secret_keys[u], PRIME) % (1 << 32)
  pair_hat = np.zeros((num, num), np.uint32)
  self_hat = np.zeros(num, np.uint32)
  for u in range(num):
    if alive[u]:
      shares = seed_shares[u]
      self_hat[u] = reconstruct([shares.xs[v] for v in holders], [shares.ys[v] for v in holders])
    else:
      shares = key_shares[u]
      sk = reconstruct([shares.xs[v] for v in holders], [shares.ys[v] for v in holders])
      for v in range(num):
        if alive[v]:
          pair_hat[u, v] = pow(public[v], sk, PRIME) % (1 << 32)
  return pair, np.array(self_seeds, np.uint32), np.array(alive, np.uint32), pair_hat, self_hat


def _prg(seed, leaf_index: int, shape):
  return jax.random.bits(jax.random.fold_in(jax.random.key(seed), leaf_index), shape, jnp.uint32)


def masked_uploads(quantised: list, pair, self_seed) -> list:
  """Per leaf [C, ...] uint32: y_u = q_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv) (mod 2³²)."""
  num = pair.shape[0]

  def one_leaf(i, q):
    y = q + jax.vmap(lambda b: _prg(b, i, q.shape[1:]))(self_seed)

    def add_pair(p, y):
      u, v = p // num, p % num
      mask = _prg(pair[u, v], i, q.shape[1:])
      delta = jnp.where(v > u, mask, jnp.where(v < u, -mask, jnp.zeros_like(mask)))  # uint32: −m wraps
      return y.at[u].add(delta)

    return jax.lax.fori_loop(0, num * num, add_pair, y)

  return [one_leaf(i, q) for i, q in enumerate(quantised)]


def unmasked_sum(uploads: list, alive, pair_hat, self_hat) -> list:
  """The server's Σ_{u alive} y_u with the reconstructed self masks and dropped clients' pair masks removed."""
  num = alive.shape[0]
  alive = alive.astype(bool)

  def one_leaf(i, y):
    total = jnp.sum(jnp.where(alive.reshape((-1,) + (1,) * (y.ndim - 1)), y, 0), axis=0, dtype=jnp.uint32)
    selfs = jax.vmap(lambda b: _prg(b, i, y.shape[1:]))(self_hat)
    total = total - jnp.sum(jnp.where(alive.reshape((-1,) + (1,) * (y.ndim - 1)), selfs, 0), axis=0,
                            dtype=jnp.uint32)

    def remove_pair(p, total):  # dropped u, surviving v: v's y_v holds +PRG(s_vu) if u > v, −PRG(s_vu) if u < v
      u, v = p // num, p % num
      mask = _prg(pair_hat[u, v], i, y.shape[1:])
      live = (~alive[u]) & alive[v]
      return total - jnp.where(live & (u > v), mask, 0) + jnp.where(live & (u < v), mask, 0)

    return jax.lax.fori_loop(0, num * num, remove_pair, total)

  return [one_leaf(i, y) for i, y in enumerate(uploads)]


def quantise(x, value_range: float, bits: int):
  levels = (1 << bits) - 1
  return jnp.round((jnp.clip(x, -value_range, value_range) + value_range) * (levels / (2 * value_range))
                   ).astype(jnp.uint32)


def decode(total, survivors, value_range: float, bits: int):
  """Σ Δ from Σ q over n survivors: (2·Σ q − n·(2^b − 1))·r/(2^b − 1), the offset removed in integers.

  With m = ⌊n·(2^b − 1)/2⌋, d = Σ q − m fits int32 (|d| ≤ n·(2^b − 1)/2 + 1 < 2³¹), and
  2·Σ q − n·(2^b − 1) = 2d − (n·(2^b − 1) mod 2). Computed in uint32 (wrapping), then read as int32.
  """
  levels = (1 << bits) - 1
  offset = survivors.astype(jnp.uint32) * jnp.uint32(levels)  # < 2³² (checked)
  d = jax.lax.bitcast_convert_type(total - offset // 2, jnp.int32)
  return (2 * d.astype(jnp.float32) - (offset % 2).astype(jnp.float32)) * (value_range / levels)


def secure_mean(bits: int = 16, value_range: float = 0.1, dropout: float = 0.0) -> Aggregator:
  """The aggregator: quantise, mask, drop, unmask, decode (module docstring).

  Args:
    bits: b, bits per quantised coordinate (C·(2^b − 1) must stay below 2³²).
    value_range: r, every update coordinate is clipped to [−r, r] before quantisation.
    dropout: the share of the round's clients that drop after masking (seeded per round).

  Diagnostics: secagg_survivors (clients whose update entered the sum), secagg_clipped_fraction (update
  coordinates outside [−r, r]).
  """

  def apply(models, weights, state, reference, key):
    del weights
    num = jax.tree.leaves(models)[0].shape[0]
    if num * ((1 << bits) - 1) >= 1 << 32:
      raise ValueError(f"secure aggregation: {num} clients × (2^{bits} − 1) overflows 2^32; lower bits")
    dropped = int(round(dropout * num))
    if num - dropped < threshold(num):
      raise ValueError(f"secure aggregation: {dropped} of {num} clients dropping leaves fewer than the "
                       f"{threshold(num)} needed to unmask")
    round_seed = jax.random.randint(key, (), 0, jnp.iinfo(jnp.int32).max)
    shapes = (jax.ShapeDtypeStruct((num, num), jnp.uint32), jax.ShapeDtypeStruct((num,), jnp.uint32),
              jax.ShapeDtypeStruct((num,), jnp.uint32), jax.ShapeDtypeStruct((num, num), jnp.uint32),
              jax.ShapeDtypeStruct((num,), jnp.uint32))
    pair, self_seed, alive, pair_hat, self_hat = jax.pure_callback(
        lambda s: protocol_seeds(int(s), num, dropped), shapes, round_seed,
        vmap_method="sequential")  # vectorised runs: one host call per run
    updates, treedef = jax.tree.flatten(tree_math.updates(models, reference))
    quantised = [quantise(x, value_range, bits) for x in updates]
    total = unmasked_sum(masked_uploads(quantised, pair, self_seed), alive, pair_hat, self_hat)
    survivors = jnp.sum(alive)
    mean = [decode(t, survivors, value_range, bits) / survivors.astype(jnp.float32) for t in total]
    clipped = sum(jnp.sum(jnp.abs(x) > value_range) for x in updates) / sum(x.size for x in updates)
    average = jax.tree.map(lambda r, m: (r + m).astype(r.dtype), reference, jax.tree.unflatten(treedef, mean))
    return Aggregate(average, state, {"secagg_survivors": survivors, "secagg_clipped_fraction": clipped})

  return Aggregator(lambda params: EmptyState(), apply, protocol_bytes)


def protocol_bytes(num: int) -> int:
  """Bytes a client sends besides its masked vector (uint32 per coordinate, as a float32 model): 2 public keys,
  C − 1 encrypted share pairs, and up to C − 1 shares in the unmasking round (Bonawitz et al.'s four rounds)."""
  return KEY_BYTES * (2 + 2 * (num - 1) + (num - 1))


class Settings(NamedTuple):
  """Secure aggregation, config section `secagg`: the server learns only the sum of the surviving clients'
  quantised updates (module docstring).

  Attributes:
    enabled: run every round's aggregation through the protocol.
    bits: b, bits per quantised coordinate (clients_per_round·(2^b − 1) < 2^32).
    range: r, update coordinates are clipped to [−r, r] before quantisation.
    dropout: the share of each round's clients that drop after masking (at most C − (⌊C/2⌋ + 1) of C).
  """

  enabled: bool = False
  bits: int = 16
  range: float = 0.1
  dropout: float = 0.0


def enabled(s: Settings) -> bool:
  return s.enabled


def validate(s: Settings, federation: Federation, algorithm: AlgorithmInfo) -> None:
  """Raises InputError naming `secagg.<field>` for settings the protocol cannot run with."""
  if not s.enabled:
    return
  num = federation.clients_per_round
  require("secure_aggregation" in algorithm.privacy, "secagg.enabled",
          f"{algorithm.name}'s server needs individual client models (see its module), which secure aggregation "
          "hides; run it with secagg.enabled=False")
  require(1 <= s.bits <= 31 and num * ((1 << s.bits) - 1) < 1 << 32, "secagg.bits",
          f"{num} clients × (2^{s.bits} − 1) must stay below 2^32")
  require(s.range > 0, "secagg.range", f"must be > 0, got {s.range}")
  dropped = int(round(s.dropout * num))
  require(0 <= s.dropout < 1 and num - dropped >= threshold(num), "secagg.dropout",
          f"{dropped} of {num} dropping leaves fewer than the {threshold(num)} survivors needed to unmask")


def build(s: Settings, federation: Federation, seed: int) -> MechanismParts:
  del federation, seed
  return MechanismParts(aggregator=secure_mean(s.bits, s.range, s.dropout))


SPEC = MechanismSpec("secagg", Settings, enabled, validate, build)
