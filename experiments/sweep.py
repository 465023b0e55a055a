r"""Runs algorithms × α × seeds, one train run per cell, then tables and plots (docs/design.md §10).

  python -m experiments.sweep --config=experiments/configs/default.py --algorithms=fedavg,fedsnd \
      --alphas=0.1,0.5 --seeds=0,1,2 --workdir=runs/sweep \
      [--variant=fedsnd_best:algorithm=fedsnd:fedsnd.synthesis.projection=True] [--config.<field>=<value> ...]

Cell `DIR/<algorithm>/alpha=<α>/seed=<s>/` is skipped when its summary.json exists, so an interrupted
sweep resumes where it stopped (a cell that diverged is reported and kept as it is). A
`--variant=NAME:field=value:...` is an extra "algorithm" NAME: the config with those fields set (dotted
names reach an algorithm's section: `fedsnd.schedule.distill_rounds=3`, `moon.mu=5`). Writes DIR/results.csv (one
row per cell), DIR/results.md (mean ± std over seeds, numpy's population std; test and validation columns),
DIR/accuracy_vs_round_alpha=<α>.png and DIR/final_accuracy_vs_alpha.png (`experiments/report.py`).
`--table_only` runs nothing and tables the finished cells (listing the missing ones). `--vectorize=seeds` (or
`seeds,alphas`) runs each algorithm's cells that differ only in seed (and α) as one compiled program with a
leading run axis (partitions padded to a common shape): the same per-cell workdirs, tables and results as one by
one (tests/test_sweep.py checks equality), in fewer, larger device calls; worth it on a GPU, where one cell
leaves most of the device idle. A cell's seconds per round are then those of its whole vectorised round.
Rounds to target are recomputed from each cell's metrics.jsonl at the sweep's `target_accuracy`, so a finished
sweep can be tabled again at another target (`--config.target_accuracy=0.7`) without running anything; with
fedavg in the sweep, results.md also gives every algorithm's rounds to target as a ratio to FedAvg's.
"""

