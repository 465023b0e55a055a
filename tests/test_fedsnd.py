"""FedSND's identities (docs/design.md §7) and the mechanics of synthesis and cross-client distillation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsnd_jax import algorithms, client, federated_data, losses, models, systems
from fedsnd_jax.algorithms.fedsnd import distillation, self_distillation, synthesis
from fedsnd_jax.algorithms.fedsnd.pool import NoisePool, noise_pool, teacher_probs
from fedsnd_jax.rounds import MechanismParts

SHAPE = (4, 4, 1)
SMALL = {"synthesis.samples": 6, "synthesis.steps": 3, "distillation.steps": 2, "distillation.batch": 4}
T = 2.0  # the default temperature


def test_all_distillation_off_is_fedavg(federation, run_rounds, assert_close):
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  off = {"self_distillation.lambda_mutual": 0.0, "self_distillation.lambda_prev": 0.0, "synthesis.steps": 2,
         "distillation.steps": 0}
  a, outs = run_rounds(algorithms.build("fedsnd", model, fed, off), data, 2)
  b, _ = run_rounds(algorithms.build("fedavg", model, fed), data, 2)
  assert "synthesis_time_s" in outs[0].times  # the server part did run, with D = 0
  assert_close(a.params, b.params)


@pytest.mark.parametrize("mode", ["none", "dropout", "previous", "both"])
def test_self_distillation_terms_switch(mode, federation, run_rounds):
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  fedsd = algorithms.build("fedsd", model, fed, {"self_distillation": {"lambda_mutual": 1.0, "lambda_prev": 0.5,
                                                                       "mode": mode}})
  a, _ = run_rounds(fedsd, data, 1)
  b, _ = run_rounds(algorithms.build("fedavg", model, fed), data, 1)
  diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a.params, b.params)))
  assert (diff < 1e-6) if mode == "none" else (diff > 1e-5)


def test_kl_terms_vanish_when_teacher_is_student():
  z = jax.random.normal(jax.random.key(0), (5, 4))
  np.testing.assert_allclose(losses.kl_divergence(losses.tempered_softmax(z, 3.0), z, 3.0), 0.0, atol=1e-6)
  model = models.build_model("mlp", SHAPE, 3, dropout=0.0)  # both dropout views identical
  params = model.init(jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
  y = jnp.arange(6) % 3
  both = self_distillation.Settings(lambda_mutual=1.0, lambda_prev=1.0, confidence_gate=False)
  sd = self_distillation.self_distillation_loss(model, both, 2.0)
  ce = losses.cross_entropy(model.apply(params, x), y)
  np.testing.assert_allclose(sd(params, x, y, jax.random.key(3), client.ClientContext(params)), ce, rtol=1e-5,
                             atol=1e-6)
  other = model.init(jax.random.key(4))  # a different teacher makes the previous-model term positive
  assert jnp.all(sd(params, x, y, jax.random.key(3), client.ClientContext(other)) > ce)


def test_confidence_gate_by_hand():
  """With dropout 0 the two views agree, so only the previous-model term is left: CE + λ_p·T²·σ(z⁰)_y·KL."""
  model = models.build_model("mlp", SHAPE, 3, dropout=0.0)
  params, teacher = model.init(jax.random.key(1)), model.init(jax.random.key(4))
  x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
  y = jnp.arange(6) % 3
  z, z0 = model.apply(params, x), model.apply(teacher, x)
  kl = losses.kl_divergence(losses.tempered_softmax(z0, 2.0), z, 2.0)
  p_true = jax.nn.softmax(z0)[jnp.arange(6), y]
  expected = losses.cross_entropy(z, y) + 0.5 * 4.0 * p_true * kl
  weights = self_distillation.Settings(lambda_mutual=1.0, lambda_prev=0.5)
  gated = self_distillation.self_distillation_loss(model, weights, 2.0)  # the gate is on by default
  got = gated(params, x, y, jax.random.key(3), client.ClientContext(teacher))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(p_true, 1.0)  # the gate is not trivially one
  plain = self_distillation.self_distillation_loss(model, weights._replace(confidence_gate=False), 2.0)
  assert jnp.all(plain(params, x, y, jax.random.key(3), client.ClientContext(teacher)) > got)


def test_kl_by_hand():
  p = jnp.array([[0.5, 0.5]])
  z = jnp.log(jnp.array([[0.25, 0.75]]))
  expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
  np.testing.assert_allclose(losses.kl_divergence(p, z, 1.0), [expected], rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_synthesis_lowers_teacher_ce(projection):
  model = models.build_model("mlp", SHAPE, 3)
  params = model.init(jax.random.key(0))
  space = synthesis.noise_space(model, SHAPE)
  targets = synthesis.balanced_targets(12, 3)
  x, stats = synthesis.synthesize(space, params, jax.random.key(1), targets,
                                  synthesis.Settings(steps=30, lr=0.1, projection=projection))
  assert x.shape == (12, *SHAPE)
  assert float(stats.ce_final) < 0.5 * float(stats.ce_initial)
  assert float(stats.accuracy) == 1.0
  if projection:
    np.testing.assert_allclose(jnp.linalg.norm(x.reshape(12, -1), axis=1), 4.0, rtol=1e-5)  # √16


def test_synthesis_is_adam_on_the_inputs_and_stops_at_the_ce_threshold():
  model = models.build_model("mlp", SHAPE, 3)
  params = model.init(jax.random.key(0))
  space = synthesis.noise_space(model, SHAPE)
  targets = synthesis.balanced_targets(12, 3)
  x0 = jax.random.normal(jax.random.key(1), (12, *SHAPE))
  ce = lambda x: jnp.mean(losses.cross_entropy(model.apply(params, x), targets))
  opt = optax.adam(0.1)
  x, state = x0, opt.init(x0)  # the reference: 20 plain Adam steps on the inputs
  for _ in range(20):
    updates, state = opt.update(jax.grad(ce)(x), state, x)
    x = x + updates
  run = lambda init, steps, stop: synthesis.synthesize(space, params, None, targets,
                                                       synthesis.Settings(lr=0.1, stop_ce=stop), steps=steps,
                                                       init=init)
  full, stats = run(x0, 20, 0.0)
  np.testing.assert_allclose(full, x, rtol=1e-5, atol=1e-6)
  assert int(stats.steps) == 20
  # A threshold half-way: it stops at the first iterate whose CE is at or below it, one step after the last above.
  tau = 0.5 * (float(stats.ce_initial) + float(stats.ce_final))
  stopped, early = run(x0, 20, tau)
  taken = int(early.steps)
  assert 0 < taken < 20 and float(early.ce_final) <= tau
  np.testing.assert_array_equal(stopped, run(x0, taken, 0.0)[0])
  assert float(run(x0, taken - 1, 0.0)[1].ce_final) > tau
  # Under vmap each model stops on its own: a start that already fits takes no step and is left as it is.
  batched, bstats = jax.vmap(lambda init: run(init, 20, tau))(jnp.stack([full, x0]))
  assert bstats.steps.tolist() == [0, taken]
  np.testing.assert_array_equal(batched[0], full)
  np.testing.assert_allclose(batched[1], stopped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode,rows", [("client", 3), ("round", 2)])
def test_warm_start_starts_from_the_kept_noise(mode, rows, federation, run_rounds):
  """With a threshold no CE is above, synthesis takes no step, so a warm-started round's noise is exactly the
  noise it started from: what round 1 kept (its Gaussian start) for a client (`client`: one row per client) or
  a position in the round (`round`: one row per position) is unchanged after round 2."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation(3, 2)
  alg = algorithms.build("fednd", model, fed, {**SMALL, "synthesis.warm_start": mode, "synthesis.stop_ce": 1e6})
  one, outs = run_rounds(alg, data, 1)
  two, _ = run_rounds(alg, data, 1, state=one)
  seen = np.asarray(one.algorithm.seen)
  assert one.algorithm.noise.shape == (rows, 6, *SHAPE) and seen.sum() == 2
  assert float(outs[0].diagnostics["noise_steps_taken"]) == 0.0
  assert float(jnp.std(one.algorithm.noise[seen])) > 0.5  # a Gaussian start was kept
  np.testing.assert_array_equal(np.asarray(two.algorithm.noise)[seen], np.asarray(one.algorithm.noise)[seen])


