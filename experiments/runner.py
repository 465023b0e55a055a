"""Turns an experiment ConfigDict into a run: config validation and config → builder wiring.

`run(config, workdir)` builds the data, model and algorithm, then hands them to the library's experiment loop
(`fedsnd_jax.experiment.run`), which writes DESIGN §5's output contract and resumes from the workdir's newest
checkpoint. Bad input raises `InputError` before anything is written. The binaries (`train`, `sweep`) call it.
"""

import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
import optax
from absl import flags

from experiments.configs import default
from fedsnd_jax import algorithms, evaluation, experiment, federated_data, mapping, mechanisms, metrics, models
from fedsnd_jax import partition as partition_lib
from fedsnd_jax.algorithm import (
  SAMPLINGS,
  AlgorithmInfo,
  FederatedAlgorithm,
  Federation,
  LocalSchedule,
  MechanismParts,
)
from fedsnd_jax.data import Dataset, load_dataset
from fedsnd_jax.errors import InputError, require

SERVER_OPTIMIZERS = ("sgd", "adam")
# Fields a resumed run may change; every other field must match the workdir's config.json.
RESUMABLE_CHANGES = ("rounds", "checkpoint_every", "eval_batch_size", "client_map", "chunk_size")


def _check_finite(c, prefix="") -> None:
  """Every numeric field, sections included, must be a finite number."""
  for field, value in c.items():
    if hasattr(value, "items"):
      _check_finite(value, f"{prefix}{field}.")
    elif isinstance(value, float):
      require(math.isfinite(value), prefix + field, f"must be finite, got {value}")


def federation(c, input_shape=None, num_classes=None, schedule=None) -> Federation:
  """The config's Federation; before the data is loaded (validation), shapes and schedule are None."""
  return Federation(c.num_clients, c.clients_per_round, schedule, c.client_lr, c.client_momentum, c.weight_decay,
                    input_shape, num_classes, c.client_sampling)


def hyperparameters(c):
  """The algorithm's Hyperparameters from its config section."""
  section = algorithms.get(c.algorithm).section
  return algorithms.hyperparameters(c.algorithm, c[section].to_dict() if section in c else {})


def algorithm_info(c) -> AlgorithmInfo:
  return AlgorithmInfo(c.algorithm, algorithms.get(c.algorithm).privacy(hyperparameters(c)))


def mechanism_settings(c) -> dict:
  """Section → Settings of every registered mechanism, from the config's sections."""
  return {section: mechanisms.settings(section, c[section].to_dict() if section in c else {})
          for section in mechanisms.REGISTRY}


def multi_process_problem(coordinator: str | None, num_processes: int | None, process_id: int | None) -> str:
  """What is wrong with the multi-process flags, as one line naming the flag ('' if nothing): all three or none,
  at least one process, and an index in [0, num_processes) (otherwise jax.distributed waits for ever)."""
  given = [coordinator is not None, num_processes is not None, process_id is not None]
  if not any(given):
    return ""
  if not all(given):
    return ("coordinator_address: a multi-process run needs --coordinator_address, --num_processes and "
            "--process_id together")
  if num_processes < 1:
    return f"num_processes: must be ≥ 1, got {num_processes}"
  if not 0 <= process_id < num_processes:
    return f"process_id: must be in [0, {num_processes}), got {process_id}"
  return ""


def refuse_moved(field: str) -> None:
  """Raises InputError naming the new place of a field of the earlier flat layout (`dp_clip_norm`)."""
  if field in mechanisms.MOVED:
    raise InputError(mechanisms.MOVED[field], f"the field {field} is now {mechanisms.MOVED[field]} "
                     f"(--config.{mechanisms.MOVED[field]}=...)")


def parse_flags(argv):
  """absl flag parsing for the binaries, but a bad flag value exits with code 2 and one line, like any other
  bad input (an earlier version's flat --config field names its new place)."""
  try:
    for arg in argv[1:]:
      if arg.startswith("--config."):
        refuse_moved(arg.removeprefix("--config.").partition("=")[0])
    return flags.FLAGS(argv)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
  except flags.Error as e:  # a config file's own error comes with its traceback: its first and last lines
    lines = str(e).strip().splitlines()
    print(f"error: {lines[0]}{' ' + lines[-1] if len(lines) > 1 else ''}", file=sys.stderr)
  except (KeyError, AttributeError) as e:  # ml_collections' answer to an unknown --config.<field>
    print(f"error: config: unknown field {str(e).strip(chr(34))}; see experiments/configs/default.py",
          file=sys.stderr)
  except TypeError as e:  # a config file setting a field to a value of another type (a section to a value)
    print(f"error: config: {e}", file=sys.stderr)
  sys.exit(2)


