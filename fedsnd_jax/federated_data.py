"""Device-resident federated training data and on-device batch schedules (docs/design.md §9).

The training set is placed on the device once; clients are rows of a padded index table. Each local
step gathers its batch by index on the device, so a round moves no data between host and device.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsnd_jax import tree_math
from fedsnd_jax.partition import Partition


class FederatedData(NamedTuple):
  """The training set and who holds what, as device arrays (a pytree: pass it to jitted functions).

  Attributes:
    x: [N, ...] training inputs (uint8 images stay uint8).
    y: [N] int32 labels.
    index: [K, n_max] int32 training-example indices of each client, padded with 0.
    counts: [K] int32 examples per client.
    mean, std: [ch] float32 normalisation statistics.
    own_max_count: [] int32 n_max of this run's own partition when `index` is padded wider to stack runs of
      different partitions (`stack`); None: index.shape[1]. Local schedules follow it, so a stacked run trains
      exactly as it would alone.
  """

  x: jax.Array
  y: jax.Array
  index: jax.Array
  counts: jax.Array
  mean: jax.Array
  std: jax.Array
  own_max_count: jax.Array | None = None

  @property
  def max_count(self) -> int:
    """n_max: the index table's width (stacked runs, [R, K, n_max]: the widest run's)."""
    return self.index.shape[-1]


def to_device(x, y, part: Partition, mean, std) -> FederatedData:
  """Builds the padded index table and places everything on the default device."""
  counts = part.sizes
  index = np.zeros((len(counts), int(counts.max())), np.int32)
  for k, idx in enumerate(part.client_indices):
    index[k, : len(idx)] = idx
  return FederatedData(*(jnp.asarray(a) for a in (x, y, index, counts.astype(np.int32), mean, std)))


def stack(datas: list[FederatedData]) -> FederatedData:
  """R runs' data with a leading [R] axis on every field (vectorised sweeps: `jax.vmap` over runs); index tables
  are padded to the widest, each run keeping its own n_max in `own_max_count`. The runs' training sets must have
  the same shapes (the same dataset and subsample; α and seed may differ)."""
  widest = max(d.max_count for d in datas)
  shapes = {(d.x.shape, d.index.shape[0]) for d in datas}
  if len(shapes) > 1:
    raise ValueError(f"runs to stack need training sets and client counts of one shape, got {sorted(shapes)}")
  padded = [d._replace(index=jnp.pad(d.index, ((0, 0), (0, widest - d.max_count))),
                       own_max_count=jnp.asarray(d.max_count, jnp.int32)) for d in datas]
  return tree_math.stack(padded)


def with_empty_client(data: FederatedData) -> FederatedData:
  """The data with one more client, id K, holding no examples (Poisson sampling's padding)."""
  return data._replace(index=jnp.concatenate([data.index, jnp.zeros((1, data.max_count), data.index.dtype)]),
                       counts=jnp.concatenate([data.counts, jnp.zeros((1,), data.counts.dtype)]))


def label_histograms(data: FederatedData, ids, num_classes: int):
  """[C, NC] int32 label counts of the clients `ids` [C], from their rows of the index table (what a client
  uploads when an algorithm's server needs its label histogram)."""

  def one(cid):
    valid = jnp.arange(data.max_count) < data.counts[cid]
    labels = data.y[data.index[cid]]
    return jnp.sum(jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * valid[:, None], axis=0)

  return jax.vmap(one)(ids)


def client_batches(key, index_row, count, *, batch_size: int, num_steps: int, local_epochs: int,
                   local_steps: int, own_max_count=None):
  """On-device batch schedule for one client (vmap it over clients).

  Each epoch visits the client's own examples once in a fresh random order; its last partial batch is
  masked. With `local_steps > 0` the client runs exactly that many steps of ceil(count / B) batches per
  epoch, starting a new epoch as needed. With epochs (`local_steps == 0`) every client's schedule has
  `num_steps = E·ceil(n_max / B)` slots and the slots past its own ceil(count / B) batches per epoch are
  fully masked.

  Args:
    key: the client's PRNG key for this round.
    index_row: [n_max] int32 indices of the client's examples (padded).
    count: int32 scalar, the client's number of examples.
    batch_size: B.
    num_steps: S.
    local_epochs, local_steps: the schedule (`rounds.LocalSchedule`'s epochs, and steps when > 0).
    own_max_count: the run's own n_max when `index_row` is padded wider (`stack`); its epochs are laid out
      as alone (ceil(own / B) slots each) and the steps past its E epochs are fully masked.

  Returns:
    idx: [S, B] int32 training-example indices.
    mask: [S, B] bool, True where the slot holds a real example.
  """
  n_max = index_row.shape[0]
  num_epochs = num_steps if local_steps > 0 else local_epochs  # An upper bound on epochs started.
  slots_per_epoch = -(-(n_max if own_max_count is None else own_max_count) // batch_size)

  def permutation(epoch_key):  # Valid positions first, in random order; padding last.
    u = jax.random.uniform(epoch_key, (n_max,))
    return jnp.argsort(jnp.where(jnp.arange(n_max) < count, u, 2.0)).astype(jnp.int32)

  perms = jax.vmap(permutation)(jax.random.split(key, num_epochs))  # [E, n_max]
  steps = jnp.arange(num_steps)
  batches_per_epoch = jnp.maximum(-(-count // batch_size), 1) if local_steps > 0 else slots_per_epoch
  epoch, slot = steps // batches_per_epoch, steps % batches_per_epoch
  pos = slot[:, None] * batch_size + jnp.arange(batch_size)[None, :]  # [S, B]
  mask = (pos < count) & (epoch[:, None] < num_epochs)  # (stacked runs: no epoch past the E of its own)
  local = perms[epoch[:, None], jnp.minimum(pos, n_max - 1)]
  return index_row[local], mask
