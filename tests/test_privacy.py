"""Client-level differential privacy: clipping and noise checked by hand, accounting against dp-accounting."""

import json
import re

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configuration, train_lib
from experiments.configs import tiny as tiny_config
from fedsnd_jax import aggregation, algorithms, models, privacy
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import MechanismParts


def _models(*updates):
  """Stacked [C] pytrees reference + update_k, reference = {"w": [1, 1], "b": [0]}."""
  reference = {"w": jnp.array([1.0, 1.0]), "b": jnp.array([0.0])}
  stacked = {"w": jnp.stack([reference["w"] + jnp.array(u[:2]) for u in updates]),
             "b": jnp.stack([reference["b"] + jnp.array(u[2:]) for u in updates])}
  return reference, stacked


def test_clipping_by_hand():
  reference, stacked = _models([3.0, 0.0, 4.0], [0.3, 0.0, 0.4])  # norms 5 (clipped) and 0.5 (kept)
  clipped, norms = privacy.clip(jax.tree.map(lambda m, r: m - r[None], stacked, reference), 1.0)
  np.testing.assert_allclose(norms, [5.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(clipped["w"], [[0.6, 0.0], [0.3, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(clipped["b"], [[0.8], [0.4]], rtol=1e-6)


def test_central_dp_without_noise_is_the_mean_of_clipped_updates():
  reference, stacked = _models([3.0, 0.0, 4.0], [0.3, 0.0, 0.4])
  agg = privacy.central_dp(clip_norm=1.0, noise_multiplier=0.0)
  out = jax.jit(agg.apply)(stacked, jnp.array([100, 1]), agg.init(reference), reference, jax.random.key(0))
  # Clipped updates (0.6, 0, 0.8) and (0.3, 0, 0.4), uniform mean (example counts ignored): (0.45, 0, 0.6).
  np.testing.assert_allclose(out.params["w"], [1.45, 1.0], rtol=1e-6)
  np.testing.assert_allclose(out.params["b"], [0.6], rtol=1e-6)
  assert float(out.diagnostics["dp_clipped_fraction"]) == 0.5
  unclipped = privacy.central_dp(clip_norm=1e9, noise_multiplier=0.0)
  mean = aggregation.unweighted_mean()
  a = unclipped.apply(stacked, jnp.array([100, 1]), unclipped.init(reference), reference, jax.random.key(0))
  b = mean.apply(stacked, jnp.array([100, 1]), mean.init(reference), reference, jax.random.key(0))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a.params, b.params)


def test_central_noise_has_std_sigma_s_over_c():
  reference = {"w": jnp.zeros(40_000)}
  stacked = {"w": jnp.zeros((4, 40_000))}
  agg = privacy.central_dp(clip_norm=2.0, noise_multiplier=1.5)
  out = agg.apply(stacked, jnp.ones(4), agg.init(reference), reference, jax.random.key(1))
  np.testing.assert_allclose(float(jnp.std(out.params["w"])), 1.5 * 2.0 / 4, rtol=0.03)


def test_noise_leaves_batch_norm_variances_non_negative():
  # Small C, large σ: the noise on an update would drive running variances below 0 (NaN at evaluation).
  reference = {"params": {"w": jnp.zeros(50)},
               "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(50), "var": jnp.full(50, 0.01)}}}
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), reference)
  agg = privacy.central_dp(clip_norm=1.0, noise_multiplier=5.0)
  out = agg.apply(stacked, jnp.ones(2), agg.init(reference), reference, jax.random.key(0))
  assert float(out.params["batch_stats"]["BatchNorm_0"]["var"].min()) >= 0.0
  assert float(out.params["batch_stats"]["BatchNorm_0"]["mean"].min()) < 0.0  # only variances are clipped
  assert float(out.params["params"]["w"].min()) < 0.0
  local = privacy.local_noise(1.0, 5.0)(reference, reference, jax.random.key(1))
  assert float(local["batch_stats"]["BatchNorm_0"]["var"].min()) >= 0.0


def test_adaptive_clip_norm_follows_the_geometric_update():
  reference, stacked = _models([3.0, 0.0, 4.0], [0.3, 0.0, 0.4], [0.0, 0.0, 0.1])  # norms 5, 0.5, 0.1
  agg = privacy.central_dp(1.0, 0.0, privacy.AdaptiveClipping(target_quantile=0.5, count_stddev=0.0,
                                                              learning_rate=0.2))
  out = agg.apply(stacked, jnp.ones(3), agg.init(reference), reference, jax.random.key(0))
  # 2 of 3 unclipped: S ← 1·exp(−0.2·(2/3 − 1/2)).
  np.testing.assert_allclose(float(out.state.clip_norm), np.exp(-0.2 * (2 / 3 - 0.5)), rtol=1e-6)


def test_local_noise_clips_then_noises_each_upload():
  received = {"w": jnp.zeros(30_000)}
  upload = {"w": jnp.full(30_000, 0.1)}  # norm 0.1·√30000 ≈ 17.3 → clipped to S = 2
  clean = privacy.local_noise(2.0, 0.0)(received, upload, jax.random.key(0))
  np.testing.assert_allclose(float(jnp.linalg.norm(clean["w"])), 2.0, rtol=1e-5)
  noisy = privacy.local_noise(2.0, 0.5)(received, upload, jax.random.key(0))
  np.testing.assert_allclose(float(jnp.std(noisy["w"] - clean["w"])), 0.5 * 2.0, rtol=0.03)


def test_accountant_is_dp_accounting_on_the_mechanism_run():
  acc = privacy.Accountant(100, 10, noise_multiplier=1.2, delta=1e-5)
  reference = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  reference.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.6)), 7)
  assert acc.epsilon(7) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
  assert 0 == acc.epsilon(0) < acc.epsilon(1) < acc.epsilon(7) < acc.epsilon(20)
  # Local DP has no amplification by sampling, so it costs more at the same σ.
  assert privacy.Accountant(100, 10, 1.2, 1e-5, local=True).epsilon(7) > acc.epsilon(7)
  assert privacy.Accountant(100, 10, 0.0, 1e-5).epsilon(3) == float("inf")