def test_warm_start_round_is_client_when_every_client_takes_part(federation, run_rounds, assert_close):
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation(3, 3)
  a, _ = run_rounds(algorithms.build("fednd", model, fed, {**SMALL, "synthesis.warm_start": "round"}), data, 2)
  b, _ = run_rounds(algorithms.build("fednd", model, fed, {**SMALL, "synthesis.warm_start": "client"}), data, 2)
  c, _ = run_rounds(algorithms.build("fednd", model, fed, {**SMALL, "synthesis.warm_start": "none"}), data, 2)
  assert_close(a.params, b.params)
  assert_close(a.algorithm.noise, b.algorithm.noise)
  assert c.algorithm.noise is None  # a cold start keeps no noise; the warm one's second round started from it:
  assert float(jnp.max(jnp.abs(jax.tree.leaves(a.params)[0] - jax.tree.leaves(c.params)[0]))) > 0


def test_text_noise_lives_in_embedding_space():
  model = models.build_model("text_mean", (7,), 3, vocab_size=50)
  params = model.init(jax.random.key(0))
  space = synthesis.noise_space(model, (7,))
  assert space.shape == (7, 64)
  x, stats = synthesis.synthesize(space, params, jax.random.key(1), synthesis.balanced_targets(9, 3),
                                  synthesis.Settings(steps=30))
  assert x.shape == (9, 7, 64) and float(stats.ce_final) < 0.5 * float(stats.ce_initial)


