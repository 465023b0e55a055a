"""Client training, mapping strategies and FedAvg on tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsnd_jax import algorithm, client, federated_data, losses, mapping, models
from fedsnd_jax.data import normalize
from fedsnd_jax.fedavg import build_fedavg
from fedsnd_jax.partition import partition

RNG = np.random.default_rng(0)
X = RNG.integers(0, 17, (30, 4, 4, 1)).astype(np.uint8)
Y = (X.reshape(30, -1).sum(1) % 3).astype(np.int32)
MEAN, STD = np.array([8.0], np.float32), np.array([5.0], np.float32)


def _setup(num_clients=3, clients_per_round=3, model_name="mlp", dropout=0.2, **sched):
  part = partition(Y, num_clients, "quantity", alpha=2.0, seed=0, min_size=3)
  data = federated_data.to_device(X, Y, part, MEAN, STD)
  model = models.build_model(model_name, (4, 4, 1), 3, dropout=dropout)
  sched = {"batch_size": 4, "local_epochs": 1, "local_steps": 0, **sched}
  num_steps = federated_data.steps_per_round(data.max_count, sched["batch_size"], sched["local_epochs"],
                                             sched["local_steps"])
  schedule = algorithm.LocalSchedule(sched["batch_size"], num_steps, sched["local_epochs"], sched["local_steps"])
  return data, model, dict(num_clients=num_clients, clients_per_round=clients_per_round, schedule=schedule)


def _run(alg, data, rounds, seed=0):
  state = alg.init(jax.random.key(seed))
  for _ in range(rounds):
    state, _ = alg.apply(state, data)
  return state


@pytest.mark.parametrize("model_name", ["mlp", "cnn2"])
def test_strategies_agree(model_name):
  data, model, kw = _setup(num_clients=3, clients_per_round=3, model_name=model_name)
  opt = client.client_optimizer(0.05, 0.9, 1e-4)
  results = {cm: _run(build_fedavg(model, client_opt=opt, client_map=cm, chunk_size=2, **kw), data, 2).params
             for cm in ("vmap", "chunked", "loop")}
  for cm in ("chunked", "loop"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), results["vmap"],
                 results[cm])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), results["vmap"],
                                       model.init(jax.random.split(jax.random.key(0))[0])))
  assert max(moved) > 1e-3  # the rounds did train


def test_one_client_one_full_batch_step_is_centralised_sgd():
  n = len(Y)
  data, model, kw = _setup(num_clients=1, clients_per_round=1, dropout=0.0, batch_size=n, local_steps=1)
  lr = 0.1
  alg = build_fedavg(model, client_opt=client.client_optimizer(lr, momentum=0.9), **kw)
  state0 = alg.init(jax.random.key(0))
  state1, _ = alg.apply(state0, data)

  def loss(p):
    return losses.cross_entropy(model.apply(p, normalize(jnp.asarray(X), MEAN, STD)), jnp.asarray(Y)).mean()

  grads = jax.grad(loss)(state0.params)
  expected = jax.tree.map(lambda p, g: p - lr * g, state0.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state1.params, expected)


def test_average_of_identical_updates_is_that_update():
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.5])}
  stacked = jax.tree.map(lambda x: jnp.stack([x, x, x]), tree)
  out = algorithm.weighted_average(stacked, jnp.array([5, 1, 9]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, tree)


def test_weighting_matches_numpy():
  stacked = RNG.normal(size=(3, 4, 2)).astype(np.float32)
  counts = np.array([10, 3, 27])
  expected = np.einsum("k,kij->ij", counts / counts.sum(), stacked)
  np.testing.assert_allclose(algorithm.weighted_average(jnp.asarray(stacked), jnp.asarray(counts)),
                             expected, rtol=1e-5)


def test_server_sgd_lr1_is_plain_average():
  params = {"w": jnp.array([1.0, 2.0])}
  avg = {"w": jnp.array([3.0, -1.0])}
  opt = optax.sgd(1.0)
  new, _ = algorithm.server_update(opt, params, opt.init(params), avg)
  np.testing.assert_allclose(new["w"], avg["w"])


def test_masked_step_is_a_noop():
  _, model, _ = _setup()
  loss_fn = client.supervised_loss(model)
  opt = optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.01))  # state and update move with any step
  params = model.init(jax.random.key(0))
  idx = jnp.arange(8).reshape(2, 4)
  real = jnp.ones((1, 4), bool)
  key = jax.random.key(1)
  x, y = jnp.asarray(X), jnp.asarray(Y)
  args = (loss_fn, opt, params, client.ClientContext(params), x, y, MEAN, STD)
  # A masked step in front must leave the real step's result (params and, through adam's counter and
  # moments, the optimiser state) exactly as without it. Same dropout key for the real step.
  masked_first, _ = client.train_steps(*args, idx, jnp.concatenate([~real, real]), key)
  # train_steps gives step i the i-th of split(key, S); replay the real step alone with that key.
  alone = _train_with_step_keys(args, idx[1:], real, jax.random.split(key, 2)[1:])
  # Had the masked step moved anything, adam's count and weight decay would differ by ~lr = 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), masked_first, alone)
  all_masked, _ = client.train_steps(*args, idx, jnp.zeros((2, 4), bool), key)
  jax.tree.map(np.testing.assert_array_equal, all_masked, params)


def _train_with_step_keys(args, idx, mask, step_keys):
  loss_fn, opt, params, context, x, y, mean, std = args
  opt_state = opt.init(params)
  for i in range(idx.shape[0]):
    def objective(p, i=i):
      batch = normalize(x[idx[i]], mean, std)
      return losses.masked_mean(loss_fn(p, batch, y[idx[i]], step_keys[i], context), mask[i])
    grads = jax.grad(objective)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("client_map", ["vmap", "chunked", "loop"])
def test_round_does_not_retrace(client_map):
  data, model, kw = _setup(num_clients=3, clients_per_round=2)
  traces = []

  def counting_apply(*args, **kwargs):
    traces.append(1)
    return model.apply(*args, **kwargs)

  alg = build_fedavg(model._replace(apply=counting_apply), client_opt=client.client_optimizer(0.05),
                     client_map=client_map, chunk_size=2, **kw)
  state = _run(alg, data, 1)
  after_first = len(traces)
  assert after_first > 0
  for _ in range(3):
    state, _ = alg.apply(state, data)
  assert len(traces) == after_first


def test_sampling_is_seeded_and_without_replacement():
  rng = jax.random.key(3)
  ids_a, keys_a, _ = algorithm.round_keys(rng, 5, 10, 4)
  ids_b, _, _ = algorithm.round_keys(rng, 5, 10, 4)
  ids_c, _, _ = algorithm.round_keys(rng, 6, 10, 4)
  np.testing.assert_array_equal(ids_a, ids_b)
  assert len(set(np.asarray(ids_a).tolist())) == 4
  assert not np.array_equal(ids_a, ids_c)
  # A client's key depends on its id and the round only, not on who else was sampled.
  _, clients_key, _ = jax.random.split(jax.random.fold_in(rng, 5), 3)
  np.testing.assert_array_equal(jax.random.key_data(keys_a[0]),
                                jax.random.key_data(jax.random.fold_in(clients_key, ids_a[0])))


def test_client_map_default_per_backend():
  assert mapping.default_client_map("cpu") == "loop"
  assert mapping.default_client_map("gpu") == mapping.default_client_map("tpu") == "vmap"
