"""Turns an experiment ConfigDict into a run: config validation and config → builder wiring.

`run(config, workdir)` builds the data, model and algorithm, then hands them to the library's experiment loop
(`fedsnd_jax.experiment.run`), which writes DESIGN §5's output contract and resumes from the workdir's newest
checkpoint. Bad input raises `InputError` before anything is written. The binaries (`train`, `sweep`) call it.
"""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import optax

from fedsnd_jax import (
  aggregation,
  algorithms,
  attacks,
  evaluation,
  experiment,
  federated_data,
  mapping,
  metrics,
  models,
  privacy,
  robust,
  secure_aggregation,
)
from fedsnd_jax import partition as partition_lib
from fedsnd_jax.algorithm import SAMPLINGS, FederatedAlgorithm, Federation, LocalSchedule
from fedsnd_jax.data import Dataset, load_dataset
from fedsnd_jax.errors import require

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
                    input_shape, num_classes)


def hyperparameters(c):
  """The algorithm's Hyperparameters from its config section."""
  section = algorithms.get(c.algorithm).section
  return algorithms.hyperparameters(c.algorithm, c[section].to_dict() if section in c else {})


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


def validate_config(c) -> None:
  """Checks every field that can be checked without loading data.

  Raises:
    InputError: naming the first bad field and its allowed values.
  """
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
  _validate_privacy(c, plugin)
  _validate_robustness(c)
  _validate_secure_aggregation(c, plugin)
  require(c.client_sampling == "fixed" or (c.aggregator == "mean" and not c.secure_aggregation), "client_sampling",
          "poisson sampling varies the cohort's size, which a robust rule's f and secure aggregation's threshold "
          "are not checked against; use aggregator=mean without secure_aggregation, or client_sampling=fixed")


def _validate_secure_aggregation(c, plugin) -> None:
  if not c.secure_aggregation:
    return
  require("secure_aggregation" in plugin.privacy(hyperparameters(c)), "secure_aggregation",
          f"{c.algorithm}'s server needs individual client models (see its module), which secure aggregation "
          "hides; run it without secure_aggregation")
  require(c.dp_clip_norm == 0 and c.aggregator == "mean" and not c.nearest_neighbor_mixing, "secure_aggregation",
          "the server only sees the sum: it cannot clip individual updates (DP) or run a robust rule")
  require(1 <= c.secagg_bits <= 31 and c.clients_per_round * ((1 << c.secagg_bits) - 1) < 1 << 32, "secagg_bits",
          f"{c.clients_per_round} clients × (2^{c.secagg_bits} − 1) must stay below 2^32")
  require(c.secagg_range > 0, "secagg_range", f"must be > 0, got {c.secagg_range}")
  dropped = int(round(c.secagg_dropout * c.clients_per_round))
  require(0 <= c.secagg_dropout < 1 and c.clients_per_round - dropped >= secure_aggregation.threshold(
      c.clients_per_round), "secagg_dropout", f"{dropped} of {c.clients_per_round} dropping leaves fewer than the "
          f"{secure_aggregation.threshold(c.clients_per_round)} survivors needed to unmask")


