"""ByzFL's outputs on given inputs; `benchmarks.byzfl_reference` runs this in ByzFL's own venv.

  <byzfl venv>/bin/python benchmarks/byzfl_reference_worker.py < cases.json > outputs.json

Reads {"cases": [{"name", "dtype", "f", "byzantine" [n] bool, "x" [n][d]}, ...]} on stdin and prints
{"versions": {...}, "outputs": {name: {"aggregators": {key: {"call", "out"}}, "attacks": {...}}}}: for every
case, every ByzFL call below as the exact Python expression run (`x` the case's [n, d] array in its dtype,
`honest` the rows not marked Byzantine) and its output. Imports neither fedsnd_jax nor jax.

`import byzfl` would run byzfl/__init__.py, which also imports byzfl.benchmark and with it torchvision,
matplotlib and seaborn (ByzFL's training harness). The venv has none of them, so the package is registered
bare and only byzfl.aggregators and byzfl.attacks, the modules that byzfl/__init__.py re-exports as
byzfl.Krum and so on, are imported, unchanged.
"""

import importlib.metadata
import importlib.util
import json
import math
import sys
import types

import numpy as np
import scipy.stats
import torch

_spec = importlib.util.find_spec("byzfl")
byzfl = types.ModuleType("byzfl")
byzfl.__path__ = list(_spec.submodule_search_locations)
sys.modules["byzfl"] = byzfl
import byzfl.aggregators  # noqa: E402
import byzfl.attacks  # noqa: E402


def aggregator_calls(f: int) -> dict[str, str]:
  """Key -> the ByzFL call; statements separated by '; ', the last one's value is the output."""
  agg = "byzfl.aggregators"
  return {
      "median": f"{agg}.Median()(x)",
      "trimmed_mean": f"{agg}.TrMean(f={f})(x)",
      "krum": f"{agg}.Krum(f={f})(x)",
      "multi_krum": f"{agg}.MultiKrum(f={f})(x)",
      "geometric_median": f"{agg}.GeometricMedian()(x)",  # ByzFL's defaults nu=0.1, T=3
      "geometric_median_nu2.5_T10": f"{agg}.GeometricMedian(nu=2.5, T=10)(x)",
      "centered_clipping": f"{agg}.CenteredClipping()(x)",  # ByzFL's defaults m=0, L=1, tau=100.0
      "centered_clipping_tau1_L3": f"{agg}.CenteredClipping(tau=1.0, L=3)(x)",
      # A second call starts from the first one's output (ByzFL's m); its constructor refuses any m given.
      "centered_clipping_tau2_twice": f"cc = {agg}.CenteredClipping(tau=2.0); cc(x); cc(x)",
      "nnm": f"{agg}.NNM(f={f})(x)",
      "nnm_median": f"{agg}.Median()({agg}.NNM(f={f})(x))",
      "nnm_krum": f"{agg}.Krum(f={f})({agg}.NNM(f={f})(x))",
  }


def attack_calls(n: int, b: int, h: int) -> dict[str, str]:
  """Key -> the ByzFL call on the h honest rows, for b Byzantine rows among n."""
  # ALIE's z (Baruch et al.): s = ⌊n/2 + 1⌋ − b, z = Φ⁻¹((n − s)/n). ByzFL's ALittleIsEnough(tau) returns
  # μ + tau·σ with σ the sample std (ddof=1, though its docstring writes 1/n); the paper's and our σ is the
  # population std (1/h), so tau = z·√((h − 1)/h) makes ByzFL's output μ + z·σ_population.
  s = math.floor(n / 2 + 1) - b
  z = float(scipy.stats.norm.ppf((n - s) / n))
  return {
      "sign_flip": "byzfl.attacks.SignFlipping()(honest)",
      "ipm_0.1": "byzfl.attacks.InnerProductManipulation(tau=0.1)(honest)",
      "ipm_2.0": "byzfl.attacks.InnerProductManipulation(tau=2.0)(honest)",  # ByzFL's default tau
      "alie": f"byzfl.attacks.ALittleIsEnough(tau={z * math.sqrt((h - 1) / h)!r})(honest)",
  }


def run(call: str, dtype, **arrays) -> dict:
  scope = {"byzfl": byzfl, **arrays}
  *statements, last = call.split("; ")
  for statement in statements:
    exec(statement, scope)
  out = np.asarray(eval(last, scope))
  assert out.dtype == dtype, (call, out.dtype, dtype)
  # The shortest decimal that reads back as the same float32; float64 kept to 10 significant digits.
  values = [float(str(v)) if dtype == np.float32 else float(f"{v:.10g}") for v in out.ravel()]
  return {"call": call, "out": np.reshape(values, out.shape).tolist()}


def main():
  cases = json.load(sys.stdin)["cases"]
  outputs = {}
  for case in cases:
    dtype = np.dtype(case["dtype"])
    x = np.asarray(case["x"], dtype)
    honest = x[~np.asarray(case["byzantine"])]
    n, b = len(x), len(x) - len(honest)
    outputs[case["name"]] = {
        "aggregators": {k: run(c, dtype, x=x) for k, c in aggregator_calls(case["f"]).items()},
        "attacks": {k: run(c, dtype, honest=honest) for k, c in attack_calls(n, b, len(honest)).items()},
    }
  versions = {name: importlib.metadata.version(name) for name in ("byzfl", "torch", "numpy", "scipy")}
  versions["torch"] = torch.__version__
  versions["python"] = sys.version.split()[0]
  json.dump({"versions": versions, "outputs": outputs}, sys.stdout)


if __name__ == "__main__":
  main()
