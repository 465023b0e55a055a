r"""FedSND's server cost against its accuracy: the levers that make a round cheaper, side by side.

  python -m benchmarks.server_cost [--setting=xdevice_a0.1] [--workdir=runs/server_cost]

One setting of `benchmarks.tuning` (digits, or real Fashion-MNIST with the MLP), at the tuning seed on the
validation split: FedAvg, then FedSND with each server setting of `variants`, then FedAvg again (the two FedAvg
runs show how much the machine's speed drifted meanwhile). Every run uses FedSND's tuned client settings in that
setting (benchmarks/configs/tuned.json; FedAvg the same ones), so only the server differs. Columns: validation
accuracy, final and last-5 mean; client and server seconds per round (median over rounds 2+: round 1 compiles);
the round (client + server) as a multiple of FedAvg's (the mean of its two runs' medians), and the same of the
means over rounds 2+ (a lever that skips the server's work in most rounds, `recheck_every`, has a median of the
cheap rounds: the mean charges it its expensive ones). The target: a setting whose last-5 accuracy is within 0.5
points of the most accurate FedSND setting's, at a round ≤ 2× FedAvg's by both measures.

Prints the table and rewrites its block of benchmarks/RESULTS.md (`--results`, `--block`); also writes it to
`--output` (markdown) and the accuracy-vs-server-seconds plot with its Pareto front to `--plot`. Finished runs are
reused: delete a run's folder to time it again.
"""

import json
import os
import statistics

from absl import app, flags, logging

from benchmarks import results, tuning
from experiments import report

TARGET_RATIO = 2.0
TARGET_POINTS = 0.5


def variants(warm: str) -> dict[str, dict]:
  """FedSND server settings, by name: the full server at the protocol's Q first (Q, G, D: pseudo-samples per
  model, synthesis steps, distillation steps; Gaussian start; `tuning.FULL_SERVER`; synthesising every round),
  then a larger one, then the levers, each applied on the full server. `warm`: the warm start that suits the
  setting (`client` when every client comes back each round, else `round`)."""
  synthesis, distillation = "fedsnd.synthesis.", "fedsnd.distillation."
  levers = {
      "full server (Q 32, G 50, D 10)": {},
      "larger server (Q 64, G 100, D 20)": {synthesis + "samples": 64, synthesis + "steps": 100,
                                            distillation + "steps": 20},
      "G 10": {synthesis + "steps": 10},
      f"warm start ({warm}), G 10": {synthesis + "warm_start": warm, synthesis + "steps": 10},
      f"warm start ({warm}), stop at CE 0.3": {synthesis + "warm_start": warm, synthesis + "stop_ce": 0.3},
      f"warm start ({warm}), G 10, D 5": {
          synthesis + "warm_start": warm, synthesis + "steps": 10, distillation + "steps": 5},
      "Q 16, D 5": {synthesis + "samples": 16, distillation + "steps": 5},
      "distil in rounds 1-3 only": {"fedsnd.schedule.distill_rounds": 3},
      "closed gate: synthesise every 10th round only": {"fedsnd.schedule.recheck_every": 10},
      f"warm start ({warm}), G 10, D 5, closed gate: every 10th round (the library's default server)": {
          synthesis + "warm_start": warm, synthesis + "steps": 10, distillation + "steps": 5,
          "fedsnd.schedule.recheck_every": 10},
  }
  every_round = {**tuning.FULL_SERVER, "fedsnd.schedule.recheck_every": 0}  # each lever alone
  return {name: {**every_round, **overrides} for name, overrides in levers.items()}


def medians(workdir: str) -> dict:
  """Median and mean client and server seconds over rounds 2+, and mean synthesis steps taken."""
  rows = report.read_metrics(workdir)[1:]
  med = lambda key: statistics.median(r[key] for r in rows)
  steps = [r["noise_steps_taken"] for r in rows if "noise_steps_taken" in r]
  return {"client_s": med("client_time_s"), "server_s": med("server_time_s"),
          "round_mean_s": statistics.mean(r["client_time_s"] + r["server_time_s"] for r in rows),
          "steps": sum(steps) / len(steps) if steps else None}


def plan(setting: str, tuned: dict):
  """(base config, [(folder, name, overrides)]): FedSND's tuned client settings in the setting, FedAvg first
  and last."""
  client = {k: v for k, v in tuned.get(setting, {}).get("fedsnd", {"overrides": {}})["overrides"].items()
            if not k.startswith("fedsnd.") and k != "algorithm"}
  base = tuning.apply(tuning.setting_config(setting), client)
  warm = "client" if base.clients_per_round == base.num_clients else "round"
  runs = [("fedavg", "FedAvg", {"algorithm": "fedavg"})]
  runs += [(f"fedsnd_{i}", name, {"algorithm": "fedsnd", **overrides})
           for i, (name, overrides) in enumerate(variants(warm).items())]
  return base, [*runs, ("fedavg_again", "FedAvg (again)", {"algorithm": "fedavg"})]


