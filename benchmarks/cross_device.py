r"""Cross-device as it is: availability, round deadlines and buffered asynchronous aggregation on a simulated
clock, and compressed uploads, on the leaderboard's cross-device protocol.

  python -m benchmarks.cross_device --table=systems      # seeds 0–2; rewrites its RESULTS.md block
  python -m benchmarks.cross_device --table=compression  # seeds 0–2; rewrites its RESULTS.md block
  python -m benchmarks.cross_device --table=systems --rows=fedavg,fedavg_drop --seeds=0 --results=

Every row runs the leaderboard's cross-device setting (`benchmarks.tuning.SETTINGS["xdevice_a0.1"]`: real
Fashion-MNIST, the MLP, 100 clients of which 10 a round, α = 0.1) at tuned FedAvg's client settings
(`benchmarks/configs/tuned.json`), on the simulated clock at its default client systems (`fedsnd_jax/systems.py`:
log-normal step times and bandwidths, drawn per seed). Two tables, each run by its own command in one pass:

  systems      every client always online, no deadline (the reference); seeded availability (online and
               offline spells of 5 and 10 minutes on average); a deadline at the 0.8-quantile of each round's
               client times, where stragglers are dropped or upload their partial work; FedNova under partial
               work; FedSND (library defaults) without and with partial work; FedBuff (buffer 10, 20 clients in
               flight, staleness 1/√(1 + τ)) for FedAvg and FedSND. A FedBuff round is one buffer: 10 uploads, as
               a synchronous round, so 300 rounds are the same client work.
  compression  the reference, and every compressor of `fedsnd_jax/compression.py` with and without error
               feedback (top-k also with EF21), for FedAvg, and FedSND with top-k and error feedback.

Per row: the plateau (as the leaderboard's: each seed's mean over the last fifth of the run, and how far it
still moved), and the simulated seconds, upload MB and rounds to the target — the plateau of the table's
reference row (FedAvg on the clock, no deadline, no compression), less one point. Curves: accuracy against
simulated seconds (systems) and against cumulative upload MB (compression), one line per row with its seed band.
Runs land in `--workdir/<table>/<row>/seed=<s>/` and are reused when finished.
"""

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from benchmarks import leaderboard, results
from experiments import report

SETTING = "xdevice_a0.1"
CLOCK = {"systems.enabled": True}
DEADLINE = {**CLOCK, "systems.deadline_quantile": 0.8}
PARTIAL = {**DEADLINE, "systems.stragglers": "partial"}
FEDBUFF = {**CLOCK, "systems.buffer_size": 10, "systems.concurrency": 20}
REFERENCE = "fedavg"  # each table's row on the clock without deadline or compression: its plateau sets the target
# table -> row -> (algorithm, overrides on top of tuned FedAvg's client settings).
ROWS = {
    "systems": {
        REFERENCE: ("fedavg", CLOCK),
        "fedavg_availability": ("fedavg", {**CLOCK, "systems.online_s": 300.0, "systems.offline_s": 600.0}),
        "fedavg_drop": ("fedavg", DEADLINE),
        "fedavg_partial": ("fedavg", PARTIAL),
        "fednova_partial": ("fednova", PARTIAL),
        "fedsnd": ("fedsnd", CLOCK),
        "fedsnd_partial": ("fedsnd", PARTIAL),
        "fedbuff_fedavg": ("fedavg", FEDBUFF),
        "fedbuff_fedsnd": ("fedsnd", FEDBUFF),
    },
    "compression": {
        REFERENCE: ("fedavg", CLOCK),
        **{f"fedavg_{kind}{'_' + fb if fb != 'none' else ''}": (
            "fedavg", {**CLOCK, "compression.kind": kind, "compression.ratio": ratio, "compression.levels": 4,
                       "compression.feedback": fb})
           for kind, ratio in (("topk", 0.01), ("randk", 0.1), ("qsgd", 1.0), ("sign", 1.0))
           for fb in (("none", "ef", "ef21") if kind == "topk" else ("none", "ef"))},
        "fedsnd_topk_ef": ("fedsnd", {**CLOCK, "compression.kind": "topk", "compression.ratio": 0.01,
                                      "compression.feedback": "ef"}),
    },
}
TARGET_MARGIN = 0.01


def run_rows(workdir: str, tuned: dict, table: str, names, seeds) -> dict[str, dict]:
  """Runs the table's missing cells (all, or those in `names`); returns row -> {summaries, metrics, folders}."""
  client = leaderboard.chosen(tuned, SETTING, "fedavg")[0]
  out = {}
  for name, (algorithm, overrides) in ROWS[table].items():
    if names and name not in names:
      continue
    folders = leaderboard.run_cells(os.path.join(workdir, table), SETTING, name,
                                    {**client, "algorithm": algorithm, **overrides}, seeds)
    out[name] = {"summaries": [report.read_summary(f) for f in folders],
                 "metrics": [report.read_metrics(f) for f in folders], "folders": folders}
  return out