def test_histogram_targets_follow_the_histogram():
  labels = synthesis.histogram_targets(jax.random.key(0), jnp.array([0, 30, 10]), 400)
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
  space = synthesis.noise_space(model, SHAPE)
  teachers = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
  pool = jax.random.normal(jax.random.key(1), (3, 6, *SHAPE))
  labels = jnp.tile(synthesis.balanced_targets(6, 3), (3, 1))
  return space, teachers, pool, labels


def _plan(settings: distillation.Settings):
  return distillation.Plan(jnp.float32(1.0), None, settings.steps)


def _distill(space, teachers, pool, labels, ids, settings, histograms=None):
  pooled, order = noise_pool(space, teachers, pool, labels, ids, T, histograms)
  return distillation.distill_clients(space, pooled, order, ids, jax.random.key(2), settings, T, _plan(settings))


@pytest.mark.parametrize("weighting", ["none", "class_count", "confidence"])
def test_distillation_lowers_student_teacher_kl(weighting):
  space, teachers, pool, labels = _pool_setup()
  hp = distillation.Settings(steps=15, batch=8, lr=0.01, teacher_weighting=weighting)
  hist = jnp.array([[5, 1, 0], [0, 4, 4], [2, 2, 2]])
  _, diag = _distill(space, teachers, pool, labels, jnp.array([0, 1, 2]), hp, hist)
  assert float(diag["kl_after"]) < 0.7 * float(diag["kl_before"])


def test_students_starting_kl_reuses_their_teacher_probabilities():
  # A student starts as its own upload, whose tempered softmax on the pool is already computed: kl_before from it
  # equals the forward pass it replaces.
  space, teachers, pool, labels = _pool_setup()
  hp = distillation.Settings(steps=1, batch=8)
  pooled, order = noise_pool(space, teachers, pool, labels, jnp.array([0, 1, 2]), T)
  _, diag = distillation.distill_clients(space, pooled, order, jnp.array([0, 1, 2]), jax.random.key(2), hp, T,
                                         _plan(hp))
  by_forward = []
  for j in range(3):
    targets = distillation.soft_targets(pooled.probs, pooled.owners, j, "none")
    valid = (pooled.owners != j).astype(jnp.float32)
    by_forward.append(distillation.mean_kl(space, jax.tree.map(lambda a, j=j: a[j], pooled.teachers), pooled.x,
                                           targets, valid, T))
  np.testing.assert_allclose(float(diag["kl_before"]), np.mean(by_forward), rtol=1e-5)
  assert float(diag["kl_before"]) > 0.01


def test_global_target_lowers_kl():
  space, teachers, pool, labels = _pool_setup()
  hp = distillation.Settings(steps=15, batch=8, lr=0.01, target="global")
  pooled, _ = noise_pool(space, teachers, pool, labels, jnp.array([0, 1, 2]), T)
  start = jax.tree.map(lambda a: a.mean(0), teachers)
  new, diag = distillation.distill_global(space, pooled, start, jax.random.key(2), hp, T, _plan(hp))
  assert jax.tree.leaves(new)[0].shape == jax.tree.leaves(teachers)[0].shape[1:]
  assert float(diag["kl_after"]) < 0.7 * float(diag["kl_before"])


