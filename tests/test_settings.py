"""Nested typed settings to and from config mappings (`fedsnd_jax/settings.py`)."""

import pytest

from fedsnd_jax import algorithms, settings
from fedsnd_jax.algorithms.fedsnd import Hyperparameters
from fedsnd_jax.errors import InputError


def test_dotted_and_nested_overrides_reach_the_same_part():
  hp = settings.from_dict(Hyperparameters, {"synthesis.steps": 3, "synthesis": {"samples": 4},
                                            "schedule": {"distill_rounds": 2}, "temperature": 1.5}, "fedsnd")
  assert (hp.synthesis.steps, hp.synthesis.samples, hp.schedule.distill_rounds, hp.temperature) == (3, 4, 2, 1.5)
  assert hp.distillation == Hyperparameters().distillation  # a part not named keeps its defaults
  assert settings.from_dict(Hyperparameters, settings.as_dict(hp), "fedsnd") == hp  # the config's round trip


@pytest.mark.parametrize("values, field, message", [
    ({"synthesis.stepz": 1}, "fedsnd.synthesis.stepz", "fedsnd.synthesis has no such field; it has: samples, "),
    ({"synthesis": 3}, "fedsnd.synthesis", "is a section, not the value 3"),
    ({"temperature": {"x": 1}}, "fedsnd.temperature", "is a value, not a section"),
    ({"noise_steps": 5}, "fedsnd.synthesis.steps", "the field fedsnd.noise_steps is now fedsnd.synthesis.steps"),
])
def test_bad_fields_name_their_dotted_place(values, field, message):
  with pytest.raises(InputError) as e:
    algorithms.hyperparameters("fedsnd", values)
  assert e.value.field == field and message in str(e.value)
