import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsnd_jax import federated_data as F
from fedsnd_jax.partition import partition
from fedsnd_jax.rounds import LocalSchedule

LABELS = np.arange(23) % 3
PART = partition(LABELS, 3, "quantity", alpha=1.0, seed=2, min_size=2)  # unequal client sizes


def _schedule(epochs=0, steps=0, batch=4):
  data = F.to_device(np.zeros((23, 1), np.uint8), LABELS, PART, np.zeros(1), np.ones(1))
  num_steps = LocalSchedule(batch, epochs, steps).num_steps(data.max_count)
  fn = lambda k, row, n: F.client_batches(k, row, n, batch_size=batch, num_steps=num_steps,
                                          local_epochs=epochs, local_steps=steps)
  keys = jax.random.split(jax.random.key(0), 3)
  return data, num_steps, fn, keys


def test_index_table_pads_client_rows():
  data = F.to_device(np.zeros((23, 1), np.uint8), LABELS, PART, np.zeros(1), np.ones(1))
  assert data.index.shape == (3, PART.sizes.max())
  for k, idx in enumerate(PART.client_indices):
    assert data.counts[k] == len(idx)
    np.testing.assert_array_equal(data.index[k, : len(idx)], idx)


@pytest.mark.parametrize("epochs", [1, 3])
def test_each_epoch_visits_each_own_example_once(epochs):
  data, num_steps, fn, keys = _schedule(epochs=epochs)
  idx, mask = jax.vmap(fn)(keys, data.index, data.counts)
  slots = num_steps // epochs
  assert idx.shape == mask.shape == (3, num_steps, 4)
  for k, own in enumerate(PART.client_indices):
    for e in range(epochs):
      seen = np.asarray(idx[k, e * slots:(e + 1) * slots])[np.asarray(mask[k, e * slots:(e + 1) * slots])]
      np.testing.assert_array_equal(np.sort(seen), own)
    # The mask covers exactly the padding: count valid slots per epoch, and valid ones come first.
    m = np.asarray(mask[k]).reshape(epochs, -1)
    assert (m.sum(1) == len(own)).all()
    assert (m == (np.arange(m.shape[1]) < len(own))).all()


def test_epochs_are_reshuffled():
  data, _, fn, keys = _schedule(epochs=2)
  idx, mask = fn(keys[0], data.index[0], data.counts[0])
  flat = np.asarray(idx).reshape(2, -1)
  n = int(data.counts[0])
  assert not np.array_equal(flat[0, :n], flat[1, :n])


def test_fixed_steps_cycle_through_epochs():
  data, num_steps, fn, keys = _schedule(steps=7, batch=4)
  assert num_steps == 7
  idx, mask = fn(keys[1], data.index[1], data.counts[1])
  n = int(data.counts[1])
  per_epoch = -(-n // 4)
  m = np.asarray(mask)
  for s in range(7):  # Only the last batch of each epoch is partial.
    expected = min(4, n - (s % per_epoch) * 4)
    assert m[s].sum() == expected
  first = np.asarray(idx[:per_epoch])[m[:per_epoch]]
  np.testing.assert_array_equal(np.sort(first), PART.client_indices[1])


def test_vmap_equals_loop_over_clients():
  data, _, fn, keys = _schedule(epochs=2)
  vm = jax.vmap(fn)(keys, data.index, data.counts)
  for k in range(3):
    one = fn(keys[k], data.index[k], data.counts[k])
    for a, b in zip(vm, one, strict=True):
      np.testing.assert_array_equal(a[k], b)


def test_data_stays_uint8_on_device():
  data = F.to_device(np.zeros((23, 2, 2, 1), np.uint8), LABELS, PART, np.zeros(1), np.ones(1))
  assert data.x.dtype == jnp.uint8 and isinstance(data.x, jax.Array)