def test_distillation_is_order_independent(assert_close):
  space, teachers, pool, labels = _pool_setup()
  hp = distillation.Settings(steps=5, batch=4, lr=0.01)
  ids = jnp.array([4, 9, 17])
  out, _ = _distill(space, teachers, pool, labels, ids, hp)
  perm = jnp.array([2, 0, 1])
  take = lambda tree: jax.tree.map(lambda a: a[perm], tree)
  out_p, _ = _distill(space, take(teachers), pool[perm], labels[perm], ids[perm], hp)
  assert_close(out_p, take(out), rtol=1e-6, atol=1e-7)


def test_distillation_never_steps_batch_norm_statistics():
  # Eval-mode students read their BatchNorm statistics; Adam must not move them (a variance could go < 0).
  model = models.build_model("cnn2", SHAPE, 3, batch_norm=True, conv_impl="im2col")
  space = synthesis.noise_space(model, SHAPE)
  x_real = 2.0 * jax.random.normal(jax.random.key(5), (16, *SHAPE)) + 1.0
  params = model.calibrate(model.init(jax.random.key(0)), x_real)
  pool = jax.random.normal(jax.random.key(1), (12, *SHAPE))
  targets = jax.nn.softmax(jax.random.normal(jax.random.key(3), (12, 3)))
  idx = jax.random.randint(jax.random.key(4), (5, 6), 0, 12)
  new = distillation.distill(space, params, pool, targets, idx, jax.random.key(6), distillation.Settings(lr=0.1),
                             2.0)
  jax.tree.map(np.testing.assert_array_equal, new["batch_stats"], params["batch_stats"])
  assert float(jnp.abs(new["params"]["Dense_0"]["bias"] - params["params"]["Dense_0"]["bias"]).max()) > 1e-3


def test_fedsnd_round_does_not_retrace_and_warm_start_keeps_noise(federation, run_rounds, traced):
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation(3, 2)
  hp = {**SMALL, "synthesis.warm_start": "client", "synthesis.projection": True}
  alg = algorithms.build("fedsnd", model, fed, hp)
  state, _ = run_rounds(alg, data, 1)
  seen_after_one = np.asarray(state.algorithm.seen)
  assert seen_after_one.sum() == 2 and state.algorithm.noise.shape == (3, 6, *SHAPE)
  state, outs = run_rounds(alg, data, 1, state=state)
  with traced() as names:  # from round 3 on, every step is one already compiled
    state, more = run_rounds(alg, data, 2, state=state)
  assert names == []
  outs += more
  kept = np.asarray(state.algorithm.noise)[np.asarray(state.algorithm.seen)]
  np.testing.assert_allclose(np.linalg.norm(kept.reshape(len(kept), 6, -1), axis=-1), 4.0, rtol=1e-4)
  out = outs[-1]
  for field in ("teacher_ce", "teacher_noise_accuracy", "noise_norm", "teacher_agreement", "kl_before",
                "kl_after"):
    assert field in out.diagnostics, field
  for field in ("synthesis_time_s", "distill_time_s", "aggregate_time_s", "server_time_s"):
    assert field in out.times, field
  assert "no_distill" in out.eval_models


def test_agreement_gate_closed_is_no_distillation(federation, run_rounds, assert_close):
  """distill_agreement at 0 never distils (agreement < 0 is impossible): FedND == FedAvg, gate logged as 0;
  at 1.01 it always distils, as distill_agreement = 1 (the default) does below full agreement."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  every_round = {**SMALL, "schedule.recheck_every": 0}  # the gate measured in every round
  closed = algorithms.build("fednd", model, fed, {**every_round, "schedule.distill_agreement": 1e-9})
  a, outs = run_rounds(closed, data, 2)
  b, _ = run_rounds(algorithms.build("fedavg", model, fed), data, 2)
  assert [float(o.diagnostics["distill_gate"]) for o in outs] == [0.0, 0.0]
  assert_close(a.params, b.params)
  opened = algorithms.build("fednd", model, fed, {**SMALL, "schedule.distill_agreement": 1.01})
  opened, outs = run_rounds(opened, data, 2)
  assert [float(o.diagnostics["distill_gate"]) for o in outs] == [1.0, 1.0]
  assert float(outs[-1].diagnostics["kl_after"]) < float(outs[-1].diagnostics["kl_before"])


def test_partial_participation_ungated_distils_every_round(federation, run_rounds, assert_close):
  """With 2 of 3 clients a round the agreement gate holds by default (a gate no agreement passes never
  distils); without gate_partial_participation every round distils, the same run as distill_agreement = 1."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation(3, 2)
  closed = algorithms.build("fednd", model, fed, {**SMALL, "schedule.distill_agreement": 1e-9,
                                                   "schedule.recheck_every": 0})
  _, outs = run_rounds(closed, data, 2)
  assert [float(o.diagnostics["distill_gate"]) for o in outs] == [0.0, 0.0]
  hp = {**SMALL, "schedule.distill_agreement": 1e-9, "schedule.gate_partial_participation": False}
  a, outs = run_rounds(algorithms.build("fednd", model, fed, hp), data, 2)
  b, _ = run_rounds(algorithms.build("fednd", model, fed, {**SMALL, "schedule.distill_agreement": 1.0}), data, 2)
  assert [float(o.diagnostics["distill_gate"]) for o in outs] == [1.0, 1.0]
  assert_close(a.params, b.params)


