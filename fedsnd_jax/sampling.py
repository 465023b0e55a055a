"""Which clients a round samples: C of K without replacement, or Poisson sampling padded to a cohort cap."""

import math

import jax
import jax.numpy as jnp

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


def round_streams(rng, round_index):
  """The round's (sample_key, clients_key, server_key) = split(fold_in(rng, round), 3) (`round_keys`)."""
  return jax.random.split(jax.random.fold_in(rng, round_index), 3)


def round_keys(rng, round_index, num_clients: int, clients_per_round: int, cap: int = 0, eligible=None):
  """Samples the round's clients and derives their keys.

  round_key = fold_in(rng, round); (sample_key, clients_key, server_key) = split(round_key, 3). Fixed-size
  sampling (cap = 0): the C of K client ids are drawn without replacement from sample_key and sorted. Poisson
  sampling (cap > 0): every client is in with probability q = C/K independently (u_k < q, u ~ U[0, 1)^K from
  sample_key); the sampled ids, sorted, fill the first slots of `cap` and the rest hold K, the empty client
  (no examples: it trains nothing and weighs 0); if more than cap are sampled, the highest ids are left out (a
  chance of `cohort_cap`'s overflow per round). Client k's key is fold_in(clients_key, k), so it depends only on
  the seed, the round and the client id. With `eligible` [K] bool (the clients online, `systems.check_in`), the
  C clients are drawn uniformly among the eligible ones (the C smallest of u ~ U[0, 1)^K from sample_key).

  Returns:
    ids: [C] (or [cap]) int32 sorted client ids.
    keys: [C] (or [cap]) typed keys.
    server_key: a typed key for the server's own randomness this round.
  """
  sample_key, clients_key, server_key = round_streams(rng, round_index)
  if cap:
    sampled = jax.random.uniform(sample_key, (num_clients,)) < clients_per_round / num_clients
    ids = jnp.sort(jnp.where(sampled, jnp.arange(num_clients), num_clients))[:cap].astype(jnp.int32)
  elif eligible is not None:
    scores = jnp.where(eligible, jax.random.uniform(sample_key, (num_clients,)), 2.0)
    ids = jnp.sort(jnp.argsort(scores)[:clients_per_round]).astype(jnp.int32)
  elif clients_per_round == num_clients:
    ids = jnp.arange(num_clients, dtype=jnp.int32)
  else:
    ids = jnp.sort(jax.random.choice(sample_key, num_clients, (clients_per_round,), replace=False))
    ids = ids.astype(jnp.int32)
  return ids, jax.vmap(lambda i: jax.random.fold_in(clients_key, i))(ids), server_key
