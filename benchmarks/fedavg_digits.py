r"""FedAvg on digits with the default config: accuracy per α and seconds per round per client_map.

  python -m benchmarks.fedavg_digits [--alphas=0.1,1.0] [--client_maps=vmap,chunked,loop] [--rounds=30]

Every cell is a full `experiments.train` run in a temporary workdir; times exclude round 1 (compilation).
Prints one Markdown table, and rewrites its block of benchmarks/RESULTS.md (`--results`, `--block`).
"""

import tempfile

import jax
from absl import app, flags, logging

from benchmarks import results
from experiments import train_lib
from experiments.configs import default

_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "1.0"], "Dirichlet α values (dirichlet_label).")
_MAPS = flags.DEFINE_list("client_maps", ["vmap", "chunked", "loop"], "Client mapping strategies.")
_ROUNDS = flags.DEFINE_integer("rounds", 30, "Rounds per run.")
results.define_flags("fedavg-digits")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  for alpha in _ALPHAS.value:
    for client_map in _MAPS.value:
      c = default.get_config()
      c.alpha, c.client_map, c.rounds = float(alpha), client_map, _ROUNDS.value
      with tempfile.TemporaryDirectory() as workdir:
        s = train_lib.train_and_evaluate(c, workdir)
      rows.append(f"| {alpha} | {client_map} | {s['final_accuracy']:.4f} | {s['last5_mean_accuracy']:.4f} | "
                  f"{s['rounds_to_target']} | {s['mean_client_time_s']:.4f} | {s['mean_server_time_s']:.4f} |")
  c = default.get_config()
  text = "\n".join([
      f"FedAvg, {c.dataset}, {c.model}, {c.partition}, {c.num_clients} clients ({c.clients_per_round} per "
      f"round), {c.local_epochs} local epochs, batch {c.batch_size}, lr {c.client_lr}, {_ROUNDS.value} rounds; "
      f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})\n",
      f"| α | client_map | final acc | last-5 mean | rounds to {c.target_accuracy} | client s/round | "
      "server s/round |",
      "|---|---|---|---|---|---|---|", *rows])
  print(f"\n{text}", flush=True)
  results.publish(flags.FLAGS.results, flags.FLAGS.block, text, "FedAvg on digits")


if __name__ == "__main__":
  app.run(main)
