"""benchmarks.tuning: every algorithm gets the same budget, and every candidate is a valid config."""

import pytest

from benchmarks import tuning
from experiments import runner


def test_every_algorithm_gets_the_same_budget():
  assert len({len(grid) for grid in tuning.GRIDS.values()}) == 1


@pytest.mark.parametrize("setting", ["digits", "digits_slow"])  # the Fashion-MNIST ones need Debian's package
def test_every_candidate_is_a_valid_config(setting):
  base = tuning.setting_config(setting)
  assert base.seed == tuning.TUNING_SEED and base.validation_fraction > 0
  candidates = [c for grid in tuning.GRIDS.values() for c in grid]
  candidates += [{"algorithm": "fedsnd", **c} for c in tuning.DEFAULT_CANDIDATES.values()]
  for candidate in candidates:
    c = tuning.apply(base, candidate)
    runner.validate_config(c)
    for field, value in candidate.items():
      if field == "lr×":
        assert c.client_lr == pytest.approx(base.client_lr * value)
      elif field == "epochs×":
        assert c.local_epochs == base.local_epochs * value
      else:
        section, _, name = field.rpartition(".")
        assert (c[section][name] if section else c[name]) == value
