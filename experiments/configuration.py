"""The experiment config as typed objects, and every check that needs no data.

A config (experiments/configs/default.py) holds the run's fields, one section per algorithm with its
`Hyperparameters` and one per mechanism with its `Settings`. `federation`, `hyperparameters`, `algorithm_info` and
`mechanism_settings` read it into what the builders take; `validate` refuses bad input before anything loads or
is written, naming the field (`InputError`).
"""

import math

import jax

from experiments.configs import default
from fedsnd_jax import algorithms, mapping, mechanisms, models, settings
from fedsnd_jax import partition as partition_lib
from fedsnd_jax.errors import require
from fedsnd_jax.rounds import AlgorithmInfo, Federation, LocalSchedule
from fedsnd_jax.sampling import SAMPLINGS

SERVER_OPTIMIZERS = ("sgd", "adam")
# Fields a resumed run may change; every other field must match the workdir's config.json.
RESUMABLE_CHANGES = ("rounds", "checkpoint_every", "eval_batch_size", "client_map", "chunk_size")


def set_fields(c, fields: dict):
  """Sets `fields` (dotted names reach a section: {"dp.clip_norm": 1.0}) in the config `c`; returns it."""
  for dotted, value in fields.items():
    *sections, field = dotted.split(".")
    target = c
    for section in sections:
      target = target[section]
    target[field] = value
  return c


def federation(c, input_shape=None, num_classes=None) -> Federation:
  """The config's Federation; before the data is loaded (validation), input_shape and num_classes are None."""
  return Federation(c.num_clients, c.clients_per_round, LocalSchedule(c.batch_size, c.local_epochs, c.local_steps),
                    c.client_lr, c.client_momentum, c.weight_decay, input_shape, num_classes, c.client_sampling)


def hyperparameters(c):
  """The algorithm's Hyperparameters from its config section."""
  section = algorithms.get(c.algorithm).section
  return algorithms.hyperparameters(c.algorithm, c[section].to_dict() if section in c else {})


def algorithm_info(c) -> AlgorithmInfo:
  spec = algorithms.get(c.algorithm)
  return AlgorithmInfo(c.algorithm, spec.privacy(hyperparameters(c)), spec.partial_work,
                       spec.asynchronous)


def mechanism_settings(c) -> dict:
  """Section → Settings of every registered mechanism, from the config's sections."""
  return {section: mechanisms.settings(section, c[section].to_dict() if section in c else {})
          for section in mechanisms.REGISTRY}


# Fields of earlier layouts → their place now: mechanisms' flat fields, FedSND's flat section.
MOVED = {**mechanisms.MOVED, **algorithms.MOVED}


def refuse_moved(field: str) -> None:
  """Raises InputError naming the new place of a field of an earlier layout (`dp_clip_norm`,
  `fedsnd.noise_steps`)."""
  if field in MOVED:
    raise settings.moved_error(field, MOVED[field])


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


def _check_finite(c, prefix="") -> None:
  """Every numeric field, sections included, must be a finite number."""
  for field, value in c.items():
    if hasattr(value, "items"):
      _check_finite(value, f"{prefix}{field}.")
    elif isinstance(value, float):
      require(math.isfinite(value), prefix + field, f"must be finite, got {value}")


def validate(c) -> None:
  """Checks every field that can be checked without loading data.

  Raises:
    InputError: naming the first bad field and its allowed values.
  """
  check_fields(c)
  spec = algorithms.get(c.algorithm)
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
  fed = federation(c)
  spec.validate(hyperparameters(c), fed)
  mechanisms.validate(mechanism_settings(c), fed, algorithm_info(c))
