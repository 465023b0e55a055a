import gzip
import struct

import numpy as np
import pytest

from fedsnd_jax import data as D
from fedsnd_jax.errors import InputError


def _write_idx(path, array):
  code = {np.uint8: 0x08}[array.dtype.type]
  payload = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  payload += array.tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


def _idx_dir(tmp_path, gz, n_train=6, n_test=4):
  rng = np.random.default_rng(0)
  arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
            "train-labels-idx1-ubyte": rng.integers(0, 3, n_train, dtype=np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": np.array([0, 1, 2, 1], np.uint8)[:n_test]}
  for stem, a in arrays.items():
    _write_idx(tmp_path / (stem + (".gz" if gz else "")), a)
  return arrays


def test_digits_is_offline_uint8_with_stats():
  ds = D.load_dataset("digits")
  assert ds.x_train.dtype == np.uint8 and ds.x_train.shape[1:] == (8, 8, 1) == ds.input_shape
  assert len(ds.y_train) + len(ds.y_test) == 1797 and ds.num_classes == 10
  np.testing.assert_allclose(ds.mean, [ds.x_train.mean()], rtol=1e-5)
  np.testing.assert_allclose(ds.std, [ds.x_train.std()], rtol=1e-5)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source_reads_what_was_written(tmp_path, gz):
  arrays = _idx_dir(tmp_path, gz)
  ds = D.load_dataset(f"idx:{tmp_path}")
  np.testing.assert_array_equal(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"])
  np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
  assert ds.x_train.dtype == np.uint8 and ds.num_classes == 3


def test_idx_errors(tmp_path):
  with pytest.raises(InputError, match="^dataset: .*not a readable directory"):
    D.load_dataset(f"idx:{tmp_path}/missing")
  with pytest.raises(InputError, match="^dataset: .*has no train-images-idx3-ubyte"):
    D.load_dataset(f"idx:{tmp_path}")
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
  with pytest.raises(InputError, match="bad magic"):
    D.read_idx(str(tmp_path / "bad"))


def test_idx_train_test_mismatch(tmp_path):
  _idx_dir(tmp_path, gz=False, n_test=3)  # 4 test labels would not match 3 images
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 1], np.uint8))
  with pytest.raises(InputError, match="do not match"):
    D.load_dataset(f"idx:{tmp_path}")


def test_npz_source_and_normalize(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(10) % 4, x_test=x[:3], y_test=np.arange(3))
  ds = D.load_dataset(f"npz:{tmp_path / 'd.npz'}")
  assert ds.input_shape == (4, 4, 3) and ds.num_classes == 4 and ds.mean.shape == (3,)
  z = np.asarray(D.normalize(ds.x_train, ds.mean, ds.std))
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-4)


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(4, int), x_test=np.zeros((2, 3)),
          y_test=np.zeros(2, int)), "differ in shape"),
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(3, int), x_test=np.zeros((2, 2)),
          y_test=np.zeros(2, int)), "do not match"),
    (dict(x_train=np.zeros((4, 2)), y_train=np.array([0, 1, -1, 0]), x_test=np.zeros((2, 2)),
          y_test=np.zeros(2, int)), "outside"),
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(4, int)), "lacks arrays"),
])
def test_npz_errors(tmp_path, arrays, message):
  np.savez(tmp_path / "d.npz", **arrays)
  with pytest.raises(InputError, match=message):
    D.load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_npz_missing_file(tmp_path):
  with pytest.raises(InputError, match="^dataset: cannot read"):
    D.load_dataset(f"npz:{tmp_path}/none.npz")


def test_labels_out_of_declared_range():
  with pytest.raises(InputError, match="outside"):
    D.make_dataset("x", np.zeros((3, 2)), np.array([0, 1, 5]), np.zeros((1, 2)), np.array([0]), num_classes=3)


def test_tfds_name_under_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=6):
    ds = D.load_dataset("mnist", data_dir="/nonexistent-tfds-dir")
  assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_train.dtype == np.uint8 and ds.num_classes == 10


def test_unknown_tfds_name():
  with pytest.raises(InputError, match="^dataset: unknown dataset 'no_such_dataset_xyz'"):
    D.load_dataset("no_such_dataset_xyz")


def test_text_tokenisation_by_hand():
  ds = D.make_text_dataset("t", [b"the cat sat", b"the dog"], [0, 1], ["the bird"], [1], vocab_size=5,
                           max_len=4)
  # Vocabulary: pad 0, OOV 1, then by frequency: the=2, then ties alphabetically: cat=3, dog=4.
  np.testing.assert_array_equal(ds.x_train, [[2, 3, 1, 0], [2, 4, 0, 0]])
  np.testing.assert_array_equal(ds.x_test, [[2, 1, 0, 0]])
  assert ds.is_text and ds.vocab_size == 5 and ds.x_train.dtype == np.int32
  assert D.normalize(ds.x_train, ds.mean, ds.std) is ds.x_train
