r"""Tunes every algorithm with the same budget on the validation split, and chooses FedSND's defaults.

  python -m benchmarks.tuning --settings=digits,fmnist10_a0.1,fmnist10_a0.5,xdevice_a0.1,xdevice_a0.5 \
      --algorithms=fedavg,fedavgm,fedprox,scaffold,feddyn,moon,fedntd,fedgen,fedftg,fedsnd --workdir=runs/tuning

Two stages, the same budget (`--budget` candidates of `GRIDS`) for every algorithm: first FedAvg searches the
client settings (local learning rate and epochs); then every other algorithm searches its own knob (FedProx's μ,
FedSND's server schedule, …) at the client settings FedAvg chose, so no method gets local work the others were
not offered. Every run is at the tuning seed (100; evaluation seeds are 0–2) with 10 % of the training set held
out; candidates are ranked by the last-5-round mean of validation accuracy, and the winners, with every
candidate's score as evidence, go to `--output` (benchmarks/configs/tuned.json), which the leaderboard reads.
Each winner keeps the configuration it ran as (`config`): the leaderboard refuses a winner whose overrides would
run otherwise today, after a library default changed (`drifted`), rather than table it under the tuning's name.

FedSND's defaults (`--defaults`): every candidate of `DEFAULT_CANDIDATES` runs in every setting; the table gives
each candidate's validation gain over FedAvg at its tuned setting, and candidates are ranked by their
worst-case gain over the settings, not the best (a default must be safe everywhere).
Each run is one `experiments.train` workdir under `<workdir>/<setting>/<name>/`; a finished run of the same
configuration anywhere in the setting's folder is reused (`stale`), so an interrupted tuning resumes.
"""

import json
import os
import shutil

from absl import app, flags, logging

from benchmarks import results
from benchmarks.configs import fmnist_mlp, fmnist_mlp_xdevice
from experiments import configuration, report, train_lib
from experiments.configs import default
from fedsnd_jax import algorithms, loop

TUNING_SEED = 100

# name -> (base config module, overrides). The settings FedSND's defaults must be safe in: the README's main job;
# the same at a tenth of its local work, a model that under-fits for all 30 rounds; and the leaderboard's four
# (real Fashion-MNIST, the MLP): 10 clients all participating, and cross-device (100 clients, 10 a round).
SETTINGS = {
    "digits": (default, {}),
    "digits_slow": (default, {"client_lr": 0.01, "local_epochs": 1}),
    "fmnist10_a0.1": (fmnist_mlp, {"alpha": 0.1}),
    "fmnist10_a0.5": (fmnist_mlp, {"alpha": 0.5}),
    "xdevice_a0.1": (fmnist_mlp_xdevice, {"alpha": 0.1}),
    "xdevice_a0.5": (fmnist_mlp_xdevice, {"alpha": 0.5}),
}

# Each algorithm's candidates, best guess first (a smaller budget keeps the first ones). Values are config
# overrides (dotted names inside an algorithm's section); "lr×" and "epochs×" scale the client learning rate and
# local epochs. FedAvg's candidates are client settings (stage 1); every other algorithm's apply on top of the
# client settings FedAvg chose (stage 2; `candidates`).
# FedSND's full server: fresh Gaussian noise every round, G 50 synthesis and D 10 distillation steps. The library's
# default is the cheap warm-started server (G 10, D 5): its noise is easier, teachers agree on more of it, and the
# agreement gate closes sooner, so cross-device it distils in fewer rounds.
FULL_SERVER = {"fedsnd.synthesis.warm_start": "none", "fedsnd.synthesis.steps": 50,
               "fedsnd.distillation.steps": 10}