def test_full_server_every_round_is_the_cold_larger_server(federation, run_rounds, assert_close):
  """With full_server_below above any agreement, every round runs the full server: the same run as a cold
  (Gaussian) start at full_noise_steps / full_distill_steps, whatever the cheap server's warm start and steps."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation(3, 2)
  regime = {**SMALL, "synthesis.warm_start": "round", "synthesis.steps": 1, "distillation.steps": 1,
            "schedule": {"full_server_below": 1.01, "full_noise_steps": 4, "full_distill_steps": 3}}
  a, outs = run_rounds(algorithms.build("fedsnd", model, fed, regime), data, 3)
  cold = {**SMALL, "synthesis.warm_start": "none", "synthesis.steps": 4, "distillation.steps": 3}
  b, _ = run_rounds(algorithms.build("fedsnd", model, fed, cold), data, 3)
  assert [float(o.diagnostics["full_server"]) for o in outs] == [1.0, 1.0, 1.0]
  assert [float(o.diagnostics["noise_steps_taken"]) for o in outs] == [4.0, 4.0, 4.0]
  assert_close(a.params, b.params)


def test_full_server_follows_the_last_rounds_agreement(federation, run_rounds):
  """The first round runs the full server; every later one does exactly when the previous round's logged
  teacher agreement was below the threshold, taking full_noise_steps synthesis steps, else noise_steps."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation(3, 2)
  hp = {**SMALL, "synthesis.steps": 2,
        "schedule": {"full_server_below": 0.4, "full_noise_steps": 5, "full_distill_steps": 3}}
  _, outs = run_rounds(algorithms.build("fedsnd", model, fed, hp), data, 4)
  agreement = [float(o.diagnostics["teacher_agreement"]) for o in outs]
  full = [float(o.diagnostics["full_server"]) for o in outs]
  assert full == [1.0] + [float(a < 0.4) for a in agreement[:-1]]
  assert 0.0 in full  # both budgets ran
  assert [float(o.diagnostics["noise_steps_taken"]) for o in outs] == [5.0 if f else 2.0 for f in full]


def test_distill_rounds_and_histogram_bytes(federation, run_rounds):
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  hp = {**SMALL, "schedule.distill_rounds": 1, "distillation.teacher_weighting": "class_count"}
  _, outs = run_rounds(algorithms.build("fedsnd", model, fed, hp), data, 2)
  assert "synthesis_time_s" in outs[0].times and "synthesis_time_s" not in outs[1].times
  assert outs[0].bytes_up - outs[1].bytes_up == 3 * 3 * 4  # C clients × NC int32 counts, distilling rounds only


def test_bn_prior_pulls_noise_statistics_to_the_model():
  model = models.build_model("cnn2", (8, 8, 1), 3, batch_norm=True)
  x_real = 2.0 * jax.random.normal(jax.random.key(5), (64, 8, 8, 1)) + 1.0
  params = model.calibrate(model.init(jax.random.key(0)), x_real)  # statistics of "real" data
  space = synthesis.noise_space(model, (8, 8, 1))
  targets = synthesis.balanced_targets(16, 3)
  gap = lambda x: float(synthesis.bn_statistics_loss(space, params, x))
  plain, init = synthesis.Settings(steps=40), jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  x_plain, _ = synthesis.synthesize(space, params, None, targets, plain, init=init)
  x_prior, stats = synthesis.synthesize(space, params, None, targets, plain._replace(bn_prior=1.0), init=init)
  assert gap(x_prior) < 0.5 * gap(x_plain)
  assert float(stats.ce_final) < float(stats.ce_initial)


