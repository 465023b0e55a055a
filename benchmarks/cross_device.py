r"""Cross-device as it is: round deadlines on a simulated clock, and compressed uploads, on the leaderboard's
cross-device protocol.

  python -m benchmarks.cross_device                 # both blocks, seeds 0–2; rewrites its RESULTS.md block
  python -m benchmarks.cross_device --rows=fedavg,fedavg_drop --seeds=0 --results=

Every row runs the leaderboard's cross-device setting (`benchmarks.tuning.SETTINGS["xdevice_a0.1"]`: real
Fashion-MNIST, the MLP, 100 clients of which 10 a round, α = 0.1) at tuned FedAvg's client settings
(`benchmarks/configs/tuned.json`), on the simulated clock at its default client systems (`fedsnd_jax/systems.py`:
log-normal step times and bandwidths, drawn per seed). Two blocks:

  deadlines    no deadline; a deadline at the 0.8-quantile of each round's client times, where stragglers are
               dropped or upload their partial work; FedNova under partial work; FedSND (library defaults,
               no deadline: its server reads every upload, so a deadline is refused).
  compression  every compressor of `fedsnd_jax/compression.py` with and without error feedback (top-k also with
               EF21), for FedAvg, and FedSND with top-k and error feedback.

Per row: the plateau (as the leaderboard's: each seed's mean over the last fifth of the run, and how far it
still moved), and the simulated seconds, upload MB and rounds to the target — the plateau of FedAvg without a
deadline or compression, less one point. Curves: accuracy against simulated seconds (deadlines) and against
cumulative upload MB (compression), one line per row with its seed band. Runs land in
`--workdir/<block>/<row>/seed=<s>/` and are reused when finished.
"""

import json
import os

import numpy as np
from absl import app, flags, logging

from benchmarks import leaderboard, results
from experiments import report

SETTING = "xdevice_a0.1"
CLOCK = {"systems.enabled": True}
DEADLINE = {**CLOCK, "systems.deadline_quantile": 0.8}
# block -> row -> (algorithm, overrides on top of tuned FedAvg's client settings).
ROWS = {
    "deadlines": {
        "fedavg": ("fedavg", CLOCK),
        "fedavg_drop": ("fedavg", DEADLINE),
        "fedavg_partial": ("fedavg", {**DEADLINE, "systems.stragglers": "partial"}),
        "fednova_partial": ("fednova", {**DEADLINE, "systems.stragglers": "partial"}),
        "fedsnd": ("fedsnd", CLOCK),
    },
    "compression": {
        **{f"fedavg_{kind}{'_' + fb if fb != 'none' else ''}": (
            "fedavg", {**CLOCK, "compression.kind": kind, "compression.ratio": ratio, "compression.levels": 4,
                       "compression.feedback": fb})
           for kind, ratio in (("topk", 0.01), ("randk", 0.1), ("qsgd", 1.0), ("sign", 1.0))
           for fb in (("none", "ef", "ef21") if kind == "topk" else ("none", "ef"))},
        "fedsnd_topk_ef": ("fedsnd", {**CLOCK, "compression.kind": "topk", "compression.ratio": 0.01,
                                      "compression.feedback": "ef"}),
    },
}
REFERENCE = "fedavg"  # the deadlines block's row without deadline or compression: its plateau sets the target
TARGET_MARGIN = 0.01


def run_rows(workdir: str, tuned: dict, names, seeds) -> dict[str, dict[str, dict]]:
  """Runs the missing cells; returns block -> row -> {summaries, metrics, folders}."""
  client = leaderboard.chosen(tuned, SETTING, "fedavg")[0]
  out = {}
  for block, rows in ROWS.items():
    for name, (algorithm, overrides) in rows.items():
      if name not in names and f"{block}:{name}" not in names:
        continue
      folders = leaderboard.run_cells(os.path.join(workdir, block), SETTING, name,
                                      {**client, "algorithm": algorithm, **overrides}, seeds)
      out.setdefault(block, {})[name] = {"summaries": [report.read_summary(f) for f in folders],
                                         "metrics": [report.read_metrics(f) for f in folders], "folders": folders}
  return out


def target_of(blocks: dict[str, dict]) -> float | None:
  reference = blocks.get("deadlines", {}).get(REFERENCE)
  if reference is None:
    return None
  level = [v for v in leaderboard.plateau(reference["metrics"])[0] if np.isfinite(v)]
  return float(np.mean(level)) - TARGET_MARGIN if level else None


def to_target(records: list[dict], target: float | None) -> tuple:
  """(rounds, simulated seconds, upload MB) at the first round at or above `target`; Nones if never."""
  i = next((i for i, r in enumerate(records) if target and r["test_accuracy"] >= target), None)
  if i is None:
    return None, None, None
  return records[i]["round"], records[i]["sim_time_s"], records[i]["bytes_up"] / 1e6


def per_round(metrics: list[list[dict]], key: str) -> list[float]:
  """Each seed's mean of a per-round diagnostic (0 where a round did not log it)."""
  return [float(np.mean([r.get(key, 0.0) for r in m])) for m in metrics if m]