GRIDS = {
    "fedavg": [{"algorithm": "fedavg", **g} for g in ({}, {"lr×": 0.5}, {"lr×": 2.0}, {"epochs×": 2})],
    "fedavgm": [{"algorithm": "fedavg", "server_momentum": m, "server_lr": lr}
                for m, lr in ((0.9, 0.3), (0.5, 1.0), (0.9, 0.1), (0.7, 0.5))],
    "fedprox": [{"algorithm": "fedprox", "fedprox.mu": mu} for mu in (0.01, 0.1, 0.001, 1.0)],
    # SCAFFOLD has no knob of its own and can diverge at FedAvg's client settings, so its candidates trade step
    # size: a smaller client lr, or a global step size (server lr) below 1.
    "scaffold": [{"algorithm": "scaffold", **g} for g in ({}, {"lr×": 0.5}, {"server_lr": 0.5}, {"lr×": 0.25})],
    "feddyn": [{"algorithm": "feddyn", "feddyn.alpha": a} for a in (0.01, 0.1, 0.001, 0.03)],
    "moon": [{"algorithm": "moon", "moon.mu": mu} for mu in (1.0, 5.0, 0.1, 10.0)],
    "fedntd": [{"algorithm": "fedntd", "fedntd.beta": b} for b in (1.0, 0.3, 3.0, 0.1)],
    "fedgen": [{"algorithm": "fedgen", "fedgen.generative_alpha": a, "fedgen.generative_beta": b}
               for a, b in ((1.0, 1.0), (0.3, 0.3), (3.0, 3.0), (1.0, 0.1))],
    "fedftg": [{"algorithm": "fedftg", **g} for g in (
        {}, {"fedftg.distill_lr": 0.03}, {"fedftg.distill_lr": 0.003}, {"fedftg.beta_tran": 0.0})],
    # The library defaults first (at FedAvg's client settings: the leaderboard's fedsnd_defaults row), then the
    # previous-model weight, distillation in the first rounds only, and the full, larger server.
    "fedsnd": [{"algorithm": "fedsnd", **g} for g in (
        {}, {"fedsnd.self_distillation.lambda_prev": 0.3}, {"fedsnd.schedule.distill_rounds": 3}, FULL_SERVER)],
}

# FedSND's candidate defaults: the library's own defaults first, then the alternatives the evidence points at.
DEFAULT_CANDIDATES = {
    "library": {},
    "full_server": FULL_SERVER,  # Gaussian start, G 50, D 10
    "paper": {"fedsnd.self_distillation.lambda_mutual": 1.0, "fedsnd.self_distillation.confidence_gate": False,
              "fedsnd.schedule.distill_agreement": 1.0},
    # a stronger previous-model teacher
    "lambda_prev_0.3": {"fedsnd.self_distillation.lambda_prev": 0.3},
    # FedSND on a momentum server (one of FedAvgM's candidates).
    "server_momentum": {"server_momentum": 0.5, "server_lr": 1.0},
    # Distil every round: no agreement gate.
    "always_distil": {"fedsnd.schedule.distill_agreement": 1.0},
    # The regime-aware server budget: the full server while the last round's teacher agreement is below 0.8.
    "regime_server": {"fedsnd.schedule.full_server_below": 0.8},
}

def setting_config(name: str, rounds: int = 0):
  """The setting's config at the tuning seed with a validation split (rounds > 0 overrides its rounds)."""
  module, overrides = SETTINGS[name]
  c = module.get_config()
  c.update(overrides)
  c.validation_fraction, c.seed = 0.1, TUNING_SEED
  c.rounds = rounds or c.rounds
  return c


def apply(base, candidate: dict):
  """The base config with a candidate's overrides (dotted fields, and the lr× / epochs× scalings)."""
  c = base.copy_and_resolve_references()
  for field, value in candidate.items():
    if field == "lr×":
      c.client_lr = base.client_lr * value
    elif field == "epochs×":
      c.local_epochs = round(base.local_epochs * value)
    else:
      c.update_from_flattened_dict({field: value})
  return c


def label(candidate: dict) -> str:
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in candidate.items()
                   if k != "algorithm") or "setting's own"


def compose(first: dict, then: dict) -> dict:
  """Overrides `then` on top of `first`, as one dict: `then` wins, except that the scalings multiply."""
  out = {**first, **then}
  for scale in ("lr×", "epochs×"):
    if scale in first and scale in then:
      out[scale] = first[scale] * then[scale]
  return out


def candidates(tuned: dict, setting: str, algorithm: str) -> list[dict]:
  """The algorithm's grid in a setting: FedAvg's as it is (stage 1), every other's at FedAvg's chosen client
  settings (stage 2; FedAvg must be tuned in the setting first)."""
  if algorithm == "fedavg":
    return GRIDS["fedavg"]
  client = {k: v for k, v in tuned[setting]["fedavg"]["overrides"].items() if k != "algorithm"}
  return [compose(client, g) for g in GRIDS[algorithm]]


