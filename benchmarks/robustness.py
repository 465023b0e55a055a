r"""Accuracy under every attack × aggregator, with the no-attack column, and each aggregator's server seconds.

  python -m benchmarks.robustness [--config=experiments/configs/default.py] \
      [--algorithms=fedavg,fedsnd+consensus] \
      [--aggregators=mean,median,trimmed_mean,krum,multi_krum,geometric_median,centered_clipping] \
      [--attacks=none,sign_flip,gaussian,alie,ipm,label_flip] [--fractions=0.1,0.2] [--alphas=0.5,0.1] \
      [--seeds=0] [--workdir=runs/robustness]

An algorithm named `<name>+consensus` is FedND/FedSND with noise consensus on; for those the script also tables
how well the consensus found the Byzantine uploads (precision and recall over all rounds, and the share of honest
uploads it flagged). Each cell is one `experiments.train` run in
`<workdir>/<algorithm>/<aggregator>/<attack>/frac=<f>/alpha=<α>/seed=<s>/` (finished cells are reused);
robust rules are built for f = ⌈fraction·C⌉ Byzantine uploads per round. Prints, per algorithm, fraction and
α, a Markdown table of final test accuracy (%, mean over seeds; "div" where the run diverged) and the
aggregator's mean server seconds per round; the tables also rewrite their block of benchmarks/RESULTS.md
(`--results`, `--block`).
"""

import math
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import results
from experiments import report, train_lib
from fedsnd_jax import attacks, loop

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/robustness", "Output folder.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["fedavg"], "Algorithms.")
_AGGREGATORS = flags.DEFINE_list("aggregators", ["mean", "median", "trimmed_mean", "krum", "multi_krum",
                                                 "geometric_median", "centered_clipping"], "Aggregators.")
_ATTACKS = flags.DEFINE_list("attacks", ["none", "sign_flip", "gaussian", "alie", "ipm", "label_flip"], "Attacks.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.1", "0.2"], "Byzantine fractions.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.5", "0.1"], "Dirichlet α values.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
results.define_flags("robustness")


def _cell(algorithm, aggregator, attack, fraction, alpha, seed):
  c = _CONFIG.value.copy_and_resolve_references()
  c.algorithm, c.robust.rule, c.alpha, c.seed = algorithm.removesuffix("+consensus"), aggregator, alpha, seed
  c.fedsnd.consensus.enabled = algorithm.endswith("+consensus")
  c.robust.f = max(1, math.ceil(fraction * c.clients_per_round))
  if attack != "none":
    c.attack.kind, c.attack.fraction = attack, fraction
  workdir = os.path.join(_WORKDIR.value, algorithm, aggregator, attack, f"frac={fraction:g}", f"alpha={alpha:g}",
                         f"seed={seed}")
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    try:
      train_lib.train_and_evaluate(c, workdir)
    except loop.Diverged as e:
      print(f"{algorithm} {aggregator} {attack} frac={fraction:g} α={alpha:g} seed={seed}: {e}", flush=True)
  return report.read_summary(workdir), workdir, c


def detection(workdir, c, fraction) -> tuple[int, int, int, int]:
  """(true positives, false positives, false negatives, honest uploads) of noise consensus over a run."""
  byzantine = set(np.flatnonzero(attacks.byzantine_clients(c.num_clients, fraction, c.seed)).tolist())
  tp = fp = fn = honest = 0
  for record in report.read_metrics(workdir):
    if "consensus_trusted" not in record:
      continue
    for cid, trusted in zip(record["consensus_client_ids"], record["consensus_trusted"], strict=True):
      bad = c.attack.kind != "none" and cid in byzantine
      tp, fp, fn = tp + (bad and not trusted), fp + (not bad and not trusted), fn + (bad and trusted)
      honest += not bad
  return tp, fp, fn, honest


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
        found = []
        for aggregator in _AGGREGATORS.value:
          cells, server = [], []
          for attack in _ATTACKS.value:
            cells_runs = [_cell(algorithm, aggregator, attack, fraction, alpha, int(s)) for s in _SEEDS.value]
            runs = [summary for summary, _, _ in cells_runs]
            if algorithm.endswith("+consensus"):
              counts = np.sum([detection(w, c, fraction) for _, w, c in cells_runs], axis=0)
              found.append((aggregator, attack, *counts))
            finished = [r for r in runs if not r.get("diverged")]
            cells.append(f"{100 * np.mean([r['final_accuracy'] for r in finished]):.1f}"
                         + (f" ({len(runs) - len(finished)} div)" if len(finished) < len(runs) else "")
                         if finished else "div")
            server += [r["mean_server_time_s"] for r in finished]
          lines.append(f"| {aggregator} | " + " | ".join(cells) + f" | {np.mean(server):.4f} |")
          print(lines[-1], flush=True)
        if found:
          lines += ["\nNoise consensus: Byzantine uploads found (precision, recall) and honest uploads flagged\n",
                    "| aggregator | attack | precision | recall | honest flagged |", "|---|---|---|---|---|"]
          for aggregator, attack, tp, fp, fn, honest in found:
            precision = f"{tp / (tp + fp):.2f}" if tp + fp and attack != "none" else "–"
            recall = f"{tp / (tp + fn):.2f}" if tp + fn else "–"
            lines.append(f"| {aggregator} | {attack} | {precision} | {recall} | {fp / max(honest, 1):.1%} |")
        tables.append("\n".join(lines))
  text = "\n".join(tables)
  print(text, flush=True)
  results.publish(flags.FLAGS.results, flags.FLAGS.block, text, "Byzantine robustness")


if __name__ == "__main__":
  app.run(main)
