"""The mechanism registry: sections from Settings, the rules between mechanisms, the earlier flat names refused."""

import re

import pytest

from experiments import configuration
from experiments.configs import tiny as tiny_config
from fedsnd_jax import mechanisms
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import MechanismParts


def _config(fields=None):
  return configuration.set_fields(tiny_config.get_config(),
                                  {"num_clients": 7, "clients_per_round": 7, **(fields or {})})


def test_every_mechanism_has_a_section_with_its_settings_defaults_and_is_off_there():
  c = tiny_config.get_config()
  for section, settings in mechanisms.sections().items():
    assert c[section].to_dict() == settings()._asdict()
    assert not mechanisms.REGISTRY[section].enabled(settings())
  assert mechanisms.build(configuration.mechanism_settings(c), configuration.federation(c), 0) == MechanismParts()
  assert set(mechanisms.RULES) == set(mechanisms.REGISTRY)


ON = {"dp": {"dp.clip_norm": 1.0}, "secagg": {"secagg.enabled": True}, "robust": {"robust.rule": "median"},
      "attack": {"attack.kind": "sign_flip", "attack.fraction": 0.3}, "systems": {"systems.enabled": True},
      "compression": {"compression.kind": "topk"}}
DEADLINE = {"systems.enabled": True, "systems.deadline_s": 1.0}


@pytest.mark.parametrize("first, second", [("dp", "secagg"), ("dp", "robust"), ("secagg", "robust")])
def test_two_mechanisms_that_choose_the_aggregator_are_refused_naming_the_second(first, second):
  configuration.validate(_config(ON[first]))
  configuration.validate(_config(ON[second]))
  with pytest.raises(InputError, match=f"^{second}: {first} .* both choose the round's aggregator"):
    configuration.validate(_config({**ON[first], **ON[second]}))


def test_rules_refuse_poisson_sampling_vectorised_runs_deadlines_and_compression_where_the_table_says():
  for section, rule in mechanisms.RULES.items():
    fields = ON[section]
    if section != "compression":
      c = _config({**fields, **ON["compression"]})
      if rule.compression:
        with pytest.raises(InputError, match=f"^compression.kind: {section} cannot take compressed uploads"):
          configuration.validate(c)
      else:
        configuration.validate(c)
    if section != "systems":
      c = _config({**fields, **DEADLINE})
      if rule.deadline:
        with pytest.raises(InputError, match=f"^systems.deadline_s: {section} cannot run with a deadline"):
          configuration.validate(c)
      else:
        configuration.validate(c)
    c = _config({**fields, "client_sampling": "poisson"})
    if rule.poisson:
      with pytest.raises(InputError, match="^client_sampling: "):
        configuration.validate(c)
    else:
      configuration.validate(c)
    c = _config(fields)
    chosen = configuration.mechanism_settings(c)
    if rule.vectorised:
      with pytest.raises(InputError, match=f"^vectorize: {section}: "):
        mechanisms.validate(chosen, configuration.federation(c), configuration.algorithm_info(c), vectorised=True)


@pytest.mark.parametrize("old, new", [("dp_clip_norm", "dp.clip_norm"), ("secure_aggregation", "secagg.enabled"),
                                      ("aggregator", "robust.rule"), ("attack_scale", "attack.scale"),
                                      ("byzantine_fraction", "attack.fraction"),
                                      ("fedsnd.noise_steps", "fedsnd.synthesis.steps"),
                                      ("fedsnd.noise_consensus", "fedsnd.consensus.enabled"),
                                      ("fedsnd.self_distill", "fedsnd.self_distillation.mode")])
def test_a_field_of_the_flat_layout_is_refused_naming_its_new_place(old, new):
  c = configuration.set_fields(tiny_config.get_config(), {"algorithm": "fedsnd"})
  configuration.set_fields(c, {old: 1.0})  # what a config file of the flat layout does (`c.dp_clip_norm = 1.0`)
  message = f"^{re.escape(new)}: the field {re.escape(old)} is now {re.escape(new)}"
  with pytest.raises(InputError, match=message):
    configuration.validate(c)
  with pytest.raises(InputError, match=message):  # on the command line, before the config is read
    configuration.refuse_moved(old)


def test_unknown_fields_are_refused():
  c = tiny_config.get_config()
  c.no_such_field = 3
  with pytest.raises(InputError, match="^no_such_field: "):
    configuration.validate(c)
  with pytest.raises(InputError, match=r"^dp\.clip: dp has no such field"):
    mechanisms.settings("dp", {"clip": 1.0})
