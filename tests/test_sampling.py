"""Poisson client sampling: the cohort by hand, the empty client's padding changes nothing, the aggregators
leave weight-0 uploads out, and the Poisson accounting is dp-accounting's (RDP and PLD)."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configuration
from experiments.configs import tiny as tiny_config
from fedsnd_jax import aggregation, algorithms, driver, models, privacy, sampling
from fedsnd_jax.errors import InputError


def test_cohort_cap_by_the_binomial_tail():
  cap, overflow = sampling.cohort_cap(100, 10)
  assert sampling.binomial_tail(100, 0.1, cap) == overflow <= sampling.COHORT_OVERFLOW
  assert sampling.binomial_tail(100, 0.1, cap - 1) > sampling.COHORT_OVERFLOW  # the smallest such cap
  # P[Binomial(3, 1/2) > 1] = (3 + 1)/8 by hand.
  assert sampling.binomial_tail(3, 0.5, 1) == pytest.approx(0.5, rel=1e-12)
  assert sampling.cohort_cap(20, 20) == (20, 0.0)


def test_poisson_cohort_by_hand():
  rng, k, c = jax.random.key(3), 10, 3
  cap = sampling.cohort_cap(k, c)[0]
  for r in range(5):
    ids, keys, _ = sampling.round_keys(rng, r, k, c, cap)
    sample_key = jax.random.split(jax.random.fold_in(rng, r), 3)[0]
    sampled = np.flatnonzero(np.asarray(jax.random.uniform(sample_key, (k,))) < c / k)
    np.testing.assert_array_equal(ids, np.concatenate([sampled, np.full(cap - len(sampled), k)]))
    assert keys.shape == (cap,)


def test_poisson_with_everyone_in_is_full_participation(tiny, federation, run_rounds, assert_close):
  data, fed = federation()  # 3 of 3: q = 1
  model = models.build_model("mlp", tiny.shape, 3)
  assert_close(run_rounds(algorithms.build("fedavg", model, fed._replace(sampling="poisson")), data, 2)[0].params,
               run_rounds(algorithms.build("fedavg", model, fed), data, 2)[0].params)


def test_poisson_round_is_fedavg_over_the_sampled_clients_only(tiny, federation, assert_close):
  data, fed = federation(3, 1)  # q = 1/3, cap 3: a round pads with the empty client
  model = models.build_model("mlp", tiny.shape, 3)
  alg = algorithms.build("fedavg", model, fed._replace(sampling="poisson"))
  state = alg.init(jax.random.key(0))
  phase = driver.make_client_phase(model, algorithms.get("fedavg").build(model, None, fed).client_loss,
                                   fed, fed.schedule.num_steps(data.max_count), "vmap", 8)
  partial = 0
  for _ in range(6):
    ids, keys, _ = sampling.round_keys(state.rng, state.round, 3, 1, 3)
    valid = np.asarray(ids) < 3
    new, out = alg.apply(state, data)
    assert out.diagnostics["cohort_size"] == valid.sum()
    if 0 < valid.sum() < 3:
      partial += 1
      limits = fed.schedule.steps_taken(data.counts[ids[valid]])
      uploads = phase((state.params, None, data), (ids[valid], keys[valid], None, limits))
      assert_close(new.params, aggregation.weighted_average(uploads.params, uploads.num_examples))
    elif valid.sum() == 0:
      assert_close(new.params, state.params)  # an empty round leaves the model as it was
    state = new
  assert partial >= 2


def test_poisson_refuses_algorithms_that_would_see_the_empty_client(tiny, federation):
  _, fed = federation(3, 1)
  with pytest.raises(InputError, match="client_sampling"):
    algorithms.build("scaffold", models.build_model("mlp", tiny.shape, 3), fed._replace(sampling="poisson"))


def test_aggregators_leave_weight_zero_uploads_out():
  reference = {"w": jnp.array([1.0, 1.0])}
  stacked = {"w": jnp.array([[4.0, 5.0], [100.0, -100.0]])}  # the second is the empty client's (garbage)
  key = jax.random.key(0)
  out = aggregation.weighted_mean().apply(stacked, jnp.array([2, 0]), None, reference, key)
  np.testing.assert_allclose(out.params["w"], [4.0, 5.0])
  out = aggregation.unweighted_mean().apply(stacked, jnp.array([2, 0]), None, reference, key)
  np.testing.assert_allclose(out.params["w"], [4.0, 5.0])
  out = aggregation.weighted_mean().apply(stacked, jnp.array([0, 0]), None, reference, key)
  np.testing.assert_allclose(out.params["w"], [1.0, 1.0])  # nobody sampled: the reference
  # Central DP, σ = 0: reference + clip(Δ, 1)/C with C = 2 expected clients; Δ = (3, 4) clips to (0.6, 0.8).
  dp = privacy.central_dp(1.0, 0.0, expected_clients=2)
  out = dp.apply(stacked, jnp.array([2, 0]), dp.init(reference), reference, key)
  np.testing.assert_allclose(out.params["w"], [1.3, 1.4], rtol=1e-6)
  assert float(out.diagnostics["dp_clipped_fraction"]) == 1.0


def test_poisson_accounting_charges_the_cohort_cap_as_one_plus_e_to_the_epsilon():
  # The capped run differs from the Poisson one with probability ≤ T·p, on either neighbour: it is
  # (ε, δ_M(ε) + (1 + e^ε)·T·p)-DP. The reported ε must keep that total within δ.
  overflow = sampling.cohort_cap(100, 10)[1]
  event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0))
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  for kind, reference in (("rdp", dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)),
                          ("pld", dp_accounting.pld.PLDAccountant(neighboring_relation=relation))):
    reference.compose(event, 30)
    ours = privacy.Accountant(100, 10, 1.0, 1e-5, sampling="poisson", kind=kind).epsilon(30)
    assert reference.get_delta(ours) + (1 + math.exp(ours)) * 30 * overflow <= 1e-5
    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-4)  # p ≈ 10⁻¹⁵ costs next to nothing
  rdp = privacy.Accountant(100, 10, 1.0, 1e-5, sampling="poisson").epsilon(30)
  assert privacy.Accountant(100, 10, 1.0, 1e-5, sampling="poisson", kind="pld").epsilon(30) < rdp  # tighter
  with pytest.raises(ValueError, match="PLD"):
    privacy.Accountant(100, 10, 1.0, 1e-5, kind="pld")  # sampling without replacement


def test_the_private_benchmarks_epsilon_holds_with_its_cohort_cap():
  # benchmarks/configs/fmnist_dp.py: 3,000 clients, 600 a round (Poisson), 30 rounds, σ = 1, PLD, δ = 10⁻⁵.
  # A cap that overflows with p ≈ 8·10⁻¹⁰ a round would not hold: its (1 + e^ε)·T·p term alone is 6.8·10⁻⁵ > δ.
  k, c, rounds, delta = 3000, 600, 30, 1e-5
  overflow = sampling.cohort_cap(k, c)[1]
  eps = privacy.Accountant(k, c, 1.0, delta, sampling="poisson", kind="pld").epsilon(rounds)
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  reference = dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
  reference.compose(dp_accounting.PoissonSampledDpEvent(c / k, dp_accounting.GaussianDpEvent(1.0)), rounds)
  assert reference.get_delta(eps) + (1 + math.exp(eps)) * rounds * overflow <= delta


def test_capped_epsilon_is_the_smallest_that_holds():
  # A large overflow chance, where the (1 + e^ε) factor binds: the search lands on the boundary.
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  reference = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  reference.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 30)
  failure = 1e-8
  eps = privacy._capped_epsilon(reference, 1e-5, failure)
  total = lambda e: reference.get_delta(e) + (1 + math.exp(e)) * failure
  assert total(eps) <= 1e-5 < total(0.999 * eps)
  assert eps > reference.get_epsilon(1e-5 - failure)  # charging T·p alone under-reports
  assert privacy._capped_epsilon(reference, 1e-5, 1e-5) == math.inf  # the overflow alone spends δ


def test_config_checks_poisson_and_pld():
  c = tiny_config.get_config()
  c.dp.clip_norm, c.dp.accountant = 1.0, "pld"
  with pytest.raises(InputError, match="^dp.accountant: "):
    configuration.validate(c)
  c.client_sampling = "poisson"
  configuration.validate(c)
  c.robust.rule = "median"
  c.dp.clip_norm = 0.0
  with pytest.raises(InputError, match="^client_sampling: "):
    configuration.validate(c)
