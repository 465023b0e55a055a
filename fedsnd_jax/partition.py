"""Non-IID partitioners: split training example indices over K clients (seeded numpy, deterministic).

Conventions (docs/design.md §9) — α in one is not comparable to α in another:
  iid              uniform random split into near-equal parts.
  dirichlet_label  for each class, its examples are split over clients by proportions ~ Dir(α·1_K)
                   (NIID-Bench / MOON; a client already holding ≥ N/K examples gets no more; when that
                   leaves no proportion, the class goes to the emptiest client), resampled until every
                   client has ≥ min_size examples.
  dirichlet_client each client's class mix ~ Dir(α·p) with p = 1_NC/NC the uniform prior, i.e. Dir((α/NC)·1),
                   near-equal client sizes (Hsu, Qi, Brown, arXiv 1909.06335, 2019: α is the total
                   concentration, so α = NC draws mixes uniformly from the simplex).
  shards           sort by label, cut into K·s equal shards, give each client s shards (McMahan et al.,
                   2017); s = `shards_per_client` ≈ classes per client.
  quantity         client sizes ~ Dir(α·1_K) (resampled until ≥ min_size), labels iid.
"""

import dataclasses

import numpy as np

from fedsnd_jax.errors import InputError

PARTITIONS = ("iid", "dirichlet_label", "dirichlet_client", "shards", "quantity")
MAX_ATTEMPTS = 1000


@dataclasses.dataclass(frozen=True)
class Partition:
  """Which training examples each client holds.

  Attributes:
    client_indices: K int64 arrays of training-example indices, disjoint, together covering all N.
    histograms: [K, C] int64 label counts per client.
  """

  client_indices: list[np.ndarray]
  histograms: np.ndarray

  @property
  def sizes(self) -> np.ndarray:
    """[K] examples per client."""
    return np.array([len(i) for i in self.client_indices])


def partition(labels, num_clients: int, method: str, *, alpha: float = 0.5, seed: int = 0,
              min_size: int = 1, shards_per_client: int = 2, num_classes: int | None = None) -> Partition:
  """Splits example indices over clients.

  Args:
    labels: [N] int labels.
    num_clients: K.
    method: one of PARTITIONS.
    alpha: Dirichlet concentration (dirichlet_* and quantity), > 0.
    seed: numpy seed; the same seed gives the same partition.
    min_size: least examples per client (dirichlet_label, quantity), ≥ 1.
    shards_per_client: s for `shards`.
    num_classes: C; max label + 1 when None.

  Raises:
    InputError: bad arguments or an impossible request.
  """
  labels = np.asarray(labels)
  n = len(labels)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if method not in PARTITIONS:
    raise InputError("partition", f"unknown partition {method!r}; allowed: {', '.join(PARTITIONS)}")
  if num_clients < 1:
    raise InputError("num_clients", f"must be ≥ 1, got {num_clients}")
  if num_clients > n:
    raise InputError("num_clients", f"{num_clients} clients but only {n} training examples")
  if method in ("dirichlet_label", "dirichlet_client", "quantity") and not alpha > 0:
    raise InputError("alpha", f"must be > 0, got {alpha}")
  if min_size < 1:
    raise InputError("min_size", f"must be ≥ 1, got {min_size}")
  if min_size * num_clients > n:
    raise InputError("min_size", f"{num_clients} clients × min_size {min_size} > {n} examples")
  rng = np.random.default_rng(seed)
  if method == "iid":
    parts = np.array_split(rng.permutation(n), num_clients)
  elif method == "dirichlet_label":
    parts = _dirichlet_label(labels, num_clients, num_classes, alpha, min_size, rng)
  elif method == "dirichlet_client":
    parts = _dirichlet_client(labels, num_clients, num_classes, alpha, rng)
  elif method == "shards":
    parts = _shards(labels, num_clients, shards_per_client, num_classes, rng)
  else:
    parts = _quantity(n, num_clients, alpha, min_size, rng)
  parts = [np.sort(p).astype(np.int64) for p in parts]
  hist = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
  return Partition(parts, hist)


def _resample_error(method, alpha, min_size):
  return InputError("alpha", f"{method} with alpha={alpha} gave some client fewer than min_size={min_size} "
                    f"examples in {MAX_ATTEMPTS} attempts; raise alpha, lower min_size or num_clients")


def _dirichlet_label(labels, k, num_classes, alpha, min_size, rng):
  n = len(labels)
  by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
  for _ in range(MAX_ATTEMPTS):
    parts = [[] for _ in range(k)]
    sizes = np.zeros(k, np.int64)
    for idx in by_class:
      idx = rng.permutation(idx)
      p = rng.dirichlet(np.full(k, alpha))
      p = np.where(sizes < n / k, p, 0.0)  # NIID-Bench: full clients take no more.
      if not p.sum() > 0:  # Every client the draw chose is full (α → 0): the emptiest client takes the class.
        p = np.eye(k)[np.argmin(sizes)]
      p = p / p.sum()
      cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
      for j, chunk in enumerate(np.split(idx, cuts)):
        parts[j].append(chunk)
        sizes[j] += len(chunk)
    if sizes.min() >= min_size:
      return [np.concatenate(p) for p in parts]
  raise _resample_error("dirichlet_label", alpha, min_size)


def _dirichlet_client(labels, k, num_classes, alpha, rng):
  """Each client draws its near-equal share of examples class by class from its own mix ~ Dir((α/NC)·1)."""
  pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
  remaining = np.array([len(p) for p in pools])
  sizes = np.full(k, len(labels) // k)
  sizes[: len(labels) % k] += 1
  parts = []
  for size in sizes:
    mix = rng.dirichlet(np.full(num_classes, alpha / num_classes))
    take = np.zeros(num_classes, np.int64)
    while take.sum() < size:  # Redraw the shortfall over the classes that still have examples.
      open_mix = np.where(remaining - take > 0, mix, 0.0)
      if open_mix.sum() == 0:  # The client's classes are used up: fall back to what is left.
        open_mix = (remaining - take > 0).astype(float)
      draw = rng.multinomial(size - take.sum(), open_mix / open_mix.sum())
      take = np.minimum(take + draw, remaining)
    remaining -= take
    parts.append(np.concatenate([[pools[c].pop() for _ in range(take[c])] for c in range(num_classes)]
                                + [np.zeros(0, np.int64)]))
  return parts


def _shards(labels, k, s, num_classes, rng):
  if not 1 <= s <= num_classes:
    raise InputError("shards_per_client", f"must be in [1, {num_classes}] (the number of classes), got {s}")
  if k * s > len(labels):
    raise InputError("shards_per_client", f"{k} clients × {s} shards > {len(labels)} examples")
  order = np.argsort(labels, kind="stable")
  shards = np.array_split(order, k * s)
  owner = rng.permutation(k * s)
  return [np.concatenate([shards[i] for i in owner[j * s:(j + 1) * s]]) for j in range(k)]


def _quantity(n, k, alpha, min_size, rng):
  order = rng.permutation(n)
  for _ in range(MAX_ATTEMPTS):
    p = rng.dirichlet(np.full(k, alpha))
    cuts = (np.cumsum(p) * n).astype(np.int64)[:-1]
    parts = np.split(order, cuts)
    if min(len(x) for x in parts) >= min_size:
      return parts
  raise _resample_error("quantity", alpha, min_size)


def label_entropy(histograms) -> np.ndarray:
  """[K] Shannon entropy (nats) of each client's label distribution; log C for a uniform mix."""
  h = np.asarray(histograms, np.float64)
  p = h / np.maximum(h.sum(axis=1, keepdims=True), 1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
