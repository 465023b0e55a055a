r"""Every algorithm and every mechanism on the tiny config, for checking that a refactor changes no result.

  python -m benchmarks.bit_identity --workdir=runs/identity_before            # on the old tree
  python -m benchmarks.bit_identity --workdir=runs/identity_after --against=runs/identity_before

Each case is the tiny config (experiments/configs/tiny.py: 3 digits clients, 3 rounds of 2 local steps) with a
few fields set, run in this process into `<workdir>/<case>/`. With `--against`, every case's metrics.jsonl and
summary.json are compared with the other folder's, record by record, leaving out the fields that are times
(`*_s`); the script prints one line per case (`same`, or the first field that differs) and exits 1 if any case
differs or is missing. Cases are named, so a renamed config field keeps its case's name.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

from experiments import configuration, train_lib
from experiments.configs import tiny

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the cases run (one folder each).")
_AGAINST = flags.DEFINE_string("against", None, "A finished --workdir of this script to compare with.")
_CASES = flags.DEFINE_list("cases", [], "Run only these cases (default: all).")

ROBUST = {"num_clients": 7, "clients_per_round": 7}  # room for f = 1 under every rule
ATTACKED = {**ROBUST, "attack.fraction": 0.3}  # 2 of 7 clients

CASES: dict[str, dict] = {
    **{name: {"algorithm": name} for name in ("fedavg", "fedsd", "fednd", "fedsnd", "fedprox", "scaffold", "moon",
                                              "feddyn", "fedntd", "fedgen", "fedftg", "fednova")},
    "fedavg_epochs": {"local_steps": 0, "local_epochs": 1},
    "fedavg_server_adam": {"server_opt": "adam", "server_lr": 0.01},
    "fedavg_poisson": {"client_sampling": "poisson"},
    "dp_central": {"dp.clip_norm": 1.0, "dp.noise_multiplier": 0.5},
    "dp_adaptive": {"dp.clip_norm": 1.0, "dp.noise_multiplier": 0.5, "dp.adaptive_clip": True},
    "dp_local_fedsnd": {"algorithm": "fedsnd", "dp.clip_norm": 1.0, "dp.noise_multiplier": 0.5, "dp.local": True},
    "dp_poisson_pld": {"dp.clip_norm": 1.0, "client_sampling": "poisson", "dp.accountant": "pld"},
    "dp_target_epsilon": {"dp.clip_norm": 1.0, "dp.noise_multiplier": 0.8, "dp.target_epsilon": 18.0},
    "secagg": {"secagg.enabled": True},
    "secagg_dropout": {"num_clients": 5, "clients_per_round": 5, "secagg.enabled": True,
                       "secagg.dropout": 0.2, "secagg.bits": 12},
    **{f"robust_{rule}": {**ROBUST, "robust.rule": rule}
       for rule in ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping")},
    "robust_median_nnm": {**ROBUST, "robust.rule": "median", "robust.nearest_neighbor_mixing": True},
    **{f"attack_{kind}": {**ATTACKED, "attack.kind": kind} for kind in ("sign_flip", "gaussian", "alie", "ipm",
                                                                   "label_flip")},
    "attack_ipm_scaled_krum": {**ATTACKED, "attack.kind": "ipm", "attack.scale": 0.5, "robust.rule": "krum"},
    "systems_clock": {"systems.enabled": True},
    "systems_deadline_drop": {"systems.enabled": True, "systems.deadline_quantile": 0.7},
    "systems_deadline_partial_fednova": {"algorithm": "fednova", "systems.enabled": True,
                                         "systems.deadline_quantile": 0.7, "systems.stragglers": "partial"},
    "systems_availability_fedsnd_partial": {"algorithm": "fedsnd", "systems.enabled": True,
                                            "systems.online_s": 2.0, "systems.offline_s": 2.0,
                                            "systems.deadline_quantile": 0.7, "systems.stragglers": "partial"},
    "systems_fedbuff": {"systems.enabled": True, "systems.buffer_size": 2, "systems.concurrency": 3},
    "systems_fedbuff_fedsnd_availability": {"algorithm": "fedsnd", "systems.enabled": True,
                                            "systems.buffer_size": 2, "systems.concurrency": 3,
                                            "systems.online_s": 2.0, "systems.offline_s": 2.0},
    "compression_topk_ef": {"compression.kind": "topk", "compression.ratio": 0.1, "compression.feedback": "ef"},
    "compression_qsgd_ef21_fednova": {"algorithm": "fednova", "compression.kind": "qsgd",
                                      "compression.feedback": "ef21"},
    "compression_randk_local_dp": {"compression.kind": "randk", "compression.ratio": 0.5, "dp.clip_norm": 1.0,
                                   "dp.local": True},
    "attack_gaussian_fedsnd_consensus_median": {**ATTACKED, "attack.kind": "gaussian", "robust.rule": "median",
                                                "algorithm": "fedsnd", "fedsnd.consensus.enabled": True},
    **{f"fedsnd_{name}": {"algorithm": "fedsnd", **{f"fedsnd.{k}": v for k, v in fields.items()}}
       for name, fields in {
           "warm_start_client": {"synthesis.warm_start": "client"},
           "gaussian_projected": {"synthesis.warm_start": "none", "synthesis.projection": True,
                                  "synthesis.l2": 0.01},
           "histogram_class_count": {"synthesis.targets": "histogram",
                                     "distillation.teacher_weighting": "class_count"},
           "confidence_weighting_dropout": {"distillation.teacher_weighting": "confidence",
                                            "distillation.student_train_mode": True},
           "global_target_decay": {"distillation.target": "global", "distillation.lr_decay": 0.9},
           "recheck": {"schedule.recheck_every": 2, "schedule.distill_agreement": 0.5},
           "regime_budget_stop_ce": {"schedule.full_server_below": 0.9, "synthesis.stop_ce": 0.5},
           "distill_rounds_consensus": {"schedule.distill_rounds": 1, "consensus.enabled": True},
           "ungated": {"schedule.gate_partial_participation": False, "schedule.distill_agreement": 0.5},
           "adversarial": {"synthesis.adversarial": 0.5},
           "mutual_ungated_loss": {"self_distillation.mode": "dropout", "self_distillation.lambda_mutual": 1.0,
                                   "self_distillation.confidence_gate": False},
       }.items()},
}
# Cases run vectorised (`train_lib.train_and_evaluate_many`) over these seeds.
VECTORISED = {"vectorised_fedavg": {}, "vectorised_fedavg_epochs": {"local_steps": 0, "local_epochs": 1},
              "vectorised_dp_central": {"dp.clip_norm": 1.0, "dp.noise_multiplier": 0.5}}
VECTORISED_SEEDS = (0, 1)


def config(overrides: dict, seed: int = 0):
  return configuration.set_fields(tiny.get_config(), {**overrides, "seed": seed})


def run_case(name: str, workdir: str) -> None:
  if name in VECTORISED:
    configs = [config(VECTORISED[name], seed) for seed in VECTORISED_SEEDS]
    workdirs = [os.path.join(workdir, name, f"seed={s}") for s in VECTORISED_SEEDS]
    train_lib.train_and_evaluate_many(configs, workdirs)
  else:
    train_lib.train_and_evaluate(config(CASES[name]), os.path.join(workdir, name))


def _untimed(record: dict) -> dict:
  return {k: v for k, v in record.items() if not k.endswith("_s")}


def _records(folder: str) -> list[dict]:
  """The folder's metrics.jsonl records and summary.json (last), without times; a vectorised case's runs in
  turn."""
  runs = sorted(d for d in os.listdir(folder) if d.startswith("seed=")) if os.path.isdir(folder) else []
  out = []
  for run_folder in [os.path.join(folder, d) for d in runs] or [folder]:
    with open(os.path.join(run_folder, "metrics.jsonl")) as f:
      out += [_untimed(json.loads(line)) for line in f]
    with open(os.path.join(run_folder, "summary.json")) as f:
      out.append(_untimed(json.load(f)))
  return out


def difference(ours: str, theirs: str) -> str:
  """'' if both folders hold the same records, else the first difference, in words."""
  try:
    a, b = _records(ours), _records(theirs)
  except FileNotFoundError as e:
    return f"missing {e.filename}"
  if len(a) != len(b):
    return f"{len(a)} records against {len(b)}"
  for i, (x, y) in enumerate(zip(a, b, strict=True)):
    for key in sorted(set(x) | set(y)):
      if x.get(key) != y.get(key):
        return f"record {i + 1}: {key} = {x.get(key)} against {y.get(key)}"
  return ""


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  names = _CASES.value or [*CASES, *VECTORISED]
  unknown = sorted(set(names) - set(CASES) - set(VECTORISED))
  if unknown:
    print(f"error: cases: unknown {', '.join(unknown)}", file=sys.stderr)
    sys.exit(2)
  differ = 0
  for name in names:
    start = time.perf_counter()
    run_case(name, _WORKDIR.value)
    verdict = ""
    if _AGAINST.value:
      problem = difference(os.path.join(_WORKDIR.value, name), os.path.join(_AGAINST.value, name))
      differ += bool(problem)
      verdict = f"  {problem or 'same'}"
    print(f"{name:42s} {time.perf_counter() - start:6.1f} s{verdict}", flush=True)
  if _AGAINST.value:
    print(f"{len(names) - differ} of {len(names)} cases the same")
  sys.exit(1 if differ else 0)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
