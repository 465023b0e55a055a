"""Tables and plots of finished runs, shared by the sweep and the benchmarks.

A run folder holds summary.json and metrics.jsonl (the output contract of fedsnd_jax/loop.py); these functions
read them and write Markdown tables (mean ± population std over seeds) and matplotlib figures. Validation-split
columns (`val`) sit beside the test columns so settings can be chosen without looking at the test set.
"""

import json
import os

import numpy as np

COLUMNS = ("algorithm", "alpha", "seed", "final_accuracy", "best_accuracy", "last5_mean_accuracy",
           "final_val_accuracy", "last5_mean_val_accuracy", "rounds_to_target", "mean_client_time_s",
           "mean_server_time_s", "total_wall_s", "diverged")
TABLE_FIELDS = (("final_accuracy", "final acc"), ("last5_mean_accuracy", "last-5 mean"),
                ("best_accuracy", "best acc"), ("final_val_accuracy", "val final"),
                ("last5_mean_val_accuracy", "val last-5 mean"), ("rounds_to_target", "rounds to target"),
                ("mean_client_time_s", "client s/round"), ("mean_server_time_s", "server s/round"))


def read_summary(path):
  """A run folder's summary.json."""
  with open(os.path.join(path, "summary.json")) as f:
    return json.load(f)


def read_metrics(path):
  """A run folder's metrics.jsonl records."""
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def seed_runs(metrics: dict, algorithm, alpha) -> list[list[dict]]:
  """The metrics records of every finished seed of (algorithm, α); `metrics` maps cells to records."""
  return [records for (alg, al, _), records in metrics.items() if (alg, al) == (algorithm, alpha)]


def aggregate(rows: list[dict], algorithms, alphas) -> list[dict]:
  """Per (algorithm, α): mean and population std over seeds of every TABLE_FIELDS value.

  rounds_to_target counts only seeds that reached the target; `reached` says how many did.
  """
  out = []
  for alg in algorithms:
    for alpha in alphas:
      cells = [r for r in rows if r["algorithm"] == alg and r["alpha"] == alpha]
      if not cells:
        continue
      entry = {"algorithm": alg, "alpha": alpha, "seeds": len(cells)}
      for field, _ in TABLE_FIELDS:
        values = np.array([r[field] for r in cells if r[field] is not None], dtype=np.float64)
        entry[field] = (float(values.mean()), float(values.std())) if values.size else None
      entry["reached"] = sum(r["rounds_to_target"] is not None for r in cells)
      out.append(entry)
  return out


