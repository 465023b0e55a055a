"""Turns an experiment ConfigDict into a run: validation, data, algorithm, the loop and its outputs.

`run(config, workdir)` writes DESIGN §5's output contract and resumes from the workdir's newest checkpoint.
Bad input raises `InputError` before anything is written. The binaries (`train`, `sweep`) call it.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
import optax

from fedsnd_jax import checkpoint, client, distillation, evaluation, federated_data, mapping, metrics, models
from fedsnd_jax import partition as partition_lib
from fedsnd_jax.algorithm import FederatedAlgorithm, LocalSchedule
from fedsnd_jax.baselines import BASELINES, build_baseline
from fedsnd_jax.data import Dataset, load_dataset
from fedsnd_jax.errors import InputError
from fedsnd_jax.fedavg import build_fedavg
from fedsnd_jax.fedsnd import DISTILL_TARGETS, NOISE_TARGETS, NoiseDistillation, build_fedsnd
from fedsnd_jax.self_distillation import SELF_DISTILL_MODES, self_distillation_loss

ALGORITHMS = ("fedavg", "fedsd", "fednd", "fedsnd", *BASELINES)
CLIENT_DISTILLATION = ("fedsd", "fedsnd")
SERVER_DISTILLATION = ("fednd", "fedsnd")
SERVER_OPTIMIZERS = ("sgd", "adam")
# Fields a resumed run may change; every other field must match the workdir's config.json.
RESUMABLE_CHANGES = ("rounds", "checkpoint_every", "eval_batch_size", "client_map", "chunk_size")

def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise InputError(field, message)


def validate_config(c) -> None:
  """Checks every field that can be checked without loading data.

  Raises:
    InputError: naming the first bad field and its allowed values.
  """
  _require(c.algorithm in ALGORITHMS, "algorithm",
           f"unknown algorithm {c.algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
  _require(c.model in models.MODELS, "model", f"unknown model {c.model!r}; allowed: {', '.join(models.MODELS)}")
  _require(c.partition in partition_lib.PARTITIONS, "partition",
           f"unknown partition {c.partition!r}; allowed: {', '.join(partition_lib.PARTITIONS)}")
  _require(c.client_map == "auto" or c.client_map in mapping.CLIENT_MAPS, "client_map",
           f"unknown client_map {c.client_map!r}; allowed: auto, {', '.join(mapping.CLIENT_MAPS)}")
  _require(c.conv_impl == "auto" or c.conv_impl in models.CONV_IMPLS, "conv_impl",
           f"unknown conv_impl {c.conv_impl!r}; allowed: auto, {', '.join(models.CONV_IMPLS)}")
  _require(c.server_opt in SERVER_OPTIMIZERS, "server_opt",
           f"unknown server_opt {c.server_opt!r}; allowed: {', '.join(SERVER_OPTIMIZERS)}")
  _require(c.alpha > 0, "alpha", f"must be > 0, got {c.alpha}")
  _require(c.num_clients >= 1, "num_clients", f"must be ≥ 1, got {c.num_clients}")
  _require(1 <= c.clients_per_round <= c.num_clients, "clients_per_round",
           f"must be in [1, num_clients={c.num_clients}], got {c.clients_per_round}")
  for field in ("rounds", "batch_size", "eval_every", "eval_batch_size", "chunk_size"):
    _require(c[field] >= 1, field, f"must be ≥ 1, got {c[field]}")
  for field in ("local_steps", "checkpoint_every", "train_examples", "weight_decay", "client_momentum",
                "server_momentum", "dropout"):
    _require(c[field] >= 0, field, f"must be ≥ 0, got {c[field]}")
  _require(c.local_steps > 0 or c.local_epochs >= 1, "local_epochs",
           f"must be ≥ 1 when local_steps is 0, got {c.local_epochs}")
  _require(c.client_lr > 0, "client_lr", f"must be > 0, got {c.client_lr}")
  _require(c.server_lr > 0, "server_lr", f"must be > 0, got {c.server_lr}")
  _require(c.dropout < 1, "dropout", f"must be < 1, got {c.dropout}")
  _require(0 < c.target_accuracy <= 1, "target_accuracy", f"must be in (0, 1], got {c.target_accuracy}")
  _require(0 <= c.validation_fraction < 1, "validation_fraction",
           f"must be in [0, 1), got {c.validation_fraction}")
  _validate_fedsnd(c)
  for field in ("prox_mu", "moon_mu", "feddyn_alpha", "ntd_beta", "projection_dim"):
    _require(c[field] >= 0, field, f"must be ≥ 0, got {c[field]}")
  for field in ("moon_tau", "ntd_tau"):
    _require(c[field] > 0, field, f"must be > 0, got {c[field]}")
  _require(c.algorithm != "moon" or c.model in ("mlp", "cnn2", "simple_cnn"), "model",
           f"moon needs a model with a representation (mlp, cnn2, simple_cnn), not {c.model}")


def _validate_fedsnd(c) -> None:
  for field, allowed in (("self_distill", SELF_DISTILL_MODES), ("noise_targets", NOISE_TARGETS),
                         ("teacher_weighting", distillation.TEACHER_WEIGHTINGS),
                         ("distill_target", DISTILL_TARGETS)):
    _require(c[field] in allowed, field, f"unknown value {c[field]!r}; allowed: {', '.join(allowed)}")
  for field in ("lambda_mutual", "lambda_prev", "noise_steps", "noise_l2", "adversarial", "bn_prior",
                "distill_steps", "distill_rounds"):
    _require(c[field] >= 0, field, f"must be ≥ 0, got {c[field]}")
  for field in ("temperature", "noise_samples", "noise_lr", "distill_batch", "distill_lr", "distill_lr_decay"):
    _require(c[field] > 0, field, f"must be > 0, got {c[field]}")
  _require(c.bn_prior == 0 or c.batch_norm, "bn_prior", "needs --config.batch_norm=True (a BatchNorm model)")
  if c.algorithm in SERVER_DISTILLATION:
    _require(c.clients_per_round >= 2, "clients_per_round",
             f"{c.algorithm} distils on the other clients' noise, so it needs ≥ 2, got {c.clients_per_round}")


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


def build_algorithm(c, model: models.Model, ds: Dataset, schedule: LocalSchedule) -> FederatedAlgorithm:
  """Turns the config's algorithm fields into builder arguments."""
  server_opt = (optax.sgd(c.server_lr, momentum=c.server_momentum or None) if c.server_opt == "sgd"
                else optax.adam(c.server_lr))
  common = dict(num_clients=c.num_clients, clients_per_round=c.clients_per_round, schedule=schedule,
                client_opt=client.client_optimizer(c.client_lr, c.client_momentum, c.weight_decay),
                server_opt=server_opt, client_map=resolve_client_map(c), chunk_size=c.chunk_size)
  if c.algorithm == "fedavg":
    return build_fedavg(model, **common)
  if c.algorithm in BASELINES:
    mu, tau = (c.moon_mu, c.moon_tau) if c.algorithm == "moon" else (c.prox_mu, c.ntd_tau)
    return build_baseline(c.algorithm, model, mu=mu, tau=tau, alpha=c.feddyn_alpha, beta=c.ntd_beta,
                          client_step=c.client_lr / (1.0 - c.client_momentum), **common)
  client_loss = None
  if c.algorithm in CLIENT_DISTILLATION:
    client_loss = self_distillation_loss(model, lambda_mutual=c.lambda_mutual, lambda_prev=c.lambda_prev,
                                         temperature=c.temperature, mode=c.self_distill)
  server = None
  if c.algorithm in SERVER_DISTILLATION:
    server = NoiseDistillation(**{field: c[field] for field in NoiseDistillation._fields})
  return build_fedsnd(model, ds.input_shape, ds.num_classes, client_loss=client_loss, server=server, **common)


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, tuple | None]:
  """Holds out a seeded `fraction` of the training set; returns (the rest as a Dataset, (x_val, y_val))."""
  if fraction <= 0:
    return ds, None
  order = np.random.default_rng(seed).permutation(len(ds.y_train))
  n_val = max(1, int(round(fraction * len(order))))
  val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
  rest = dataclasses.replace(ds, x_train=ds.x_train[train], y_train=ds.y_train[train])
  return rest, (ds.x_train[val], ds.y_train[val])


