r"""Chooses FedAvg's and FedSND's settings on the validation split (never the test set).

  python -m benchmarks.fedsnd_tuning --config=benchmarks/configs/fmnist_cpu.py --workdir=runs/tuning

Stage 1 gives FedAvg its tuning budget (client lr × local epochs); stage 2 runs FedSD, FedND, FedSND and
the §2.6 variants at the client settings stage 1 chose. Each candidate is one `experiments.train` run
(seed 0) in `<workdir>/<name>/` (finished runs are reused); the table ranks by the last-5-round mean of
validation accuracy.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import runner

_CONFIG = config_flags.DEFINE_config_file("config", "benchmarks/configs/fmnist_cpu.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tuning", "Output folder.")
_LRS = flags.DEFINE_list("client_lrs", ["0.01", "0.03", "0.1"], "Client learning rates for FedAvg.")
_EPOCHS = flags.DEFINE_list("local_epochs", ["1", "2"], "Local epochs for FedAvg.")

VARIANTS = {
    "fedsd": dict(algorithm="fedsd"),
    "fednd": dict(algorithm="fednd"),
    "fedsnd": dict(algorithm="fedsnd"),
    "fedsnd+proj": dict(algorithm="fedsnd", noise_projection=True),
    "fedsnd+proj+classw": dict(algorithm="fedsnd", noise_projection=True, teacher_weighting="class_count"),
    "fedavg+bn": dict(algorithm="fedavg", batch_norm=True),
    "fedsnd+classw+first3": dict(algorithm="fedsnd", teacher_weighting="class_count", distill_rounds=3),
    "fedsnd+classw+global": dict(algorithm="fedsnd", teacher_weighting="class_count", distill_target="global"),
    "fedsnd+bn+prior": dict(algorithm="fedsnd", batch_norm=True, bn_prior=0.1),  # slow on CPU: last
}


def _val_history(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["val_accuracy"] for line in f]


def _run(name, overrides):
  c = _CONFIG.value.copy_and_resolve_references()
  c.seed = 0
  for k, v in overrides.items():
    c[k] = v
  workdir = os.path.join(_WORKDIR.value, name)
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  else:
    summary = runner.run(c, workdir)
  val = _val_history(workdir)
  row = {"name": name, "val_final": val[-1], "val_last5": sum(val[-5:]) / len(val[-5:]),
         "client_s": summary["mean_client_time_s"], "server_s": summary["mean_server_time_s"]}
  print(f"[tuning] {name}: val last-5 {row['val_last5']:.4f}", flush=True)
  return row


def _table(title, rows):
  lines = [f"\n{title}\n", "| run | val final | val last-5 mean | client s/round | server s/round |",
           "|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: -r["val_last5"]):
    lines.append(f"| {r['name']} | {r['val_final']:.4f} | {r['val_last5']:.4f} | {r['client_s']:.2f} | "
                 f"{r['server_s']:.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  base = _CONFIG.value
  stage1 = [_run(f"fedavg_lr{lr}_e{e}", dict(algorithm="fedavg", client_lr=float(lr), local_epochs=int(e)))
            for lr in _LRS.value for e in _EPOCHS.value]
  best = max(stage1, key=lambda r: r["val_last5"])
  lr, epochs = best["name"].split("_lr")[1].split("_e")
  client = dict(client_lr=float(lr), local_epochs=int(epochs))
  stage2 = [best] + [_run(f"{name}_lr{lr}_e{epochs}", {**client, **v}) for name, v in VARIANTS.items()]
  print(_table(f"Stage 1: FedAvg tuning on the validation split ({base.dataset}, α={base.alpha}, "
               f"{base.num_clients} clients, seed 0)", stage1))
  print(_table(f"Stage 2: variants at client_lr={lr}, local_epochs={epochs}", stage2))


if __name__ == "__main__":
  app.run(main)