def set_fields(c, fields: dict):
  """Sets `fields` (dotted names reach a section: {"dp.clip_norm": 1.0}) in the config `c`; returns it."""
  for dotted, value in fields.items():
    *sections, field = dotted.split(".")
    target = c
    for section in sections:
      target = target[section]
    target[field] = value
  return c


def check_fields(c) -> None:
  """Every top-level field is one of the default config's, and a section where that is one (a field of an
  earlier version's flat layout is refused naming its new place)."""
  known = default.get_config()
  for field, value in c.items():
    if not hasattr(value, "items"):
      refuse_moved(field)
    require(field in known, field, "no such config field; see experiments/configs/default.py")
    require(hasattr(value, "items") == hasattr(known[field], "items"), field,
            f"is {'a section' if hasattr(known[field], 'items') else 'a value'} in the config, not "
            f"{'a section' if hasattr(value, 'items') else 'a value'}")


def validate_config(c) -> None:
  """Checks every field that can be checked without loading data.

  Raises:
    InputError: naming the first bad field and its allowed values.
  """
  check_fields(c)
  plugin = algorithms.get(c.algorithm)
  require(c.model in models.MODELS, "model", f"unknown model {c.model!r}; allowed: {', '.join(models.MODELS)}")
  require(c.partition in partition_lib.PARTITIONS, "partition",
          f"unknown partition {c.partition!r}; allowed: {', '.join(partition_lib.PARTITIONS)}")
  require(c.client_map == "auto" or c.client_map in mapping.CLIENT_MAPS, "client_map",
          f"unknown client_map {c.client_map!r}; allowed: auto, {', '.join(mapping.CLIENT_MAPS)}")
  require(jax.process_count() == 1 or c.client_map in ("auto", "sharded"), "client_map",
          f"a run of {jax.process_count()} processes shares its clients out with client_map=sharded (or auto), "
          f"not {c.client_map}")
  require(c.conv_impl in models.CONV_IMPLS, "conv_impl",
          f"unknown conv_impl {c.conv_impl!r}; allowed: {', '.join(models.CONV_IMPLS)}")
  require(c.server_opt in SERVER_OPTIMIZERS, "server_opt",
          f"unknown server_opt {c.server_opt!r}; allowed: {', '.join(SERVER_OPTIMIZERS)}")
  require(c.client_sampling in SAMPLINGS, "client_sampling",
          f"unknown client_sampling {c.client_sampling!r}; allowed: {', '.join(SAMPLINGS)}")
  _check_finite(c)
  require(c.alpha > 0, "alpha", f"must be > 0, got {c.alpha}")
  require(c.num_clients >= 1, "num_clients", f"must be ≥ 1, got {c.num_clients}")
  require(1 <= c.clients_per_round <= c.num_clients, "clients_per_round",
          f"must be in [1, num_clients={c.num_clients}], got {c.clients_per_round}")
  for field in ("rounds", "batch_size", "eval_every", "eval_batch_size", "chunk_size"):
    require(c[field] >= 1, field, f"must be ≥ 1, got {c[field]}")
  for field in ("local_steps", "checkpoint_every", "train_examples", "weight_decay", "client_momentum",
                "server_momentum", "dropout"):
    require(c[field] >= 0, field, f"must be ≥ 0, got {c[field]}")
  require(c.local_steps > 0 or c.local_epochs >= 1, "local_epochs",
          f"must be ≥ 1 when local_steps is 0, got {c.local_epochs}")
  require(c.client_lr > 0, "client_lr", f"must be > 0, got {c.client_lr}")
  require(c.client_momentum < 1, "client_momentum", f"must be < 1, got {c.client_momentum}")
  require(c.server_lr > 0, "server_lr", f"must be > 0, got {c.server_lr}")
  require(c.dropout < 1, "dropout", f"must be < 1, got {c.dropout}")
  require(0 < c.target_accuracy <= 1, "target_accuracy", f"must be in (0, 1], got {c.target_accuracy}")
  require(0 <= c.validation_fraction < 1, "validation_fraction",
          f"must be in [0, 1), got {c.validation_fraction}")
  plugin.validate(hyperparameters(c), federation(c))
  mechanisms.validate(mechanism_settings(c), federation(c), algorithm_info(c))


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, built from a config."""

  dataset: Dataset
  partition: partition_lib.Partition
  model: models.Model
  algorithm: FederatedAlgorithm
  train_data: federated_data.FederatedData
  eval_sets: dict[str, evaluation.EvalData]  # "test", and "val" when validation_fraction > 0
  num_steps: int
  mechanisms: MechanismParts  # what the mechanisms that are on plug in (DP's accountant among them)


def build_algorithm(c, model: models.Model, fed: Federation, parts: MechanismParts,
                    runs: int = 0) -> FederatedAlgorithm:
  """Turns the config's algorithm, its section and the server fields into builder arguments, with what the
  mechanisms plug in."""
  server_opt = (optax.sgd(c.server_lr, momentum=c.server_momentum or None) if c.server_opt == "sgd"
                else optax.adam(c.server_lr))
  return algorithms.build(c.algorithm, model, fed, hyperparameters(c), server_opt=server_opt,
                          aggregator=parts.aggregator, upload_transform=parts.upload_transform,
                          attack=parts.attack, client_map=resolve_client_map(c), chunk_size=c.chunk_size,
                          runs=runs)


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, tuple | None]:
  """Holds out a seeded `fraction` of the training set; returns (the rest as a Dataset, (x_val, y_val))."""
  if fraction <= 0:
    return ds, None
  order = np.random.default_rng(seed).permutation(len(ds.y_train))
  n_val = max(1, int(round(fraction * len(order))))
  val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
  rest = dataclasses.replace(ds, x_train=ds.x_train[train], y_train=ds.y_train[train])
  return rest, (ds.x_train[val], ds.y_train[val])


def resolve_conv_impl(c, vectorised: bool = False) -> str:
  """What the config's conv_impl runs on this backend (`auto`: XLA's convolution in the host-stepped client steps
  of the CPU `loop` map, which vectorised runs do not use, and `models.default_conv_impl` elsewhere)."""
  if c.conv_impl != "auto":
    return c.conv_impl
  step, other = (models.default_conv_impl(jax.default_backend(), top) for top in (True, False))
  if step == other or vectorised or resolve_client_map(c) != "loop":
    return other
  return f"{step} in top-level client steps, {other} elsewhere"


def resolve_client_map(c) -> str:
  """The config's client_map with `auto` replaced by the backend's default (`sharded` over several processes)."""
  if c.client_map != "auto":
    return c.client_map
  return "sharded" if jax.process_count() > 1 else mapping.default_client_map(jax.default_backend())


def subsample(ds: Dataset, num_examples: int) -> Dataset:
  """The first `num_examples` of a fixed (seed 0) shuffle of the training set: the same for every run seed."""
  if num_examples <= 0 or num_examples >= len(ds.y_train):
    return ds
  keep = np.sort(np.random.default_rng(0).permutation(len(ds.y_train))[:num_examples])
  return dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])


def prepare(c) -> Experiment:
  """Loads the data, partitions it, builds the model and the algorithm. Raises InputError on bad input."""
  validate_config(c)
  ds = subsample(load_dataset(c.dataset, data_dir=c.data_dir or None, download=c.download), c.train_examples)
  ds, val = split_validation(ds, c.validation_fraction, c.seed)
  part = partition_lib.partition(ds.y_train, c.num_clients, c.partition, alpha=c.alpha, seed=c.seed,
                                 min_size=c.min_size, shards_per_client=c.shards_per_client,
                                 num_classes=ds.num_classes)
  model = models.build_model(c.model, ds.input_shape, ds.num_classes, dropout=c.dropout,
                             vocab_size=ds.vocab_size, batch_norm=c.batch_norm, conv_impl=c.conv_impl,
                             **algorithms.model_options(c.algorithm, hyperparameters(c)))
  train_data = federated_data.to_device(ds.x_train, ds.y_train, part, ds.mean, ds.std)
  num_steps = federated_data.steps_per_round(train_data.max_count, c.batch_size, c.local_epochs,
                                             c.local_steps)
  schedule = LocalSchedule(c.batch_size, num_steps, c.local_epochs, c.local_steps)
  eval_sets = {"test": evaluation.to_eval_data(ds.x_test, ds.y_test, ds.mean, ds.std, c.eval_batch_size)}
  if val is not None:
    eval_sets["val"] = evaluation.to_eval_data(*val, ds.mean, ds.std, c.eval_batch_size)
  fed = federation(c, ds.input_shape, ds.num_classes, schedule)
  parts = mechanisms.build(mechanism_settings(c), fed, c.seed)
  if parts.data_transform is not None:
    train_data = parts.data_transform(train_data)
  algorithm = build_algorithm(c, model, fed, parts)
  return Experiment(ds, part, model, algorithm, train_data, eval_sets, num_steps, parts)


def _check_workdir(workdir: str, config: dict) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changed = sorted(k for k in config if k not in RESUMABLE_CHANGES and saved.get(k) != config[k])
  require(not changed, "workdir", f"{workdir} holds a run with other values of {', '.join(changed)}; "
          "use another --workdir or the same config to resume")




def run(c, workdir: str, stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) the experiment; returns summary.json's content.

  Args:
    c: the experiment ConfigDict.
    workdir: output folder.
    stop_after: return after this round's checkpoint without a summary, as if killed (for tests).

  Raises:
    InputError: bad input, before anything is written.
    experiment.Diverged: a non-finite loss or parameter (summary.json says so).
  """
  exp = prepare(c)  # All input checks happen before anything is written.
  return experiment.run(exp.algorithm, exp.model, exp.train_data, exp.eval_sets, workdir=workdir,
                        rounds=c.rounds, seed=c.seed, eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
                        target_accuracy=c.target_accuracy, info=_info(c), on_start=_on_start(c, exp),
                        accountant=exp.mechanisms.accountant, target_epsilon=c.dp.target_epsilon,
                        stop_after=stop_after)


