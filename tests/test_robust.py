"""Robust aggregators against ByzFL's documented outputs, attacks by hand, and Byzantine runs end to end."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configuration, train_lib
from experiments.configs import tiny as tiny_config
from fedsnd_jax import attacks, federated_data, robust
from fedsnd_jax.errors import InputError
from fedsnd_jax.partition import partition

# ByzFL's documentation example (byzfl.aggregators): x = [[1, 2, 3], [4, 5, 6], [7, 8, 9]] and its outputs.
X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], np.float32)
BYZFL = {"median": [4.0, 5.0, 6.0], "trimmed_mean": [4.0, 5.0, 6.0], "krum": [1.0, 2.0, 3.0],
         "multi_krum": [2.5, 3.5, 4.5], "geometric_median": [3.78788764, 4.78788764, 5.78788764],
         "centered_clipping": [4.0, 5.0, 6.0]}


def _aggregate(aggregator, stacked, reference):
  out = jax.jit(aggregator.apply)(stacked, jnp.ones(3), aggregator.init(reference), reference, jax.random.key(0))
  return out


@pytest.mark.parametrize("rule", robust.RULES)
def test_rules_reproduce_byzfl_on_its_documented_example(rule):
  # As one leaf, and split over two leaves with a nonzero reference (rules act on updates x − w).
  agg = robust.robust_rule(rule, f=1, tau=100.0)
  out = _aggregate(agg, {"v": jnp.asarray(X)}, {"v": jnp.zeros(3)})
  np.testing.assert_allclose(out.params["v"], BYZFL[rule], rtol=1e-6)
  ref = {"a": jnp.array([0.5, -1.0]), "b": jnp.array([2.0])}
  split = {"a": jnp.asarray(X[:, :2]) + ref["a"], "b": jnp.asarray(X[:, 2:]) + ref["b"]}
  out = _aggregate(agg, split, ref)
  np.testing.assert_allclose(jnp.concatenate([out.params["a"] - ref["a"], out.params["b"] - ref["b"]]),
                             BYZFL[rule], rtol=1e-6)


@pytest.mark.parametrize("mixing", [False, True])
@pytest.mark.parametrize("rule", robust.RULES)
def test_an_upload_of_weight_zero_is_left_out(rule, mixing):
  # Noise consensus (and Poisson padding) drop an upload by weight 0: the rule on 7 uploads with two of weight 0
  # equals the rule on the other 5 alone, whatever the dropped rows hold.
  rng = np.random.default_rng(1)
  kept = rng.normal(size=(5, 6)).astype(np.float32)
  dropped = np.full((2, 6), 1e4, np.float32)  # would dominate every rule if counted
  order = np.array([0, 5, 1, 2, 6, 3, 4])  # dropped rows at positions 1 and 4
  stacked = np.concatenate([kept, dropped])[order]
  weights = jnp.asarray((order < 5).astype(np.float32) * 3.0)
  agg = robust.robust_rule(rule, f=1, tau=1.0, mixing=mixing)
  reference = {"v": jnp.zeros(6)}
  key = jax.random.key(0)
  ours = jax.jit(agg.apply)({"v": jnp.asarray(stacked)}, weights, agg.init(reference), reference, key)
  alone = jax.jit(agg.apply)({"v": jnp.asarray(kept)}, jnp.ones(5), agg.init(reference), reference, key)
  np.testing.assert_allclose(ours.params["v"], alone.params["v"], rtol=1e-5, atol=1e-6)


def test_nearest_neighbor_mixing_reproduces_byzfl():
  # ByzFL's NNM(1) maps the example to [[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]]; its median is row 0.
  out = _aggregate(robust.robust_rule("median", f=1, mixing=True), {"v": jnp.asarray(X)}, {"v": jnp.zeros(3)})
  np.testing.assert_allclose(out.params["v"], [2.5, 3.5, 4.5], rtol=1e-6)


def test_centered_clipping_clips_around_its_previous_center():
  agg = robust.centered_clipping(tau=1.0, steps=1)
  reference = {"v": jnp.zeros(2)}
  out = agg.apply({"v": jnp.array([[3.0, 4.0], [0.0, 0.5]])}, jnp.ones(2), agg.init(reference), reference, None)
  # From v = 0: (3, 4) is clipped to (0.6, 0.8), (0, 0.5) kept; v = mean = (0.3, 0.65), and it is the new centre.
  np.testing.assert_allclose(out.params["v"], [0.3, 0.65], rtol=1e-6)
  np.testing.assert_allclose(out.state.center["v"], [0.3, 0.65], rtol=1e-6)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum", "geometric_median"])
def test_one_huge_upload_does_not_move_robust_rules(rule):
  honest = np.random.default_rng(0).normal(0.0, 0.1, (6, 50)).astype(np.float32)
  stacked = np.concatenate([honest, np.full((1, 50), 1e6, np.float32)])
  aggregator = robust.robust_rule(rule, f=1)
  out = jax.jit(aggregator.apply)({"v": stacked}, jnp.ones(7), aggregator.init(None), {"v": jnp.zeros(50)},
                                  jax.random.key(0))
  assert float(jnp.abs(out.params["v"]).max()) < 1.0  # the plain mean would be ≈ 1.4e5


def test_model_attacks_by_hand():
  reference = {"v": jnp.array([1.0, 1.0])}
  models = {"v": jnp.array([[2.0, 1.0], [1.0, 3.0], [9.0, 9.0]])}  # updates (1, 0), (0, 2); client 2 Byzantine
  byzantine = np.array([False, False, True])
  ids = jnp.arange(3)
  flip = attacks.model_attack("sign_flip", byzantine, 1.0)(models, ids, reference, jax.random.key(0))
  np.testing.assert_allclose(flip["v"], [[2.0, 1.0], [1.0, 3.0], [0.5, 0.0]])  # w − mean((1, 0), (0, 2))
  ipm = attacks.model_attack("ipm", byzantine, 0.1)(models, ids, reference, jax.random.key(0))
  np.testing.assert_allclose(ipm["v"][2], [0.95, 0.9], rtol=1e-6)
  alie = attacks.model_attack("alie", byzantine, 0.0)(models, ids, reference, jax.random.key(0))
  # C = 3, one Byzantine: q = ⌊2.5⌋ − 1 = 1, z = Φ⁻¹(2/3) = 0.4307; honest std = (0.5, 1).
  np.testing.assert_allclose(alie["v"][2], [1.5 + 0.43072730 * 0.5, 2.0 + 0.43072730 * 1.0], rtol=1e-5)
  gauss = attacks.model_attack("gaussian", byzantine, 2.0)(models, ids, reference, jax.random.key(0))
  np.testing.assert_array_equal(gauss["v"][:2], models["v"][:2])  # honest uploads untouched


@pytest.mark.parametrize("bad", [5, 6, 7, 9])
def test_alie_stays_finite_when_a_round_holds_half_or_more_attackers(bad):
  # C = 10: q = ⌊6⌋ − b is 1 at b = 5, and would be 0 (z = Φ⁻¹(1) = ∞) at b = 6 and < 0 (NaN) beyond.
  rng = np.random.default_rng(0)
  reference = {"v": jnp.zeros(4)}
  models = {"v": jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)}
  byzantine = np.arange(10) < bad
  out = attacks.model_attack("alie", byzantine, 0.0)(models, jnp.arange(10), reference, jax.random.key(0))
  honest = np.asarray(models["v"])[bad:]
  z = 1.2815516  # Φ⁻¹(9/10): q bounded below by 1
  np.testing.assert_allclose(out["v"][0], honest.mean(0) + z * honest.std(0), rtol=1e-5)


def test_byzantine_set_is_seeded_and_label_flip_poisons_only_their_data(tiny):
  mask = attacks.byzantine_clients(10, 0.2, seed=3)
  assert mask.sum() == 2 and np.array_equal(mask, attacks.byzantine_clients(10, 0.2, seed=3))
  part = partition(tiny.y, 3, "iid", seed=0)
  data = federated_data.to_device(tiny.x, tiny.y, part, tiny.mean, tiny.std)
  flipped = attacks.flip_labels(data, np.array([False, True, False]), 3)
  owned = part.client_indices[1]
  np.testing.assert_array_equal(np.asarray(flipped.y)[owned], 2 - tiny.y[owned])
  others = np.setdiff1d(np.arange(len(tiny.y)), owned)
  np.testing.assert_array_equal(np.asarray(flipped.y)[others], tiny.y[others])


def _byzantine_tiny(fields=None):
  return configuration.set_fields(tiny_config.get_config(),
                                  {"num_clients": 10, "clients_per_round": 10, "rounds": 3, **(fields or {})})


def test_median_survives_what_breaks_the_mean(tmp_path):
  attack = {"attack.kind": "gaussian", "attack.fraction": 0.2, "attack.scale": 1000.0}
  clean = train_lib.train_and_evaluate(_byzantine_tiny({"robust.rule": "median"}), str(tmp_path / "clean"))
  robust_run = train_lib.train_and_evaluate(_byzantine_tiny({"robust.rule": "median", **attack}),
                                            str(tmp_path / "median"))
  try:
    broken = train_lib.train_and_evaluate(_byzantine_tiny(attack), str(tmp_path / "mean"))["final_accuracy"]
  except Exception:  # noqa: BLE001 — a diverged mean is broken too
    broken = 0.0
  assert robust_run["final_accuracy"] > broken + 0.2
  assert robust_run["final_accuracy"] > clean["final_accuracy"] - 0.15


@pytest.mark.parametrize("fields, field", [
    ({"robust.rule": "krum", "robust.f": 4}, "robust.f"),  # Krum needs C > 2f + 2
    ({"robust.rule": "bulyan"}, "robust.rule"),
    ({"attack.kind": "alie"}, "attack.kind"),  # an attack without Byzantine clients
    ({"attack.kind": "alie", "attack.fraction": 0.5}, "attack.fraction"),
    ({"robust.rule": "median", "dp.clip_norm": 1.0}, "robust"),  # both choose the aggregator
    ({"robust.nearest_neighbor_mixing": True}, "robust.nearest_neighbor_mixing"),
    ({"robust.rule": "centered_clipping", "robust.tau": 0.0}, "robust.tau"),
    ({"robust.rule": "centered_clipping", "robust.tau": float("inf")}, "robust.tau"),
    ({"robust.rule": "trimmed_mean", "robust.f": 5}, "robust.f"),  # more than the cohort can trim
    ({"attack.kind": "gaussian", "attack.fraction": float("nan")}, "attack.fraction"),
    ({"attack.kind": "gaussian", "attack.fraction": 0.2, "attack.scale": float("inf")}, "attack.scale"),
    ({"secagg.enabled": True, "secagg.range": float("nan")}, "secagg.range"),
    ({"secagg.enabled": True, "secagg.bits": 0}, "secagg.bits"),
    ({"dp.clip_norm": 1.0, "dp.noise_multiplier": float("inf")}, "dp.noise_multiplier"),
    ({"dp.clip_norm": 1.0, "dp.noise_multiplier": 1.0, "dp.delta": 1.0}, "dp.delta"),
    ({"dp.clip_norm": 1.0, "dp.noise_multiplier": 1.0, "dp.target_epsilon": float("nan")}, "dp.target_epsilon"),
])
def test_bad_robustness_settings_are_refused(fields, field):
  with pytest.raises(InputError, match=f"^{re.escape(field)}: "):
    configuration.validate(_byzantine_tiny(fields))


def test_noise_consensus_flags_the_upload_that_mislabels_the_others_noise():
  from fedsnd_jax.algorithms.fedsnd.consensus import flag
  from fedsnd_jax.algorithms.fedsnd.pool import NoisePool

  labels = jnp.tile(jnp.arange(3), 5)  # 5 uploads × 3 samples, targets 0, 1, 2
  owners = jnp.repeat(jnp.arange(5), 3)
  right = jax.nn.one_hot(labels, 3) * 0.8 + 0.1  # [15, 3] argmax = target
  wrong = jax.nn.one_hot((labels + 1) % 3, 3) * 0.8 + 0.1
  probs = jnp.stack([right, right, right, wrong, right])  # upload 3 disagrees everywhere
  pool = NoisePool(None, None, labels, owners, probs, None)
  trusted, scores = flag(pool, threshold=3.0, present=jnp.ones(5, bool))
  np.testing.assert_array_equal(trusted, [True, True, True, False, True])
  np.testing.assert_allclose(scores, [1, 1, 1, 0, 1])
  # Upload 3 dropped by a deadline: neither judged nor its noise counted. Upload 1 mislabels only upload 3's
  # noise: 9 of 12 others' samples right with it, all 9 without it.
  probs = probs.at[1].set(jnp.where((owners == 3)[:, None], wrong, right))
  pool = pool._replace(probs=probs)
  np.testing.assert_allclose(flag(pool, 3.0, jnp.ones(5, bool))[1], [1, 0.75, 1, 0, 1])
  trusted, scores = flag(pool, 3.0, jnp.arange(5) != 3)
  np.testing.assert_array_equal(trusted, [True] * 5)
  np.testing.assert_allclose(scores, [1, 1, 1, np.nan, 1])
  # Only upload 3 present: no other present noise to score it on, so it is not judged either.
  trusted, scores = flag(pool, 3.0, jnp.arange(5) == 3)
  np.testing.assert_array_equal(trusted, [True] * 5)
  assert np.all(np.isnan(scores))


@pytest.mark.parametrize("mode", [{"schedule.distill_rounds": 1}, {"distillation.target": "global"}])
def test_noise_consensus_finds_the_byzantine_clients_end_to_end(tmp_path, mode):
  # Honest clients must learn something for a consensus to exist: 30 local steps, α = 1. The defence holds in
  # every mode: after distill_rounds (round 2 here distils no more) and when distilling into the aggregate.
  c = _byzantine_tiny({"algorithm": "fednd", "attack.kind": "gaussian", "attack.fraction": 0.2,
                       "attack.scale": 100.0, "rounds": 2, "local_steps": 30, "alpha": 1.0})
  configuration.set_fields(c, {f"fedsnd.{k}": v for k, v in {
      "synthesis.samples": 20, "synthesis.steps": 30, "distillation.steps": 2, "distillation.batch": 8,
      "consensus.enabled": True, **mode}.items()})
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  byzantine = set(np.flatnonzero(attacks.byzantine_clients(10, 0.2, c.seed)).tolist())
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["round"] for r in records] == [1, 2]
  for record in records:
    ids, trusted = record["consensus_client_ids"], record["consensus_trusted"]
    flagged = {i for i, ok in zip(ids, trusted, strict=True) if not ok}
    assert flagged == byzantine, (record["round"], flagged, record["consensus_scores"])
  assert summary["final_accuracy"] > 0.5  # the flagged uploads were left out of the aggregate


def test_untrusted_uploads_neither_vote_nor_are_voted_on_in_teacher_agreement():
  from fedsnd_jax.algorithms.fedsnd.pool import NoisePool, agreement

  # 4 uploads × 2 samples; upload 3 is flagged. Honest teachers name the first sample of each honest owner right
  # and the second wrong, and the flagged owner's noise right; the flagged teacher is right everywhere.
  labels = jnp.zeros(8, jnp.int32)
  owners = jnp.repeat(jnp.arange(4), 2)
  right, wrong = jnp.array([0.9, 0.1]), jnp.array([0.1, 0.9])
  honest = jnp.stack([right, wrong, right, wrong, right, wrong, right, right])
  probs = jnp.stack([honest, honest, honest, jnp.tile(right, (8, 1))])
  pool = NoisePool(None, None, labels, owners, probs, None, trusted=jnp.array([True, True, True, False]))
  # Over trusted teachers and trusted noise: each honest teacher is right on 2 of the 4 others' samples.
  assert float(agreement(pool)) == pytest.approx(0.5)  # counting the flagged upload too gave 0.75
  assert float(agreement(pool._replace(trusted=None))) == pytest.approx(0.75)
