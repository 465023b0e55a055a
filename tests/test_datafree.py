"""The data-free distillation peers FedGen and FedFTG: FedAvg with their terms off, their weightings and losses
by hand, and their server state's schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsnd_jax import algorithms, client, generators, losses, models
from fedsnd_jax.algorithms import fedftg, fedgen
from fedsnd_jax.errors import InputError


def _mlp(tiny, **options):
  return models.build_model("mlp", tiny.shape, 3, **options)


@pytest.mark.parametrize("name, hp", [("fedgen", dict(generative_alpha=0.0, generative_beta=0.0)),
                                      ("fedftg", dict(iterations=0))])
def test_switched_off_peer_is_fedavg(name, hp, tiny, federation, run_rounds, assert_close):
  data, fed = federation()
  model = _mlp(tiny)
  state, outputs = run_rounds(algorithms.build(name, model, fed, hp), data, 2)
  assert_close(state.params, run_rounds(algorithms.build("fedavg", model, fed), data, 2)[0].params)
  fedavg_bytes = run_rounds(algorithms.build("fedavg", model, fed), data, 1)[1][0].bytes_up
  assert outputs[-1].bytes_up == fedavg_bytes + 3 * 3 * 4  # C clients' label counts (NC int32 each)


@pytest.mark.parametrize("name", ["fedgen", "fedftg"])
def test_switched_on_peer_differs_from_fedavg(name, tiny, federation, run_rounds):
  data, fed = federation()
  model = _mlp(tiny)
  a = run_rounds(algorithms.build(name, model, fed), data, 2)[0].params
  b = run_rounds(algorithms.build("fedavg", model, fed), data, 2)[0].params
  gaps = [float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  assert max(gaps) > 1e-5


def test_classify_is_the_last_layer_on_the_representation(tiny):
  cases = ((_mlp(tiny), tiny.shape), (models.build_model("cnn2", (28, 28, 1), 3, batch_norm=True), (28, 28, 1)))
  for model, shape in cases:
    params, x = model.init(jax.random.key(0)), jax.random.normal(jax.random.key(1), (5, *shape))
    np.testing.assert_allclose(model.classify(params, model.represent(params, x)), model.apply(params, x),
                               rtol=1e-5, atol=1e-5)
  assert _mlp(tiny, projection_dim=4).classify is None


def test_fedgen_refuses_a_model_without_a_separate_classifier(tiny, federation):
  _, fed = federation()
  with pytest.raises(InputError, match="model"):
    algorithms.build("fedgen", _mlp(tiny, projection_dim=4), fed)


def test_fedgen_label_weights_and_teacher_loss_by_hand():
  histograms = jnp.array([[2, 0, 1], [0, 0, 3]])
  weights, qualified = fedgen.label_weights(histograms)
  np.testing.assert_allclose(weights, [[3 / 4, 1 / 2, 2 / 6], [1 / 4, 1 / 2, 4 / 6]], rtol=1e-6)
  np.testing.assert_array_equal(qualified, [True, False, True])
  logits = jnp.array([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # [C=2, B=2, 3]
  labels = jnp.array([0, 2])
  ce = lambda z, y: -np.log(np.exp(z[y]) / np.exp(z).sum())
  expected = sum(np.mean([np.asarray(weights)[k, labels[i]] * ce(np.asarray(logits[k, i]), int(labels[i]))
                          for i in range(2)]) for k in range(2))
  np.testing.assert_allclose(fedgen.teacher_loss(logits, labels, weights), expected, rtol=1e-6)


def test_fedgen_client_weights_follow_the_schedule_and_the_generator_learns(tiny, federation, run_rounds):
  data, fed = federation()
  alg = algorithms.build("fedgen", _mlp(tiny), fed)
  start = alg.init(jax.random.key(0))
  assert float(start.algorithm.alpha) == 0.0  # no client regularisation before the first generator
  state, _ = run_rounds(alg, data, 2)
  np.testing.assert_allclose([state.algorithm.alpha, state.algorithm.beta], [0.98**2] * 2, rtol=1e-6)
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.algorithm.generator),
                                                        jax.tree.leaves(start.algorithm.generator), strict=True)]
  assert max(moved) > 1e-4


def _trained_generator(generator, steps=20, classes=10):
  """A generator whose running averages have seen mixed-label batches (as the server's training leaves them)."""
  variables = generator.init(jax.random.key(0))
  for i in range(steps):
    labels = jax.random.randint(jax.random.key(i), (32,), 0, classes)
    _, variables = generator.apply(variables, generator.noise(jax.random.key(100 + i), 32), labels, True)
  return variables


def test_generator_in_eval_mode_keeps_the_label_of_a_one_class_batch():
  # A client batch of one class: in train mode BatchNorm removes the (constant) one-hot, so G(ε, 3) = G(ε, 7);
  # in eval mode the running averages keep it.
  generator = generators.conditional_mlp(10, (8,), noise_dim=4, hidden=(16,))
  variables = _trained_generator(generator)
  eps = generator.noise(jax.random.key(1), 16)
  three, seven = jnp.full((16,), 3), jnp.full((16,), 7)
  train = lambda y: generator.apply(variables, eps, y, True)[0]
  evaluate = lambda y: generator.apply(variables, eps, y, False)[0]
  assert float(jnp.abs(train(three) - train(seven)).max()) < 1e-4
  assert float(jnp.abs(evaluate(three) - evaluate(seven)).max()) > 1e-2
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), variables["batch_stats"],
                       generator.init(jax.random.key(0))["batch_stats"])
  assert max(jax.tree.leaves(moved)) > 1e-3  # train mode updated the running averages