def resolve_conv_impl(c) -> str:
  """The config's conv_impl with `auto` replaced by the backend's default."""
  return models.default_conv_impl(jax.default_backend()) if c.conv_impl == "auto" else c.conv_impl


def resolve_client_map(c) -> str:
  """The config's client_map with `auto` replaced by the backend's default."""
  return mapping.default_client_map(jax.default_backend()) if c.client_map == "auto" else c.client_map


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
                             vocab_size=ds.vocab_size, batch_norm=c.batch_norm, conv_impl=resolve_conv_impl(c),
                             projection_dim=c.projection_dim if c.algorithm == "moon" else 0)
  train_data = federated_data.to_device(ds.x_train, ds.y_train, part, ds.mean, ds.std)
  num_steps = federated_data.steps_per_round(train_data.max_count, c.batch_size, c.local_epochs,
                                             c.local_steps)
  schedule = LocalSchedule(c.batch_size, num_steps, c.local_epochs, c.local_steps)
  eval_sets = {"test": evaluation.to_eval_data(ds.x_test, ds.y_test, ds.mean, ds.std, c.eval_batch_size)}
  if val is not None:
    eval_sets["val"] = evaluation.to_eval_data(*val, ds.mean, ds.std, c.eval_batch_size)
  return Experiment(ds, part, model, build_algorithm(c, model, ds, schedule), train_data, eval_sets, num_steps)