def target_of(rows: dict[str, dict]) -> float | None:
  reference = rows.get(REFERENCE)
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
          "partial/round", "staleness"]
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
             leaderboard._mean_std(per_round(metrics, "partial_clients"), digits=2),
             leaderboard._mean_std(per_round(metrics, "mean_staleness"), digits=2)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(path: str, block: str, rows: dict[str, dict], x_key: str, x_label: str, scale: float,
         x_scale: str) -> None:
  """Test accuracy against `x_key` (cumulative, averaged over seeds; axis `x_scale`), one line per row with its
  seed band."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(8, 4.8))
  for colour, (name, row) in zip(plt.get_cmap("tab20").colors, rows.items(), strict=False):
    mean, std = leaderboard.accuracy_band(row["metrics"])
    x = leaderboard.seed_mean([np.array([r[x_key] / scale for r in m]) for m in row["metrics"]])
    leaderboard.draw_band(ax, x, mean, std, colour, name)
  ax.set_xscale(x_scale)
  ax.set_xlabel(x_label)
  ax.set_ylabel("test accuracy (mean ± std over seeds, moving mean)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  ax.set_title(f"{SETTING}: {block}")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# compressed rows upload 10-300× less than dense ones: bytes on a log axis
AXES = {"systems": ("sim_time_s", "cumulative simulated seconds", 1.0, "linear"),
        "compression": ("bytes_up", "cumulative upload MB (log)", 1e6, "log")}
INTRO = {
    "systems": "Availability: online and offline spells of 300 and 600 s on average. Deadlines at the "
               "0.8-quantile of each round's client times. FedBuff: buffer 10, 20 clients in flight, staleness "
               "1/√(1 + τ), the run's server step; a round is one buffer.",
    "compression": "Ratios: top-k 1 %, rand-k 10 %; QSGD at 4 levels.",
}


def table_text(table_name: str, rows: dict[str, dict], seeds, plots: str, results_path: str) -> str:
  target = target_of(rows)
  text = [f"{SETTING} on the simulated clock (default client systems), tuned FedAvg's client settings, "
          f"300 rounds; seeds {', '.join(map(str, seeds))}; accuracies in %, mean ± population std over seeds. "
          f"Target: the plateau of the `{REFERENCE}` row (no deadline, no compression), less "
          f"{100 * TARGET_MARGIN:.0f} point. {INTRO[table_name]}\n"]
  os.makedirs(plots, exist_ok=True)
  path = os.path.join(plots, f"cross_device_{table_name}.png")
  plot(path, table_name, rows, *AXES[table_name])
  text += [table(table_name, rows, target),
           f"![{table_name}]({os.path.relpath(path, os.path.dirname(results_path) or '.')})\n"]
  return "\n".join(text + [leaderboard.provenance({table_name: rows})])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  flag = flags.FLAGS
  unknown = [r for r in flag.rows if r not in ROWS[flag.table]]
  if unknown:
    raise app.UsageError(f"unknown rows of {flag.table}: {', '.join(unknown)}; known: "
                         f"{', '.join(ROWS[flag.table])}")
  with open(flag.tuned) as f:
    tuned = json.load(f)["settings"]
  seeds = [int(s) for s in flag.seeds]
  start = time.perf_counter()
  rows = run_rows(flag.workdir, tuned, flag.table, set(flag.rows), seeds)
  text = table_text(flag.table, rows, seeds, flag.plots,
                    flag.results or os.path.join(flag.workdir, f"cross_device_{flag.table}.md"))
  print(text, flush=True)
  results.publish(flag.results, f"{flag.block}-{flag.table}", text, f"Cross-device systems: {flag.table}",
                  time.perf_counter() - start)


def define_flags():
  flags.DEFINE_enum("table", "systems", list(ROWS), "Which table to run and write.")
  flags.DEFINE_list("rows", [], "Rows of that table to run (default: all).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Evaluation seeds (disjoint from the tuning seed, 100).")
  flags.DEFINE_string("tuned", "benchmarks/configs/tuned.json", "The tuning's chosen settings.")
  flags.DEFINE_string("workdir", "runs/cross_device", "Run folders.")
  flags.DEFINE_string("plots", "benchmarks/plots", "Where the curves go.")
  results.define_flags("cross-device")


if __name__ == "__main__":
  define_flags()
  app.run(main)
