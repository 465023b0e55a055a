r"""Chooses FedAvg's and FedSND's settings on the validation split (never the test set).

  python -m benchmarks.fedsnd_tuning --config=benchmarks/configs/fmnist_cpu.py --workdir=runs/tuning

Stage 1 gives FedAvg its tuning budget (client lr × local epochs); stage 2 runs FedSD, FedND, FedSND and
the §2.6 variants at the client settings stage 1 chose. Each candidate is one `experiments.train` run
(seed 0) in `<workdir>/<name>/` (finished runs are reused); the table ranks by the last-5-round mean of
validation accuracy.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import report, runner

_CONFIG = config_flags.DEFINE_config_file("config", "benchmarks/configs/fmnist_cpu.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tuning", "Output folder.")
_LRS = flags.DEFINE_list("client_lrs", ["0.01", "0.03", "0.1"], "Client learning rates for FedAvg.")
_EPOCHS = flags.DEFINE_list("local_epochs", ["1", "2"], "Local epochs for FedAvg.")

# Each variant: top-level config fields, and FedSND's section (`c.fedsnd`) under "fedsnd".
VARIANTS = {
    "fedsd": dict(algorithm="fedsd"),
    "fednd": dict(algorithm="fednd"),
    "fedsnd": dict(algorithm="fedsnd"),
    "fedsnd+proj": dict(algorithm="fedsnd", fedsnd=dict(noise_projection=True)),
    "fedsnd+proj+classw": dict(algorithm="fedsnd", fedsnd=dict(noise_projection=True,
                                                               teacher_weighting="class_count")),
    "fedavg+bn": dict(algorithm="fedavg", batch_norm=True),
    "fedsnd+classw+first3": dict(algorithm="fedsnd", fedsnd=dict(teacher_weighting="class_count",
                                                                 distill_rounds=3)),
    "fedsnd+classw+global": dict(algorithm="fedsnd", fedsnd=dict(teacher_weighting="class_count",
                                                                 distill_target="global")),
    "fedsnd+bn+prior": dict(algorithm="fedsnd", batch_norm=True, fedsnd=dict(bn_prior=0.1)),  # slow on CPU: last
}


def _run(name, overrides):
  c = _CONFIG.value.copy_and_resolve_references()
  c.seed = 0
  for k, v in overrides.items():
    if isinstance(v, dict):
      c[k].update(v)
    else:
      c[k] = v
  workdir = os.path.join(_WORKDIR.value, name)
  summary_path = os.path.join(workdir, "summary.json")
  summary = report.read_summary(workdir) if os.path.exists(summary_path) else runner.run(c, workdir)
  val = report.val_history(workdir)
  row = {"name": name, "val_final": val[-1], "val_last5": sum(val[-5:]) / len(val[-5:]),
         "client_s": summary["mean_client_time_s"], "server_s": summary["mean_server_time_s"]}
  print(f"[tuning] {name}: val last-5 {row['val_last5']:.4f}", flush=True)
  return row


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
  print(report.ranking_markdown(f"Stage 1: FedAvg tuning on the validation split ({base.dataset}, α={base.alpha}, "
               f"{base.num_clients} clients, seed 0)", stage1))
  print(report.ranking_markdown(f"Stage 2: variants at client_lr={lr}, local_epochs={epochs}", stage2))


if __name__ == "__main__":
  app.run(main)
