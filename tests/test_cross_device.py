"""benchmarks.cross_device: every row is a valid configuration, and the target and time to it by hand."""

import pytest

from benchmarks import cross_device, tuning
from experiments import configuration


@pytest.mark.parametrize("table, name", [(t, n) for t, rows in cross_device.ROWS.items() for n in rows])
def test_every_row_is_a_valid_run(table, name):
  # validate raises InputError for a combination the rules refuse (e.g. FedBuff under SCAFFOLD); the row runs on
  # the clock, with its algorithm.
  algorithm, overrides = cross_device.ROWS[table][name]
  config = tuning.apply(tuning.setting_config(cross_device.SETTING), {"algorithm": algorithm, **overrides})
  configuration.validate(config)
  assert config.algorithm == algorithm and config.systems.enabled


def _records(accuracies, step_s=10.0, mb=2.0):
  return [{"round": r + 1, "test_accuracy": a, "sim_time_s": step_s * (r + 1), "bytes_up": int(mb * 1e6) * (r + 1)}
          for r, a in enumerate(accuracies)]


def test_the_target_is_the_reference_plateau_less_a_point_and_reached_on_the_clock():
  # 10 rounds: the plateau window is at least 5 rounds, 0.79, 0.8, 0.8, 0.8 and 0.82, whose mean 0.802 less a
  # point is the target 0.792, first reached in round 7.
  reference = _records([0.5, 0.6, 0.7, 0.75, 0.78, 0.79, 0.8, 0.8, 0.8, 0.82])
  assert cross_device.target_of({"fedavg": {"metrics": [reference]}}) == pytest.approx(0.792)
  assert cross_device.to_target(reference, 0.792) == (7, 70.0, 14.0)
  assert cross_device.to_target(_records([0.1, 0.2]), 0.80) == (None, None, None)
