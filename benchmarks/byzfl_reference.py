r"""ByzFL's outputs on seeded random inputs, written to tests/data/byzfl_reference.json for our tests.

  python -m benchmarks.byzfl_reference [--venv=~/.cache/fedsnd-jax/byzfl-venv] [--out=tests/data/...]

ByzFL (EPFL/INRIA's reference library for Byzantine-robust learning) needs torch, too heavy for our venv and
CI, so it runs in its own venv, built once under --venv (BYZFL_REQUIREMENTS; torch 2.13.0 is a CPU build
where pip finds one on disk, else PyPI's CUDA build) and reused. The inputs: six cases of n ∈ {5, 7, 10}
vectors of dimension d ∈ {4, 13}, float32 or float64, drawn from a seeded generator and rounded to 4
decimals (so the JSON holds them exactly), most with a few large outlier rows. `byzfl_reference_worker.py`
runs, in that venv, every aggregator we implement (Median, TrMean(f), Krum(f), MultiKrum(f),
GeometricMedian, CenteredClipping, NNM(f) alone and before Median and Krum) on every case, and the attacks
we share with ByzFL (SignFlipping, InnerProductManipulation, ALittleIsEnough) on the case's honest rows;
the JSON keeps each exact ByzFL call and its output. tests/test_byzfl_reference.py checks `fedsnd_jax.robust`
and `fedsnd_jax.attacks` against it, without ByzFL. Gaussian is random in both libraries and not compared.
"""

import json
import os
import re
import subprocess

import numpy as np
from absl import app, flags

from benchmarks import venvs

# torch first, with its own small dependencies; then byzfl without its dependencies: torchvision, matplotlib
# and seaborn serve only byzfl.benchmark (ByzFL's training harness), which the worker never imports.
BYZFL_REQUIREMENTS = (("torch==2.13.0", "numpy==2.4.6", "scipy==1.17.1"), ("--no-deps", "byzfl==0.0.11"))
CHECK = "import importlib.metadata as m, torch, scipy; assert m.version('byzfl') == '0.0.11'"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "byzfl_reference_worker.py")
# name, n, d, dtype, f, outlier rows (at random positions; with none, the last f rows are the Byzantine ones
# for the attacks). Cases come in pairs of one (n, d, f), which the tests check in one compiled program.
CASES = (("n5_d13_f64", 5, 13, "float64", 1, 0), ("n5_d13_f32_outlier", 5, 13, "float32", 1, 1),
         ("n7_d4_f32", 7, 4, "float32", 2, 0), ("n7_d4_f64_outliers", 7, 4, "float64", 2, 2),
         ("n10_d13_f64_outliers", 10, 13, "float64", 3, 3), ("n10_d13_f32_outliers", 10, 13, "float32", 3, 2))
NOTES = {
    "inputs": "x [n, d] in dtype; honest rows ~ N(μ, I) with μ ~ N(0.5, 1) per case, outlier rows "
              "μ + 30·N(0, I) − 20; rounded to 4 decimals. f is the rules' and NNM's f; `byzantine` marks the "
              "rows an attack replaces (its input is the other rows, `honest`).",
    "outputs": "float32 cases: ByzFL's numpy path in float32, each value the shortest decimal that reads back as "
               "that float32; float64 cases: in float64, 10 significant digits.",
    "geometric_median": "ByzFL's smoothed Weiszfeld from z = 0, β_i = 1/max(nu, ‖x_i − z‖), T steps (rows with an "
                        "inf are dropped first): ours geometric_median(nu, steps=T).",
    "centered_clipping": "ByzFL's m (start, zeros), L (steps), tau; ours centered_clipping(tau, steps=L) from a "
                         "zero centre. ByzFL's constructor refuses every m given (its type check is always "
                         "true), so the stateful case calls one instance twice: the second call starts from the "
                         "first one's output, as ours does from its state.",
    "alie": "ByzFL's ALittleIsEnough(tau) is μ + tau·σ with σ the sample std (ddof=1; its docstring writes 1/n); "
            "ours is μ + z·σ with σ the population std and z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − b (Baruch et al.), "
            "so the call uses tau = z·√((h − 1)/h), h the honest rows.",
    "ipm": "InnerProductManipulation(tau) is −tau·μ, ours ipm with scale = tau (ByzFL's default tau 2.0, "
           "ours 0.1). SignFlipping is −μ, ours sign_flip with scale 1.",
    "gaussian": "not compared: random in both libraries (ByzFL N(mu, sigma²) per coordinate, ours N(0, scale²)).",
}


def cases(seed: int = 0) -> list[dict]:
  """The inputs: for every CASES row, x [n, d] (as lists, 4 decimals), f and the Byzantine mask."""
  rng = np.random.default_rng(seed)
  out = []
  for name, n, d, dtype, f, outliers in CASES:
    mu = rng.normal(0.5, 1.0, d)
    x = mu + rng.normal(0.0, 1.0, (n, d))
    byzantine = np.zeros(n, bool)
    if outliers:
      rows = rng.choice(n, outliers, replace=False)
      x[rows] = mu + 30.0 * rng.normal(0.0, 1.0, (outliers, d)) - 20.0
      byzantine[rows] = True
    else:
      byzantine[n - f:] = True
    out.append({"name": name, "dtype": dtype, "f": f, "byzantine": byzantine.tolist(),
                "x": np.round(x, 4).tolist()})
  return out


def main(argv):
  del argv
  flag = flags.FLAGS
  python = venvs.venv_python(flag.venv, CHECK, [list(r) for r in BYZFL_REQUIREMENTS], "byzfl_reference")
  inputs = cases()
  done = subprocess.run([python, WORKER], input=json.dumps({"cases": inputs}), check=True, capture_output=True,
                        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
  result = json.loads(done.stdout)
  reference = {"command": "python -m benchmarks.byzfl_reference", "versions": result["versions"], "notes": NOTES,
               "cases": [{**case, **result["outputs"][case["name"]]} for case in inputs]}
  os.makedirs(os.path.dirname(os.path.abspath(flag.out)), exist_ok=True)
  # Indented, but every list of numbers or booleans on one line.
  text = re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                json.dumps(reference, indent=1, ensure_ascii=False))
  with open(flag.out, "w") as file:
    file.write(text + "\n")
  entries = sum(len(c["aggregators"]) + len(c["attacks"]) for c in reference["cases"])
  print(f"byzfl_reference: {entries} ByzFL outputs on {len(inputs)} cases (byzfl {result['versions']['byzfl']}, "
        f"torch {result['versions']['torch']}) -> {flag.out} ({os.path.getsize(flag.out):,} bytes)")


def define_flags():
  flags.DEFINE_string("venv", os.path.expanduser("~/.cache/fedsnd-jax/byzfl-venv"), "ByzFL's own venv.")
  flags.DEFINE_string("out", "tests/data/byzfl_reference.json", "Where the inputs and ByzFL's outputs go.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