def _check_workdir(workdir: str, config: dict) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changed = sorted(k for k in config if k not in RESUMABLE_CHANGES and saved.get(k) != config[k])
  _require(not changed, "workdir", f"{workdir} holds a run with other values of {', '.join(changed)}; "
           "use another --workdir or the same config to resume")


def _save_partition(workdir: str, exp: Experiment) -> None:
  np.savez_compressed(os.path.join(workdir, "partition.npz"),
                      index=np.asarray(exp.train_data.index), counts=exp.partition.sizes,
                      histograms=exp.partition.histograms)


def rounds_to_target(records: list[dict], target: float) -> int | None:
  """The first evaluated round whose test accuracy is at or above `target` (None if none is)."""
  return next((r["round"] for r in records if r["test_accuracy"] >= target), None)


def _summary(c, records: list[dict], wall_s: float) -> dict:
  accs = [r["test_accuracy"] for r in records]
  timed = [r for r in records if r["round"] > 1] or records  # Round 1 includes compilation.
  val = ({"final_val_accuracy": records[-1]["val_accuracy"],
          "last5_mean_val_accuracy": float(np.mean([r["val_accuracy"] for r in records[-5:]]))}
         if "val_accuracy" in records[-1] else {})
  return {**val,
      "algorithm": c.algorithm, "dataset": c.dataset, "partition": c.partition, "alpha": c.alpha,
      "num_clients": c.num_clients, "clients_per_round": c.clients_per_round, "seed": c.seed,
      "rounds": records[-1]["round"], "final_accuracy": accs[-1], "best_accuracy": max(accs),
      "last5_mean_accuracy": float(np.mean(accs[-5:])), "target_accuracy": c.target_accuracy,
      "rounds_to_target": rounds_to_target(records, c.target_accuracy),
      "mean_client_time_s": float(np.mean([r["client_time_s"] for r in timed])),
      "mean_server_time_s": float(np.mean([r["server_time_s"] for r in timed])),
      "total_wall_s": wall_s,
  }