def test_local_dp_under_pld_is_the_replace_one_gaussian_of_sensitivity_2s():
  # A local upload: clipped Δ (‖Δ‖ ≤ S) plus N(0, σ²S²); replacing the client's data moves Δ by up to 2S. So T
  # rounds are T compositions of the Gaussian mechanism with std σ and sensitivity 2 (units of S).
  sigma, rounds, delta = 2.0, 10, 1e-5
  direct = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(standard_deviation=sigma,
                                                                                sensitivity=2.0)
  exact = direct.self_compose(rounds).get_epsilon_for_delta(delta)
  pld = privacy.Accountant(10, 10, sigma, delta, local=True, kind="pld").epsilon(rounds)
  rdp = privacy.Accountant(10, 10, sigma, delta, local=True, kind="rdp").epsilon(rounds)
  assert pld == pytest.approx(exact, rel=1e-3)  # 17.86; σ halved twice would give 46.2
  assert pld <= rdp <= 1.2 * pld  # RDP: α·2²/(2σ²) per round, converted: 19.05
  # And calibration: PLD's σ for a target ε is at most RDP's.
  pld_sigma = privacy.noise_for_epsilon(8.0, rounds, 10, 10, delta, local=True, kind="pld")
  assert pld_sigma <= privacy.noise_for_epsilon(8.0, rounds, 10, 10, delta, local=True, kind="rdp")
  assert privacy.Accountant(10, 10, pld_sigma, delta, local=True, kind="pld").epsilon(rounds) <= 8.0


def test_one_local_release_is_the_analytic_gaussian_mechanism():
  # Balle & Wang (ICML 2018), Thm 8: δ(ε) = Φ(Δ/2σ − εσ/Δ) − e^ε·Φ(−Δ/2σ − εσ/Δ) for sensitivity Δ, std σ.
  from scipy.stats import norm
  sigma, delta, sens = 3.0, 1e-5, 2.0
  eps = privacy.Accountant(10, 10, sigma, delta, local=True, kind="pld").epsilon(1)
  analytic = lambda e: norm.cdf(sens / (2 * sigma) - e * sigma / sens) - np.exp(e) * norm.cdf(
      -sens / (2 * sigma) - e * sigma / sens)
  assert analytic(eps) <= delta * 1.001 and analytic(0.99 * eps) > delta  # ε is (near) the smallest that holds


def _dp_tiny(fields=None):
  return configuration.set_fields(tiny_config.get_config(), {
      "rounds": 4, "num_clients": 3, "clients_per_round": 3, "dp.clip_norm": 1.0, "dp.noise_multiplier": 2.0,
      **(fields or {})})


