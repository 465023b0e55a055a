r"""The leaderboard: every algorithm at its tuned setting on real Fashion-MNIST, evaluation seeds 0–2, one pass.

  python -m benchmarks.leaderboard        # three settings, every algorithm; rewrites its RESULTS.md block
  python -m benchmarks.leaderboard --settings=xdevice_a0.1 --algorithms=fedavg,fedsnd --results=

The settings are `benchmarks.tuning.SETTINGS`' Fashion-MNIST protocols (the MLP; 10 clients all participating
for 50 rounds, and cross-device, 100 clients 10 a round, for 300 rounds: `benchmarks/configs/fmnist_mlp*.py`).
Each algorithm runs with the winner of its tuning (`benchmarks/configs/tuned.json`, written by
`benchmarks.tuning` on the validation split at tuning seed 100) where that setting was tuned, else with the first
candidate of its grid (its paper's defaults); the "setting" column says which, and how many configurations the
tuning compared. Two rows have no tuning of their own: `fedsnd_defaults`, FedSND at the library defaults of its
own section at tuned FedAvg's client settings (are the defaults safe?), and `fedsnd_momentum`, tuned FedSND on
tuned FedAvgM's server optimiser (does FedSND add to server momentum?). Runs land in
`--workdir/<setting>/<algorithm>/seed=<s>/` and are skipped when finished, so an interrupted leaderboard resumes;
a folder that ran another configuration of the algorithm (its tuning changed since) or other rounds runs again.

Per setting, one table and one figure. The table: final test accuracy, the plateau (each seed's mean over the
last fifth of the run) and how far it still moved, rounds / client + server seconds / upload bytes to tuned
FedAvg's plateau, and client and server seconds per round. The figure: test accuracy against rounds, cumulative
upload and cumulative seconds, one line per algorithm with its seed band. Both go to the `leaderboard` block of
`--results` (benchmarks/RESULTS.md), the figures to `--plots`.
"""

import json
import os
import shutil
import warnings

import numpy as np
from absl import app, flags, logging

from benchmarks import results, tuning
from experiments import report, train_lib
from fedsnd_jax import loop

# Rows of FedSND composed from other rows' tuning, with no tuning of their own: the library defaults of its own
# section at tuned FedAvg's client settings (are they safe: never more than 0.5 points below tuned FedAvg?), and
# FedSND's tuned setting on tuned FedAvgM's server optimiser (does FedSND add to momentum? Both were tuned at
# FedAvg's client settings).
DEFAULTS, MOMENTUM = "fedsnd_defaults", "fedsnd_momentum"
COMPOSED = {DEFAULTS: "library defaults", MOMENTUM: "tuned FedSND on FedAvgM's server"}
ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "scaffold", "feddyn", "moon", "fedntd", "fedgen", "fedftg", "fedsnd",
              DEFAULTS, MOMENTUM)


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


# points per 10 rounds: a curve whose last-window mean moved less than this from the window before, scaled to 10
# rounds, is flat (the window grows with the run, so the criterion is a slope, the same at every horizon).
FLAT = 0.3


def per_10_rounds(moved: float, metrics: list[list[dict]]) -> float:
  """`plateau`'s move between the last two windows, scaled to 10 rounds."""
  return moved * 10 / window(_rounds(metrics))


