"""Client training, mapping strategies, aggregation and the round driver on tiny shapes."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsnd_jax import (
  aggregation,
  algorithms,
  client,
  driver,
  host_loop,
  losses,
  mapping,
  models,
  rounds,
  sampling,
)
from fedsnd_jax.data import normalize


@pytest.mark.parametrize("model_name", ["mlp", "cnn2"])
def test_strategies_agree(model_name, tiny, federation, run_rounds, assert_close):
  data, fed = federation()
  model = models.build_model(model_name, tiny.shape, 3, conv_impl="im2col")
  results = {cm: run_rounds(algorithms.build("fedavg", model, fed, client_map=cm, chunk_size=2), data, 2)[0].params
             for cm in ("vmap", "chunked", "loop")}
  for cm in ("chunked", "loop"):
    assert_close(results["vmap"], results[cm], rtol=2e-5, atol=2e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), results["vmap"],
                                       model.init(jax.random.split(jax.random.key(0))[0])))
  assert max(moved) > 1e-3  # the rounds did train


def test_host_stepped_loop_with_auto_convolutions_agrees_with_vmap(tiny, federation, run_rounds, assert_close):
  # The CPU loop drives each step from the host with XLA's convolution (conv_impl=auto); vmap runs im2col in a
  # scan: the same training up to float rounding. Unequal clients: the loop skips their padding steps.
  data, fed = federation()
  assert len(set(np.asarray(data.counts).tolist())) > 1
  model = models.build_model("cnn2", tiny.shape, 3, conv_impl="auto")
  results = {cm: run_rounds(algorithms.build("fedavg", model, fed, client_map=cm), data, 2)[0].params
             for cm in ("vmap", "loop")}
  assert_close(results["vmap"], results["loop"], rtol=2e-5, atol=2e-6)


def test_threaded_loop_stacks_in_client_order_whatever_finishes_first():

  def one(offset, i):
    time.sleep(0.02 * (3 - int(i)))  # later clients finish first
    return {"v": offset + i}

  out = host_loop.threaded_loop(one, workers=3)((jnp.float32(10.0),), (jnp.arange(4.0),))
  np.testing.assert_array_equal(out["v"], [10.0, 11.0, 12.0, 13.0])


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs, rounded up
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cfs_quota_cpus_reads_cgroup_v2_and_v1(tmp_path, files, cpus):
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert host_loop.cfs_quota_cpus(str(tmp_path)) == cpus


def test_worker_threads_capped_by_a_cfs_quota(monkeypatch):
  monkeypatch.setattr(host_loop, "cfs_quota_cpus", lambda: 1)
  assert host_loop.worker_threads() == 1
  monkeypatch.setattr(host_loop, "cfs_quota_cpus", lambda: None)
  assert host_loop.worker_threads() == len(os.sched_getaffinity(0))


def test_one_client_one_full_batch_step_is_centralised_sgd(tiny, federation, assert_close):
  n = len(tiny.y)
  lr = 0.1
  data, fed = federation(1, 1, batch_size=n, local_steps=1, lr=lr, weight_decay=0.0, min_size=1)
  model = models.build_model("mlp", tiny.shape, 3, dropout=0.0)
  alg = algorithms.build("fedavg", model, fed)
  state0 = alg.init(jax.random.key(0))
  state1, _ = alg.apply(state0, data)

  def loss(p):
    x = normalize(jnp.asarray(tiny.x), tiny.mean, tiny.std)
    return losses.cross_entropy(model.apply(p, x), jnp.asarray(tiny.y)).mean()

  grads = jax.grad(loss)(state0.params)
  assert_close(state1.params, jax.tree.map(lambda p, g: p - lr * g, state0.params, grads))


def test_average_of_identical_updates_is_that_update(assert_close):
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.5])}
  stacked = jax.tree.map(lambda x: jnp.stack([x, x, x]), tree)
  assert_close(aggregation.weighted_average(stacked, jnp.array([5, 1, 9])), tree)


def test_weighted_mean_aggregator_matches_numpy():
  stacked = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
  counts = np.array([10, 3, 27])
  expected = np.einsum("k,kij->ij", counts / counts.sum(), stacked)
  agg = aggregation.weighted_mean()
  out = jax.jit(agg.apply)(jnp.asarray(stacked), jnp.asarray(counts), agg.init(stacked[0]), jnp.zeros((4, 2)),
                           jax.random.key(0))
  np.testing.assert_allclose(out.params, expected, rtol=1e-5)
  assert out.state == agg.init(stacked[0]) and out.diagnostics == {}


def test_server_sgd_lr1_is_plain_average():
  params = {"w": jnp.array([1.0, 2.0])}
  avg = {"w": jnp.array([3.0, -1.0])}
  opt = optax.sgd(1.0)
  new, _ = driver.server_update(opt, params, opt.init(params), avg)
  np.testing.assert_allclose(new["w"], avg["w"])


def test_server_momentum_never_steps_batch_norm_statistics(tiny):
  model = models.build_model("cnn2", tiny.shape, 3, batch_norm=True)
  params = model.init(jax.random.key(0))
  average = jax.tree.map(lambda a: a + 0.5, params)
  opt = models.freeze_statistics(optax.sgd(0.7, momentum=0.9))
  new, _ = driver.server_update(opt, params, opt.init(params), average)
  jax.tree.map(np.testing.assert_array_equal, new["batch_stats"], average["batch_stats"])
  np.testing.assert_allclose(new["params"]["Dense_0"]["bias"], params["params"]["Dense_0"]["bias"] + 0.35,
                             rtol=1e-6)


def test_masked_step_is_a_noop(tiny):
  model = models.build_model("mlp", tiny.shape, 3)
  loss_fn = client.supervised_loss(model)
  opt = optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.01))  # state and update move with any step
  params = model.init(jax.random.key(0))
  idx = jnp.arange(8).reshape(2, 4)
  real = jnp.ones((1, 4), bool)
  key = jax.random.key(1)
  x, y = jnp.asarray(tiny.x), jnp.asarray(tiny.y)
  args = (loss_fn, opt, params, client.ClientContext(params), x, y, tiny.mean, tiny.std)
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
def test_round_does_not_retrace(client_map, tiny, federation, run_rounds, traced):
  data, fed = federation(3, 2)
  model = models.build_model("mlp", tiny.shape, 3)
  alg = algorithms.build("fedavg", model, fed, client_map=client_map, chunk_size=2)
  state, _ = run_rounds(alg, data, 1)
  with traced() as names:
    state, _ = run_rounds(alg, data, 3, state=state)
  assert names == [] and int(state.round) == 4


def test_the_trace_check_sees_a_retrace(tiny, federation, traced):
  data, fed = federation(3, 2)
  model = models.build_model("mlp", tiny.shape, 3)
  alg = algorithms.build("fedavg", model, fed)
  state, _ = alg.apply(alg.init(jax.random.key(0)), data)
  with traced() as names:  # bfloat16 params: a new signature, traced again
    alg.apply(state._replace(params=jax.tree.map(lambda a: a.astype(jnp.bfloat16), state.params)), data)
  assert "aggregate_and_server_update" in names


def test_sampling_is_seeded_and_without_replacement():
  rng = jax.random.key(3)
  ids_a, keys_a, _ = sampling.round_keys(rng, 5, 10, 4)
  ids_b, _, _ = sampling.round_keys(rng, 5, 10, 4)
  ids_c, _, _ = sampling.round_keys(rng, 6, 10, 4)
  np.testing.assert_array_equal(ids_a, ids_b)
  assert len(set(np.asarray(ids_a).tolist())) == 4
  assert not np.array_equal(ids_a, ids_c)
  # A client's key depends on its id and the round only, not on who else was sampled.
  _, clients_key, _ = jax.random.split(jax.random.fold_in(rng, 5), 3)
  np.testing.assert_array_equal(jax.random.key_data(keys_a[0]),
                                jax.random.key_data(jax.random.fold_in(clients_key, ids_a[0])))


def test_steps_taken_counts_non_padding_steps():
  counts = jnp.array([1, 4, 5, 9])
  np.testing.assert_array_equal(rounds.LocalSchedule(4, epochs=2).steps_taken(counts), [2, 2, 4, 6])
  np.testing.assert_array_equal(rounds.LocalSchedule(4, steps=7).steps_taken(counts), [7, 7, 7, 7])


def test_client_map_default_per_backend():
  assert mapping.default_client_map("cpu") == "loop"
  assert mapping.default_client_map("gpu") == mapping.default_client_map("tpu") == "vmap"
