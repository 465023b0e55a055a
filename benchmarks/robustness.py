r"""Accuracy under every attack × aggregator, with the no-attack column, and each aggregator's server seconds.

  python -m benchmarks.robustness [--config=experiments/configs/default.py] [--algorithms=fedavg] \
      [--aggregators=mean,median,trimmed_mean,krum,multi_krum,geometric_median,centered_clipping] \
      [--attacks=none,sign_flip,gaussian,alie,ipm,label_flip] [--fractions=0.1,0.2] [--alphas=0.5,0.1] \
      [--seeds=0] [--workdir=runs/robustness]

Each cell is one `experiments.train` run in
`<workdir>/<algorithm>/<aggregator>/<attack>/frac=<f>/alpha=<α>/seed=<s>/` (finished cells are reused);
robust rules are built for f = ⌈fraction·C⌉ Byzantine uploads per round. Prints, per algorithm, fraction and
α, a Markdown table of final test accuracy (%, mean over seeds; "div" where the run diverged) and the
aggregator's mean server seconds per round.
"""

import math
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import report, runner
from fedsnd_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/robustness", "Output folder.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["fedavg"], "Algorithms.")
_AGGREGATORS = flags.DEFINE_list("aggregators", ["mean", "median", "trimmed_mean", "krum", "multi_krum",
                                                 "geometric_median", "centered_clipping"], "Aggregators.")
_ATTACKS = flags.DEFINE_list("attacks", ["none", "sign_flip", "gaussian", "alie", "ipm", "label_flip"], "Attacks.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.1", "0.2"], "Byzantine fractions.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.5", "0.1"], "Dirichlet α values.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")


def _cell(algorithm, aggregator, attack, fraction, alpha, seed):
  c = _CONFIG.value.copy_and_resolve_references()
  c.algorithm, c.aggregator, c.alpha, c.seed = algorithm, aggregator, alpha, seed
  c.aggregator_f = max(1, math.ceil(fraction * c.clients_per_round))
  if attack != "none":
    c.attack, c.byzantine_fraction = attack, fraction
  workdir = os.path.join(_WORKDIR.value, algorithm, aggregator, attack, f"frac={fraction:g}", f"alpha={alpha:g}",
                         f"seed={seed}")
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    try:
      runner.run(c, workdir)
    except experiment.Diverged as e:
      print(f"{algorithm} {aggregator} {attack} frac={fraction:g} α={alpha:g} seed={seed}: {e}", flush=True)
  return report.read_summary(workdir)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  base = _CONFIG.value
  tables = []
  for algorithm in _ALGORITHMS.value:
    for fraction in (float(f) for f in _FRACTIONS.value):
      for alpha in (float(a) for a in _ALPHAS.value):
        lines = [f"\n{algorithm}, {base.dataset}, {base.num_clients} clients ({base.clients_per_round} per "
                 f"round), {base.rounds} rounds, α = {alpha:g}, Byzantine fraction {fraction:g} (f = "
                 f"{max(1, math.ceil(fraction * base.clients_per_round))}); final test accuracy %, seeds "
                 f"{', '.join(_SEEDS.value)}\n",
                 "| aggregator | " + " | ".join(_ATTACKS.value) + " | server s/round |",
                 "|---|" + "---|" * (len(_ATTACKS.value) + 1)]
        for aggregator in _AGGREGATORS.value:
          cells, server = [], []
          for attack in _ATTACKS.value:
            runs = [_cell(algorithm, aggregator, attack, fraction, alpha, int(s)) for s in _SEEDS.value]
            finished = [r for r in runs if not r.get("diverged")]
            cells.append(f"{100 * np.mean([r['final_accuracy'] for r in finished]):.1f}"
                         + (f" ({len(runs) - len(finished)} div)" if len(finished) < len(runs) else "")
                         if finished else "div")
            server += [r["mean_server_time_s"] for r in finished]
          lines.append(f"| {aggregator} | " + " | ".join(cells) + f" | {np.mean(server):.4f} |")
          print(lines[-1], flush=True)
        tables.append("\n".join(lines))
  print("\n".join(tables))


if __name__ == "__main__":
  app.run(main)
