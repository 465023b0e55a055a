r"""Accuracy against the privacy budget ε for FedAvg (central DP) and FedSND (local DP, the mode that covers it).

  python -m benchmarks.privacy_tradeoff [--config=benchmarks/configs/fmnist_cpu_xdevice.py] [--alpha=0.5] \
      [--epsilons=8,3,1] [--algorithms=fedavg,fedsnd] [--seeds=0] [--clip_norm=S] [--workdir=runs/privacy]

For every algorithm it runs the config without DP (ε = ∞), then, for each target ε, with the noise multiplier σ
that dp-accounting's calibration gives for the config's rounds, clients and dp.delta (fixed clipping at
--clip_norm): central DP where the algorithm allows it, else local DP. Each cell is one `experiments.train` run
in `<workdir>/<algorithm>/eps=<ε>/seed=<s>/` (finished cells are reused; a run whose loss stops being finite is
reported with its round). Prints one Markdown table, and rewrites its block of benchmarks/RESULTS.md
(`--results`, `--block`).
"""

import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import results
from experiments import configuration, report, train_lib
from fedsnd_jax import algorithms, loop, privacy

_CONFIG = config_flags.DEFINE_config_file("config", "benchmarks/configs/fmnist_cpu_xdevice.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/privacy", "Output folder.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["fedavg", "fedsnd"], "Algorithms.")
_EPSILONS = flags.DEFINE_list("epsilons", ["8", "3", "1"], "Target ε values (plus ∞, no DP).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Dirichlet α.")
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "S, the L2 clip of a client's update.")
results.define_flags("privacy-tradeoff")


def _mode(c) -> str:
  modes = algorithms.get(c.algorithm).privacy(configuration.hyperparameters(c))
  if not modes:
    raise ValueError(f"{c.algorithm}: no DP mode covers its releases")
  return "central" if "central" in modes else "local"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  for name in _ALGORITHMS.value:
    for eps_text in ["inf", *_EPSILONS.value]:
      finals, last5, spent, sigma, server, diverged = [], [], [], None, [], []
      for seed in (int(s) for s in _SEEDS.value):
        c = _CONFIG.value.copy_and_resolve_references()
        c.algorithm, c.alpha, c.seed = name, _ALPHA.value, seed
        mode = _mode(c)
        if eps_text != "inf":
          c.dp.clip_norm, c.dp.local = _CLIP.value, mode == "local"
          c.dp.noise_multiplier = sigma = privacy.noise_for_epsilon(
              float(eps_text), c.rounds, c.num_clients, c.clients_per_round, c.dp.delta, local=c.dp.local,
              sampling=c.client_sampling, kind=c.dp.accountant)
        workdir = os.path.join(_WORKDIR.value, name, f"eps={eps_text}", f"seed={seed}")
        if not os.path.exists(os.path.join(workdir, "summary.json")):
          try:
            train_lib.train_and_evaluate(c, workdir)
          except loop.Diverged as e:
            print(f"{name} ε={eps_text} seed={seed}: {e}", flush=True)
        summary = report.read_summary(workdir)
        if summary.get("diverged"):
          diverged.append(summary["diverged_round"])
          continue
        finals.append(summary["final_accuracy"])
        last5.append(summary["last5_mean_accuracy"])
        spent.append(summary.get("epsilon", float("inf")))
        server.append(summary["mean_server_time_s"])
      dp = "none" if eps_text == "inf" else mode
      cells = (f"{np.mean(spent):.2f} | {100 * np.mean(finals):.2f} ± {100 * np.std(finals):.2f} | "
               f"{100 * np.mean(last5):.2f} | {np.mean(server):.2f}") if finals else "– | – | – | –"
      note = f" (diverged in round {', '.join(map(str, diverged))})" if diverged else ""
      rows.append(f"| {name} | {dp}{note} | {eps_text} | {'–' if sigma is None else f'{sigma:.2f}'} | {cells} |")
      print(rows[-1], flush=True)
  c = _CONFIG.value
  text = "\n".join([
      f"Accuracy vs ε: {c.dataset}, {c.num_clients} clients ({c.clients_per_round} per round), "
      f"α = {_ALPHA.value}, {c.rounds} rounds, δ = {c.dp.delta}, S = {_CLIP.value}, seeds "
      f"{', '.join(_SEEDS.value)}\n",
      "| algorithm | DP | target ε | σ | ε spent | final acc % | last-5 mean % | server s/round |",
      "|---|---|---|---|---|---|---|---|", *rows])
  print(f"\n{text}", flush=True)
  results.publish(flags.FLAGS.results, flags.FLAGS.block, text, "Accuracy against ε")


if __name__ == "__main__":
  app.run(main)