def test_fedsnd_with_batch_norm_and_prior_runs(federation, run_rounds):
  model = models.build_model("cnn2", SHAPE, 3, batch_norm=True)
  data, fed = federation()
  alg = algorithms.build("fednd", model, fed, {**SMALL, "synthesis.bn_prior": 0.1})
  state, outs = run_rounds(alg, data, 2)
  # Clients calibrated their statistics; the aggregate holds their average, not the initial 0/1.
  assert not np.allclose(state.params["batch_stats"]["BatchNorm_0"]["var"], 1.0)
  assert np.all(np.isfinite(jax.tree.leaves(state.params)[0]))
  assert np.isfinite(outs[-1].diagnostics["kl_after"])


@pytest.mark.parametrize("weighting", distillation.TEACHER_WEIGHTINGS)
def test_a_student_left_without_trusted_teachers_keeps_its_params(weighting):
  model = models.build_model("mlp", (4,), 3)
  space = synthesis.noise_space(model, (4,))
  params = model.init(jax.random.key(0))
  teachers = jax.tree.map(lambda x: jnp.stack([x, x + 0.1, x - 0.1]), params)
  x = jax.random.normal(jax.random.key(1), (6, 4))
  probs = teacher_probs(space, teachers, x, T)
  pool = NoisePool(teachers, x, jnp.tile(jnp.arange(3), 2), jnp.repeat(jnp.arange(3), 2), probs,
                   jnp.array([[3, 0, 1], [0, 2, 2], [1, 1, 1]]), trusted=jnp.array([True, False, False]))
  hp = distillation.Settings(steps=2, batch=4, teacher_weighting=weighting)
  new, before, after, right = distillation.distill_one(space, pool, 0, params, jax.random.key(2), hp, T, _plan(hp))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, params)  # the only trusted teacher: itself
  assert all(np.isfinite(float(v)) for v in (before, after, right))


@pytest.mark.parametrize("consensus", [False, True])
def test_a_dropped_clients_upload_reaches_no_teacher(consensus, federation):
  """Under a deadline a dropped client uploads the model it received: FedSND's server leaves it out as teacher,
  owner of noise and from noise consensus, so whatever that upload holds, the round's result is the same (an
  attack stands in for the upload's contents here)."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  slow = systems.Profiles(jnp.array([0.01, 100.0, 0.01]), jnp.full(3, 1e9), jnp.full(3, 1e9))  # client 1 drops

  def round_with(scale):
    def replace(params, ids, received, key):
      del received, key
      held = lambda a: jnp.sin(scale * jnp.arange(a.size)).reshape(a.shape)  # a model of its own
      return jax.tree.map(lambda a: a.at[1].set(held(a[1])), params)
    hp = {**SMALL, "schedule.distill_agreement": 1.01, "consensus.enabled": consensus}  # the gate always open
    alg = algorithms.build("fedsnd", model, fed, hp,
                           mechanisms=MechanismParts(clock=systems.Clock(slow, 5.0), attack=replace))
    return alg.apply(alg.init(jax.random.key(0)), data)

  (a, out), (b, other) = round_with(1.0), round_with(-3.0)
  assert out.diagnostics["dropped_clients"] == 1 and float(out.diagnostics["distill_gate"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  if consensus:  # the others' scores do not see the dropped upload's noise
    np.testing.assert_array_equal(out.diagnostics["consensus_scores"], other.diagnostics["consensus_scores"])


def test_a_dropped_client_keeps_its_warm_start_noise(federation):
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  slow = systems.Profiles(jnp.array([0.01, 100.0, 0.01]), jnp.full(3, 1e9), jnp.full(3, 1e9))  # client 1 drops
  alg = algorithms.build("fedsnd", model, fed, {**SMALL, "synthesis.warm_start": "client"},
                         mechanisms=MechanismParts(clock=systems.Clock(slow, 5.0)))
  state, out = alg.apply(alg.init(jax.random.key(0)), data)
  assert out.diagnostics["dropped_clients"] == 1
  assert state.algorithm.seen.tolist() == [True, False, True]  # its row: no noise of a model it did not train
  assert not np.any(np.asarray(state.algorithm.noise[1])) and np.any(np.asarray(state.algorithm.noise[0]))


@pytest.mark.parametrize("agreement", [1e-9, 1.01])
def test_recheck_every_skips_only_the_server_work_of_closed_rounds(agreement, federation, run_rounds):
  """With the gate always closed, rounds between rechecks only aggregate and the model is the one of every round
  synthesising (a closed gate distils nothing); always open, every round synthesises as without the lever."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  hp = {**SMALL, "schedule.distill_agreement": agreement}
  every, _ = run_rounds(algorithms.build("fedsnd", model, fed, {**hp, "schedule.recheck_every": 0}), data, 4)
  skipping, outs = run_rounds(algorithms.build("fedsnd", model, fed, {**hp, "schedule.recheck_every": 3}), data, 4)
  jax.tree.map(np.testing.assert_array_equal, skipping.params, every.params)
  synthesised = ["synthesis_time_s" in o.times for o in outs]
  assert synthesised == ([True, False, False, True] if agreement < 1 else [True] * 4)