def test_fedgen_clients_see_the_label_on_a_one_class_batch(tiny):
  # β's term alone: KL(σ(h(G(ε, y))) ‖ σ(f(x))) on a batch of one label must depend on that label.
  model = _mlp(tiny)
  params = model.init(jax.random.key(0))
  features = jax.eval_shape(lambda: model.represent(params, jnp.zeros((1, *tiny.shape)))).shape[1:]
  generator = generators.conditional_mlp(3, features, noise_dim=32, hidden=(256,))
  shared = fedgen.FedGenState(_trained_generator(generator, classes=3), None, jnp.float32(0.0), jnp.float32(1.0))
  loss = fedgen.client_loss(model, generator, 3)
  x = jax.random.normal(jax.random.key(3), (8, *tiny.shape))
  ctx = client.ClientContext(params, shared)

  def latent(label):
    y = jnp.full((8,), label)
    ce = losses.cross_entropy(model.apply(params, x, train=True, rng=jax.random.key(4)), y)
    return loss(params, x, y, jax.random.key(4), ctx) - ce

  assert float(jnp.abs(latent(0) - latent(2)).max()) > 1e-4


def test_fedftg_class_ensemble_and_hard_samples_by_hand():
  logits = jnp.array([[[1.0, 0.0], [0.0, 3.0]], [[0.0, 2.0], [0.0, 1.0]]])  # [C=2, B=2, NC=2]
  histograms = jnp.array([[3, 0], [1, 0]])  # nobody holds class 1: its samples average the teachers
  labels = jnp.array([0, 1])
  ensemble = fedftg.class_ensemble(logits, labels, histograms)
  np.testing.assert_allclose(ensemble, [[0.75, 0.5], [0.0, 2.0]], rtol=1e-6)
  student = jnp.array([[1.0, 0.0], [1.0, 0.0]])  # agrees with the ensemble on sample 0 only
  hard, agree = fedftg.hard_sample_kl(ensemble, student, 1.0)
  np.testing.assert_array_equal(agree, [1.0, 0.0])
  p = np.exp([0.75, 0.5]) / np.exp([0.75, 0.5]).sum()
  q = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
  np.testing.assert_allclose(hard, [np.sum(p * np.log(p / q)), 0.0], rtol=1e-5)


def test_fedftg_fine_tuning_moves_the_global_model_towards_the_ensemble(tiny, federation, run_rounds):
  data, fed = federation()
  _, outputs = run_rounds(algorithms.build("fedftg", _mlp(tiny), fed), data, 2)
  for out in outputs:
    assert out.diagnostics["kl_after"] < out.diagnostics["kl_before"]
    assert "no_distill" in out.eval_models


def test_diversity_loss_by_hand():
  eps = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  out = jnp.array([[0.0, 2.0, 4.0], [1.0, 2.0, 1.0]])
  # Pairs (0, 1) and (1, 0): d_eps = 1, d_out = (1 + 0 + 3)/3; the diagonal pairs are 0.
  np.testing.assert_allclose(generators.diversity_loss(eps, out), np.exp(-(2 * 4 / 3) / 4), rtol=1e-6)