def window(rounds: int) -> int:
  """The plateau's window: the last fifth of the run (at least 5 rounds), long enough to average out the
  round-to-round swings of non-IID training (several points cross-device)."""
  return max(5, rounds // 5)


def _mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
  values = [scale * v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "–"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _mean(values, digits: int = 3) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  return f"{np.mean(values):.{digits}f}" if values else "–"


def _accuracy(records) -> np.ndarray:
  return np.array([r["test_accuracy"] for r in records], dtype=np.float64)


def _padded(series: list[np.ndarray]) -> np.ndarray:
  """[seeds, rounds], NaN after a seed's last record (a run that diverged stops early)."""
  out = np.full((len(series), max(1, max(len(x) for x in series))), np.nan)
  for i, x in enumerate(series):
    out[i, :len(x)] = x
  return out


def _rounds(metrics: list[list[dict]]) -> int:
  return max(1, max(len(m) for m in metrics))


def plateau(metrics: list[list[dict]]) -> tuple[list[float], float]:
  """(each seed's mean accuracy over its last `window` rounds, how far the seeds' mean moved between the window
  before and the last one, in accuracy units, over the seeds that have both windows: a run that diverged early
  may not)."""
  w = window(_rounds(metrics))
  mean = lambda x: float(np.mean(x)) if len(x) else np.nan
  last = [mean(_accuracy(m)[-w:]) for m in metrics]
  before = [mean(_accuracy(m)[-2 * w:-w]) if len(m) >= 2 * w else np.nan for m in metrics]
  moved = [x - y for x, y in zip(last, before, strict=True) if np.isfinite(x - y)]  # seeds that have both
  return last, float(np.mean(moved)) if moved else np.nan


def seconds(records: list[dict]) -> np.ndarray:
  """Cumulative client + server seconds per round, round 1 (which compiles) counted at the mean of the others."""
  per_round = np.array([r["client_time_s"] + r["server_time_s"] for r in records], dtype=np.float64)
  if len(per_round) > 1:
    per_round[0] = np.mean(per_round[1:])
  return np.cumsum(per_round)


def target_of(rows: dict[str, dict]) -> float | None:
  """Tuned FedAvg's plateau accuracy (mean over seeds of the last-window mean), the target every row races to."""
  if "fedavg" not in rows:
    return None
  level = [v for v in plateau(rows["fedavg"]["metrics"])[0] if np.isfinite(v)]
  return float(np.mean(level)) if level else None


def _to_target(records: list[dict], target: float | None) -> tuple:
  """(rounds, client + server seconds, upload MB) to reach `target`; Nones if the run never does."""
  r = loop.rounds_to_target(records, target) if target else None
  if r is None:
    return None, None, None
  i = next(i for i, x in enumerate(records) if x["round"] == r)
  return r, float(seconds(records)[i]), records[i]["bytes_up"] / 1e6


def table(setting: str, rows: dict[str, dict]) -> str:
  """The Markdown table of one setting; `rows` maps algorithms to {summaries, metrics, setting: what ran}."""
  target = target_of(rows)
  rounds = max(_rounds(row["metrics"]) for row in rows.values())
  header = ["algorithm", "setting", "final acc", f"plateau (last {window(rounds)} rounds)", "plateau moved",
            "moved per 10 rounds",
            f"rounds to {100 * target:.1f} %" if target else "rounds to target", "reached", "s to target",
            "MB up to target", "client s/round", "server s/round"]
  lines = [f"**{setting}** (target: tuned FedAvg's plateau accuracy)\n",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for algorithm, row in rows.items():
    summaries, metrics = row["summaries"], row["metrics"]
    level, moved = plateau(metrics)
    reach, wall, upload = zip(*(_to_target(m, target) for m in metrics), strict=True)
    diverged = sum(bool(s.get("diverged")) for s in summaries)
    name = algorithm + (f" ({diverged} of {len(summaries)} diverged: last finite round)" if diverged else "")
    cells = [name, row["setting"], _mean_std([s.get("final_accuracy") for s in summaries], 100),
             _mean_std(level, 100), "–" if np.isnan(moved) else f"{100 * moved:+.2f}",
             "–" if np.isnan(moved) else f"{100 * per_10_rounds(moved, metrics):+.2f}", _mean_std(reach, digits=1),
             f"{sum(r is not None for r in reach)}/{len(summaries)}", _mean_std(wall, digits=1),
             _mean_std(upload, digits=1), _mean([s.get("mean_client_time_s") for s in summaries]),
             _mean([s.get("mean_server_time_s") for s in summaries])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def moving_mean(values: np.ndarray, width: int) -> np.ndarray:
  """The mean of each value and its neighbours within `width` // 2, over the neighbours that exist (the first and
  last values average fewer, not zeros)."""
  kernel = np.ones(width)
  return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def seed_mean(series: list[np.ndarray]) -> np.ndarray:
  """The mean over seeds of per-round series of unequal length (a round no seed reached is NaN)."""
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(_padded(series), 0)


def accuracy_band(metrics: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) over seeds of the test accuracy per round, as moving means over a 30th of the run."""
  acc = _padded([_accuracy(m) for m in metrics])
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a round no seed reached is NaN
    return tuple(moving_mean(v, max(1, acc.shape[1] // 30)) for v in (np.nanmean(acc, 0), np.nanstd(acc, 0)))


def draw_band(ax, x, mean, std, colour, label: str) -> None:
  """One line with its ± std band."""
  ax.plot(x, mean, color=colour, label=label, linewidth=1.2)
  ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15)


def plot(path: str, setting: str, rows: dict[str, dict]) -> None:
  """Test accuracy against rounds, cumulative upload bytes and cumulative client + server seconds: one line per
  algorithm (mean over seeds) with its band (± std over seeds), both as moving means over a 30th of the
  run so that a dozen curves that swing by points from round to round stay legible."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
  colours = plt.get_cmap("tab20").colors
  for colour, (algorithm, row) in zip(colours, rows.items(), strict=False):
    metrics = row["metrics"]
    mean, std = accuracy_band(metrics)
    xs = (np.arange(1, len(mean) + 1), seed_mean([np.array([r["bytes_up"] / 1e6 for r in m]) for m in metrics]),
          seed_mean([seconds(m) for m in metrics]))
    for ax, x in zip(axes, xs, strict=True):
      draw_band(ax, x, mean, std, colour, algorithm)
  for ax, label in zip(axes, ("round", "cumulative upload MB", "cumulative client + server seconds"), strict=True):
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (mean ± std over seeds, moving mean)")
  axes[0].set_ylim(bottom=max(0.0, min(ax.get_ylim()[0] for ax in axes)))
  axes[2].legend(fontsize=7, ncol=2, loc="lower right")
  fig.suptitle(setting)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def leaderboard(workdir: str, settings, algorithms, seeds, tuned: dict) -> dict[str, dict]:
  """Runs the missing cells of `settings`; returns each setting's rows, with a table after every algorithm in
  `<workdir>/<setting>.md` to follow a long run."""
  out = {}
  for setting in settings:
    rows = out.setdefault(setting, {})
    for algorithm in algorithms:
      overrides, how = chosen(tuned, setting, algorithm)
      if algorithm in COMPOSED and overrides == chosen(tuned, setting, "fedsnd")[0]:  # FedSND's tuning chose it
        folders, how = run_cells(workdir, setting, "fedsnd", overrides, seeds), how + " (= fedsnd's runs)"
      else:
        folders = run_cells(workdir, setting, algorithm, overrides, seeds)
      rows[algorithm] = {"summaries": [report.read_summary(f) for f in folders],
                         "metrics": [report.read_metrics(f) for f in folders], "setting": how, "folders": folders}
      with open(os.path.join(workdir, f"{setting}.md"), "w") as f:
        f.write(table(setting, rows))
  return out


def block(boards: dict[str, dict], seeds, plots: str, results_path: str) -> str:
  """The RESULTS block: each setting's table and its curves (written to `plots`, linked relative to
  `results_path`)."""
  text = [f"Evaluation seeds {', '.join(map(str, seeds))}; accuracies in %, mean ± population std over seeds. "
          "\"plateau\" is each seed's mean test accuracy over the last fifth of its rounds; \"plateau moved\" is "
          "how far the seeds' mean moved from the fifth before, and that move scaled to 10 rounds (a curve counts "
          f"as converged when it moves less than {FLAT} points per 10 rounds). Rounds, seconds and upload MB to "
          "target: "
          "the first round at or above tuned FedAvg's plateau (seeds that never get there are left out; "
          "\"reached\" counts them); seconds are client + server seconds, round 1 (which compiles) counted at the "
          "mean of the others. Seconds per round: mean over rounds 2+.\n"]
  os.makedirs(plots, exist_ok=True)
  for setting, rows in boards.items():
    path = os.path.join(plots, f"leaderboard_{setting}.png")
    plot(path, setting, rows)
    text += [table(setting, rows), f"![{setting}: accuracy against rounds, upload and seconds]"
             f"({os.path.relpath(path, os.path.dirname(results_path) or '.')})\n"]
  return "\n".join(text + [provenance(boards)])


def provenance(boards: dict[str, dict]) -> str:
  """How many cells this invocation ran and how many it reused, and the compute the cells took themselves: what
  the header's wall time covers."""
  cells = {f: s for rows in boards.values() for row in rows.values()  # a composed row may share fedsnd's runs
           for f, s in zip(row["folders"], row["summaries"], strict=True)}
  earlier = sum(map(results.made_earlier, cells))
  compute = sum(s.get("total_wall_s", 0.0) for s in cells.values())
  return (f"{len(cells)} runs; {earlier} of them {results.REUSED}. The runs' own wall times add up to "
          f"{compute / 60:.1f} min.\n")


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
  boards = leaderboard(flag.workdir, flag.settings, flag.algorithms, seeds, tuned)
  text = block(boards, seeds, flag.plots, flag.results or os.path.join(flag.workdir, "leaderboard.md"))
  print(text, flush=True)
  results.publish(flag.results, flag.block, text, "Leaderboard")


def define_flags():  # only when run as a program (tests import this module beside the sweep's flags)
  # The published pass: cross-device α 0.1 and the 10-client settings; xdevice_a0.5 adds ~80 minutes on 2 cores
  # (its tuning and its cells) and is run by naming it.
  flags.DEFINE_list("settings", ["xdevice_a0.1", "fmnist10_a0.5", "fmnist10_a0.1"], "Settings (of "
                    "benchmarks.tuning.SETTINGS).")
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "Algorithms (names of benchmarks.tuning.GRIDS, and "
                    f"{DEFAULTS}, {MOMENTUM}).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Evaluation seeds (disjoint from the tuning seed, 100).")
  flags.DEFINE_string("tuned", "benchmarks/configs/tuned.json", "The tuning's chosen settings.")
  flags.DEFINE_string("workdir", "runs/leaderboard", "Run folders.")
  flags.DEFINE_string("plots", "benchmarks/plots", "Where each setting's curves go.")
  results.define_flags("leaderboard")


if __name__ == "__main__":
  define_flags()
  app.run(main)
