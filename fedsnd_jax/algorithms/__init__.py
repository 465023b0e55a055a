"""The algorithm registry: a name → its `AlgorithmSpec` (builder, hyperparameters with the paper's defaults,
validation, config section), and `build`, which hands the algorithm's round parts to the one round driver.

Adding an algorithm: one module here (the paper cited, its update equations, `Hyperparameters`, `validate`,
`build`, `SPEC`), its test, and one line in REGISTRY (docs/library.md, "Adding an algorithm").
"""

from fedsnd_jax import models, settings, systems
from fedsnd_jax.algorithms import fedavg, feddyn, fedftg, fedgen, fednova, fedntd, fedprox, fedsnd, moon, scaffold
from fedsnd_jax.driver import build_rounds
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import (
  NO_MECHANISMS,
  AlgorithmInfo,
  AlgorithmSpec,
  FederatedAlgorithm,
  Federation,
  MechanismParts,
)

REGISTRY: dict[str, AlgorithmSpec] = {
    "fedavg": fedavg.SPEC,
    "fedsd": fedsnd.FEDSD,
    "fednd": fedsnd.FEDND,
    "fedsnd": fedsnd.FEDSND,
    "fedprox": fedprox.SPEC,
    "scaffold": scaffold.SPEC,
    "moon": moon.SPEC,
    "feddyn": feddyn.SPEC,
    "fedntd": fedntd.SPEC,
    "fedgen": fedgen.SPEC,
    "fedftg": fedftg.SPEC,
    "fednova": fednova.SPEC,
}


def sections() -> dict[str, type]:
  """Config section → Hyperparameters class, for every registered algorithm that has hyperparameters."""
  return {spec.section: spec.hyperparameters for spec in REGISTRY.values() if spec.hyperparameters._fields}


def get(name: str) -> AlgorithmSpec:
  if name not in REGISTRY:
    raise InputError("algorithm", f"unknown algorithm {name!r}; allowed: {', '.join(REGISTRY)}")
  return REGISTRY[name]


def hyperparameters(name: str, values=None):
  """The algorithm's Hyperparameters from a (nested) mapping of overrides (None: the defaults).

  Raises:
    InputError: a field the algorithm does not have (naming its new place if it moved).
  """
  spec = get(name)
  return settings.from_dict(spec.hyperparameters, values, spec.section, moved(spec))


def moved(spec: AlgorithmSpec) -> dict[str, str]:
  """The spec's moved fields as dotted config names ("fedsnd.noise_steps" → "fedsnd.synthesis.steps")."""
  return {f"{spec.section}.{old}": f"{spec.section}.{new}" for old, new in spec.moved.items()}


# Every algorithm's moved fields, as dotted config names.
MOVED = {old: new for spec in REGISTRY.values() for old, new in moved(spec).items()}


def model_options(name: str, hp) -> dict:
  """Extra `models.build_model` arguments the algorithm needs (MOON's projection head), else {}."""
  return get(name).model_options(hp)


def build(name: str, model: models.Model, federation: Federation, hp=None, *, server_opt=None,
          mechanisms: MechanismParts = NO_MECHANISMS, client_map: str = "vmap", chunk_size: int = 8,
          runs: int = 0) -> FederatedAlgorithm:
  """Builds a registered algorithm on the round driver.

  Args:
    name: a REGISTRY key.
    model: the model pair (built with `model_options(name, hp)`).
    federation: clients, local schedule, client optimiser settings, data shapes, client sampling.
    hp: the spec's Hyperparameters, or a mapping of overrides (None: the paper's defaults).
    server_opt, mechanisms, client_map, chunk_size, runs: the driver's (`driver.build_rounds`).

  Raises:
    InputError: an unknown name, or hyperparameters out of range.
  """
  spec = get(name)
  if not isinstance(hp, spec.hyperparameters):
    hp = hyperparameters(name, hp)
  spec.validate(hp, federation)
  clock, info = mechanisms.clock, AlgorithmInfo(name, spec.privacy(hp), spec.partial_work, spec.asynchronous)
  if clock is not None and clock.deadline:
    systems.require_partial_work(info)
  if clock is not None and clock.buffer_size:
    systems.require_asynchronous(info)
  return build_rounds(spec.build(model, hp, federation), model, federation, server_opt=server_opt,
                      mechanisms=mechanisms, client_map=client_map, chunk_size=chunk_size, runs=runs)
