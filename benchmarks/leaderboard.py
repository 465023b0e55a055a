r"""The leaderboard: every algorithm at its tuned setting on real Fashion-MNIST, evaluation seeds 0–2.

  bash benchmarks/leaderboard.sh        # all settings and algorithms (see the script for the CPU scale)
  python -m benchmarks.leaderboard --settings=xdevice_a0.1 --algorithms=fedavg,fedsnd --seeds=0,1,2

Each algorithm runs with the winner of its tuning (`benchmarks/configs/tuned.json`, written by
`benchmarks.tuning` on the validation split at tuning seed 100) where that setting was tuned, else with the first
candidate of its grid (its paper's defaults); the "setting" column says which, and how many configurations the
tuning compared. The row `fedsnd_defaults` is FedSND at the library defaults of its own section, at tuned FedAvg's
client settings: whether those defaults are safe (issue 13) is read off it against FedAvg's row (where FedSND's
tuning kept exactly that, the row reuses FedSND's runs); `fedsnd_momentum` is tuned FedSND on tuned FedAvgM's
server optimiser, whether FedSND adds to server momentum (no tuning of its own either). Runs land in
`--workdir/<setting>/<algorithm>/seed=<s>/` and are skipped when finished, so an interrupted leaderboard resumes;
a folder that ran another configuration of the algorithm (its tuning changed since) or other rounds runs again.

Per setting, one table: test accuracy final and last-5 mean (mean ± population std over seeds), rounds to
target and wall-clock to target, client and server seconds per round (mean over rounds 2+, round 1 compiles).
The target is tuned FedAvg's mean final test accuracy on the same seeds: "rounds to reach what FedAvg ends at"
(seeds that never reach it are left out of the mean; `reached` counts them). Wall-clock to target is rounds to
target × (client + server seconds per round): where a server's cost shows. Each setting's table is kept in
`<workdir>/<setting>.md`; all settings' tables found there (not only this run's) go to `--output`, and between
the leaderboard markers of `--results` (benchmarks/RESULTS.md) when given.
"""

import json
import os
import shutil

import numpy as np
from absl import app, flags, logging

from benchmarks import tuning
from experiments import report, train_lib
from fedsnd_jax import loop

# Rows of FedSND composed from other rows' tuning, with no tuning of their own: the library defaults of its own
# section at tuned FedAvg's client settings (issue 13's first target, "never more than 0.5 points below tuned
# FedAvg", is read off it), and FedSND's tuned setting on tuned FedAvgM's server optimiser (does FedSND add to
# momentum? Both were tuned at FedAvg's client settings).
DEFAULTS, MOMENTUM = "fedsnd_defaults", "fedsnd_momentum"
COMPOSED = {DEFAULTS: "library defaults", MOMENTUM: "tuned FedSND on FedAvgM's server"}
ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "scaffold", "feddyn", "moon", "fedntd", "fedgen", "fedftg", "fedsnd",
              DEFAULTS, MOMENTUM)
BEGIN, END = "<!-- leaderboard:begin -->", "<!-- leaderboard:end -->"


def chosen(tuned: dict, setting: str, algorithm: str) -> tuple[dict, str]:
  """(the algorithm's overrides in a setting, what they are): the winner of its tuning ("best of N"; "one-stage"
  where it was tuned before the two-stage protocol, at the setting's own client settings), else its first
  candidate, the paper's defaults (at tuned FedAvg's client settings where FedAvg is tuned)."""
  if algorithm == DEFAULTS:
    return {**chosen(tuned, setting, "fedavg")[0], "algorithm": "fedsnd"}, COMPOSED[algorithm]
  if algorithm == MOMENTUM:
    server = {k: v for k, v in chosen(tuned, setting, "fedavgm")[0].items() if k.startswith("server_")}
    return {**chosen(tuned, setting, "fedsnd")[0], **server}, COMPOSED[algorithm]
  entry = tuned.get(setting, {}).get(algorithm)
  if entry and (changed := tuning.drifted(entry, setting)):
    raise ValueError(f"{setting} {algorithm}: the tuned winner ran with other {', '.join(changed)} than its "
                     "overrides give today (a library default changed since): pin them in the entry's overrides "
                     f"or tune again (python -m benchmarks.tuning --settings={setting} --algorithms={algorithm})")
  if entry:
    return entry["overrides"], f"best of {len(entry['evidence'])}" + (
        "" if entry.get("protocol") == "two-stage" or algorithm == "fedavg" else ", one-stage")
  if "fedavg" in tuned.get(setting, {}):
    return tuning.candidates(tuned, setting, algorithm)[0], "paper default at FedAvg's client settings"
  return tuning.GRIDS[algorithm][0], "paper default"


def run_cells(workdir: str, setting: str, algorithm: str, overrides: dict, seeds) -> list[str]:
  """Runs the missing seeds of one algorithm in one setting; returns their run folders."""
  base = tuning.setting_config(setting)
  folders = []
  for seed in seeds:
    folder = os.path.join(workdir, setting, algorithm, f"seed={seed}")
    config = tuning.apply(base, overrides)
    config.seed = seed
    done = tuning.finished(folder, config)
    if not done and (tuning.stale(folder, config) or os.path.exists(os.path.join(folder, "summary.json"))):
      print(f"[leaderboard] {folder} ran another configuration or number of rounds: running it again", flush=True)
      shutil.rmtree(folder)
    if not done:  # a run cut short resumes
      try:
        final = f"final {train_lib.train_and_evaluate(config, folder)['final_accuracy']:.4f}"
      except loop.Diverged as e:
        final = f"diverged ({e})"
      print(f"[leaderboard] {setting} {algorithm} seed={seed}: {final}", flush=True)
    folders.append(folder)
  return folders