# Values a field had before it took names: a run saved with the old value ran what the new name means.
FORMER_VALUES = {"fedsnd.synthesis.warm_start": {False: "none", True: "client"}}
# Fields whose default changed after they were added: a run saved without one ran this value.
FIRST_DEFAULTS = {"fedsnd.schedule.recheck_every": 0}


def _flat(config: dict, prefix: str = "") -> dict:
  """{"a": 1, "s": {"b": 2}} -> {"a": 1, "s.b": 2} (sections at any depth); a field saved under an earlier
  layout's name takes its name now (`configuration.MOVED`), and former values their names."""
  flat = {}
  for k, v in config.items():
    name = configuration.MOVED.get(prefix + k, prefix + k)
    flat.update(_flat(v, name + ".") if isinstance(v, dict) else {name: v})
  return {k: FORMER_VALUES.get(k, {}).get(v, v) if isinstance(v, bool) else v for k, v in flat.items()}


def differences(saved: dict, config, exact: bool = False, also_ignored=()) -> list[str]:
  """The fields in which `config` runs otherwise than `saved` (a config as JSON). Other algorithms' sections do
  not change the run, nor do fields added to the config since `saved` was written, at the default they were
  added with (which kept the old behaviour: the library's default, or `FIRST_DEFAULTS`), also inside a section —
  unless `exact`."""
  ignored = {*configuration.RESUMABLE_CHANGES, *algorithms.sections(), *also_ignored} - {
      algorithms.get(config.algorithm).section}
  saved, wanted = _flat(saved), _flat(json.loads(config.to_json()))
  absent = {**_flat(json.loads(default.get_config().to_json())), **FIRST_DEFAULTS}
  return [k for k, v in wanted.items() if k.split(".")[0] not in ignored
          and (saved[k] != v if k in saved else (exact or v != absent.get(k)))]


def stale(folder: str, config) -> bool:
  """Whether `folder` holds a run (finished or not) of a configuration other than `config` (`differences`; an
  unfinished run must match exactly to resume)."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  return bool(differences(saved, config, exact=not os.path.exists(os.path.join(folder, "summary.json"))))


def ran(config) -> dict:
  """What a config runs, as JSON, without the other algorithms' sections: kept beside a tuned winner."""
  own = algorithms.get(config.algorithm).section
  return {k: v for k, v in json.loads(config.to_json()).items() if k == own or k not in algorithms.sections()}


def drifted(entry: dict, setting: str) -> list[str]:
  """The fields in which a tuned entry's overrides, applied today, run otherwise than its winner did when it was
  chosen (`entry["config"]`): a library default changed since (e.g. FedSND's synthesis steps)."""
  if "config" not in entry:
    return []
  return differences(entry["config"], apply(setting_config(setting), entry["overrides"]), also_ignored=("seed",))


def finished(folder: str, config) -> bool:
  """Whether `folder` holds a finished run of `config`: the same configuration (`differences`) and rounds (a
  finished run of other rounds is not the run asked for)."""
  if not os.path.exists(os.path.join(folder, "summary.json")):
    return False
  with open(os.path.join(folder, "config.json")) as f:
    saved = json.load(f)
  return saved["rounds"] == config.rounds and not differences(saved, config)


def finished_run(folder: str, config) -> str | None:
  """A finished run of `config` among the runs in `folder` (`finished`), if there is one."""
  runs = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  return next((os.path.join(folder, name) for name in runs if finished(os.path.join(folder, name), config)), None)