def test_recheck_every_under_noise_consensus_synthesises_every_round_and_distils_on_rechecks(federation,
                                                                                            run_rounds):
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  hp = {**SMALL, "consensus.enabled": True, "schedule.distill_agreement": 1e-9, "schedule.recheck_every": 3,
        "synthesis.warm_start": "client"}
  alg = algorithms.build("fedsnd", model, fed, hp)
  first, outs = run_rounds(alg, data, 1)
  _, more = run_rounds(alg, data, 3, state=first)
  assert ["synthesis_time_s" in o.times for o in outs + more] == [True] * 4
  assert ["distill_time_s" in o.times for o in outs + more] == [True, False, False, True]
  second, _ = run_rounds(alg, data, 1, state=first)  # a round between rechecks keeps the noise it made
  assert not np.array_equal(np.asarray(second.algorithm.noise), np.asarray(first.algorithm.noise))


@pytest.mark.parametrize("variant", [{}, {"distillation.target": "global", "schedule.full_server_below": 0.5}])
def test_recheck_every_vectorised_equals_runs_alone_when_their_gates_differ(variant, federation, run_rounds):
  """Two runs vectorised whose first gates differ: in round 1 one run measures the gate and the other does not
  distil; each run ends as it does alone (its model, kept noise, agreement and gate), and the one that did not
  measure logs NaN there."""
  model = models.build_model("mlp", SHAPE, 3)
  data, fed = federation()
  hp = {**SMALL, **variant, "synthesis.warm_start": "client", "schedule.distill_agreement": 1.01,
        "schedule.recheck_every": 0}
  measuring = algorithms.build("fedsnd", model, fed, hp)
  first = [run_rounds(measuring, data, 1, seed=s)[1][0] for s in (0, 1)]
  agreements = [float(o.diagnostics["teacher_agreement"]) for o in first]
  assert agreements[0] != agreements[1]
  hp = {**hp, "schedule.distill_agreement": float(np.mean(agreements)), "schedule.recheck_every": 2}
  one = algorithms.build("fedsnd", model, fed, hp)
  alone = [run_rounds(one, data, 2, seed=s) for s in (0, 1)]
  skips = int(np.argmax(agreements))  # its gate closed in round 0
  assert ["distill_time_s" in o.times for o in alone[skips][1]] == [True, False]
  assert ["distill_time_s" in o.times for o in alone[1 - skips][1]] == [True, True]
  vectorised = algorithms.build("fedsnd", model, fed, hp, runs=2)
  state, outs = vectorised.init(jnp.stack([jax.random.key(0), jax.random.key(1)])), []
  stacked = federated_data.stack([data, data])
  for _ in range(2):
    state, out = vectorised.apply(state, stacked)
    outs.append(out)
  for run in (0, 1):  # (vmap's float32 sums drift apart over the full server's 50 synthesis steps)
    chex.assert_trees_all_close(jax.tree.map(lambda x, run=run: x[run], (state.params, state.algorithm)),
                                (alone[run][0].params, alone[run][0].algorithm), rtol=1e-4, atol=1e-5)
  assert np.isnan(outs[1].diagnostics["teacher_agreement"][skips])
  assert not np.isnan(outs[1].diagnostics["teacher_agreement"][1 - skips])
