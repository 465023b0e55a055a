"""benchmarks.tuning and benchmarks.leaderboard: equal budgets, two stages, run reuse, the table by hand."""

import functools
import json
import os

import numpy as np
import pytest

from benchmarks import distill_gain, leaderboard, server_cost, tuning
from experiments import configuration
from fedsnd_jax.algorithms import fedsnd as fedsnd_lib


def test_every_algorithm_gets_the_same_budget():
  assert len({len(grid) for grid in tuning.GRIDS.values()}) == 1


def test_stage_two_runs_every_algorithm_at_fedavgs_client_settings():
  tuned = {"s": {"fedavg": {"overrides": {"algorithm": "fedavg", "lr×": 2.0, "epochs×": 2}}}}
  assert tuning.candidates(tuned, "s", "fedavg") == tuning.GRIDS["fedavg"]  # stage 1: the client settings
  assert tuning.candidates(tuned, "s", "fedprox")[0] == {"algorithm": "fedprox", "lr×": 2.0, "epochs×": 2,
                                                         "fedprox.mu": 0.01}
  assert tuning.candidates(tuned, "s", "scaffold")[1] == {"algorithm": "scaffold", "lr×": 1.0, "epochs×": 2}
  base = tuning.setting_config("digits")
  c = tuning.apply(base, tuning.candidates(tuned, "s", "scaffold")[3])  # its own lr×0.25 on FedAvg's lr×2
  assert c.client_lr == pytest.approx(0.5 * base.client_lr) and c.local_epochs == 2 * base.local_epochs
  with pytest.raises(KeyError):
    tuning.candidates({}, "s", "fedprox")  # stage 2 needs FedAvg tuned first


