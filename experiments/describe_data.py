r"""Prints how a partition spreads a dataset over clients: sizes, label histograms, label entropy.

  python -m experiments.describe_data --dataset=digits --partition=dirichlet_label --alpha=0.1 \
      --num_clients=20 --seed=0 [--heatmap=hist.png]
"""

import sys

import numpy as np
from absl import app, flags

from fedsnd_jax import partition as partition_lib
from fedsnd_jax.data import load_dataset
from fedsnd_jax.errors import InputError

_DATASET = flags.DEFINE_string("dataset", "digits", "digits | idx:<dir> | npz:<file> | a TFDS name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
_PARTITION = flags.DEFINE_enum("partition", "dirichlet_label", partition_lib.PARTITIONS, "Partitioner.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration.")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 20, "K.")
_SEED = flags.DEFINE_integer("seed", 0, "Partition seed.")
_MIN_SIZE = flags.DEFINE_integer("min_size", 2, "Least examples per client (dirichlet_label, quantity).")
_SHARDS = flags.DEFINE_integer("shards_per_client", 2, "Shards per client (shards).")
_HEATMAP = flags.DEFINE_string("heatmap", None, "Save a heat-map PNG of the [K, C] histogram here.")


def describe(part: partition_lib.Partition) -> str:
  """A table of per-client sizes, label counts and label entropy, then the mean entropy."""
  hist = part.histograms
  entropy = partition_lib.label_entropy(hist)
  head = "client  size  entropy  " + " ".join(f"{c:>5d}" for c in range(hist.shape[1]))
  rows = [f"{k:>6d} {hist[k].sum():>5d}  {entropy[k]:7.3f}  " + " ".join(f"{v:>5d}" for v in hist[k])
          for k in range(hist.shape[0])]
  sizes = part.sizes
  tail = (f"sizes: min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}; "
          f"mean label entropy {entropy.mean():.3f} nats (uniform over {hist.shape[1]} classes: "
          f"{np.log(hist.shape[1]):.3f})")
  return "\n".join([head, *rows, tail])


def save_heatmap(part: partition_lib.Partition, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  hist = part.histograms
  fig, ax = plt.subplots(figsize=(max(4, hist.shape[1] * 0.5), max(3, hist.shape[0] * 0.25)))
  im = ax.imshow(hist, aspect="auto", cmap="viridis")
  ax.set_xlabel("class")
  ax.set_ylabel("client")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="examples")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  try:
    ds = load_dataset(_DATASET.value, data_dir=_DATA_DIR.value)
    part = partition_lib.partition(ds.y_train, _NUM_CLIENTS.value, _PARTITION.value, alpha=_ALPHA.value,
                                   seed=_SEED.value, min_size=_MIN_SIZE.value,
                                   shards_per_client=_SHARDS.value, num_classes=ds.num_classes)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  title = (f"{_DATASET.value}: {_PARTITION.value} α={_ALPHA.value}, {_NUM_CLIENTS.value} clients, "
           f"seed {_SEED.value}")
  print(f"{title}; {len(ds.y_train)} training examples, {ds.num_classes} classes")
  print(describe(part))
  if _HEATMAP.value:
    save_heatmap(part, _HEATMAP.value, title)
    print(f"heat-map written to {_HEATMAP.value}")


if __name__ == "__main__":
  app.run(main)