def test_target_epsilon_stops_the_run_before_it_is_exceeded(tmp_path):
  acc = privacy.Accountant(3, 3, 2.0, 1e-5)
  target = (acc.epsilon(2) + acc.epsilon(3)) / 2  # room for exactly 2 rounds
  summary = train_lib.train_and_evaluate(_dp_tiny({"dp.target_epsilon": target}), str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["round"] for r in records] == [1, 2]
  assert all(r["epsilon"] <= target for r in records) and records[-1]["epsilon"] == pytest.approx(acc.epsilon(2))
  assert summary["epsilon"] == pytest.approx(acc.epsilon(2)) and summary["dp_delta"] == 1e-5
  assert summary["stopped"].startswith("dp.target_epsilon: round 3")


def test_huge_clip_and_no_noise_is_fedavg_with_uniform_weights(tiny, federation, run_rounds):
  data, fed = federation()
  model = models.build_model("mlp", tiny.shape, 3)
  with_aggregator = lambda agg: algorithms.build("fedavg", model, fed, mechanisms=MechanismParts(agg))
  a, _ = run_rounds(with_aggregator(privacy.central_dp(1e9, 0.0)), data, 2)
  b, _ = run_rounds(with_aggregator(aggregation.unweighted_mean()), data, 2)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.params, b.params)


@pytest.mark.parametrize("fields, field", [
    ({"algorithm": "fedsnd"}, "dp.local"),  # central DP cannot cover cross-client distillation
    ({"algorithm": "scaffold"}, "algorithm"),  # control variates uploaded in the clear
    ({"algorithm": "fedsnd", "dp.local": True, "fedsnd.distillation.teacher_weighting": "class_count"},
     "algorithm"),
    ({"dp.local": True, "dp.adaptive_clip": True}, "dp.adaptive_clip"),
    ({"dp.noise_multiplier": 0.0, "dp.target_epsilon": 3.0}, "dp.target_epsilon"),
    ({"dp.delta": 0.0}, "dp.delta"),
])
def test_uncovered_combinations_are_refused(fields, field):
  with pytest.raises(InputError, match=f"^{re.escape(field)}: "):
    configuration.validate(_dp_tiny(fields))


def test_fedsnd_runs_under_local_dp_and_logs_only_what_dp_covers(tmp_path):
  c = _dp_tiny({"algorithm": "fedsnd", "dp.local": True})
  c.fedsnd.synthesis.update(samples=6, steps=3)
  c.fedsnd.distillation.update(steps=2, batch=4)
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  assert summary["epsilon"] == pytest.approx(privacy.Accountant(3, 3, 2.0, 1e-5, local=True).epsilon(4))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert records and all("epsilon" in r and "test_accuracy" in r for r in records)
  for r in records:  # raw training losses and what example counts weigh are not covered by DP
    assert not {"train_loss", "average_noise_accuracy", "test_accuracy_no_distill"} & set(r), sorted(r)


def test_a_resumed_private_run_reports_the_epsilon_of_an_uninterrupted_one(tmp_path):
  c = _dp_tiny({"client_sampling": "poisson", "dp.accountant": "pld", "checkpoint_every": 1})
  whole = train_lib.train_and_evaluate(c, str(tmp_path / "whole"))
  assert train_lib.train_and_evaluate(c, str(tmp_path / "cut"), stop_after=2) is None
  resumed = train_lib.train_and_evaluate(c, str(tmp_path / "cut"))
  assert resumed["epsilon"] == whole["epsilon"] > 0
  eps = lambda d: [json.loads(line)["epsilon"] for line in open(tmp_path / d / "metrics.jsonl")]
  assert eps("cut") == eps("whole")


def test_noise_for_epsilon_calibrates_with_dp_accounting():
  sigma = privacy.noise_for_epsilon(3.0, 20, 100, 10, 1e-5)
  eps = privacy.Accountant(100, 10, sigma, 1e-5).epsilon(20)
  assert 2.99 < eps <= 3.0
  assert privacy.Accountant(100, 10, 0.95 * sigma, 1e-5).epsilon(20) > 3.0  # the smallest such σ, within 5 %


def test_noise_for_epsilon_with_pld_calibrates_below_rdp():
  # PLD searched near RDP's σ: a bracket down to σ = 0.01 made dp-accounting's PLD take > 20 GB (q = 0.2).
  kw = dict(sampling="poisson", kind="pld")
  sigma = privacy.noise_for_epsilon(3.0, 10, 50, 10, 1e-5, **kw)
  assert 2.99 < privacy.Accountant(50, 10, sigma, 1e-5, **kw).epsilon(10) <= 3.0
  assert privacy.Accountant(50, 10, 0.95 * sigma, 1e-5, **kw).epsilon(10) > 3.0
  assert sigma < privacy.noise_for_epsilon(3.0, 10, 50, 10, 1e-5, sampling="poisson", kind="rdp")
