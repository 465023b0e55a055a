"""Shared fixtures: a tiny 3-class federation (36 examples of 4×4×1) and helpers to run and compare rounds.

Importing fedsnd_jax first makes its XLA_FLAGS set-up run before any test imports jax (imported after jax,
it would leave XLA:CPU's YNN fusions on: slower compiles, and other numerics than the binaries'). The suite
shares one persistent XLA compilation cache (`.pytest_cache/jax-compilation`, also for the binaries the tests
start): many tests compile the same tiny programs, and an executable is reused only for the same program,
compile options, XLA flags and jax version, so results are those of a fresh compile.
"""

import os

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import fedsnd_jax  # noqa: E402, F401, I001  (before jax: XLA_FLAGS are set when jax is imported)

import contextlib
from typing import NamedTuple

import chex
import jax
import jax.monitoring
import numpy as np
import pytest

from fedsnd_jax import federated_data
from fedsnd_jax.rounds import Federation, LocalSchedule
from fedsnd_jax.partition import partition

JAXPR_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax's monitoring event for one trace
SHAPE = (4, 4, 1)
NUM_CLASSES = 3
_RNG = np.random.default_rng(0)
X = _RNG.integers(0, 17, (36, *SHAPE)).astype(np.uint8)
Y = (X.reshape(36, -1).sum(1) % NUM_CLASSES).astype(np.int32)
MEAN, STD = np.array([8.0], np.float32), np.array([5.0], np.float32)


class Tiny(NamedTuple):
  """The tiny dataset (x [36, 4, 4, 1] uint8, y [36]) and its normalisation, for tests that need arrays."""

  x: np.ndarray
  y: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  shape: tuple
  num_classes: int


@pytest.fixture
def tiny() -> Tiny:
  return Tiny(X, Y, MEAN, STD, SHAPE, NUM_CLASSES)


@pytest.fixture
def federation():
  """make(num_clients=3, clients_per_round=3, ...) -> (FederatedData, Federation) on the tiny dataset."""

  def make(num_clients=3, clients_per_round=3, *, batch_size=4, local_epochs=1, local_steps=0, lr=0.05,
           momentum=0.9, weight_decay=1e-4, min_size=4):
    part = partition(Y, num_clients, "dirichlet_label", alpha=0.5, seed=0, min_size=min_size)
    data = federated_data.to_device(X, Y, part, MEAN, STD)
    schedule = LocalSchedule(batch_size, local_epochs, local_steps)
    return data, Federation(num_clients, clients_per_round, schedule, lr, momentum, weight_decay, SHAPE,
                            NUM_CLASSES)

  return make


def _run_rounds(alg, data, rounds, seed=0, state=None):
  """(state after `rounds` rounds from init(key(seed)) or from `state`, the rounds' RoundOutputs)."""
  state = alg.init(jax.random.key(seed)) if state is None else state
  outputs = []
  for _ in range(rounds):
    state, out = alg.apply(state, data)
    outputs.append(out)
  return state, outputs


@pytest.fixture
def run_rounds():
  return _run_rounds


@pytest.fixture
def assert_close():
  """assert_close(a, b, rtol=1e-5, atol=1e-6): two pytrees agree leaf by leaf."""
  return lambda a, b, rtol=1e-5, atol=1e-6: chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _fresh_trace_counters():
  chex.clear_trace_counter()


@contextlib.contextmanager
def _traced():
  """Collects the names of the functions jax traces inside the block (every jit, the driver's and the client
  map's own), from jax's monitoring events: a round that traces nothing reuses what is compiled."""
  names = []

  def listen(event, duration, **kwargs):
    del duration
    if event == JAXPR_TRACE_EVENT:
      names.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture
def traced():
  """traced() -> a context manager whose value lists the functions traced inside it."""
  return _traced
