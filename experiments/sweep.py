r"""Runs algorithms × α × seeds, one train run per cell, then tables and plots (DESIGN §5).

  python -m experiments.sweep --config=experiments/configs/default.py --algorithms=fedavg,fedsnd \
      --alphas=0.1,0.5 --seeds=0,1,2 --workdir=runs/sweep \
      [--variant=fedsnd_best:algorithm=fedsnd:noise_projection=True] [--config.<field>=<value> ...]

Cell `DIR/<algorithm>/alpha=<α>/seed=<s>/` is skipped when its summary.json exists, so an interrupted
sweep resumes where it stopped. A `--variant=NAME:field=value:...` is an extra "algorithm" NAME: the
config with those fields set. Writes DIR/results.csv (one row per cell), DIR/results.md (mean ± std over
seeds, numpy's population std), DIR/accuracy_vs_round_alpha=<α>.png and DIR/final_accuracy_vs_alpha.png.
`--table_only` runs nothing and tables the finished cells (listing the missing ones).
Rounds to target are recomputed from each cell's metrics.jsonl at the sweep's `target_accuracy`, so a finished
sweep can be tabled again at another target (`--config.target_accuracy=0.7`) without running anything; with
fedavg in the sweep, results.md also gives every algorithm's rounds to target as a ratio to FedAvg's.
"""

import csv
import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import runner
from fedsnd_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["fedavg", "fedsnd"], "Algorithms (or --variant names).")
_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "0.5"], "Dirichlet α values.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_PARTITION = flags.DEFINE_string("partition", None, "Partition convention (default: the config's).")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "NAME:field=value:field=value — a named config variant.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Run nothing; table and plot the finished cells.")

COLUMNS = ("algorithm", "alpha", "seed", "final_accuracy", "best_accuracy", "last5_mean_accuracy",
           "rounds_to_target", "mean_client_time_s", "mean_server_time_s", "total_wall_s")
TABLE_FIELDS = (("final_accuracy", "final acc"), ("last5_mean_accuracy", "last-5 mean"),
                ("best_accuracy", "best acc"), ("rounds_to_target", "rounds to target"),
                ("mean_client_time_s", "client s/round"), ("mean_server_time_s", "server s/round"))


def _parse_value(template, text: str):
  if isinstance(template, bool):
    if text not in ("True", "False", "true", "false"):
      raise InputError("variant", f"expected True or False, got {text!r}")
    return text.lower() == "true"
  try:
    return type(template)(text)
  except ValueError:
    raise InputError("variant", f"cannot read {text!r} as {type(template).__name__}") from None


def parse_variants(specs, base) -> dict[str, dict]:
  """{"NAME": {field: value}} from "NAME:field=value:..." strings, typed like the base config's fields."""
  variants = {}
  for spec in specs:
    name, *assignments = spec.split(":")
    overrides = {}
    for a in assignments:
      field, sep, text = a.partition("=")
      if not sep or field not in base:
        raise InputError("variant", f"{spec!r}: {a!r} is not field=value with a known config field")
      overrides[field] = _parse_value(base[field], text)
    if not name or "algorithm" not in overrides:
      raise InputError("variant", f"{spec!r} needs a name and an algorithm=... field")
    variants[name] = overrides
  return variants


def cell_config(base, algorithm: str, alpha: float, seed: int, variants: dict, partition: str | None):
  c = base.copy_and_resolve_references()
  for field, value in variants.get(algorithm, {"algorithm": algorithm}).items():
    c[field] = value
  c.alpha, c.seed = alpha, seed
  if partition:
    c.partition = partition
  return c


def cell_dir(workdir, algorithm, alpha, seed) -> str:
  return os.path.join(workdir, algorithm, f"alpha={alpha:g}", f"seed={seed}")


def _read_summary(path):
  with open(os.path.join(path, "summary.json")) as f:
    return json.load(f)


def _read_metrics(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _seed_runs(metrics: dict, algorithm, alpha) -> list[list[dict]]:
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
        cells.append("never")
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

  "acc without distillation" is the same round's aggregate of the undistilled uploads, so its gap to
  "acc" is what that round's distillation did. `metrics` maps each finished cell to its metrics records.
  """
  lines = ["\nServer diagnostics in the last round that distilled (mean over seeds):\n",
           "| algorithm | α | round | " + " | ".join(label for _, label, _ in DIAGNOSTICS) + " |",
           "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
  for alg in algorithms:
    for alpha in alphas:
      last = [next((r for r in reversed(records) if "kl_before" in r), None)
              for records in _seed_runs(metrics, alg, alpha)]
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
      runs = _seed_runs(metrics, alg, alpha)
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


def sweep(base, workdir: str, algorithms, alphas, seeds, variants=None, partition=None,
          table_only=False) -> list[dict]:
  """Runs every missing cell, then writes results.csv, results.md and the plots; returns the CSV rows.

  With `table_only`, nothing runs: the outputs cover the finished cells and the missing ones are listed.
  """
  variants = variants or {}
  cells = [(a, al, s) for al in alphas for a in algorithms for s in seeds]
  configs = {cell: cell_config(base, *cell, variants, partition) for cell in cells}
  for c in configs.values():  # Every cell's input is checked before any cell runs.
    runner.validate_config(c)
  todo = [cell for cell in cells if not os.path.exists(os.path.join(cell_dir(workdir, *cell), "summary.json"))]
  print(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done", flush=True)
  if table_only:
    if todo:
      print("sweep: tabling finished cells only; missing: "
            + ", ".join(f"{a} α={al:g} seed={s}" for a, al, s in todo), flush=True)
    cells, todo = [c for c in cells if c not in todo], []
  start = time.perf_counter()
  for done, cell in enumerate(todo, 1):
    summary = runner.run(configs[cell], cell_dir(workdir, *cell))
    per_cell = (time.perf_counter() - start) / done
    print(f"[sweep {done}/{len(todo)}] {cell[0]} α={cell[1]:g} seed={cell[2]}: final "
          f"{summary['final_accuracy']:.4f} | ETA {runner.format_eta(per_cell * (len(todo) - done))}",
          flush=True)
  metrics = {cell: _read_metrics(cell_dir(workdir, *cell)) for cell in cells}
  rows = []
  for cell in cells:
    s = _read_summary(cell_dir(workdir, *cell))
    s["rounds_to_target"] = runner.rounds_to_target(metrics[cell], base.target_accuracy)
    rows.append({"algorithm": cell[0], "alpha": cell[1], "seed": cell[2], **{k: s[k] for k in COLUMNS[3:]}})
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  table = aggregate(rows, algorithms, alphas)
  text = (f"Sweep of {base.dataset}, {partition or base.partition} partition, {base.num_clients} clients "
          f"({base.clients_per_round} per round), {base.rounds} rounds; accuracies in %, mean ± std over "
          f"seeds {', '.join(map(str, seeds))}.\n\n" + markdown(table, base.target_accuracy) + "\n"
          + rounds_ratio_markdown(table, base.target_accuracy)
          + diagnostics_markdown(algorithms, alphas, metrics))
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  plot(workdir, algorithms, alphas, metrics, table)
  print(text, flush=True)
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    print("error: workdir: --workdir is required", file=sys.stderr)
    sys.exit(2)
  try:
    alphas = [float(a) for a in _ALPHAS.value]
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError as e:
    print(f"error: alphas/seeds: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    sweep(_CONFIG.value, _WORKDIR.value, _ALGORITHMS.value, alphas, seeds,
          parse_variants(_VARIANTS.value, _CONFIG.value), _PARTITION.value, _TABLE_ONLY.value)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
