"""Dataset sources: TFDS names and the offline sources `digits`, `idx:<dir>`, `npz:<file>`.

Every source returns a `Dataset` of host numpy arrays. Images stay uint8 (normalised on the device by
`normalize`); text is int32 token ids. Shape letters as in `fedsnd_jax.shapes`.
"""

import contextlib
import dataclasses
import gzip
import os
import re

import numpy as np

from fedsnd_jax.errors import InputError

OFFLINE_SOURCES = ("digits", "idx:<dir>", "npz:<file>")
TEXT_DATASETS = ("ag_news_subset",)

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test arrays of one dataset plus what models and partitioners need to know.

  Attributes:
    name: the source name as given.
    x_train: [N, *input_shape] uint8 images (or float32 features, or int32 tokens for text).
    y_train: [N] int32 labels in [0, num_classes).
    x_test: [N_test, *input_shape], same dtype as x_train.
    y_test: [N_test] int32.
    num_classes: C.
    mean, std: [input_shape[-1]] float32 per-channel statistics of x_train; normalised input is
      (x - mean) / std. For text these are 0 and 1 (tokens are not normalised).
    vocab_size: number of token ids for text datasets, else 0.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  vocab_size: int = 0

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  @property
  def is_text(self) -> bool:
    return self.vocab_size > 0


def load_dataset(name: str, data_dir: str | None = None, download: bool = False) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: `digits`, `idx:<dir>`, `npz:<file>`, or a TFDS image-classification name (or `ag_news_subset`).
    data_dir: TFDS data directory (TFDS names only).
    download: whether TFDS may download (TFDS names only). Off by default: without a network a TFDS
      download hangs for minutes before failing.

  Raises:
    InputError: unknown name, missing or malformed files, labels out of range, shape mismatches.
  """
  if name == "digits":
    arrays = _load_digits()
  elif name.startswith("idx:"):
    arrays = _load_idx(name[len("idx:"):])
  elif name.startswith("npz:"):
    arrays = _load_npz(name[len("npz:"):])
  else:
    return _load_tfds(name, data_dir, download)
  return make_dataset(name, *arrays)


def subsample(ds: Dataset, num_examples: int) -> Dataset:
  """The first `num_examples` of a fixed (seed 0) shuffle of the training set: the same for every run seed."""
  if num_examples <= 0 or num_examples >= len(ds.y_train):
    return ds
  keep = np.sort(np.random.default_rng(0).permutation(len(ds.y_train))[:num_examples])
  return dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, tuple | None]:
  """Holds out a seeded `fraction` of the training set; returns (the rest as a Dataset, (x_val, y_val))."""
  if fraction <= 0:
    return ds, None
  order = np.random.default_rng(seed).permutation(len(ds.y_train))
  n_val = max(1, int(round(fraction * len(order))))
  val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
  rest = dataclasses.replace(ds, x_train=ds.x_train[train], y_train=ds.y_train[train])
  return rest, (ds.x_train[val], ds.y_train[val])


def make_dataset(name, x_train, y_train, x_test, y_test, num_classes=None) -> Dataset:
  """Validates image/feature arrays and computes per-channel statistics.

  Args:
    x_train: [N, H, W] or [N, H, W, ch] uint8 images, or [N, d] features (any numeric dtype).
    y_train: [N] integer labels.
    x_test, y_test: the same for the test split.
    num_classes: C; inferred as max label + 1 when None.
  """
  x_train, x_test = np.asarray(x_train), np.asarray(x_test)
  y_train, y_test = _labels(y_train, "y_train"), _labels(y_test, "y_test")
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    if x.ndim < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
      raise InputError("dataset", f"{name}: x_{split} {x.shape} and y_{split} {y.shape} do not match "
                       "(want [N, ...] and [N], N > 0)")
  if x_train.ndim == 3:  # [N, H, W] grayscale -> [N, H, W, 1]
    x_train, x_test = x_train[..., None], x_test[..., None]
  if x_train.shape[1:] != x_test.shape[1:]:
    raise InputError("dataset", f"{name}: train inputs {x_train.shape[1:]} and test inputs "
                     f"{x_test.shape[1:]} differ in shape")
  if x_train.dtype != np.uint8:
    if not np.issubdtype(x_train.dtype, np.number):
      raise InputError("dataset", f"{name}: inputs must be numeric, got {x_train.dtype}")
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    for split, x in (("x_train", x_train), ("x_test", x_test)):
      if not np.isfinite(x).all():
        raise InputError("dataset", f"{name}: {split} holds {int(np.size(x) - np.isfinite(x).sum())} non-finite "
                         "values (NaN or inf)")
  if num_classes is None:
    num_classes = int(max(y_train.max(), y_test.max())) + 1
  for split, y in (("y_train", y_train), ("y_test", y_test)):
    if y.min() < 0 or y.max() >= num_classes:
      raise InputError("dataset", f"{name}: {split} has labels outside [0, {num_classes})")
  axes = tuple(range(x_train.ndim - 1))
  mean = x_train.mean(axis=axes, dtype=np.float64).astype(np.float32)
  std = np.maximum(x_train.std(axis=axes, dtype=np.float64), 1e-6).astype(np.float32)
  return Dataset(name, x_train, y_train, x_test, y_test, int(num_classes), mean, std)


def normalize(x, mean, std):
  """(x - mean) / std in float32; token ids (integers other than uint8) pass through unchanged.

  Runs on the device inside jitted code.

  Args:
    x: [..., ch] uint8 or float inputs, or [..., L] int32 token ids.
    mean, std: [ch].
  """
  if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8:
    return x
  return (x.astype(np.float32) - mean) / std


def _labels(y, field) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise InputError("dataset", f"{field} must be a 1-D integer array, got {y.dtype} {y.shape}")
  return y.astype(np.int32)


def _load_digits():
  """scikit-learn's bundled 8×8 digits (values 0..16), split 80/20 with a fixed seed."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  bunch = load_digits()
  x = bunch.images.astype(np.uint8)  # [1797, 8, 8]
  y = bunch.target
  order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(y))
  n_test = int(round(len(y) * _DIGITS_TEST_FRACTION))
  test, train = order[:n_test], order[n_test:]
  return x[train], y[train], x[test], y[test]


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Reads one MNIST-format IDX file, gzipped or plain."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise InputError("dataset", f"cannot read IDX file {path}: {e}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise InputError("dataset", f"{path} is not an IDX file (bad magic number)")
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
  if len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
    raise InputError("dataset", f"{path}: IDX header says {shape} but the file has another size")
  return np.frombuffer(raw[header:], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> str:
  for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise InputError("dataset", f"idx:{directory} has no {stem}[.gz] (want train-images-idx3-ubyte, "
                   "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")


def _load_idx(directory: str):
  if not os.path.isdir(directory):
    raise InputError("dataset", f"idx:{directory} is not a readable directory")
  stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
           "t10k-labels-idx1-ubyte")
  return tuple(read_idx(_find_idx(directory, s)) for s in stems)