# What runs vectorised together may differ in (experiments.sweep --vectorize).
VECTORIZABLE = ("seed", "alpha")


def run_vectorized(configs: list, workdirs: list[str]) -> list[dict]:
  """Runs experiments that differ only in seed and α as one compiled program, each writing its own workdir as
  `run` would, with the same results (`build_rounds(runs=R)` over `federated_data.stack`); returns their
  summaries (a diverged run's says so). Seconds per round are the vectorised round's, all runs together.

  Raises:
    InputError: bad input, or configs that differ in more than seed and α, before anything is written.
  """
  c = configs[0]
  fixed = {k: v for k, v in c.to_dict().items() if k not in VECTORIZABLE}
  for other in configs[1:]:
    changed = sorted(k for k, v in other.to_dict().items() if k not in VECTORIZABLE and fixed[k] != v)
    require(not changed, "vectorize", f"runs vectorised together may differ only in {', '.join(VECTORIZABLE)}, "
            f"not {', '.join(changed)}")
  mechanisms.validate(mechanism_settings(c), federation(c), algorithm_info(c), vectorised=True)
  exps = [prepare(one) for one in configs]
  widest = max(e.train_data.max_count for e in exps)
  schedule = LocalSchedule(c.batch_size, federated_data.steps_per_round(widest, c.batch_size, c.local_epochs,
                                                                        c.local_steps), c.local_epochs,
                           c.local_steps)
  ds = exps[0].dataset
  fed = federation(c, ds.input_shape, ds.num_classes, schedule)
  parts = exps[0].mechanisms
  algorithm = build_algorithm(c, exps[0].model, fed, parts, runs=len(configs))
  starts = {workdir: _on_start(one, exp, vectorised=True)
            for workdir, one, exp in zip(workdirs, configs, exps, strict=True)}
  model, eval_sets = exps[0].model, [e.eval_sets for e in exps]
  data = federated_data.stack([e.train_data for e in exps])
  del exps  # each run's own training set: only the stacked copy stays on the device
  return experiment.run_many(
      algorithm, model, data, eval_sets, workdirs=workdirs, rounds=c.rounds, seeds=[one.seed for one in configs],
      eval_every=c.eval_every,
      checkpoint_every=c.checkpoint_every, target_accuracy=c.target_accuracy,
      infos=[{**_info(one), "vectorized_runs": len(configs)} for one in configs],
      on_start=lambda workdir: starts[workdir](workdir), accountant=parts.accountant,
      target_epsilon=c.dp.target_epsilon)