def run(root: str, setting: str, name: str, config) -> dict:
  """Validation scores of `config` in `<root>/<setting>/<name>`: a finished run of the same configuration under
  another name is copied there, a folder that ran another configuration is replaced."""
  workdir = os.path.join(root, setting, name)
  same = finished_run(os.path.join(root, setting), config)
  earlier = bool(same) and results.made_earlier(same)
  if same != workdir and os.path.exists(workdir) and (same or stale(workdir, config)):
    shutil.rmtree(workdir)
  if same and same != workdir:
    shutil.copytree(same, workdir)
  elif not same:
    try:
      train_lib.train_and_evaluate(config, workdir)
    except loop.Diverged:
      pass
  summary = report.read_summary(workdir)
  val = report.val_history(workdir)
  score = 0.0 if summary.get("diverged") else sum(val[-5:]) / len(val[-5:])
  row = {"name": name, "val_final": val[-1], "val_last5": score, "client_s": summary["mean_client_time_s"],
         "server_s": summary["mean_server_time_s"], "diverged": bool(summary.get("diverged")), "earlier": earlier}
  print(f"[tuning] {setting} {name}: val last-5 {score:.4f}" + (" (an earlier run, reused)" if earlier else ""),
        flush=True)
  return row


def _value(candidate: dict, field: str):
  return candidate.get(field, 1.0 if field.endswith("×") else None)  # a scaling left out is ×1


def beyond(grid: list[dict], best: dict) -> dict | None:
  """The next candidate past the grid's edge when `best` sits on it, else None: where the candidates vary in
  one numeric field of `best` only, and `best` holds its largest (smallest) value, that value scaled once more
  by the ratio of the two largest (smallest) ones."""
  varying = [k for k in best if len({repr(_value(g, k)) for g in grid}) > 1]
  if len(varying) != 1:
    return None
  field = varying[0]
  values = sorted({_value(g, field) for g in grid if isinstance(_value(g, field), int | float)})
  if len(values) < 2 or best[field] not in (values[0], values[-1]):
    return None
  low, high = (values[1], values[0]) if best[field] == values[0] else (values[-2], values[-1])
  return {**best, field: float(f"{high * high / low:.6g}")}  # 0.01, not 0.010000000000000002


def tune(root: str, setting: str, algorithm: str, tuned: dict, budget: int, rounds: int = 0,
         extensions: int = 2) -> dict:
  """Runs the first `budget` candidates of the algorithm's grid (`candidates`), then, while the winner sits at
  the grid's edge (`beyond`), up to `extensions` candidates past it; the winner, with every score as evidence."""
  base = setting_config(setting, rounds)
  grid = candidates(tuned, setting, algorithm)[:budget]
  rows = [dict(run(root, setting, f"{algorithm}_{i}", apply(base, g)), candidate=g) for i, g in enumerate(grid)]
  best = max(rows, key=lambda r: r["val_last5"])
  while len(grid) < budget + extensions and (past := beyond(grid, best["candidate"])):
    grid.append(past)
    rows.append(dict(run(root, setting, f"{algorithm}_{len(grid) - 1}", apply(base, past)), candidate=past))
    best = max(rows, key=lambda r: r["val_last5"])
  print(report.ranking_markdown(f"{setting}: {algorithm} ({len(rows)} configurations)",
                                [dict(r, name=f"{algorithm}: {label(r['candidate'])}") for r in rows]))
  return {"overrides": best["candidate"], "config": ran(apply(base, best["candidate"])),  # against later changes
          "val_last5": best["val_last5"], "protocol": "two-stage",
          "evidence": [{"overrides": r["candidate"], "val_last5": r["val_last5"], "val_final": r["val_final"],
                        "diverged": r["diverged"], "earlier_run": r["earlier"]} for r in rows]}


def defaults_table(root: str, settings, tuned, rounds: int = 0) -> str:
  """Each candidate's validation gain over tuned FedAvg in every setting, ranked by the worst case."""
  gains = {}
  for name, candidate in DEFAULT_CANDIDATES.items():
    for setting in settings:
      base = apply(setting_config(setting, rounds), tuned[setting]["fedavg"]["overrides"])  # FedAvg's client
      row = run(root, setting, f"default_{name}", apply(base, {"algorithm": "fedsnd", **candidate}))
      gains.setdefault(name, {})[setting] = 100 * (row["val_last5"] - tuned[setting]["fedavg"]["val_last5"])
  lines = ["\nFedSND default candidates: validation last-5 mean minus tuned FedAvg's, points\n",
           "| candidate | " + " | ".join(settings) + " | worst | mean |", "|---" * (len(settings) + 3) + "|"]
  for name, g in sorted(gains.items(), key=lambda kv: -min(kv[1].values())):
    values = [g[s] for s in settings]
    lines.append(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in values)
                 + f" | {min(values):+.2f} | {sum(values) / len(values):+.2f} |")
  return "\n".join(lines)


