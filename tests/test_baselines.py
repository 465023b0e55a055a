"""Each baseline's pinning identity on tiny shapes (FedAvg equivalences, hand-computed losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsnd_jax import algorithm, baselines, client, federated_data, models
from fedsnd_jax.fedavg import build_fedavg
from fedsnd_jax.partition import partition

RNG = np.random.default_rng(0)
X = RNG.integers(0, 17, (36, 4, 4, 1)).astype(np.uint8)
Y = (X.reshape(36, -1).sum(1) % 3).astype(np.int32)
SHAPE = (4, 4, 1)
LR = 0.05


def _setup(model, momentum=0.9):
  part = partition(Y, 3, "dirichlet_label", alpha=0.5, seed=0, min_size=4)
  data = federated_data.to_device(X, Y, part, np.array([8.0], np.float32), np.array([5.0], np.float32))
  steps = federated_data.steps_per_round(data.max_count, 4, 1, 0)
  return data, dict(num_clients=3, clients_per_round=3, schedule=algorithm.LocalSchedule(4, steps, 1, 0),
                    client_opt=client.client_optimizer(LR, momentum, 1e-4))


def _run(alg, data, rounds):
  state = alg.init(jax.random.key(0))
  for _ in range(rounds):
    state, _ = alg.apply(state, data)
  return state


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.parametrize("name, kwargs", [("fedprox", dict(mu=0.0)), ("moon", dict(mu=0.0)),
                                          ("feddyn", dict(alpha=0.0)), ("fedntd", dict(beta=0.0))])
def test_switched_off_baseline_is_fedavg(name, kwargs):
  model = models.build_model("mlp", SHAPE, 3)
  data, common = _setup(model)
  _close(_run(baselines.build_baseline(name, model, **kwargs, **common), data, 2).params,
         _run(build_fedavg(model, **common), data, 2).params)


@pytest.mark.parametrize("name, kwargs", [("fedprox", dict(mu=1.0)), ("moon", dict(mu=1.0)),
                                          ("feddyn", dict(alpha=0.1)), ("fedntd", dict(beta=1.0))])
def test_switched_on_baseline_differs(name, kwargs):
  model = models.build_model("mlp", SHAPE, 3)
  data, common = _setup(model)
  a = _run(baselines.build_baseline(name, model, **kwargs, **common), data, 2).params
  b = _run(build_fedavg(model, **common), data, 2).params
  gaps = [float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  assert max(gaps) > 1e-5


def test_scaffold_first_round_is_fedavg_and_controls_follow_option_two():
  model = models.build_model("mlp", SHAPE, 3)
  data, common = _setup(model, momentum=0.0)  # plain SGD, the paper's client
  alg = baselines.build_baseline("scaffold", model, client_step=LR, **common)
  state0 = alg.init(jax.random.key(0))
  state1, _ = alg.apply(state0, data)
  _close(state1.params, _run(build_fedavg(model, **common), data, 1).params)
  # From zero controls, option II gives c_i = (w_g − w_i) / (K_i η), so w_i = w_g − K_i η c_i, and the
  # aggregate is Σ n_i/N · w_i; the server control is (|S|/N)·mean_i c_i with all 3 of 3 clients sampled.
  counts = np.asarray(data.counts)
  steps = -(-counts // 4)
  ci = state1.clients.clients
  uploads = jax.tree.map(lambda wg, c: wg[None] - (steps * LR).reshape((-1,) + (1,) * wg.ndim) * c,
                         state0.params, ci)
  weights = counts / counts.sum()
  _close(jax.tree.map(lambda u: np.tensordot(weights, u, axes=1), uploads), state1.params)
  _close(state1.clients.server, jax.tree.map(lambda c: c.mean(0), ci))
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ci)) > 0


def test_moon_contrastive_by_hand():
  z = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  zg = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  zp = jnp.array([[0.0, 1.0], [0.0, 1.0]])
  tau = 0.5
  # Example 1: cos(z, zg) = 1, cos(z, zp) = 0. Example 2: cos = 1/√2 and 1.
  expected = [-np.log(np.exp(1 / tau) / (np.exp(1 / tau) + np.exp(0.0))),
              -np.log(np.exp(2 ** -0.5 / tau) / (np.exp(2 ** -0.5 / tau) + np.exp(1 / tau)))]
  np.testing.assert_allclose(baselines.moon_contrastive(z, zg, zp, tau), expected, rtol=1e-6)


def test_not_true_distribution_excludes_true_class():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 2])
  q = baselines.not_true_probs(logits, labels, 1.0)
  np.testing.assert_allclose(q[0], [0.0, np.e / (np.e + 1), 1 / (np.e + 1)], rtol=1e-6)
  np.testing.assert_allclose(q[1], [0.5, 0.5, 0.0], rtol=1e-6)


def test_per_client_state_is_gathered_and_scattered_by_id():
  model = models.build_model("mlp", SHAPE, 3)
  data, common = _setup(model)
  common = {**common, "clients_per_round": 1}
  alg = baselines.build_baseline("moon", model, mu=1.0, **common)
  state = alg.init(jax.random.key(0))
  before = jax.tree.leaves(state.clients.clients)[0]
  state, _ = alg.apply(state, data)
  after = jax.tree.leaves(state.clients.clients)[0]
  changed = [k for k in range(3) if not np.allclose(before[k], after[k])]
  ids, _, _ = algorithm.round_keys(alg.init(jax.random.key(0)).rng, 0, 3, 1)
  assert changed == [int(ids[0])]