def _info(c) -> dict:
  """summary.json's fields from the config."""
  return {"algorithm": c.algorithm, "dataset": c.dataset, "partition": c.partition, "alpha": c.alpha,
          "num_clients": c.num_clients, "clients_per_round": c.clients_per_round, "seed": c.seed}


def _on_start(c, exp: Experiment, vectorised: bool = False):
  """What a run writes first, its lock held: config.json (with the values `auto` resolved to) and partition.npz,
  after checking a resumed workdir holds the same config."""
  config = c.to_dict()
  resolved = {"num_steps": exp.num_steps, "max_client_examples": exp.train_data.max_count,
              "num_params": models.num_params(jax.eval_shape(exp.model.init, jax.random.key(0))),
              "backend": jax.default_backend(), "conv_impl": resolve_conv_impl(c, vectorised),
              "client_map": resolve_client_map(c),
              "input_shape": list(exp.dataset.input_shape),
              "num_classes": exp.dataset.num_classes}

  index, sizes, histograms = np.asarray(exp.train_data.index), exp.partition.sizes, exp.partition.histograms

  def on_start(workdir):  # holds host copies only, not `exp`: a vectorised run frees each run's device data
    _check_workdir(workdir, config)
    metrics.write_json_atomic(os.path.join(workdir, "config.json"), {**config, "resolved": resolved})
    np.savez_compressed(os.path.join(workdir, "partition.npz"), index=index, counts=sizes, histograms=histograms)

  return on_start