def markdown(table: list[dict], target: float) -> str:
  header = ["algorithm", "α", "seeds"] + [label for _, label in TABLE_FIELDS]
  lines = ["| " + " | ".join(header).replace("rounds to target", f"rounds to {target:g}") + " |",
           "|" + "---|" * len(header)]
  for e in table:
    cells = [e["algorithm"], f"{e['alpha']:g}", str(e["seeds"])]
    for field, _ in TABLE_FIELDS:
      v = e[field]
      if v is None:
        cells.append("never" if field == "rounds_to_target" else "–")
      elif field == "rounds_to_target":
        cells.append(f"{v[0]:.1f} ± {v[1]:.1f} ({e['reached']}/{e['seeds']})")
      elif field.endswith("time_s"):
        cells.append(f"{v[0]:.3f} ± {v[1]:.3f}")
      else:
        cells.append(f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def rounds_ratio_markdown(table: list[dict], target: float) -> str:
  """Mean rounds to target of each algorithm divided by FedAvg's at the same α ("" without fedavg cells).

  A ratio below 1 means fewer rounds (less communication) than FedAvg; only seeds that reached the target
  count, so the `reached` columns say how many did.
  """
  base = {e["alpha"]: e for e in table if e["algorithm"] == "fedavg"}
  lines = [f"\nRounds to {target:g} test accuracy relative to FedAvg (mean over the seeds that reached it):\n",
           "| algorithm | α | rounds / FedAvg's | reached | FedAvg reached |", "|---|---|---|---|---|"]
  for e in table:
    ref = base.get(e["alpha"])
    if ref is None or e["algorithm"] == "fedavg":
      continue
    ratio = (f"{e['rounds_to_target'][0] / ref['rounds_to_target'][0]:.2f}"
             if e["rounds_to_target"] and ref["rounds_to_target"] else "–")
    lines.append(f"| {e['algorithm']} | {e['alpha']:g} | {ratio} | {e['reached']}/{e['seeds']} | "
                 f"{ref['reached']}/{ref['seeds']} |")
  return "\n".join(lines) + "\n" if len(lines) > 3 else ""


DIAGNOSTICS = (("teacher_ce", "teacher CE on own noise", "{:.2f}"),
               ("teacher_agreement", "teacher agreement", "{:.1%}"),
               ("soft_target_accuracy", "soft target = label", "{:.1%}"),
               ("kl_before", "KL before", "{:.2f}"), ("kl_after", "KL after", "{:.2f}"),
               ("noise_norm", "noise norm", "{:.1f}"), ("data_norm", "data norm", "{:.1f}"),
               ("test_accuracy", "acc", "{:.2%}"),
               ("test_accuracy_no_distill", "acc without distillation", "{:.2%}"))


def diagnostics_markdown(algorithms, alphas, metrics: dict) -> str:
  """Server-distillation diagnostics of the last round that distilled, mean over seeds ("" when none did).

  A round distilled when it logged the distillation's diagnostics with its regime-aware gate open.
  "acc without distillation" is the same round's aggregate of the undistilled uploads, so its gap to
  "acc" is what that round's distillation did. `metrics` maps each finished cell to its metrics records.
  """
  lines = ["\nServer diagnostics in the last round that distilled (mean over seeds):\n",
           "| algorithm | α | round | " + " | ".join(label for _, label, _ in DIAGNOSTICS) + " |",
           "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
  for alg in algorithms:
    for alpha in alphas:
      last = [next((r for r in reversed(records) if "kl_before" in r and r.get("distill_gate", 1) > 0), None)
              for records in seed_runs(metrics, alg, alpha)]
      last = [r for r in last if r is not None]
      if not last:
        continue
      values = [fmt.format(np.mean([r[k] for r in last])) for k, _, fmt in DIAGNOSTICS]
      rounds = "/".join(sorted({str(r["round"]) for r in last}))
      lines.append(f"| {alg} | {alpha:g} | {rounds} | " + " | ".join(values).replace("%", " %") + " |")
  return "\n".join(lines) + "\n" if len(lines) > 3 else ""


def plot(workdir, algorithms, alphas, metrics: dict, table) -> list[str]:
  """accuracy-vs-round per α (mean over seeds, ±std band) and final accuracy vs α; returns the paths.

  `metrics` maps each finished cell to its metrics records.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  paths = []
  for alpha in alphas:
    fig, ax = plt.subplots(figsize=(6, 4))
    for alg in algorithms:
      runs = seed_runs(metrics, alg, alpha)
      if not runs:
        continue
      rounds = [r["round"] for r in runs[0]]
      acc = np.array([[r["test_accuracy"] for r in run] for run in runs])
      mean, std = acc.mean(0), acc.std(0)
      ax.plot(rounds, mean, label=alg)
      ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"α = {alpha:g} (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(workdir, f"accuracy_vs_round_alpha={alpha:g}.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for alg in algorithms:
    entries = [e for e in table if e["algorithm"] == alg]
    xs = [e["alpha"] for e in entries]
    ax.errorbar(xs, [e["final_accuracy"][0] for e in entries], yerr=[e["final_accuracy"][1] for e in entries],
                marker="o", capsize=3, label=alg)
  ax.set_xscale("log")
  ax.set_xlabel("Dirichlet α")
  ax.set_ylabel("final test accuracy")
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(workdir, "final_accuracy_vs_alpha.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


def val_history(path) -> list[float]:
  """A run folder's validation accuracy per evaluated round."""
  return [r["val_accuracy"] for r in read_metrics(path)]


def ranking_markdown(title: str, rows: list[dict]) -> str:
  """Runs ranked by the last-5-round mean of validation accuracy (rows: name, val_final, val_last5, client_s,
  server_s)."""
  lines = [f"\n{title}\n", "| run | val final | val last-5 mean | client s/round | server s/round |",
           "|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: -r["val_last5"]):
    lines.append(f"| {r['name']} | {r['val_final']:.4f} | {r['val_last5']:.4f} | {r['client_s']:.2f} | "
                 f"{r['server_s']:.2f} |")
  return "\n".join(lines)