def _validate_robustness(c) -> None:
  require(c.aggregator == "mean" or c.aggregator in robust.RULES, "aggregator",
          f"unknown aggregator {c.aggregator!r}; allowed: mean, {', '.join(robust.RULES)}")
  require(c.attack in attacks.ATTACKS, "attack",
          f"unknown attack {c.attack!r}; allowed: {', '.join(attacks.ATTACKS)}")
  for field in ("aggregator_f", "aggregator_tau", "attack_scale"):
    require(c[field] >= 0, field, f"must be ≥ 0, got {c[field]}")
  require(c.aggregator != "centered_clipping" or c.aggregator_tau > 0, "aggregator_tau",
          "centered clipping's radius τ must be > 0 (at 0 the aggregate never moves)")
  require(0 <= c.byzantine_fraction < 0.5, "byzantine_fraction",
          f"must be in [0, 0.5), got {c.byzantine_fraction}")
  require((c.attack == "none") == (c.byzantine_fraction == 0), "attack",
          f"attack={c.attack!r} with byzantine_fraction={c.byzantine_fraction}: set both or neither")
  if c.aggregator != "mean" or c.nearest_neighbor_mixing:
    require(c.dp_clip_norm == 0, "aggregator", "differential privacy brings its own aggregator (clip and noise "
            "the mean); use aggregator=mean with dp_clip_norm > 0")
    rule = c.aggregator if c.aggregator != "mean" else "median"
    need = robust.smallest_round(rule, c.aggregator_f, c.nearest_neighbor_mixing)
    require(c.clients_per_round >= need, "aggregator_f", f"{c.aggregator}"
            f"{' with nearest-neighbour mixing' if c.nearest_neighbor_mixing else ''} for f = {c.aggregator_f} "
            f"needs at least {need} clients per round, got {c.clients_per_round}")
  require(not c.nearest_neighbor_mixing or c.aggregator != "mean", "nearest_neighbor_mixing",
          "is a pre-aggregation for a robust rule; choose an aggregator other than mean")


def robustness(c, num_classes: int, data: federated_data.FederatedData):
  """(aggregator or None, attack or None, training data) of the config's robustness and secure-aggregation
  fields.

  The Byzantine clients are drawn once per seed; label_flip poisons their data, the model attacks replace their
  uploads.
  """
  aggregator = None
  if c.aggregator != "mean":
    aggregator = robust.build(c.aggregator, c.aggregator_f, c.aggregator_tau, c.nearest_neighbor_mixing)
  elif c.secure_aggregation:
    aggregator = secure_aggregation.secure_mean(c.secagg_bits, c.secagg_range, c.secagg_dropout)
  if c.attack == "none":
    return aggregator, None, data
  byzantine = attacks.byzantine_clients(c.num_clients, c.byzantine_fraction, c.seed)
  if c.attack == "label_flip":
    return aggregator, None, attacks.flip_labels(data, byzantine, num_classes)
  scale = c.attack_scale or attacks.DEFAULT_SCALE[c.attack]
  return aggregator, attacks.model_attack(c.attack, byzantine, scale), data


def _validate_privacy(c, plugin) -> None:
  for field in ("dp_clip_norm", "dp_noise_multiplier", "dp_clip_count_stddev", "dp_target_epsilon"):
    require(c[field] >= 0, field, f"must be ≥ 0, got {c[field]}")
  if c.dp_clip_norm == 0:
    return
  require(0 < c.dp_delta < 1, "dp_delta", f"must be in (0, 1), got {c.dp_delta}")
  require(0 < c.dp_target_quantile < 1, "dp_target_quantile", f"must be in (0, 1), got {c.dp_target_quantile}")
  require(c.dp_clip_learning_rate > 0, "dp_clip_learning_rate", f"must be > 0, got {c.dp_clip_learning_rate}")
  require(not (c.dp_local and c.dp_adaptive_clip), "dp_adaptive_clip",
          "adaptive clipping is central DP's (the server sets S from a noised count); not with dp_local")
  require(c.dp_target_epsilon == 0 or c.dp_noise_multiplier > 0, "dp_target_epsilon",
          "needs dp_noise_multiplier > 0 (without noise ε is infinite)")
  require(c.dp_accountant in privacy.ACCOUNTANTS, "dp_accountant",
          f"unknown dp_accountant {c.dp_accountant!r}; allowed: {', '.join(privacy.ACCOUNTANTS)}")
  require(c.dp_accountant == "rdp" or c.dp_local or c.client_sampling == "poisson", "dp_accountant",
          "dp-accounting's PLD accountant does not support sampling without replacement; use "
          "client_sampling=poisson or dp_accountant=rdp")
  modes = plugin.privacy(hyperparameters(c))
  require(bool(modes), "algorithm", f"{c.algorithm} releases more than its model update in the clear, which no "
          "DP mode here covers (see its module); run it with dp_clip_norm=0")
  mode = "local" if c.dp_local else "central"
  require(mode in modes, "dp_local", f"{c.algorithm} can be covered by {' or '.join(modes)} DP only, not {mode} "
          f"(see its module); set --config.dp_local={not c.dp_local}")


