"""Turns an experiment config into a run: config → builders wiring.

`train_and_evaluate(config, workdir)` checks the config (`configuration.validate`), builds the data, model,
mechanisms and algorithm, then hands them to the library's experiment loop (`fedsnd_jax.loop.run`), which
writes the output contract (metrics.jsonl, summary.json, checkpoints) and resumes from the workdir's newest
checkpoint. Bad input raises `InputError` before anything is written. The binaries (`train`, `sweep`) call it.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import optax

from experiments import configuration
from experiments.configs import default
from experiments.configuration import federation, hyperparameters, mechanism_settings
from fedsnd_jax import (
  algorithms,
  evaluation,
  federated_data,
  host_loop,
  loop,
  mapping,
  mechanisms,
  metrics,
  models,
)
from fedsnd_jax import partition as partition_lib
from fedsnd_jax.data import Dataset, load_dataset, split_validation, subsample
from fedsnd_jax.errors import require
from fedsnd_jax.rounds import FederatedAlgorithm, Federation, MechanismParts


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
                          mechanisms=parts, client_map=resolve_client_map(c), chunk_size=c.chunk_size,
                          runs=runs)


def resolve_conv_impl(c, vectorised: bool = False) -> str:
  """What the config's conv_impl runs on this backend (`auto`: XLA's convolution in the host-stepped client steps
  of the CPU `loop` map, which vectorised runs do not use, and `host_loop.default_conv_impl` elsewhere)."""
  if c.conv_impl != "auto":
    return c.conv_impl
  step, other = (host_loop.default_conv_impl(jax.default_backend(), top) for top in (True, False))
  if step == other or vectorised or resolve_client_map(c) != "loop":
    return other
  return f"{step} in top-level client steps, {other} elsewhere"


def resolve_client_map(c) -> str:
  """The config's client_map with `auto` replaced by the backend's default (`sharded` over several processes)."""
  if c.client_map != "auto":
    return c.client_map
  return "sharded" if jax.process_count() > 1 else mapping.default_client_map(jax.default_backend())


def prepare(c) -> Experiment:
  """Loads the data, partitions it, builds the model and the algorithm. Raises InputError on bad input."""
  configuration.validate(c)
  ds = subsample(load_dataset(c.dataset, data_dir=c.data_dir or None, download=c.download), c.train_examples)
  ds, val = split_validation(ds, c.validation_fraction, c.seed)
  part = partition_lib.partition(ds.y_train, c.num_clients, c.partition, alpha=c.alpha, seed=c.seed,
                                 min_size=c.min_size, shards_per_client=c.shards_per_client,
                                 num_classes=ds.num_classes)
  model = models.build_model(c.model, ds.input_shape, ds.num_classes, dropout=c.dropout,
                             vocab_size=ds.vocab_size, batch_norm=c.batch_norm, conv_impl=c.conv_impl,
                             **algorithms.model_options(c.algorithm, hyperparameters(c)))
  train_data = federated_data.to_device(ds.x_train, ds.y_train, part, ds.mean, ds.std)
  eval_sets = {"test": evaluation.to_eval_data(ds.x_test, ds.y_test, ds.mean, ds.std, c.eval_batch_size)}
  if val is not None:
    eval_sets["val"] = evaluation.to_eval_data(*val, ds.mean, ds.std, c.eval_batch_size)
  fed = federation(c, ds.input_shape, ds.num_classes)
  num_steps = fed.schedule.num_steps(train_data.max_count)
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
  # A field an earlier version did not write (a newer mechanism's section) ran at its default.
  defaults = json.loads(default.get_config().to_json())
  changed = sorted(k for k in config if k not in configuration.RESUMABLE_CHANGES
                   and saved.get(k, defaults.get(k)) != config[k])
  require(not changed, "workdir", f"{workdir} holds a run with other values of {', '.join(changed)}; "
          "use another --workdir or the same config to resume")


def train_and_evaluate(c, workdir: str, stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) the experiment; returns summary.json's content.

  Args:
    c: the experiment ConfigDict.
    workdir: output folder.
    stop_after: return after this round's checkpoint without a summary, as if killed (for tests).

  Raises:
    InputError: bad input, before anything is written.
    loop.Diverged: a non-finite loss or parameter (summary.json says so).
  """
  exp = prepare(c)  # All input checks happen before anything is written.
  return loop.run(exp.algorithm, exp.model, exp.train_data, exp.eval_sets, workdir=workdir,
                  settings=loop_settings(c, exp.mechanisms, stop_after), seed=c.seed, info=_info(c),
                  on_start=_on_start(c, exp))


def loop_settings(c, parts: MechanismParts, stop_after: int | None = None) -> loop.LoopSettings:
  return loop.LoopSettings(c.rounds, c.eval_every, c.checkpoint_every, c.target_accuracy, parts.accountant,
                           c.dp.target_epsilon, stop_after)


# What runs vectorised together may differ in (experiments.sweep --vectorize).
VECTORIZABLE = ("seed", "alpha")


def train_and_evaluate_many(configs: list, workdirs: list[str]) -> list[dict]:
  """Runs experiments that differ only in seed and α as one compiled program, each writing its own workdir as
  `train_and_evaluate` would, with the same results (`build_rounds(runs=R)` over `federated_data.stack`); returns
  their summaries (a diverged run's says so). Seconds per round are the vectorised round's, all runs together.

  Raises:
    InputError: bad input, or configs that differ in more than seed and α, before anything is written.
  """
  c = configs[0]
  fixed = {k: v for k, v in c.to_dict().items() if k not in VECTORIZABLE}
  for other in configs[1:]:
    changed = sorted(k for k, v in other.to_dict().items() if k not in VECTORIZABLE and fixed[k] != v)
    require(not changed, "vectorize", f"runs vectorised together may differ only in {', '.join(VECTORIZABLE)}, "
            f"not {', '.join(changed)}")
  mechanisms.validate(mechanism_settings(c), federation(c), configuration.algorithm_info(c), vectorised=True)
  exps = [prepare(one) for one in configs]
  ds = exps[0].dataset
  fed = federation(c, ds.input_shape, ds.num_classes)  # the step count follows the widest run's stacked data
  parts = exps[0].mechanisms
  algorithm = build_algorithm(c, exps[0].model, fed, parts, runs=len(configs))
  starts = {workdir: _on_start(one, exp, vectorised=True)
            for workdir, one, exp in zip(workdirs, configs, exps, strict=True)}
  model, eval_sets = exps[0].model, [e.eval_sets for e in exps]
  data = federated_data.stack([e.train_data for e in exps])
  del exps  # each run's own training set: only the stacked copy stays on the device
  runs = [loop.RunSpec(workdir, one.seed, sets, {**_info(one), "vectorized_runs": len(configs)})
          for workdir, one, sets in zip(workdirs, configs, eval_sets, strict=True)]
  return loop.run_many(algorithm, model, data, runs, loop_settings(c, parts),
                       on_start=lambda workdir: starts[workdir](workdir))


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