def _mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def table(setting: str, rows: dict[str, dict]) -> str:
  """The Markdown table of one setting; `rows` maps algorithms to {summaries, metrics, setting: what ran}."""
  fedavg = rows.get("fedavg")
  target = float(np.mean([s["final_accuracy"] for s in fedavg["summaries"]])) if fedavg else None
  header = ["algorithm", "setting", "final acc", "last-5 mean", f"rounds to {100 * target:.1f} %" if target else
            "rounds to target", "reached", "wall-clock to target s", "client s/round", "server s/round"]
  lines = [f"**{setting}** (target: tuned FedAvg's mean final accuracy)\n",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for algorithm, row in rows.items():
    summaries = row["summaries"]
    per_round = [s["mean_client_time_s"] + s["mean_server_time_s"] for s in summaries]
    to_target = [loop.rounds_to_target(m, target) if target else None for m in row["metrics"]]
    wall = [r * t if r is not None else None for r, t in zip(to_target, per_round, strict=True)]
    diverged = sum(bool(s.get("diverged")) for s in summaries)
    name = algorithm
    if diverged:
      name += f" ({diverged} of {len(summaries)} diverged: their last finite round is tabled)"
    cells = [name, row["setting"],
             _mean_std([100 * s["final_accuracy"] for s in summaries]),
             _mean_std([100 * s["last5_mean_accuracy"] for s in summaries]),
             _mean_std(to_target), f"{sum(r is not None for r in to_target)}/{len(summaries)}", _mean_std(wall),
             f"{np.mean([s['mean_client_time_s'] for s in summaries]):.2f}",
             f"{np.mean([s['mean_server_time_s'] for s in summaries]):.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def leaderboard(workdir: str, settings, algorithms, seeds, tuned: dict) -> None:
  """Runs the missing cells of `settings` and writes each setting's table to `<workdir>/<setting>.md`."""
  for setting in settings:
    rows = {}
    for algorithm in algorithms:
      overrides, how = chosen(tuned, setting, algorithm)
      if algorithm in COMPOSED and overrides == chosen(tuned, setting, "fedsnd")[0]:  # FedSND's tuning chose it
        folders, how = run_cells(workdir, setting, "fedsnd", overrides, seeds), how + " (= fedsnd's runs)"
      else:
        folders = run_cells(workdir, setting, algorithm, overrides, seeds)
      rows[algorithm] = {"summaries": [report.read_summary(f) for f in folders],
                         "metrics": [report.read_metrics(f) for f in folders], "setting": how}
      partial = table(setting, rows)
      with open(os.path.join(workdir, f"{setting}.md"), "w") as f:  # a table after every algorithm
        f.write(partial)


def collected(workdir: str, seeds) -> str:
  """Every setting's table in `workdir` (this run's and earlier runs'), in the order of tuning.SETTINGS, so a
  run of one setting keeps the others' tables in RESULTS.md."""
  text = [f"Evaluation seeds {', '.join(map(str, seeds))}; accuracies in %, mean ± population std.\n"]
  for setting in tuning.SETTINGS:
    path = os.path.join(workdir, f"{setting}.md")
    if os.path.exists(path):
      with open(path) as f:
        text.append(f.read())
  return "\n".join(text)


def write_between_markers(path: str, text: str) -> None:
  """Replaces what lies between BEGIN and END in `path` (both must be there) by `text`."""
  with open(path) as f:
    content = f.read()
  if BEGIN not in content or END not in content:
    raise ValueError(f"{path} has no {BEGIN} … {END} markers")
  head, rest = content.split(BEGIN, 1)
  with open(path, "w") as f:
    f.write(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  flag = flags.FLAGS
  unknown = [s for s in flag.settings if s not in tuning.SETTINGS] + [
      a for a in flag.algorithms if a not in ALGORITHMS]
  if unknown:
    raise app.UsageError(f"unknown settings or algorithms: {', '.join(unknown)}")
  tuned = {}
  if os.path.exists(flag.tuned):
    with open(flag.tuned) as f:
      tuned = json.load(f)["settings"]
  os.makedirs(flag.workdir, exist_ok=True)
  seeds = [int(s) for s in flag.seeds]
  leaderboard(flag.workdir, flag.settings, flag.algorithms, seeds, tuned)
  text = collected(flag.workdir, seeds)
  with open(flag.output, "w") as f:
    f.write(text)
  if flag.results:
    write_between_markers(flag.results, text)
  print(text, flush=True)


def define_flags():  # only when run as a program (tests import this module beside the sweep's flags)
  flags.DEFINE_list("settings", ["fmnist10_a0.1", "fmnist10_a0.5", "xdevice_a0.1", "xdevice_a0.5"], "Settings.")
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "Algorithms (names of benchmarks.tuning.GRIDS, and "
                    f"{DEFAULTS}).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Evaluation seeds (disjoint from the tuning seed, 100).")
  flags.DEFINE_string("tuned", "benchmarks/configs/tuned.json", "The tuning's chosen settings.")
  flags.DEFINE_string("workdir", "runs/leaderboard", "Output folder.")
  flags.DEFINE_string("output", "runs/leaderboard/leaderboard.md", "Where the tables go.")
  flags.DEFINE_string("results", "", "A Markdown file whose leaderboard markers receive the tables.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
