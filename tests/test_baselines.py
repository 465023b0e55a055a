"""Each baseline's pinning identity on tiny shapes (FedAvg equivalences, hand-computed losses and controls)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsnd_jax import algorithms, client, models, rounds, sampling, tree_math
from fedsnd_jax.algorithms import feddyn, fednova, fedntd, moon, scaffold

LR = 0.05


def _model(tiny, name, hp=None):
  return models.build_model("mlp", tiny.shape, 3, **algorithms.model_options(name, algorithms.hyperparameters(
      name, hp)))


@pytest.mark.parametrize("name, hp", [("fedprox", dict(mu=0.0)), ("moon", dict(mu=0.0)),
                                      ("feddyn", dict(alpha=0.0)), ("fedntd", dict(beta=0.0))])
def test_switched_off_baseline_is_fedavg(name, hp, tiny, federation, run_rounds, assert_close):
  data, fed = federation()
  model = _model(tiny, name, hp)  # MOON's network for both, so only the loss differs
  assert_close(run_rounds(algorithms.build(name, model, fed, hp), data, 2)[0].params,
               run_rounds(algorithms.build("fedavg", model, fed), data, 2)[0].params)


@pytest.mark.parametrize("name, hp", [("fedprox", dict(mu=1.0)), ("moon", dict(mu=1.0)),
                                      ("feddyn", dict(alpha=0.1)), ("fedntd", dict(beta=1.0))])
def test_switched_on_baseline_differs(name, hp, tiny, federation, run_rounds):
  data, fed = federation()
  model = _model(tiny, name, hp)
  a = run_rounds(algorithms.build(name, model, fed, hp), data, 2)[0].params
  b = run_rounds(algorithms.build("fedavg", model, fed), data, 2)[0].params
  gaps = [float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  assert max(gaps) > 1e-5


def test_scaffold_first_round_is_fedavg_and_controls_follow_option_two(tiny, federation, run_rounds, assert_close):
  data, fed = federation(lr=LR, momentum=0.0)  # plain SGD, the paper's client
  model = models.build_model("mlp", tiny.shape, 3)
  alg = algorithms.build("scaffold", model, fed)
  state0 = alg.init(jax.random.key(0))
  state1, _ = alg.apply(state0, data)
  assert_close(state1.params, run_rounds(algorithms.build("fedavg", model, fed), data, 1)[0].params)
  # From zero controls, option II gives c_i = (w_g − w_i) / (K_i η), so w_i = w_g − K_i η c_i, and the
  # aggregate is Σ n_i/N · w_i; the server control is (|S|/N)·mean_i c_i with all 3 of 3 clients sampled.
  counts = np.asarray(data.counts)
  steps = -(-counts // 4)
  ci = state1.algorithm.c_clients
  uploads = jax.tree.map(lambda wg, c: wg[None] - (steps * LR).reshape((-1,) + (1,) * wg.ndim) * c,
                         state0.params, ci)
  weights = counts / counts.sum()
  assert_close(jax.tree.map(lambda u: np.tensordot(weights, u, axes=1), uploads), state1.params)
  assert_close(state1.algorithm.c, jax.tree.map(lambda c: c.mean(0), ci))
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ci)) > 0


def test_scaffold_control_recovers_a_constant_gradient_under_momentum():
  # A loss linear in w has the constant gradient g; 6 steps of SGD with heavy-ball momentum 0.9 from zero
  # move w by lr·g·[K − β(1 − β^K)/(1 − β)]/(1 − β). Option II must read g back: c_i⁺ = (w − y_i)/displacement.
  lr, beta, k = 0.05, 0.9, 6
  g = {"w": jnp.array([0.3, -1.2, 2.0]), "b": jnp.array([0.7])}
  opt = optax.sgd(lr, momentum=beta)
  y = jax.tree.map(jnp.zeros_like, g)
  opt_state = opt.init(y)
  for _ in range(k):
    updates, opt_state = opt.update(g, opt_state, y)
    y = optax.apply_updates(y, updates)
  zeros = jax.tree.map(jnp.zeros_like, g)
  displacement = client.local_displacement(jnp.array([k]), lr, beta)
  c_new = scaffold.control_update(zeros, jax.tree.map(lambda a: a[None], zeros), zeros,
                                  jax.tree.map(lambda a: a[None], y), displacement)
  jax.tree.map(lambda c, gg: np.testing.assert_allclose(c[0], gg, rtol=1e-5), c_new, g)


def test_scaffold_divides_by_each_clients_own_momentum_displacement(tiny, federation, assert_close):
  data, fed = federation(lr=LR, momentum=0.9)
  model = models.build_model("mlp", tiny.shape, 3)
  alg = algorithms.build("scaffold", model, fed)
  state0 = alg.init(jax.random.key(0))
  state1, _ = alg.apply(state0, data)
  steps = -(-np.asarray(data.counts) // 4)  # clients of different sizes take different numbers of steps
  assert len(set(steps.tolist())) > 1
  displacement = lr_k = LR * (steps - 0.9 * (1 - 0.9**steps) / 0.1) / 0.1
  assert not np.allclose(lr_k, LR * steps / 0.1)  # not K·lr/(1 − β), momentum's steady state
  # w_i = w_g − displacement_i · c_i from zero controls; the first round's aggregate is Σ n_i/N · w_i.
  uploads = jax.tree.map(lambda wg, c: wg[None] - displacement.reshape((-1,) + (1,) * wg.ndim) * c,
                         state0.params, state1.algorithm.c_clients)
  weights = np.asarray(data.counts) / np.asarray(data.counts).sum()
  assert_close(jax.tree.map(lambda u: np.tensordot(weights, u, axes=1), uploads), state1.params, rtol=1e-4,
               atol=1e-5)


def test_moon_contrastive_by_hand():
  z = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  zg = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  zp = jnp.array([[0.0, 1.0], [0.0, 1.0]])
  tau = 0.5
  # Example 1: cos(z, zg) = 1, cos(z, zp) = 0. Example 2: cos = 1/√2 and 1.
  expected = [-np.log(np.exp(1 / tau) / (np.exp(1 / tau) + np.exp(0.0))),
              -np.log(np.exp(2 ** -0.5 / tau) / (np.exp(2 ** -0.5 / tau) + np.exp(1 / tau)))]
  np.testing.assert_allclose(moon.contrastive(z, zg, zp, tau), expected, rtol=1e-6)


@pytest.mark.parametrize("on_projection", [True, False])
def test_moon_network_puts_the_classifier_on_the_projection_head(tiny, on_projection):
  model = models.build_model("mlp", tiny.shape, 3, projection_dim=8, classifier_on_projection=on_projection)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (5, *tiny.shape))
  bumped = {**params, "proj_out": {**params["proj_out"], "bias": params["proj_out"]["bias"] + 1.0}}
  moved = float(jnp.abs(model.apply(bumped, x) - model.apply(params, x)).max())
  assert (moved > 1e-3) if on_projection else (moved == 0.0)  # logits read the head's output, or not at all
  assert model.represent(params, x).shape == (5, 8)
  assert algorithms.hyperparameters("moon").classifier_on_projection  # MOON's own network is the default


def test_not_true_distribution_excludes_true_class():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 2])
  q = fedntd.not_true_probs(logits, labels, 1.0)
  np.testing.assert_allclose(q[0], [0.0, np.e / (np.e + 1), 1 / (np.e + 1)], rtol=1e-6)
  np.testing.assert_allclose(q[1], [0.5, 0.5, 0.0], rtol=1e-6)


def test_per_client_state_is_gathered_and_scattered_by_id(tiny, federation):
  data, fed = federation(3, 1)
  alg = algorithms.build("moon", _model(tiny, "moon"), fed, dict(mu=1.0))
  state = alg.init(jax.random.key(0))
  before = jax.tree.leaves(state.algorithm.previous)[0]
  state, _ = alg.apply(state, data)
  after = jax.tree.leaves(state.algorithm.previous)[0]
  changed = [k for k in range(3) if not np.allclose(before[k], after[k])]
  ids, _, _ = sampling.round_keys(alg.init(jax.random.key(0)).rng, 0, 3, 1)
  assert changed == [int(ids[0])]


def test_feddyn_correction_leaves_batch_norm_statistics_averaged(tiny, federation):
  _, fed = federation()
  model = models.build_model("cnn2", tiny.shape, 3, batch_norm=True, conv_impl="im2col")
  parts = feddyn.build(model, feddyn.Hyperparameters(alpha=0.1), fed)
  params = model.init(jax.random.key(0))
  state = parts.init_state(params)
  uploads = jax.tree.map(lambda a: jnp.stack([a + 1.0, a + 1.0]), params)  # every update is +1
  ids = jnp.array([0, 2])
  context = rounds.RoundContext(jnp.int32(0), params, state, ids, tree_math.gather(state.grads, ids),
                                   client.ClientOutput(uploads, jnp.array([5, 5]), jnp.zeros(2)),
                                   jnp.array([2, 2]), jax.random.key(0), None)
  average = jax.tree.map(lambda a: a[0], uploads)
  carry = rounds.ServerCarry(uploads, jnp.array([5, 5]), average, state, None, None, {})
  out = parts.after_aggregation(context, carry)
  # h = −α·Σ_k (w_k − w_g)/K = −0.1·2/3, so the weights move by −h/α = +2/3; statistics stay averaged.
  bias = lambda p: p["params"]["Dense_0"]["bias"]
  np.testing.assert_allclose(bias(out.average), bias(average) + 2 / 3, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, out.average["batch_stats"], average["batch_stats"])


def test_fednova_with_equal_local_work_is_fedavg(tiny, federation, run_rounds, assert_close):
  data, fed = federation(local_steps=3)  # every client takes 3 steps: every scale τ_eff / a_k is 1
  model = models.build_model("mlp", tiny.shape, 3)
  assert_close(run_rounds(algorithms.build("fednova", model, fed), data, 2)[0].params,
               run_rounds(algorithms.build("fedavg", model, fed), data, 2)[0].params)


def test_fednova_normalises_unequal_local_work_by_hand():
  # Two clients of equal weight from w = 0 without momentum: w_1 = 1 after 1 step, w_2 = 2 after 4 steps.
  # τ_eff = (1 + 4)/2 = 2.5; Σ p_k (w − w_k)/a_k = (−1/1 − 2/4)/2 = −0.75; w ← 0 + 2.5 · 0.75 = 1.875
  # (FedAvg: 1.5).
  fed = rounds.Federation(2, 2, rounds.LocalSchedule(), 0.1, 0.0, 0.0, (1,), 2)
  parts = fednova.build(None, fednova.Hyperparameters(), fed)
  normalise = parts.server_steps(0, None)[0].fn
  params = {"w": jnp.zeros(())}
  context = rounds.RoundContext(jnp.zeros((), jnp.int32), params, None, jnp.arange(2), None, None,
                                jnp.array([1, 4]), None, None)
  carry = rounds.ServerCarry({"w": jnp.array([1.0, 2.0])}, jnp.array([5.0, 5.0]), None, None, None, None, {})
  carry, diagnostics = normalise(context, carry)
  np.testing.assert_allclose(float(diagnostics["fednova_tau_eff"]), 2.5)
  np.testing.assert_allclose(float(jnp.mean(carry.models["w"])), 1.875, rtol=1e-6)


def test_fednova_local_work_follows_momentum(tiny, federation):
  # Under momentum ρ a_k = Σ_t (1 − ρ^t)/(1 − ρ): for ρ = 0.5, τ = 3 that is 1 + 1.5 + 1.75 = 4.25.
  np.testing.assert_allclose(client.local_displacement(jnp.array([3]), 1.0, 0.5), [4.25], rtol=1e-6)
  data, fed = federation(momentum=0.9)
  steps = -(-np.asarray(data.counts) // 4)
  assert len(set(steps.tolist())) > 1  # the tiny federation's clients take unequal steps under local_epochs
  model = models.build_model("mlp", tiny.shape, 3)
  run = algorithms.build("fednova", model, fed)
  state0 = run.init(jax.random.key(0))
  state1, out = run.apply(state0, data)
  weights = np.asarray(data.counts) / np.asarray(data.counts).sum()
  work = np.asarray(client.local_displacement(jnp.asarray(steps), 1.0, 0.9))
  np.testing.assert_allclose(out.diagnostics["fednova_tau_eff"], float(np.sum(weights * work)), rtol=1e-5)
  fedavg = algorithms.build("fedavg", model, fed).apply(state0, data)[0]
  gaps = [float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(state1.params),
                                                      jax.tree.leaves(fedavg.params), strict=True)]
  assert max(gaps) > 1e-5  # unequal work: not FedAvg
