"""The algorithm registry: a name → its plug-in (builder, hyperparameters with the paper's defaults,
validation, config section), and `build`, which hands a plug-in to the one round driver.

Adding an algorithm: one module here (the paper cited, its update equations, `Hyperparameters`, `validate`,
`build`, `PLUGIN`), its test, and one line in REGISTRY (README, "Adding an algorithm").
"""

from fedsnd_jax import aggregation, models
from fedsnd_jax.algorithm import FederatedAlgorithm, Federation, Plugin, build_rounds
from fedsnd_jax.algorithms import fedavg, feddyn, fedftg, fedgen, fedntd, fedprox, fedsnd, moon, scaffold
from fedsnd_jax.errors import InputError

REGISTRY: dict[str, Plugin] = {
    "fedavg": fedavg.PLUGIN,
    "fedsd": fedsnd.FEDSD,
    "fednd": fedsnd.FEDND,
    "fedsnd": fedsnd.FEDSND,
    "fedprox": fedprox.PLUGIN,
    "scaffold": scaffold.PLUGIN,
    "moon": moon.PLUGIN,
    "feddyn": feddyn.PLUGIN,
    "fedntd": fedntd.PLUGIN,
    "fedgen": fedgen.PLUGIN,
    "fedftg": fedftg.PLUGIN,
}


def sections() -> dict[str, type]:
  """Config section → Hyperparameters class, for every registered algorithm that has hyperparameters."""
  return {p.section: p.hyperparameters for p in REGISTRY.values() if p.hyperparameters._fields}


def get(name: str) -> Plugin:
  if name not in REGISTRY:
    raise InputError("algorithm", f"unknown algorithm {name!r}; allowed: {', '.join(REGISTRY)}")
  return REGISTRY[name]


def hyperparameters(name: str, values=None):
  """The plug-in's Hyperparameters from a mapping of overrides (None: the defaults).

  Raises:
    InputError: a field the algorithm does not have.
  """
  plugin = get(name)
  values = dict(values or {})
  unknown = sorted(set(values) - set(plugin.hyperparameters._fields))
  if unknown:
    raise InputError(f"{plugin.section}.{unknown[0]}", f"{name} has no such hyperparameter; it has: "
                     f"{', '.join(plugin.hyperparameters._fields) or 'none'}")
  return plugin.hyperparameters(**values)


def model_options(name: str, hp) -> dict:
  """Extra `models.build_model` arguments the algorithm needs (MOON's projection head), else {}."""
  return get(name).model_options(hp)


def build(name: str, model: models.Model, federation: Federation, hp=None, *,
          server_opt=None, aggregator: aggregation.Aggregator | None = None, upload_transform=None, attack=None,
          client_map: str = "vmap", chunk_size: int = 8, max_traces: int | None = None,
          runs: int = 0) -> FederatedAlgorithm:
  """Builds a registered algorithm on the round driver.

  Args:
    name: a REGISTRY key.
    model: the model pair (built with `model_options(name, hp)`).
    federation: clients, schedule, client optimiser settings, data shapes, client sampling.
    hp: the plug-in's Hyperparameters, or a mapping of overrides (None: the paper's defaults).
    server_opt, aggregator, upload_transform, attack, client_map, chunk_size, max_traces, runs: the driver's
      (`build_rounds`).

  Raises:
    InputError: an unknown name, or hyperparameters out of range.
  """
  plugin = get(name)
  if not isinstance(hp, plugin.hyperparameters):
    hp = hyperparameters(name, hp)
  plugin.validate(hp, federation)
  return build_rounds(plugin.build(model, hp, federation), model, num_clients=federation.num_clients,
                      clients_per_round=federation.clients_per_round, schedule=federation.schedule,
                      client_opt=federation.client_optimizer(), server_opt=server_opt, aggregator=aggregator,
                      upload_transform=upload_transform, attack=attack, client_map=client_map,
                      chunk_size=chunk_size, sampling=federation.sampling, max_traces=max_traces, runs=runs)