def evidence_markdown(tuned: dict, settings) -> str:
  """Per setting, every algorithm's candidates with their validation last-5 mean (%), the winner in bold."""
  text = [f"Tuning seed {TUNING_SEED}, 10 % of the training subset held out for validation; candidates ranked by "
          "the last-5-round mean of validation accuracy (%). Stage 1 tunes FedAvg's client settings; every other "
          "algorithm searches its own knob at FedAvg's choice (scalings ×lr, ×epochs are relative to the "
          "setting's own).\n"]
  for setting in settings:
    text += [f"**{setting}**\n", "| algorithm | candidates (winner in bold) |", "|---|---|"]
    client = tuned.get(setting, {}).get("fedavg", {}).get("overrides", {})
    for algorithm, entry in tuned.get(setting, {}).items():
      cells = []
      for e in entry["evidence"]:  # stage 2 lists only what differs from FedAvg's client settings
        name = label(e["overrides"] if algorithm == "fedavg" else
                     {k: v for k, v in e["overrides"].items() if client.get(k) != v or k == "algorithm"})
        score = "diverged" if e["diverged"] else f"{100 * e['val_last5']:.2f}"
        cells.append(f"**{name}: {score}**" if e["overrides"] == entry["overrides"] else f"{name}: {score}")
      text.append(f"| {algorithm} | {'; '.join(cells)} |")
    text.append("")
  evidence = [e for s in settings for entry in tuned.get(s, {}).values() for e in entry["evidence"]]
  earlier = sum(bool(e.get("earlier_run")) for e in evidence)
  text.append(f"{len(evidence)} candidate runs; {earlier} of them {results.REUSED}, so the wall time above covers "
              f"the other {len(evidence) - earlier}.\n")
  return "\n".join(text)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  flag = flags.FLAGS
  unknown = [s for s in flag.settings if s not in SETTINGS] + [a for a in flag.algorithms if a not in GRIDS]
  if unknown:
    raise app.UsageError(f"unknown settings or algorithms: {', '.join(unknown)}")
  record = {"tuning_seed": TUNING_SEED, "budget": flag.budget, "settings": {}}
  if os.path.exists(flag.output):
    with open(flag.output) as f:
      record["settings"] = json.load(f)["settings"]
  tuned = record["settings"]
  # FedAvg first: the others run at its client settings (its finished runs are reused: nothing runs twice).
  names = list(dict.fromkeys(["fedavg", *flag.algorithms]))
  for setting in flag.settings:
    for algorithm in names:
      tuned.setdefault(setting, {})[algorithm] = tune(flag.workdir, setting, algorithm, tuned, flag.budget,
                                                      flag.rounds)
      with open(flag.output, "w") as f:  # after every algorithm, so an interrupted tuning keeps its results
        json.dump(record, f, indent=1)
  text = evidence_markdown(tuned, flag.settings)
  if flag.defaults:
    text += "\n" + defaults_table(flag.workdir, flag.settings, tuned, flag.rounds)
  print(text, flush=True)
  results.publish(flag.results, flag.block, text, "Tuning on the validation split")


def define_flags():  # only when run as a program, so tests can import this module beside the sweep's flags
  flags.DEFINE_list("settings", list(SETTINGS), "Settings to tune in.")
  flags.DEFINE_list("algorithms", list(GRIDS), "Algorithms to tune (names of GRIDS).")
  flags.DEFINE_integer("budget", 4, "Configurations per algorithm (the same for all).")
  flags.DEFINE_bool("defaults", False, "Also rank FedSND's default candidates by worst-case gain.")
  flags.DEFINE_string("workdir", "runs/tuning", "Output folder.")
  flags.DEFINE_string("output", "benchmarks/configs/tuned.json", "Where the chosen settings go.")
  flags.DEFINE_integer("rounds", 0, "Rounds of every run (0: the setting's own).")
  results.define_flags("tuning")


if __name__ == "__main__":
  define_flags()
  app.run(main)
