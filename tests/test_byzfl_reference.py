"""Robust rules and model attacks against ByzFL's outputs on seeded random inputs (no ByzFL needed here).

tests/data/byzfl_reference.json holds six cases (n ∈ {5, 7, 10} vectors of dimension d ∈ {4, 13}, float32 or
float64, most with large outlier rows) and what ByzFL 0.0.11 returned on them, each with its exact call; it is
written by `python -m benchmarks.byzfl_reference`, which runs ByzFL in its own venv. Every ByzFL output is
checked against our rule or attack configured to ByzFL's parameters (the JSON's notes give the conventions).
Ours computes in float32, so float64 cases are compared at float32 precision.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsnd_jax import attacks, robust
from fedsnd_jax.aggregation import Aggregate, Aggregator, EmptyState

REFERENCE = json.loads((pathlib.Path(__file__).parent / "data" / "byzfl_reference.json").read_text())
CASES = REFERENCE["cases"]

# The mixed uploads themselves, for ByzFL's NNM(f)(x): a "rule" that returns its [C, P] input.
_IDENTITY = Aggregator(lambda params: EmptyState(), lambda models, w, state, ref, k: Aggregate(models, state, {}))


def _aggregator(key: str, f: int) -> tuple[Aggregator, int]:
  """Our rule for a ByzFL call of the JSON, and how many times in a row it is applied (state carried over)."""
  return {
      "median": (robust.robust_rule("median", f), 1),
      "trimmed_mean": (robust.robust_rule("trimmed_mean", f), 1),
      "krum": (robust.robust_rule("krum", f), 1),
      "multi_krum": (robust.robust_rule("multi_krum", f), 1),
      "geometric_median": (robust.geometric_median(nu=0.1, steps=3), 1),  # ByzFL's defaults, ours too
      "geometric_median_nu2.5_T10": (robust.geometric_median(nu=2.5, steps=10), 1),
      "centered_clipping": (robust.centered_clipping(tau=100.0, steps=1), 1),  # ByzFL's defaults
      "centered_clipping_tau1_L3": (robust.centered_clipping(tau=1.0, steps=3), 1),
      "centered_clipping_tau2_twice": (robust.centered_clipping(tau=2.0, steps=1), 2),
      "nnm": (robust.nearest_neighbor_mixing(f, _IDENTITY), 1),
      "nnm_median": (robust.robust_rule("median", f, mixing=True), 1),
      "nnm_krum": (robust.robust_rule("krum", f, mixing=True), 1),
  }[key]


# ByzFL's attack call -> our model attack and scale. ALIE: the JSON's call sets ByzFL's tau so that its
# sample-std output equals the paper's μ + z·σ_population, which ours computes (z from C and b itself).
ATTACKS = {"sign_flip": ("sign_flip", 1.0), "ipm_0.1": ("ipm", 0.1), "ipm_2.0": ("ipm", 2.0),
           "alie": ("alie", 0.0)}
RULE_KEYS = ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "geometric_median_nu2.5_T10",
             "centered_clipping", "centered_clipping_tau1_L3", "centered_clipping_tau2_twice", "nnm", "nnm_median",
             "nnm_krum")


def _by_shape() -> dict[tuple[int, int, int], list[dict]]:
  """The cases by (n, d, f): one compiled program, vmapped over a group's cases, checks them all."""
  groups = {}
  for case in CASES:
    groups.setdefault((len(case["x"]), len(case["x"][0]), case["f"]), []).append(case)
  return groups


GROUPS = _by_shape()
SHAPES = pytest.mark.parametrize("shape", list(GROUPS), ids=[f"n{n}_d{d}_f{f}" for n, d, f in GROUPS])


def _inputs(cases) -> np.ndarray:
  """[B, n, d] float32: our rules compute in float32, so float64 cases are compared at float32 precision."""
  return np.stack([np.asarray(case["x"], case["dtype"]).astype(np.float32) for case in cases])


def _assert_matches_byzfl(ours, entry, x):
  # float32 agreement, relative to the case's scale where values pass near 0 (outlier coordinates reach |x| ≈ 110).
  np.testing.assert_allclose(ours, np.asarray(entry["out"]), rtol=1e-5, atol=1e-6 * float(np.abs(x).max()),
                             err_msg=entry["call"])


def test_reference_covers_every_rule_and_attack():
  assert REFERENCE["versions"]["byzfl"] == "0.0.11"
  for case in CASES:
    assert set(case["aggregators"]) == set(RULE_KEYS) and set(case["attacks"]) == set(ATTACKS)
  assert {n for n, _, _ in GROUPS} == {5, 7, 10} and {d for _, d, _ in GROUPS} == {4, 13}
  assert {c["dtype"] for c in CASES} == {"float32", "float64"}


def _rules(x, f):
  """Our output [d] for every RULE_KEYS call on one case's x [n, d], from a zero reference model."""
  reference = {"v": jnp.zeros(x.shape[1])}
  outs = {}
  for key in RULE_KEYS:
    aggregator, times = _aggregator(key, f)
    state = aggregator.init(reference)
    for _ in range(times):
      out = aggregator.apply({"v": x}, jnp.ones(x.shape[0]), state, reference, jax.random.key(0))
      state = out.state
    outs[key] = out.params["v"]
  return outs


@SHAPES
def test_rules_reproduce_byzfl(shape):
  cases, xs = GROUPS[shape], _inputs(GROUPS[shape])
  outs = jax.jit(jax.vmap(functools.partial(_rules, f=shape[2])))(xs)
  for i, case in enumerate(cases):
    for key, entry in case["aggregators"].items():
      _assert_matches_byzfl(np.asarray(outs[key][i]), entry, xs[i])


@SHAPES
def test_model_attacks_reproduce_byzfl(shape):
  cases, xs = GROUPS[shape], _inputs(GROUPS[shape])
  n = shape[0]
  # The group's cases as rounds over one population of B·n clients: case i's round has clients i·n … i·n + n − 1.
  byzantine = np.concatenate([case["byzantine"] for case in cases])
  ids = np.arange(len(cases) * n).reshape(len(cases), n)
  reference = {"v": jnp.zeros(shape[1])}

  def attacked(x, round_ids):
    corrupt = {key: attacks.model_attack(name, byzantine, scale) for key, (name, scale) in ATTACKS.items()}
    return {key: c({"v": x}, round_ids, reference, jax.random.key(0))["v"] for key, c in corrupt.items()}

  outs = jax.jit(jax.vmap(attacked))(xs, ids)
  for i, case in enumerate(cases):
    bad = np.asarray(case["byzantine"])
    for key, entry in case["attacks"].items():
      out = np.asarray(outs[key][i])
      np.testing.assert_array_equal(out[~bad], xs[i][~bad])  # honest rows untouched
      for row in out[bad]:
        _assert_matches_byzfl(row, entry, xs[i])