def measure(root: str, setting: str, tuned: dict) -> list[dict]:
  base, runs = plan(setting, tuned)
  rows = []
  for folder, name, overrides in runs:
    row = tuning.run(root, setting, folder, tuning.apply(base, overrides))
    rows.append(dict(row, name=name, overrides=overrides, **medians(os.path.join(root, setting, folder))))
  return rows


def table(setting: str, rows: list[dict]) -> str:
  fedavg = [r for r in rows if r["overrides"]["algorithm"] == "fedavg"]
  reference = statistics.mean(r["client_s"] + r["server_s"] for r in fedavg)
  reference_mean = statistics.mean(r["round_mean_s"] for r in fedavg)
  fedsnd = [r for r in rows if r["overrides"]["algorithm"] == "fedsnd"]
  best = max(r["val_last5"] for r in fedsnd)
  lines = [f"FedSND's server levers, {setting}, tuning seed {tuning.TUNING_SEED} (validation split); seconds are "
           "medians over rounds 2+; round × = (client + server) / FedAvg's (mean of its two runs), of the medians "
           "and of the means over rounds 2+\n",
           "| run | val final % | val last-5 % | client s | server s | synthesis steps | round × FedAvg | "
           "mean round × FedAvg | meets target |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio, mean_ratio = (r["client_s"] + r["server_s"]) / reference, r["round_mean_s"] / reference_mean
    meets = ("" if r in fedavg else "yes" if max(ratio, mean_ratio) <= TARGET_RATIO and
             100 * (best - r["val_last5"]) <= TARGET_POINTS else "no")
    steps = "" if r["steps"] is None else f"{r['steps']:.1f}"
    lines.append(f"| {r['name']} | {100 * r['val_final']:.2f} | {100 * r['val_last5']:.2f} | "
                 f"{r['client_s']:.2f} | {r['server_s']:.2f} | {steps} | {ratio:.2f} | {mean_ratio:.2f} | "
                 f"{meets} |")
  return "\n".join(lines)


def pareto(rows: list[dict]) -> list[dict]:
  """The FedSND runs no other is both cheaper (server seconds) and more accurate than, cheapest first."""
  front, best = [], -1.0
  for r in sorted((r for r in rows if r["overrides"]["algorithm"] == "fedsnd"), key=lambda r: r["server_s"]):
    if r["val_last5"] > best:
      front.append(r)
      best = r["val_last5"]
  return front


def plot(path: str, setting: str, rows: list[dict]) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    is_fedavg = r["overrides"]["algorithm"] == "fedavg"
    ax.scatter(r["server_s"], 100 * r["val_last5"], marker="s" if is_fedavg else "o",
               color="grey" if is_fedavg else "tab:blue")
    ax.annotate(r["name"], (r["server_s"], 100 * r["val_last5"]), fontsize=7, xytext=(4, 2),
                textcoords="offset points")
  front = pareto(rows)
  ax.plot([r["server_s"] for r in front], [100 * r["val_last5"] for r in front], color="tab:orange",
          label="Pareto front")
  ax.set_xlabel("server seconds per round (median, rounds 2+)")
  ax.set_ylabel("validation accuracy, last-5 mean (%)")
  ax.set_title(f"FedSND: accuracy vs server cost, {setting}")
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  flag = flags.FLAGS
  if flag.setting not in tuning.SETTINGS:
    raise app.UsageError(f"unknown setting {flag.setting!r}; allowed: {', '.join(tuning.SETTINGS)}")
  with open(flag.tuned) as f:
    rows = measure(flag.workdir, flag.setting, json.load(f)["settings"])
  text = table(flag.setting, rows)
  print(text, flush=True)
  with open(flag.output or os.path.join(flag.workdir, f"{flag.setting}.md"), "w") as f:
    f.write(text + "\n")
  results.publish(flag.results, flag.block, text, "FedSND's server cost")
  plot(flag.plot or os.path.join(flag.workdir, f"{flag.setting}.png"), flag.setting, rows)


if __name__ == "__main__":
  flags.DEFINE_string("setting", "xdevice_a0.1", "A setting of benchmarks.tuning.")
  flags.DEFINE_string("workdir", "runs/server_cost", "Output folder.")
  flags.DEFINE_string("tuned", "benchmarks/configs/tuned.json", "Tuned settings (FedSND's client settings).")
  flags.DEFINE_string("output", "", "Markdown table (default: <workdir>/<setting>.md).")
  flags.DEFINE_string("plot", "", "The Pareto plot (default: <workdir>/<setting>.png).")
  results.define_flags("server-cost")
  app.run(main)