def _evaluate(evaluate, params, eval_sets, suffix="") -> dict[str, float]:
  out = {}
  for name, data in eval_sets.items():
    acc, loss = evaluate(params, data)
    out[f"{name}_accuracy{suffix}"], out[f"{name}_loss{suffix}"] = float(acc), float(loss)
  return out


def format_eta(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run(c, workdir: str, stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) the experiment; returns summary.json's content.

  Args:
    c: the experiment ConfigDict.
    workdir: output folder.
    stop_after: return after this round's checkpoint without a summary, as if killed (for tests).
  """
  exp = prepare(c)  # All input checks happen before anything is written.
  config = c.to_dict()
  _check_workdir(workdir, config)
  os.makedirs(workdir, exist_ok=True)
  resolved = {"num_steps": exp.num_steps, "max_client_examples": exp.train_data.max_count,
              "num_params": models.num_params(jax.eval_shape(exp.model.init, jax.random.key(0))),
              "backend": jax.default_backend(), "conv_impl": resolve_conv_impl(c),
              "client_map": resolve_client_map(c),
              "input_shape": list(exp.dataset.input_shape),
              "num_classes": exp.dataset.num_classes}
  metrics.write_json_atomic(os.path.join(workdir, "config.json"), {**config, "resolved": resolved})
  _save_partition(workdir, exp)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = exp.algorithm.init(jax.random.key(c.seed))
  log = {"records": [], "bytes_up": 0, "bytes_down": 0, "wall_s": 0.0}
  if ckpt.latest_round() is not None:
    state, log = ckpt.restore(state)
    print(f"resuming {workdir} from round {int(state.round)}", flush=True)
  writer = metrics.MetricsWriter(workdir, log["records"])
  evaluate = evaluation.make_evaluator(exp.model)
  session_start, start_round = time.perf_counter(), int(state.round)
  try:
    for _ in range(start_round, c.rounds):
      state, diag = exp.algorithm.apply(state, exp.train_data)
      r = int(state.round)
      log["bytes_up"] += diag.pop("bytes_up")
      log["bytes_down"] += diag.pop("bytes_down")
      elapsed = time.perf_counter() - session_start
      wall_s = log["wall_s"] + elapsed
      extra_params = diag.pop("eval_params", {})
      if r % c.eval_every == 0 or r == c.rounds:
        record = {"round": r, **_evaluate(evaluate, state.params, exp.eval_sets), **diag,
                  "bytes_up": log["bytes_up"], "bytes_down": log["bytes_down"], "wall_s": wall_s}
        for name, params in extra_params.items():  # e.g. the aggregate without distillation
          record.update(_evaluate(evaluate, params, exp.eval_sets, suffix=f"_{name}"))
        acc, loss = record["test_accuracy"], record["test_loss"]
        log["records"].append(record)
        writer.write(record)
        per_round = elapsed / (r - start_round)
        print(f"round {r}/{c.rounds} | acc {acc:.4f} | loss {loss:.4f} | {per_round:.2f} s/round | "
              f"ETA {format_eta(per_round * (c.rounds - r))}", flush=True)
      if (c.checkpoint_every and r % c.checkpoint_every == 0) or r == c.rounds or r == stop_after:
        ckpt.save(r, state, {**log, "wall_s": wall_s})
      if r == stop_after:
        return None
  finally:
    writer.close()
    ckpt.close()
  summary = _summary(c, log["records"], log["wall_s"] + time.perf_counter() - session_start)
  metrics.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  print(f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}, "
        f"last-5 mean {summary['last5_mean_accuracy']:.4f}); rounds to {c.target_accuracy:.2f}: "
        f"{summary['rounds_to_target']}; {summary['total_wall_s']:.1f} s", flush=True)
  return summary