def finish_run(config, workdir):
  """What a finished run leaves that the run reuse reads: its config and a summary."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    f.write("{}")
  return {"final_accuracy": 0.5}


def test_tuning_reuses_a_finished_run_of_the_same_configuration_and_replaces_a_stale_one(tmp_path, monkeypatch):
  ran = []

  def fake_run(config, workdir):
    ran.append(os.path.basename(workdir))
    finish_run(config, workdir)

  monkeypatch.setattr(tuning.train_lib, "train_and_evaluate", fake_run)
  monkeypatch.setattr(tuning.report, "read_summary", lambda w: {"mean_client_time_s": 1, "mean_server_time_s": 0})
  monkeypatch.setattr(tuning.report, "val_history", lambda w: [0.5])
  base = tuning.setting_config("digits")
  fedavg, fedsnd = tuning.apply(base, {"epochs×": 2}), tuning.apply(base, {"algorithm": "fedsnd", "epochs×": 2})
  tuning.run(str(tmp_path), "s", "fedavg_3", fedavg)
  tuning.run(str(tmp_path), "s", "fedsnd_1", fedsnd)  # a grid's old candidate, at index 1
  tuning.run(str(tmp_path), "s", "fedsnd_0", fedsnd)  # the same configuration, now at index 0: copied
  assert ran == ["fedavg_3", "fedsnd_1"] and (tmp_path / "s" / "fedsnd_0" / "summary.json").exists()
  replaced = tuning.apply(fedsnd, {"fedsnd.self_distillation.lambda_prev": 0.3})
  tuning.run(str(tmp_path), "s", "fedsnd_1", replaced)
  assert ran[-1] == "fedsnd_1" and json.loads((tmp_path / "s" / "fedsnd_1" / "config.json").read_text())[
      "fedsnd"]["self_distillation"]["lambda_prev"] == 0.3
  tuning.run(str(tmp_path), "s", "fedsnd_9", tuning.apply(fedsnd, {"rounds": 3}))  # other rounds: not the same
  assert ran[-1] == "fedsnd_9"


def test_leaderboard_reruns_a_cell_of_another_configuration_or_other_rounds_and_keeps_a_finished_one(
    tmp_path, monkeypatch):
  ran = []

  def fake_run(config, workdir):
    ran.append((config.algorithm, config.rounds))
    return finish_run(config, workdir)

  monkeypatch.setattr(leaderboard.train_lib, "train_and_evaluate", fake_run)
  digits = tuning.SETTINGS["digits"][0]
  monkeypatch.setattr(tuning, "SETTINGS", {**tuning.SETTINGS, "short": (digits, {"rounds": 2})})
  for overrides in ({"algorithm": "fedavg"}, {"algorithm": "fedavg"}, {"algorithm": "fedprox"}):
    leaderboard.run_cells(str(tmp_path), "short", "x", overrides, [0])
  assert ran == [("fedavg", 2), ("fedprox", 2)]  # the second call found its cell finished
  monkeypatch.setattr(tuning, "SETTINGS", {**tuning.SETTINGS, "short": (digits, {"rounds": 3})})
  leaderboard.run_cells(str(tmp_path), "short", "x", {"algorithm": "fedprox"}, [0])  # the setting's rounds changed
  assert ran[-1] == ("fedprox", 3)
  leaderboard.run_cells(str(tmp_path), "short", "x", {"algorithm": "fedprox"}, [0])
  assert len(ran) == 3


@pytest.mark.parametrize("setting", ["digits", "digits_slow"])  # the Fashion-MNIST ones need Debian's package
def test_every_candidate_is_a_valid_config(setting):
  base = tuning.setting_config(setting)
  assert base.seed == tuning.TUNING_SEED and base.validation_fraction > 0
  candidates = [c for grid in tuning.GRIDS.values() for c in grid]
  candidates += [{"algorithm": "fedsnd", **c} for c in tuning.DEFAULT_CANDIDATES.values()]
  for candidate in candidates:
    c = tuning.apply(base, candidate)
    configuration.validate(c)
    for field, value in candidate.items():
      if field == "lr×":
        assert c.client_lr == pytest.approx(base.client_lr * value)
      elif field == "epochs×":
        assert c.local_epochs == base.local_epochs * value
      else:
        section, _, name = field.rpartition(".")
        assert (c[section][name] if section else c[name]) == value


def test_leaderboard_uses_the_tuned_winner_else_the_papers_default():
  tuned = {"xdevice_a0.1": {"fedavg": {"overrides": {"algorithm": "fedavg", "lr×": 2.0}, "evidence": [{}, {}]}}}
  assert leaderboard.chosen(tuned, "xdevice_a0.1", "fedavg") == ({"algorithm": "fedavg", "lr×": 2.0}, "best of 2")
  assert leaderboard.chosen(tuned, "xdevice_a0.1", "fedgen") == (
      {**tuning.GRIDS["fedgen"][0], "lr×": 2.0}, "paper default at FedAvg's client settings")
  assert leaderboard.chosen({}, "xdevice_a0.1", "fedgen") == (tuning.GRIDS["fedgen"][0], "paper default")
  tuned["xdevice_a0.1"]["fedprox"] = {"overrides": {"algorithm": "fedprox"}, "evidence": [{}],
                                      "protocol": "two-stage"}
  tuned["xdevice_a0.1"]["moon"] = {"overrides": {"algorithm": "moon"}, "evidence": [{}]}  # tuned before two stages
  assert leaderboard.chosen(tuned, "xdevice_a0.1", "fedprox")[1] == "best of 1"
  assert leaderboard.chosen(tuned, "xdevice_a0.1", "moon")[1] == "best of 1, one-stage"
  # FedSND at its library defaults takes tuned FedAvg's client settings, nothing of FedSND's own tuning.
  tuned["xdevice_a0.1"]["fedsnd"] = {"overrides": {"algorithm": "fedsnd", "epochs×": 2}, "evidence": [{}]}
  overrides, how = leaderboard.chosen(tuned, "xdevice_a0.1", leaderboard.DEFAULTS)
  assert overrides == {"algorithm": "fedsnd", "lr×": 2.0} and how.startswith("library defaults")
  # ... and tuned FedSND on FedAvgM's tuned server optimiser.
  tuned["xdevice_a0.1"]["fedavgm"] = {"overrides": {"algorithm": "fedavg", "lr×": 2.0, "server_momentum": 0.9,
                                                    "server_lr": 0.1}, "evidence": [{}], "protocol": "two-stage"}
  assert leaderboard.chosen(tuned, "xdevice_a0.1", leaderboard.MOMENTUM)[0] == {
      "algorithm": "fedsnd", "epochs×": 2, "server_momentum": 0.9, "server_lr": 0.1}
  assert set(leaderboard.ALGORITHMS) - set(leaderboard.COMPOSED) <= set(tuning.GRIDS)


def test_a_tuned_winner_whose_defaults_changed_since_is_refused():
  # Chosen under another library default (G 50): the same overrides run the library's G 10 server now.
  then = tuning.apply(tuning.setting_config("xdevice_a0.1"), {"algorithm": "fedsnd", "fedsnd.synthesis.steps": 50})
  entry = {"overrides": {"algorithm": "fedsnd"}, "config": tuning.ran(then), "evidence": [{}]}
  assert tuning.drifted(entry, "xdevice_a0.1") == ["fedsnd.synthesis.steps"]
  with pytest.raises(ValueError, match="fedsnd.synthesis.steps"):
    leaderboard.chosen({"xdevice_a0.1": {"fedsnd": entry}}, "xdevice_a0.1", "fedsnd")
  entry["overrides"]["fedsnd.synthesis.steps"] = 50  # pinned: runs what was chosen
  assert leaderboard.chosen({"xdevice_a0.1": {"fedsnd": entry}}, "xdevice_a0.1", "fedsnd")[0] == entry["overrides"]
  # Another algorithm's section, and the seed, are not part of what ran.
  then.fedprox.mu, then.seed = 5.0, 0
  assert not tuning.drifted({**entry, "config": tuning.ran(then)}, "xdevice_a0.1")


def test_the_committed_tuning_runs_today_what_it_chose():
  with open(os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "configs", "tuned.json")) as f:
    tuned = json.load(f)["settings"]
  drift = {(s, a): tuning.drifted(e, s) for s, entries in tuned.items() for a, e in entries.items()}
  assert all("config" in e for entries in tuned.values() for e in entries.values())
  assert not any(drift.values()), {k: v for k, v in drift.items() if v}


def test_leaderboard_defaults_row_reuses_fedsnds_runs_only_when_they_ran_the_same(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(leaderboard, "run_cells", lambda w, s, algorithm, overrides, seeds: calls.append(
      (algorithm, overrides)) or [str(tmp_path)])
  monkeypatch.setattr(leaderboard.report, "read_summary", lambda f: {
      "final_accuracy": 0.5, "last5_mean_accuracy": 0.5, "mean_client_time_s": 1.0, "mean_server_time_s": 0.0})
  monkeypatch.setattr(leaderboard.report, "read_metrics", lambda f: [{"round": 1, "test_accuracy": 0.5}])
  fedavg = {"overrides": {"algorithm": "fedavg", "epochs×": 2}, "evidence": [{}]}
  for fedsnd, expected in (({"algorithm": "fedsnd", "epochs×": 2}, "fedsnd"),
                           ({"algorithm": "fedsnd", "fedsnd.self_distillation.lambda_prev": 0.3},
                            leaderboard.DEFAULTS)):
    calls.clear()
    tuned = {"s": {"fedavg": fedavg, "fedsnd": {"overrides": fedsnd, "evidence": [{}]}}}
    leaderboard.leaderboard(str(tmp_path), ["s"], [leaderboard.DEFAULTS], [0], tuned)
    assert calls == [(expected, {"algorithm": "fedsnd", "epochs×": 2})]


def test_leaderboard_table_by_hand():
  def run(final, accuracies, client_s, server_s, diverged=False):
    summary = {"final_accuracy": final, "mean_client_time_s": client_s, "mean_server_time_s": server_s,
               "diverged": diverged}
    return summary, [{"round": r, "test_accuracy": a, "client_time_s": 9.0 if r == 1 else client_s,
                      "server_time_s": server_s, "bytes_up": 10e6 * r} for r, a in enumerate(accuracies, 1)]

  # 10 rounds: the plateau is the last 5. FedAvg's plateaus 50 % and 75 %: the target is 62.5 %, which seed 1
  # reaches at round 6 (6 s: round 1's compiling 9 s counted at the mean, 1 s; 60 MB up); seed 0 never.
  fedavg = [run(0.5, [0.5] * 10, 1.0, 0.0), run(0.75, [0.5] * 5 + [0.75] * 5, 1.0, 0.0)]
  # FedSND seed 0 reaches it at round 10 (10 × (1 + 3) s, 100 MB); seed 1 diverged and never does.
  fedsnd = [run(0.75, [0.25] * 9 + [0.75], 1.0, 3.0), run(0.5, [0.5] * 10, 1.0, 3.0, diverged=True)]
  rows = {name: {"summaries": [s for s, _ in runs], "metrics": [m for _, m in runs], "setting": how}
          for name, runs, how in (("fedavg", fedavg, "best of 4"), ("fedsnd", fedsnd, "paper default"))}
  lines = leaderboard.table("s", rows).splitlines()
  assert "plateau (last 5 rounds)" in lines[2] and "rounds to 62.5 %" in lines[2]
  # (windows of 5 rounds: a move scaled to 10 rounds doubles)
  assert lines[4].split(" | ")[1:] == ["best of 4", "62.50 ± 12.50", "62.50 ± 12.50", "+12.50", "+25.00",
                                       "6.0 ± 0.0", "1/2", "6.0 ± 0.0", "60.0 ± 0.0", "1.000", "0.000 |"]
  assert lines[5].startswith("| fedsnd (1 of 2 diverged")
  # plateaus (0.25·4 + 0.75)/5 = 35 % and 50 %; the seeds' mean moved from 37.5 % to 42.5 %
  assert lines[5].split(" | ")[1:] == ["paper default", "62.50 ± 12.50", "42.50 ± 7.50", "+5.00", "+10.00",
                                       "10.0 ± 0.0", "1/2", "40.0 ± 0.0", "100.0 ± 0.0", "1.000", "3.000 |"]


def test_the_plateau_window_is_a_fifth_of_the_run():
  assert [leaderboard.window(r) for r in (2, 50, 150)] == [5, 10, 30]


def test_a_run_is_stale_only_when_its_own_configuration_changed(tmp_path):
  config = tuning.apply(tuning.setting_config("digits"), {"algorithm": "fedgen"})
  (tmp_path / "config.json").write_text(config.to_json())
  assert not tuning.stale(str(tmp_path), config)
  assert not tuning.stale(str(tmp_path / "absent"), config)
  # another section; a resumable field
  other = tuning.apply(config, {"fedsnd.self_distillation.lambda_prev": 0.5, "rounds": 3})
  assert not tuning.stale(str(tmp_path), other)
  assert tuning.stale(str(tmp_path), tuning.apply(config, {"fedgen.generative_alpha": 3.0}))
  assert tuning.stale(str(tmp_path), tuning.apply(config, {"lr×": 2.0}))
  older = {k: v for k, v in json.loads(config.to_json()).items() if k != "client_sampling"}  # before the field
  (tmp_path / "config.json").write_text(json.dumps(older))
  assert tuning.stale(str(tmp_path), config)  # unfinished: resuming needs the very same config
  (tmp_path / "summary.json").write_text("{}")
  assert not tuning.stale(str(tmp_path), config)  # finished: the new field's default is the old behaviour
  before = json.loads(tuning.apply(config, {"algorithm": "fedsnd"}).to_json())
  del before["fedsnd"]["schedule"]["recheck_every"]  # added at 0 (every round), its default since 10
  (tmp_path / "config.json").write_text(json.dumps(before))
  assert tuning.stale(str(tmp_path), tuning.apply(config, {"algorithm": "fedsnd"}))
  assert not tuning.stale(str(tmp_path), tuning.apply(config, {"algorithm": "fedsnd",
                                                               "fedsnd.schedule.recheck_every": 0}))
  fedsnd = tuning.apply(config, {"algorithm": "fedsnd", "fedsnd.synthesis.warm_start": "none",
                                 "fedsnd.schedule.recheck_every": 0})  # as every run before that field
  older = json.loads(fedsnd.to_json())
  del older["fedsnd"]["synthesis"]["stop_ce"]  # a field added inside the section since
  older["fedsnd"]["synthesis"]["warm_start"] = False  # the bool an earlier layout saved for "none"
  (tmp_path / "config.json").write_text(json.dumps(older))
  assert not tuning.stale(str(tmp_path), fedsnd)
  assert tuning.stale(str(tmp_path), tuning.apply(fedsnd, {"fedsnd.synthesis.warm_start": "client"}))
  assert tuning.stale(str(tmp_path), tuning.apply(fedsnd, {"fedsnd.synthesis.stop_ce": 0.3}))  # not its default
  nested = json.loads(fedsnd.to_json())["fedsnd"]
  flat = {old: functools.reduce(dict.get, new.split("."), nested) for old, new in fedsnd_lib.MOVED.items()}
  (tmp_path / "config.json").write_text(json.dumps({**json.loads(fedsnd.to_json()),
                                                    "fedsnd": {**flat, "temperature": nested["temperature"]}}))
  assert not tuning.stale(str(tmp_path), fedsnd)  # saved in the flat layout of earlier versions: the same run
  assert tuning.stale(str(tmp_path), tuning.apply(fedsnd, {"fedsnd.synthesis.steps": 7}))


def test_server_cost_runs_fedsnd_at_its_tuned_client_settings_and_fedavg_alike():
  overrides = {"algorithm": "fedsnd", "epochs×": 2, "fedsnd.self_distillation.lambda_prev": 0.3}
  tuned = {"digits": {"fedsnd": {"overrides": overrides}}}
  base, runs = server_cost.plan("digits", tuned)
  assert base.local_epochs == 2 * tuning.setting_config("digits").local_epochs
  own = tuning.setting_config("digits").fedsnd.self_distillation
  assert base.fedsnd.self_distillation.lambda_prev == own.lambda_prev  # server study only
  assert [r[0] for r in runs][0] == "fedavg" and runs[-1][0] == "fedavg_again"
  assert any(o.get("fedsnd.synthesis.warm_start") == "client" for _, _, o in runs)  # all 20 clients come back
  for _, _, overrides in runs:
    configuration.validate(tuning.apply(base, overrides))


def test_server_cost_row_named_the_library_default_server_runs_it():
  base, runs = server_cost.plan("xdevice_a0.1", {})
  (overrides,) = [o for _, name, o in runs if "the library's default server" in name]
  library = tuning.apply(base, {"algorithm": "fedsnd"})
  assert tuning.apply(base, overrides).fedsnd.to_dict() == library.fedsnd.to_dict()


def test_server_cost_table_and_pareto_front_by_hand():
  def row(name, alg, val, client, server, mean=None):
    return {"name": name, "overrides": {"algorithm": alg}, "val_final": val, "val_last5": val, "client_s": client,
            "server_s": server, "round_mean_s": client + server if mean is None else mean,
            "steps": None if alg == "fedavg" else 10.0}
  rows = [row("FedAvg", "fedavg", 0.80, 1.0, 0.0), row("big", "fedsnd", 0.820, 1.5, 8.0),
          row("cheap", "fedsnd", 0.816, 1.5, 0.4), row("worse", "fedsnd", 0.810, 1.5, 1.0),
          row("cheapest", "fedsnd", 0.790, 1.5, 0.1), row("skipping", "fedsnd", 0.818, 1.5, 0.1, mean=3.0),
          row("FedAvg (again)", "fedavg", 0.80, 1.0, 0.2)]
  lines = server_cost.table("digits", rows).splitlines()
  # FedAvg's round: mean(1.0, 1.2) = 1.1 s; "cheap" is 0.4 points below the best at (1.5 + 0.4) / 1.1 = 1.73×.
  assert "| cheap | 81.60 | 81.60 | 1.50 | 0.40 | 10.0 | 1.73 | 1.73 | yes |" in lines
  assert any(line.startswith("| big |") and line.endswith("| 8.64 | 8.64 | no |") for line in lines)
  assert any(line.startswith("| cheapest |") and line.endswith("| no |") for line in lines)  # 3 points below
  # Cheap in its median round (1.45×), but its expensive rounds make its mean 3.0 / 1.1 = 2.73×.
  assert any(line.startswith("| skipping |") and line.endswith("| 1.45 | 2.73 | no |") for line in lines)
  assert [r["name"] for r in server_cost.pareto(rows)] == ["cheapest", "skipping", "big"]


def test_distill_gain_table_by_hand(tmp_path):
  def write(name, rows):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / name / "summary.json").write_text("{}")

  rec = lambda a, d, u, gate=1: {"teacher_agreement": a, "val_accuracy": d, "val_accuracy_no_distill": u,
                                 "distill_gate": gate}
  write("every", [rec(0.5, 0.60, 0.50), rec(0.9, 0.70, 0.72), rec(0.95, 0.80, 0.76)])
  write("gated", [rec(0.5, 0.6, 0.5), rec(0.9, 0.7, 0.7, gate=0)])  # did not distil every round: left out
  write("unfinished", [rec(0.5, 0.6, 0.5)])
  os.remove(tmp_path / "unfinished" / "summary.json")
  assert distill_gain.table(str(tmp_path), 0.85).splitlines()[2:] == ["| every | +10.00 (1) | +1.00 (2) |"]


def test_a_candidate_past_the_epochs_edge_is_a_valid_config():
  base = tuning.setting_config("digits")
  past = tuning.beyond(tuning.GRIDS["fedavg"], {"algorithm": "fedavg", "epochs×": 2})
  c = tuning.apply(base, past)  # raised: a float number of epochs does not fit the config's int field
  assert c.local_epochs == 4 * base.local_epochs and isinstance(c.local_epochs, int)
  configuration.validate(c)


def test_a_winner_at_its_grids_edge_gets_the_next_candidate_past_it():
  fedavg = tuning.GRIDS["fedavg"]
  assert tuning.beyond(fedavg, {"algorithm": "fedavg", "epochs×": 2}) == {"algorithm": "fedavg", "epochs×": 4.0}
  assert tuning.beyond(fedavg, {"algorithm": "fedavg", "lr×": 0.5}) == {"algorithm": "fedavg", "lr×": 0.25}
  assert tuning.beyond(fedavg, {"algorithm": "fedavg"}) is None  # the setting's own: inside the grid
  prox = tuning.GRIDS["fedprox"]  # μ ∈ {0.001, 0.01, 0.1, 1}
  assert tuning.beyond(prox, {"algorithm": "fedprox", "fedprox.mu": 1.0})["fedprox.mu"] == pytest.approx(10.0)
  assert tuning.beyond(prox, {"algorithm": "fedprox", "fedprox.mu": 0.001})["fedprox.mu"] == pytest.approx(1e-4)
  assert tuning.beyond(prox, {"algorithm": "fedprox", "fedprox.mu": 0.1}) is None
  assert tuning.beyond(tuning.GRIDS["fedavgm"], tuning.GRIDS["fedavgm"][2]) is None  # two knobs: no single edge
  # at FedAvg's client settings (stage 2) the shared fields do not count as knobs
  staged = [tuning.compose({"epochs×": 2}, g) for g in prox]
  assert tuning.beyond(staged, staged[3]) == {**staged[3], "fedprox.mu": pytest.approx(10.0)}


def test_leaderboard_tables_a_seed_that_diverged_early_or_before_its_first_round():
  def records(accuracies):
    return [{"round": r, "test_accuracy": a, "client_time_s": 1.0, "server_time_s": 0.0, "bytes_up": 1e6 * r}
            for r, a in enumerate(accuracies, 1)]

  ok = {"mean_client_time_s": 1.0, "mean_server_time_s": 0.0}
  early, never = {**ok, "final_accuracy": 0.5, "diverged": True}, {"diverged": True, "rounds": 0}
  rows = {"fedavg": {"summaries": [{**ok, "final_accuracy": 0.5}, {**ok, "final_accuracy": 0.75}],
                     "metrics": [records([0.5] * 20), records([0.75] * 20)], "setting": "best of 4"},
          # 20 rounds: the plateau is the last 5; seed 1 diverged after 7 rounds, seed 2 before its first
          "scaffold": {"summaries": [{**ok, "final_accuracy": 0.75},
                                     early, never],
                       "metrics": [records([0.25] * 15 + [0.75] * 5), records([0.5] * 7), []], "setting": "x"}}
  lines = leaderboard.table("s", rows).splitlines()
  assert lines[5].startswith("| scaffold (2 of 3 diverged")
  # plateaus 75 % and 50 % (seed 1's own last 5 rounds); only seed 0 has the window before (25 %): moved +50;
  # the target, 62.5 %, is reached by seed 0 alone, at round 16
  assert lines[5].split(" | ")[1:] == ["x", "62.50 ± 12.50", "62.50 ± 12.50", "+50.00", "+100.00", "16.0 ± 0.0",
                                       "1/3", "16.0 ± 0.0", "16.0 ± 0.0", "1.000", "0.000 |"]


def test_a_value_past_the_edge_is_written_as_a_person_would():
  moon = [tuning.compose({"epochs×": 2}, g) for g in tuning.GRIDS["moon"]]  # μ ∈ {0.1, 1, 5, 10}
  past = tuning.beyond(moon, moon[2])
  assert past["moon.mu"] == 0.01 and tuning.label(past) == "epochs×=2, moon.mu=0.01"


def test_the_curves_moving_mean_does_not_sag_at_the_ends():
  # zero padding made a flat curve of 0.8 end at 0.8·(2/3) with a width of 3
  np.testing.assert_allclose(leaderboard.moving_mean(np.full(6, 0.8), 3), np.full(6, 0.8))
  np.testing.assert_allclose(leaderboard.moving_mean(np.array([0.0, 3.0, 6.0]), 3), [1.5, 3.0, 4.5])
