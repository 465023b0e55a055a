"""FedSND's identities (DESIGN §2.7) and the mechanics of synthesis and cross-client distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsnd_jax import algorithm, client, distillation, federated_data, losses, models, noise
from fedsnd_jax.fedavg import build_fedavg
from fedsnd_jax.fedsnd import NoiseDistillation, build_fedsnd, cross_distill
from fedsnd_jax.partition import partition
from fedsnd_jax.self_distillation import self_distillation_loss

RNG = np.random.default_rng(0)
X = RNG.integers(0, 17, (36, 4, 4, 1)).astype(np.uint8)
Y = (X.reshape(36, -1).sum(1) % 3).astype(np.int32)
MEAN, STD = np.array([8.0], np.float32), np.array([5.0], np.float32)
SHAPE = (4, 4, 1)


def _common(model, clients_per_round=3):
  part = partition(Y, 3, "dirichlet_label", alpha=0.5, seed=0, min_size=4)
  data = federated_data.to_device(X, Y, part, MEAN, STD)
  steps = federated_data.steps_per_round(data.max_count, 4, 1, 0)
  return data, dict(num_clients=3, clients_per_round=clients_per_round,
                    schedule=algorithm.LocalSchedule(4, steps, 1, 0),
                    client_opt=client.client_optimizer(0.05, 0.9, 1e-4))


def _rounds(alg, data, n):
  state = alg.init(jax.random.key(0))
  diags = []
  for _ in range(n):
    state, diag = alg.apply(state, data)
    diags.append(diag)
  return state, diags


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_all_distillation_off_is_fedavg():
  model = models.build_model("mlp", SHAPE, 3)
  data, common = _common(model)
  off = self_distillation_loss(model, lambda_mutual=0.0, lambda_prev=0.0, temperature=2.0)
  fedsnd = build_fedsnd(model, SHAPE, 3, client_loss=off, server=NoiseDistillation(noise_steps=2, distill_steps=0),
                        **common)
  fedavg = build_fedavg(model, **common)
  a, diags = _rounds(fedsnd, data, 2)
  b, _ = _rounds(fedavg, data, 2)
  assert "synthesis_time_s" in diags[0]  # the server part did run, with D = 0
  _assert_trees_close(a.params, b.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["none", "dropout", "previous", "both"])
def test_self_distillation_terms_switch(mode):
  model = models.build_model("mlp", SHAPE, 3)
  data, common = _common(model)
  fedsd = build_fedsnd(model, SHAPE, 3, client_loss=self_distillation_loss(
      model, lambda_mutual=1.0, lambda_prev=0.5, temperature=2.0, mode=mode), **common)
  a, _ = _rounds(fedsd, data, 1)
  b, _ = _rounds(build_fedavg(model, **common), data, 1)
  diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a.params, b.params)))
  assert (diff < 1e-6) if mode == "none" else (diff > 1e-5)


def test_kl_terms_vanish_when_teacher_is_student():
  z = jax.random.normal(jax.random.key(0), (5, 4))
  np.testing.assert_allclose(losses.kl_divergence(losses.tempered_softmax(z, 3.0), z, 3.0), 0.0, atol=1e-6)
  model = models.build_model("mlp", SHAPE, 3, dropout=0.0)  # both dropout views identical
  params = model.init(jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
  y = jnp.arange(6) % 3
  sd = self_distillation_loss(model, lambda_mutual=1.0, lambda_prev=1.0, temperature=2.0)
  ce = losses.cross_entropy(model.apply(params, x), y)
  np.testing.assert_allclose(sd(params, x, y, jax.random.key(3), client.ClientContext(params)), ce, rtol=1e-5,
                             atol=1e-6)
  other = model.init(jax.random.key(4))  # a different teacher makes the previous-model term positive
  assert jnp.all(sd(params, x, y, jax.random.key(3), client.ClientContext(other)) > ce)


def test_kl_by_hand():
  p = jnp.array([[0.5, 0.5]])
  z = jnp.log(jnp.array([[0.25, 0.75]]))
  expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
  np.testing.assert_allclose(losses.kl_divergence(p, z, 1.0), [expected], rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_synthesis_lowers_teacher_ce(projection):
  model = models.build_model("mlp", SHAPE, 3)
  params = model.init(jax.random.key(0))
  space = noise.noise_space(model, SHAPE)
  targets = noise.balanced_targets(12, 3)
  x, stats = noise.synthesize(space, params, jax.random.key(1), targets, steps=30, optimizer=optax.adam(0.1),
                              projection=projection)
  assert x.shape == (12, *SHAPE)
  assert float(stats.ce_final) < 0.5 * float(stats.ce_initial)
  assert float(stats.accuracy) == 1.0
  if projection:
    np.testing.assert_allclose(jnp.linalg.norm(x.reshape(12, -1), axis=1), 4.0, rtol=1e-5)  # √16


def test_text_noise_lives_in_embedding_space():
  model = models.build_model("text_mean", (7,), 3, vocab_size=50)
  params = model.init(jax.random.key(0))
  space = noise.noise_space(model, (7,))
  assert space.shape == (7, 64)
  x, stats = noise.synthesize(space, params, jax.random.key(1), noise.balanced_targets(9, 3), steps=30,
                              optimizer=optax.adam(0.05))
  assert x.shape == (9, 7, 64) and float(stats.ce_final) < 0.5 * float(stats.ce_initial)


def test_histogram_targets_follow_the_histogram():
  labels = noise.histogram_targets(jax.random.key(0), jnp.array([0, 30, 10]), 400)
  counts = np.bincount(np.asarray(labels), minlength=3)
  assert counts[0] == 0 and 250 < counts[1] < 350


def test_student_batches_never_contain_own_noise():
  owners = jnp.repeat(jnp.arange(3), 5)
  for student in range(3):
    idx = distillation.sample_batches(jax.random.key(student), owners, student, 20, 8)
    assert idx.shape == (20, 8)
    assert not np.any(np.asarray(owners[idx]) == student)
    assert set(np.asarray(owners[idx]).ravel()) == set(range(3)) - {student}


def test_soft_targets_by_hand():
  # Two teachers, one sample owned by teacher 0; teacher 1 has seen only class 1.
  probs = jnp.array([[[0.8, 0.2]], [[0.3, 0.7]]])
  owners = jnp.array([0])
  np.testing.assert_allclose(distillation.soft_targets(probs, owners, 2, "none"), [[0.8, 0.2]])
  hist = jnp.array([[10, 10], [0, 30]])  # class 0: only teacher 0; class 1: shares 10/40 and 30/40
  for label, expected in ((0, [0.8, 0.2]), (1, [0.25 * 0.8 + 0.75 * 0.3, 0.25 * 0.2 + 0.75 * 0.7])):
    np.testing.assert_allclose(
        distillation.soft_targets(probs, owners, -1, "class_count", hist, jnp.array([label])), [expected],
        rtol=1e-6)
  conf = np.array([0.8, 0.7])
  expected = (conf[0] * np.array([0.8, 0.2]) + conf[1] * np.array([0.3, 0.7])) / conf.sum()
  np.testing.assert_allclose(distillation.soft_targets(probs, owners, -1, "confidence"), [expected], rtol=1e-6)
  # A student never teaches itself: excluding teacher 1 leaves teacher 0 alone.
  np.testing.assert_allclose(distillation.soft_targets(probs, owners, 1, "confidence"), [[0.8, 0.2]], rtol=1e-6)


def _pool_setup():
  model = models.build_model("mlp", SHAPE, 3)
  space = noise.noise_space(model, SHAPE)
  teachers = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
  pool = jax.random.normal(jax.random.key(1), (3, 6, *SHAPE))
  labels = jnp.tile(noise.balanced_targets(6, 3), (3, 1))
  return space, teachers, pool, labels


@pytest.mark.parametrize("weighting", ["none", "class_count", "confidence"])
def test_distillation_lowers_student_teacher_kl(weighting):
  space, teachers, pool, labels = _pool_setup()
  settings = NoiseDistillation(distill_steps=15, distill_batch=8, distill_lr=0.01, teacher_weighting=weighting)
  hist = jnp.array([[5, 1, 0], [0, 4, 4], [2, 2, 2]])
  _, diag = cross_distill(space, teachers, jnp.array([3, 4, 5]), pool, labels, jnp.array([0, 1, 2]),
                          jax.random.key(2), settings, hist)
  assert float(diag["kl_after"]) < 0.7 * float(diag["kl_before"])


def test_global_target_lowers_kl():
  space, teachers, pool, labels = _pool_setup()
  settings = NoiseDistillation(distill_steps=15, distill_batch=8, distill_lr=0.01, distill_target="global")
  new, diag = cross_distill(space, teachers, jnp.array([3, 4, 5]), pool, labels, jnp.array([0, 1, 2]),
                            jax.random.key(2), settings)
  assert jax.tree.leaves(new)[0].shape == jax.tree.leaves(teachers)[0].shape[1:]
  assert float(diag["kl_after"]) < 0.7 * float(diag["kl_before"])


def test_distillation_is_order_independent():
  space, teachers, pool, labels = _pool_setup()
  settings = NoiseDistillation(distill_steps=5, distill_batch=4, distill_lr=0.01)
  ids, counts = jnp.array([4, 9, 17]), jnp.array([3, 4, 5])
  out, _ = cross_distill(space, teachers, counts, pool, labels, ids, jax.random.key(2), settings)
  perm = jnp.array([2, 0, 1])
  take = lambda tree: jax.tree.map(lambda a: a[perm], tree)
  out_p, _ = cross_distill(space, take(teachers), counts[perm], pool[perm], labels[perm], ids[perm],
                           jax.random.key(2), settings)
  _assert_trees_close(out_p, take(out), rtol=1e-6, atol=1e-7)


def test_fedsnd_round_does_not_retrace_and_warm_start_keeps_noise():
  model = models.build_model("mlp", SHAPE, 3)
  data, common = _common(model, clients_per_round=2)
  traces = []

  def counting_apply(*args, **kwargs):
    traces.append(1)
    return model.apply(*args, **kwargs)

  counted = model._replace(apply=counting_apply)
  server = NoiseDistillation(noise_samples=6, noise_steps=3, distill_steps=2, distill_batch=4,
                             noise_warm_start=True, noise_projection=True)
  alg = build_fedsnd(counted, SHAPE, 3, client_loss=self_distillation_loss(
      counted, lambda_mutual=1.0, lambda_prev=0.1, temperature=2.0), server=server, **common)
  state, _ = _rounds(alg, data, 1)
  first = len(traces)
  seen_after_one = np.asarray(state.clients.seen)
  assert seen_after_one.sum() == 2 and state.clients.noise.shape == (3, 6, *SHAPE)
  for _ in range(3):
    state, diag = alg.apply(state, data)
  assert len(traces) == first
  kept = np.asarray(state.clients.noise)[np.asarray(state.clients.seen)]
  np.testing.assert_allclose(np.linalg.norm(kept.reshape(len(kept), 6, -1), axis=-1), 4.0, rtol=1e-4)
  for field in ("teacher_ce", "teacher_noise_accuracy", "noise_norm", "teacher_agreement", "kl_before",
                "kl_after", "synthesis_time_s", "distill_time_s", "server_time_s"):
    assert field in diag, field
  assert "no_distill" in diag["eval_params"]


def test_bn_prior_pulls_noise_statistics_to_the_model():
  model = models.build_model("cnn2", (8, 8, 1), 3, batch_norm=True)
  x_real = 2.0 * jax.random.normal(jax.random.key(5), (64, 8, 8, 1)) + 1.0
  params = model.calibrate(model.init(jax.random.key(0)), x_real)  # statistics of "real" data
  space = noise.noise_space(model, (8, 8, 1))
  targets = noise.balanced_targets(16, 3)
  gap = lambda x: float(noise.bn_statistics_loss(space, params, x))
  kw = dict(steps=40, optimizer=optax.adam(0.05), init=jax.random.normal(jax.random.key(1), (16, 8, 8, 1)))
  x_plain, _ = noise.synthesize(space, params, None, targets, **kw)
  x_prior, stats = noise.synthesize(space, params, None, targets, bn_prior=1.0, **kw)
  assert gap(x_prior) < 0.5 * gap(x_plain)
  assert float(stats.ce_final) < float(stats.ce_initial)


def test_fedsnd_with_batch_norm_and_prior_runs():
  model = models.build_model("cnn2", SHAPE, 3, batch_norm=True)
  data, common = _common(model)
  alg = build_fedsnd(model, SHAPE, 3, server=NoiseDistillation(noise_samples=6, noise_steps=3, distill_steps=2,
                                                                distill_batch=4, bn_prior=0.1), **common)
  state, diags = _rounds(alg, data, 2)
  init = alg.init(jax.random.key(0))
  # Clients calibrated their statistics; the aggregate holds their average, not the initial 0/1.
  assert not np.allclose(state.params["batch_stats"]["BatchNorm_0"]["var"], 1.0)
  assert np.all(np.isfinite(jax.tree.leaves(state.params)[0])) and init.round == 0
  assert np.isfinite(diags[-1]["kl_after"])
