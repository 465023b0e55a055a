"""The mechanism registry, and the rules between mechanisms as one table.

A mechanism is a module (differential privacy, secure aggregation, robust aggregation, Byzantine attacks, client
systems on a simulated clock, compressed uploads) with a typed `Settings` NamedTuple (its config section,
defaults off), `enabled`, `validate` and `build`, registered by its `SPEC` (`algorithm.MechanismSpec`). A run's
mechanisms are built together: `validate` checks each one's settings and then the rules below; `build` merges
what the mechanisms that are on plug in (`algorithm.MechanismParts`).

Adding a mechanism: one module with those four names and its test, one line in REGISTRY, one row in RULES
(docs/library.md, "Adding a mechanism").
"""

from typing import NamedTuple

from fedsnd_jax import attacks, compression, privacy, robust, secure_aggregation, systems
from fedsnd_jax import settings as settings_lib
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import AlgorithmInfo, Federation, MechanismParts, MechanismSpec

REGISTRY: dict[str, MechanismSpec] = {spec.section: spec for spec in (
    privacy.SPEC, secure_aggregation.SPEC, robust.SPEC, attacks.SPEC, systems.SPEC, compression.SPEC)}


class Composition(NamedTuple):
  """How a mechanism composes with the rest of a run; each field is '' where it composes, else the reason.

  Attributes:
    aggregator: what the mechanism makes of the round's aggregation when it chooses the aggregator (at most one
      mechanism that does may be on).
    poisson: why it cannot run under Poisson sampling (the cohort's size varies round to round).
    vectorised: why runs with it cannot be vectorised together (`experiments.sweep --vectorize`).
    deadline: why it cannot run with a round deadline that drops or cuts clients (`systems`).
    compression: why it cannot take compressed uploads (`compression`).
    asynchronous: why it cannot run under FedBuff (`systems.buffer_size`, `buffered`).
  """

  aggregator: str
  poisson: str
  vectorised: str
  deadline: str = ""
  compression: str = ""
  asynchronous: str = ""


RULES: dict[str, Composition] = {
    "dp": Composition("clips and noises the mean", "", "",
                      "its accounting is for the sampled cohort, not one a deadline thins (not supported)",
                      asynchronous="its accounting is per round of a sampled cohort, not per buffer of arrivals"),
    "secagg": Composition("the server sees only the sum", "its threshold is checked against a fixed cohort", "",
                          "a deadline's dropped clients are its own dropouts (secagg.dropout), not simulated",
                          "it sums fixed-point vectors of every coordinate (it quantises itself); sparse or "
                          "quantised uploads need a protocol of their own",
                          "its masks are agreed within a round's cohort, not among a buffer's arrivals"),
    "robust": Composition("a robust rule replaces the mean", "its f is checked against a fixed cohort", "",
                          "a dropped client's empty update would still vote in its rule",
                          asynchronous="its f is of a synchronous cohort, not of stale rebased uploads"),
    "attack": Composition("", "", "its Byzantine clients are drawn per seed: run attacked cells one by one",
                          "its attacks' honest statistics would count a dropped client's empty update",
                          asynchronous="its attacks read the honest updates against the model of this round"),
    "systems": Composition("", "its clock would count the empty client that pads a Poisson round",
                           "its client profiles are drawn per seed: run systems cells one by one"),
    "compression": Composition("", "", "", asynchronous="it compresses an update against the global model, "
                                                         "not against the version its client started from"),
}

# Flat config fields of earlier versions → their place in a mechanism's section.
MOVED = {
    **{f"dp_{field}": f"dp.{field}" for field in privacy.Settings._fields},
    "secure_aggregation": "secagg.enabled",
    **{f"secagg_{field}": f"secagg.{field}" for field in ("bits", "range", "dropout")},
    "aggregator": "robust.rule", "aggregator_f": "robust.f", "aggregator_tau": "robust.tau",
    "nearest_neighbor_mixing": "robust.nearest_neighbor_mixing",
    "attack": "attack.kind", "byzantine_fraction": "attack.fraction", "attack_scale": "attack.scale",
}


def sections() -> dict[str, type]:
  """Config section → Settings class, for every registered mechanism."""
  return {section: spec.settings for section, spec in REGISTRY.items()}


def settings(section: str, values=None):
  """The mechanism's Settings from a mapping of overrides (None: the defaults, every mechanism off).

  Raises:
    InputError: a field the mechanism does not have.
  """
  return settings_lib.from_dict(REGISTRY[section].settings, values, section)


def switched_on(chosen: dict) -> list[str]:
  """The sections of `chosen` (section → Settings) whose mechanism is on, in REGISTRY order."""
  return [section for section in REGISTRY if section in chosen and REGISTRY[section].enabled(chosen[section])]


def validate(chosen: dict, federation: Federation, algorithm: AlgorithmInfo, vectorised: bool = False) -> None:
  """Checks every mechanism's settings, then the RULES between the ones that are on.

  Args:
    chosen: section → Settings, for every registered mechanism.
    federation: the run's federation (before the data is loaded: schedule and shapes may be None).
    algorithm: the run's algorithm.
    vectorised: the run is one of several vectorised together.

  Raises:
    InputError: naming the first bad field, or the section of a mechanism that does not compose.
  """
  for section, spec in REGISTRY.items():
    spec.validate(chosen[section], federation, algorithm)
  on = switched_on(chosen)
  choosers = [section for section in on if RULES[section].aggregator]
  if len(choosers) > 1:
    first, second = choosers[:2]
    raise InputError(second, f"{first} ({RULES[first].aggregator}) and {second} ({RULES[second].aggregator}) "
                     "both choose the round's aggregator; turn one off")
  for section in on:
    if "compression" in on and RULES[section].compression:
      raise InputError("compression.kind",
                       f"{section} cannot take compressed uploads: {RULES[section].compression}")
    if systems.drops_clients(chosen["systems"]) and RULES[section].deadline:
      raise InputError("systems.deadline_s", f"{section} cannot run with a deadline: {RULES[section].deadline}")
    if "systems" in on and chosen["systems"].buffer_size and RULES[section].asynchronous:
      raise InputError("systems.buffer_size", f"{section} cannot run under FedBuff: {RULES[section].asynchronous}")
    if federation.sampling == "poisson" and RULES[section].poisson:
      raise InputError("client_sampling", f"poisson sampling varies the cohort's size, and {section}'s "
                       f"{RULES[section].poisson.removeprefix('its ')}; use client_sampling=fixed or turn "
                       f"{section} off")
    if vectorised and RULES[section].vectorised:
      raise InputError("vectorize", f"{section}: {RULES[section].vectorised}")


def build(chosen: dict, federation: Federation, seed: int) -> MechanismParts:
  """What the mechanisms that are on plug in, merged (each kind of part comes from one mechanism at most)."""
  merged = {}
  for section in switched_on(chosen):
    parts = REGISTRY[section].build(chosen[section], federation, seed)
    for kind, part in parts._asdict().items():
      if part is not None:
        if kind in merged:
          raise ValueError(f"two mechanisms supply the {kind} ({merged[kind][0]} and {section}); see RULES")
        merged[kind] = (section, part)
  return MechanismParts(**{kind: part for kind, (_, part) in merged.items()})