import csv
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, configuration, report, train_lib
from fedsnd_jax import loop
from fedsnd_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["fedavg", "fedsnd"], "Algorithms (or --variant names).")
_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "0.5"], "Dirichlet α values.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_PARTITION = flags.DEFINE_string("partition", None, "Partition convention (default: the config's).")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "NAME:field=value:field=value — a named config variant.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Run nothing; table and plot the finished cells.")
_VECTORIZE = flags.DEFINE_list("vectorize", [], "seeds, or seeds,alphas: run an algorithm's cells that differ "
                               "only in these as one compiled program.")

def _parse_value(template, text: str):
  if isinstance(template, bool):
    if text not in ("True", "False", "true", "false"):
      raise InputError("variant", f"expected True or False, got {text!r}")
    return text.lower() == "true"
  try:
    return type(template)(text)
  except ValueError:
    raise InputError("variant", f"cannot read {text!r} as {type(template).__name__}") from None


def _lookup(c, dotted: str):
  """The config value at a dotted field name ("alpha", "fedsnd.synthesis.steps"); KeyError if there is none."""
  *sections, field = dotted.split(".")
  for section in sections:
    c = c[section]
  if not hasattr(c, "items") or field not in c or hasattr(c[field], "items"):
    raise KeyError(dotted)
  return c[field]


def parse_variants(specs, base) -> dict[str, dict]:
  """{"NAME": {field: value}} from "NAME:field=value:..." strings, typed like the base config's fields.

  A field is a top-level name or a dotted one inside an algorithm's section (`fedsnd.schedule.distill_rounds`).
  """
  variants = {}
  for spec in specs:
    name, *assignments = spec.split(":")
    overrides = {}
    for a in assignments:
      field, sep, text = a.partition("=")
      configuration.refuse_moved(field)
      try:
        template = _lookup(base, field) if sep else None
      except KeyError:
        template = None
      if template is None:
        raise InputError("variant", f"{spec!r}: {a!r} is not field=value with a known config field")
      overrides[field] = _parse_value(template, text)
    if not name or "algorithm" not in overrides:
      raise InputError("variant", f"{spec!r} needs a name and an algorithm=... field")
    variants[name] = overrides
  return variants


def cell_config(base, algorithm: str, alpha: float, seed: int, variants: dict, partition: str | None):
  c = base.copy_and_resolve_references()
  configuration.set_fields(c, variants.get(algorithm, {"algorithm": algorithm}))
  c.alpha, c.seed = alpha, seed
  if partition:
    c.partition = partition
  return c


def cell_dir(workdir, algorithm, alpha, seed) -> str:
  return os.path.join(workdir, algorithm, f"alpha={alpha:g}", f"seed={seed}")


def groups(todo, workdir: str, vectorize) -> list[list[tuple]]:
  """The cells to run, in groups run as one program: an algorithm's fresh cells that differ only in seed (and α
  with "alphas" in `vectorize`); every other cell (an interrupted one resumes alone) is a group of its own."""
  if not vectorize:
    return [[cell] for cell in todo]
  by_key = {}
  for cell in todo:
    fresh = not os.path.exists(cell_dir(workdir, *cell))
    key = (cell[0], None if "alphas" in vectorize else cell[1]) if fresh else cell
    by_key.setdefault(key, []).append(cell)
  return list(by_key.values())


def _run_group(configs, folders) -> list[str]:
  """Runs one group of cells; returns each cell's result for the progress line."""
  if len(configs) == 1:
    try:
      return [f"final {train_lib.train_and_evaluate(configs[0], folders[0])['final_accuracy']:.4f}"]
    except loop.Diverged as e:
      return [f"diverged ({e})"]
  return [f"diverged in round {s['diverged_round']}" if s.get("diverged") else f"final {s['final_accuracy']:.4f}"
          for s in train_lib.train_and_evaluate_many(configs, folders)]


def sweep(base, workdir: str, algorithms, alphas, seeds, variants=None, partition=None,
          table_only=False, vectorize=()) -> list[dict]:
  """Runs every missing cell, then writes results.csv, results.md and the plots; returns the CSV rows.

  With `table_only`, nothing runs: the outputs cover the finished cells and the missing ones are listed.
  `vectorize` ("seeds", or "seeds" and "alphas") runs an algorithm's cells that differ only in those as one
  compiled program (`train_lib.train_and_evaluate_many`; the same per-cell results).
  """
  unknown = set(vectorize) - {"seeds", "alphas"}
  if unknown or (vectorize and "seeds" not in vectorize):
    raise InputError("vectorize", f"takes seeds or seeds,alphas, got {','.join(vectorize)}")
  variants = variants or {}
  cells = [(a, al, s) for al in alphas for a in algorithms for s in seeds]
  configs = {cell: cell_config(base, *cell, variants, partition) for cell in cells}
  for c in configs.values():  # Every cell's input is checked before any cell runs.
    configuration.validate(c)
  todo = [cell for cell in cells if not os.path.exists(os.path.join(cell_dir(workdir, *cell), "summary.json"))]
  print(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done", flush=True)
  if table_only:
    if todo:
      print("sweep: tabling finished cells only; missing: "
            + ", ".join(f"{a} α={al:g} seed={s}" for a, al, s in todo), flush=True)
    cells, todo = [c for c in cells if c not in todo], []
  start, done = time.perf_counter(), 0
  for group in groups(todo, workdir, vectorize):
    results = _run_group([configs[cell] for cell in group], [cell_dir(workdir, *cell) for cell in group])
    done += len(group)
    per_cell = (time.perf_counter() - start) / done
    for cell, result in zip(group, results, strict=True):
      print(f"[sweep {done}/{len(todo)}] {cell[0]} α={cell[1]:g} seed={cell[2]}: {result} | "
            f"ETA {loop.format_eta(per_cell * (len(todo) - done))}", flush=True)
  metrics = {cell: report.read_metrics(cell_dir(workdir, *cell)) for cell in cells}
  rows = []
  for cell in cells:
    s = report.read_summary(cell_dir(workdir, *cell))
    s["rounds_to_target"] = loop.rounds_to_target(metrics[cell], base.target_accuracy)
    s.setdefault("diverged", False)
    rows.append({"algorithm": cell[0], "alpha": cell[1], "seed": cell[2],
                 **{k: s.get(k) for k in report.COLUMNS[3:]}})
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=report.COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  table = report.aggregate(rows, algorithms, alphas)
  diverged = [f"{r['algorithm']} α={r['alpha']:g} seed={r['seed']}" for r in rows if r["diverged"]]
  text = (f"Sweep of {base.dataset}, {partition or base.partition} partition, {base.num_clients} clients "
          f"({base.clients_per_round} per round), {base.rounds} rounds; accuracies in %, mean ± std over "
          f"seeds {', '.join(map(str, seeds))}.\n\n" + report.markdown(table, base.target_accuracy) + "\n"
          + (f"\nDiverged (rounds before divergence tabled): {', '.join(diverged)}\n" if diverged else "")
          + report.rounds_ratio_markdown(table, base.target_accuracy)
          + report.diagnostics_markdown(algorithms, alphas, metrics))
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  report.plot(workdir, algorithms, alphas, metrics, table)
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
          parse_variants(_VARIANTS.value, _CONFIG.value), _PARTITION.value, _TABLE_ONLY.value, _VECTORIZE.value)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