def privacy_mechanism(c):
  """(aggregator, upload transform, accountant) of the config's DP settings; (None, None, None) without DP."""
  if c.dp_clip_norm == 0:
    return None, None, None
  count_stddev = 0.0
  if c.dp_local:
    aggregator, transform = aggregation.unweighted_mean(), privacy.local_noise(c.dp_clip_norm,
                                                                               c.dp_noise_multiplier)
  else:
    adaptive = None
    if c.dp_adaptive_clip:
      count_stddev = c.dp_clip_count_stddev or c.clients_per_round / 20
      adaptive = privacy.AdaptiveClipping(c.dp_target_quantile, count_stddev, c.dp_clip_learning_rate)
    aggregator = privacy.central_dp(c.dp_clip_norm, c.dp_noise_multiplier, adaptive, c.clients_per_round)
    transform = None
  accountant = privacy.Accountant(c.num_clients, c.clients_per_round, c.dp_noise_multiplier, c.dp_delta,
                                  count_stddev, c.dp_local, c.client_sampling, c.dp_accountant)
  return aggregator, transform, accountant


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
  accountant: privacy.Accountant | None  # differential privacy's ε, when dp_clip_norm > 0


def build_algorithm(c, model: models.Model, fed: Federation, aggregator=None, upload_transform=None,
                    attack=None, runs: int = 0) -> FederatedAlgorithm:
  """Turns the config's algorithm, its section and the server fields into builder arguments; the aggregator,
  upload transform and attack come from `privacy_mechanism` and `robustness`."""
  server_opt = (optax.sgd(c.server_lr, momentum=c.server_momentum or None) if c.server_opt == "sgd"
                else optax.adam(c.server_lr))
  return algorithms.build(c.algorithm, model, fed, hyperparameters(c), server_opt=server_opt,
                          aggregator=aggregator, upload_transform=upload_transform, attack=attack,
                          client_map=resolve_client_map(c), chunk_size=c.chunk_size, sampling=c.client_sampling,
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
  robust_aggregator, attack, train_data = robustness(c, ds.num_classes, train_data)
  dp_aggregator, transform, accountant = privacy_mechanism(c)
  algorithm = build_algorithm(c, model, fed, dp_aggregator or robust_aggregator, transform, attack)
  return Experiment(ds, part, model, algorithm, train_data, eval_sets, num_steps, accountant)


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
                        accountant=exp.accountant, target_epsilon=c.dp_target_epsilon,
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
  require(c.byzantine_fraction == 0 or c.attack == "none", "vectorize",
          "Byzantine clients are drawn per seed: run attacked cells one by one")
  exps = [prepare(one) for one in configs]
  widest = max(e.train_data.max_count for e in exps)
  schedule = LocalSchedule(c.batch_size, federated_data.steps_per_round(widest, c.batch_size, c.local_epochs,
                                                                        c.local_steps), c.local_epochs,
                           c.local_steps)
  ds = exps[0].dataset
  robust_aggregator = robustness(c, ds.num_classes, exps[0].train_data)[0]
  dp_aggregator, transform, accountant = privacy_mechanism(c)
  algorithm = build_algorithm(c, exps[0].model, federation(c, ds.input_shape, ds.num_classes, schedule),
                              dp_aggregator or robust_aggregator, transform, runs=len(configs))
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
      on_start=lambda workdir: starts[workdir](workdir), accountant=accountant,
      target_epsilon=c.dp_target_epsilon)


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
