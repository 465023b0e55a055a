import numpy as np
import pytest

from fedsnd_jax import partition as P
from fedsnd_jax.errors import InputError

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 60 per class
ALPHA_METHODS = ["dirichlet_label", "dirichlet_client", "quantity"]


@pytest.mark.parametrize("method", P.PARTITIONS)
def test_every_example_assigned_exactly_once(method):
  part = P.partition(LABELS, 12, method, alpha=0.3, seed=1)
  joined = np.concatenate(part.client_indices)
  assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
  assert part.histograms.shape == (12, 10)
  for idx, hist in zip(part.client_indices, part.histograms, strict=True):
    assert np.array_equal(np.bincount(LABELS[idx], minlength=10), hist)


@pytest.mark.parametrize("method", P.PARTITIONS)
def test_deterministic_per_seed(method):
  a, b, c = (P.partition(LABELS, 8, method, alpha=0.5, seed=s) for s in (3, 3, 4))
  assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices, strict=True))
  assert not all(np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices, strict=True))


@pytest.mark.parametrize("method", ["dirichlet_label", "dirichlet_client"])
def test_label_entropy_rises_with_alpha(method):
  low = P.label_entropy(P.partition(LABELS, 10, method, alpha=0.05, seed=0).histograms).mean()
  high = P.label_entropy(P.partition(LABELS, 10, method, alpha=100.0, seed=0).histograms).mean()
  assert low < 0.5 * high
  assert high > 0.9 * np.log(10)


def test_label_entropy_by_hand():
  ent = P.label_entropy(np.array([[5, 5, 0], [3, 0, 0]]))
  np.testing.assert_allclose(ent, [np.log(2), 0.0])


def test_dirichlet_client_sizes_near_equal():
  sizes = P.partition(LABELS, 7, "dirichlet_client", alpha=0.1, seed=0).sizes
  assert sizes.max() - sizes.min() <= 1


def test_shards_limit_classes_per_client():
  part = P.partition(LABELS, 10, "shards", shards_per_client=2, seed=0)
  assert ((part.histograms > 0).sum(1) <= 2).all()


@pytest.mark.parametrize("method, alpha", [("dirichlet_label", 0.3), ("quantity", 1.0)])
def test_min_size_honoured(method, alpha):
  part = P.partition(LABELS, 10, method, alpha=alpha, seed=0, min_size=8)
  assert part.sizes.min() >= 8


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_clients=5, method="dirichlet_label", alpha=0.0), "alpha"),
    (dict(num_clients=5, method="quantity", alpha=-1.0), "alpha"),
    (dict(num_clients=601, method="iid"), "num_clients"),
    (dict(num_clients=5, method="bogus"), "partition"),
    (dict(num_clients=5, method="shards", shards_per_client=11), "shards_per_client"),
    (dict(num_clients=100, method="dirichlet_label", alpha=0.01, min_size=6), "alpha"),
])
def test_impossible_requests_give_clear_errors(kwargs, field):
  with pytest.raises(InputError, match=f"^{field}: "):
    P.partition(LABELS, **kwargs)


def test_dirichlet_client_alpha_is_the_total_concentration():
  # Hsu et al. draw each mix from Dir(α·p), p uniform over NC classes: Dir((α/NC)·1). For a symmetric Dir(a·1)
  # the expected entropy is ψ(NC·a + 1) − ψ(a + 1): 0.85 nats at α = 1 (a = 0.1), where Dir(1·1) gives 1.93.
  labels = np.repeat(np.arange(10), 1000)
  entropy = P.label_entropy(P.partition(labels, 50, "dirichlet_client", alpha=1.0, seed=0).histograms).mean()
  assert 0.6 < entropy < 1.2


@pytest.mark.filterwarnings("error")  # numpy's divide-by-zero and NaN-cast warnings fail the test
@pytest.mark.parametrize("method", ["dirichlet_label", "dirichlet_client"])
def test_vanishing_alpha_gives_a_valid_deterministic_partition(method):
  # α → 0: each class (or each client's size) lands on one client; full clients must not leave a class with
  # no proportion at all (a division by zero before).
  parts = [P.partition(LABELS, 3, method, alpha=1e-8, seed=s) for s in (1, 1)]  # seed 1 fills a client early
  joined = np.concatenate(parts[0].client_indices)
  assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
  assert all(np.array_equal(x, y) for x, y in zip(parts[0].client_indices, parts[1].client_indices, strict=True))
  if method == "dirichlet_label":
    assert ((parts[0].histograms > 0).sum(0) == 1).all()  # every class on a single client


@pytest.mark.filterwarnings("error")
def test_vanishing_alpha_quantity_is_refused_clearly():
  with pytest.raises(InputError, match="^alpha: "):  # one client would hold everything
    P.partition(LABELS, 3, "quantity", alpha=1e-8, seed=0)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("method", P.PARTITIONS)
def test_one_client_holds_everything(method):
  part = P.partition(LABELS, 1, method, alpha=0.1, seed=0, shards_per_client=1)
  assert np.array_equal(part.client_indices[0], np.arange(len(LABELS)))


@pytest.mark.filterwarnings("error")
def test_as_many_clients_as_examples():
  assert (P.partition(LABELS, 600, "dirichlet_client", alpha=0.1, seed=0).sizes == 1).all()
  assert (P.partition(LABELS, 600, "iid", seed=0).sizes == 1).all()
  with pytest.raises(InputError, match="^alpha: "):  # no Dirichlet draw gives 599 clients an example each
    P.partition(LABELS, 599, "dirichlet_label", alpha=0.1, seed=0)