def _load_npz(path: str):
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
      if missing:
        raise InputError("dataset", f"npz:{path} lacks arrays {missing} "
                         "(want x_train, y_train, x_test, y_test)")
      return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
  except (OSError, ValueError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError("dataset", f"cannot read npz:{path}: {e}") from None


def _load_tfds(name: str, data_dir: str | None, download: bool) -> Dataset:
  """Loads a TFDS dataset; TensorFlow is imported only here (it is absent on the GPU machines)."""
  try:
    # TensorFlow's C++ start-up chatter (oneDNN, CPU features, cloud auth) goes to fd 2, not sys.stderr.
    with _quiet_stderr():
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

      known = tfds.list_builders()
  except ImportError as e:
    raise InputError("dataset", f"{name!r} is not an offline source ({', '.join(OFFLINE_SOURCES)}) and "
                     f"tensorflow-datasets cannot be imported: {e}") from None
  if name.split(":")[0].split("/")[0] not in known:
    raise InputError("dataset", f"unknown dataset {name!r}; use one of {', '.join(OFFLINE_SOURCES)} "
                     "or a TFDS image-classification name (mnist, fashion_mnist, cifar10, ...)")
  try:
    splits = tfds.load(name, split=["train", "test"], as_supervised=True, data_dir=data_dir,
                       download=download)
    # Big batches, concatenated: `batch_size=-1` aborts the process under tfds.testing.mock_data.
    (x_train, y_train), (x_test, y_test) = [_concat(tfds.as_numpy(s.batch(8192))) for s in splits]
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types for missing data.
    hint = "" if download else " (downloads are off; pass --download or prepare data_dir)"
    raise InputError("dataset", f"TFDS could not load {name!r}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None
  num_classes = _tfds_num_classes(tfds, name, data_dir)
  if name in TEXT_DATASETS:
    return make_text_dataset(name, x_train, y_train, x_test, y_test, num_classes)
  return make_dataset(name, x_train, y_train, x_test, y_test, num_classes)


@contextlib.contextmanager
def _quiet_stderr():
  """Points file descriptor 2 at /dev/null for the duration (C++ logging ignores sys.stderr)."""
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _concat(batches):
  xs, ys = zip(*batches, strict=True)
  return np.concatenate(xs), np.concatenate(ys)


def _tfds_num_classes(tfds, name, data_dir) -> int | None:
  try:
    info = tfds.builder(name, data_dir=data_dir).info
    return int(info.features["label"].num_classes)
  except Exception:  # pylint: disable=broad-except  # Fall back to inferring from labels.
    return None


_TOKEN_RE = re.compile(r"[a-z0-9']+")
TEXT_VOCAB_SIZE = 20_000
TEXT_MAX_LEN = 64


def make_text_dataset(name, texts_train, y_train, texts_test, y_test, num_classes=None,
                      vocab_size=TEXT_VOCAB_SIZE, max_len=TEXT_MAX_LEN) -> Dataset:
  """Tokenises raw texts into int32 ids [N, L] with a vocabulary of the training set's commonest words.

  Id 0 is padding and id 1 is out-of-vocabulary; the other `vocab_size - 2` ids are the commonest
  lower-cased words of the training texts, most frequent first.
  """
  train_tokens = [_TOKEN_RE.findall(_text(t).lower()) for t in texts_train]
  counts: dict[str, int] = {}
  for words in train_tokens:
    for w in words:
      counts[w] = counts.get(w, 0) + 1
  common = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - 2]
  ids = {w: i + 2 for i, w in enumerate(common)}

  def encode(token_lists):
    out = np.zeros((len(token_lists), max_len), np.int32)
    for row, words in enumerate(token_lists):
      seq = [ids.get(w, 1) for w in words[:max_len]]
      out[row, : len(seq)] = seq
    return out

  x_train = encode(train_tokens)
  x_test = encode([_TOKEN_RE.findall(_text(t).lower()) for t in texts_test])
  base = make_dataset(name, x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test,
                      num_classes)
  return dataclasses.replace(base, x_train=x_train, x_test=x_test, mean=np.zeros(1, np.float32),
                             std=np.ones(1, np.float32), vocab_size=len(ids) + 2)


def _text(t) -> str:
  return t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