def table(block: str, rows: dict[str, dict], target: float | None) -> str:
  rounds = max(leaderboard._rounds(row["metrics"]) for row in rows.values())
  head = ["row", f"plateau (last {leaderboard.window(rounds)} rounds)", "plateau moved", "moved per 10 rounds",
          "reached",
          "rounds to target", "simulated s to target", "MB up to target", "simulated s/round", "dropped/round",
          "partial/round"]
  lines = [f"**{block}** (target {100 * target:.1f} %)\n" if target else f"**{block}**\n",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in rows.items():
    metrics = row["metrics"]
    level, moved = leaderboard.plateau(metrics)
    reach, sim, upload = zip(*(to_target(m, target) for m in metrics), strict=True)
    cells = [name, leaderboard._mean_std(level, 100), "–" if np.isnan(moved) else f"{100 * moved:+.2f}",
             "–" if np.isnan(moved) else f"{100 * leaderboard.per_10_rounds(moved, metrics):+.2f}",
             f"{sum(r is not None for r in reach)}/{len(metrics)}", leaderboard._mean_std(reach, digits=1),
             leaderboard._mean_std(sim, digits=0), leaderboard._mean_std(upload, digits=1),
             leaderboard._mean_std(per_round(metrics, "round_sim_s"), digits=1),
             leaderboard._mean_std(per_round(metrics, "dropped_clients"), digits=2),
             leaderboard._mean_std(per_round(metrics, "partial_clients"), digits=2)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(path: str, block: str, rows: dict[str, dict], x_key: str, x_label: str, scale: float) -> None:
  """Test accuracy against `x_key` (cumulative, averaged over seeds), one line per row with its seed band."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(8, 4.8))
  for colour, (name, row) in zip(plt.get_cmap("tab20").colors, rows.items(), strict=False):
    mean, std = leaderboard.accuracy_band(row["metrics"])
    x = leaderboard.seed_mean([np.array([r[x_key] / scale for r in m]) for m in row["metrics"]])
    leaderboard.draw_band(ax, x, mean, std, colour, name)
  ax.set_xlabel(x_label)
  ax.set_ylabel("test accuracy (mean ± std over seeds, moving mean)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  ax.set_title(f"{SETTING}: {block}")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


AXES = {"deadlines": ("sim_time_s", "cumulative simulated seconds", 1.0),
        "compression": ("bytes_up", "cumulative upload MB", 1e6)}


def block_text(blocks: dict[str, dict], seeds, plots: str, results_path: str) -> str:
  target = target_of(blocks)
  text = [f"{SETTING} on the simulated clock (default client systems), tuned FedAvg's client settings; seeds "
          f"{', '.join(map(str, seeds))}; accuracies in %, mean ± population std over seeds. Target: the plateau "
          f"of the row without deadline or compression, less {100 * TARGET_MARGIN:.0f} point. Deadlines at the "
          "0.8-quantile of each round's client times.\n"]
  os.makedirs(plots, exist_ok=True)
  for block, rows in blocks.items():
    if block == "compression" and REFERENCE in blocks.get("deadlines", {}):  # the uncompressed row beside them
      rows = {f"{REFERENCE} (uncompressed)": blocks["deadlines"][REFERENCE], **rows}
    path = os.path.join(plots, f"cross_device_{block}.png")
    plot(path, block, rows, *AXES[block])
    text += [table(block, rows, target),
             f"![{block}]({os.path.relpath(path, os.path.dirname(results_path) or '.')})\n"]
  return "\n".join(text + [leaderboard.provenance(blocks)])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  flag = flags.FLAGS
  known = {n for rows in ROWS.values() for n in rows} | {f"{b}:{n}" for b, rows in ROWS.items() for n in rows}
  unknown = [r for r in flag.rows if r not in known]
  if unknown:
    raise app.UsageError(f"unknown rows: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
  with open(flag.tuned) as f:
    tuned = json.load(f)["settings"]
  seeds = [int(s) for s in flag.seeds]
  blocks = run_rows(flag.workdir, tuned, set(flag.rows), seeds)
  text = block_text(blocks, seeds, flag.plots, flag.results or os.path.join(flag.workdir, "cross_device.md"))
  print(text, flush=True)
  results.publish(flag.results, flag.block, text, "Cross-device systems")


def define_flags():
  every = [f"{b}:{n}" for b, rows in ROWS.items() for n in rows]
  flags.DEFINE_list("rows", every, "Rows to run (a row name, or block:row).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Evaluation seeds (disjoint from the tuning seed, 100).")
  flags.DEFINE_string("tuned", "benchmarks/configs/tuned.json", "The tuning's chosen settings.")
  flags.DEFINE_string("workdir", "runs/cross_device", "Run folders.")
  flags.DEFINE_string("plots", "benchmarks/plots", "Where the curves go.")
  results.define_flags("cross-device")


if __name__ == "__main__":
  define_flags()
  app.run(main)
