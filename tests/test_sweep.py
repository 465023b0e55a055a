import csv
import json
import os

import numpy as np
import pytest

from experiments import report, sweep, train_lib
from experiments.configs import tiny
from fedsnd_jax.errors import InputError


def test_sweep_outputs_and_resume(tmp_path, monkeypatch):
  base = tiny.get_config()
  base.rounds = 2
  variants = sweep.parse_variants(["sd_prev:algorithm=fedsd:fedsnd.self_distillation.mode=previous"], base)
  rows = sweep.sweep(base, str(tmp_path), ["fedavg", "sd_prev"], [0.3, 1.0], [0], variants)
  assert len(rows) == 4
  for name in ("results.csv", "results.md", "accuracy_vs_round_alpha=0.3.png", "accuracy_vs_round_alpha=1.png",
               "final_accuracy_vs_alpha.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  with open(tmp_path / "sd_prev" / "alpha=0.3" / "seed=0" / "config.json") as f:
    cfg = json.load(f)
  assert cfg["algorithm"] == "fedsd" and cfg["alpha"] == 0.3
  assert cfg["fedsnd"]["self_distillation"]["mode"] == "previous"
  calls = []
  monkeypatch.setattr(train_lib, "train_and_evaluate", lambda *a, **k: calls.append(a))
  sweep.sweep(base, str(tmp_path), ["fedavg", "sd_prev"], [0.3, 1.0], [0], variants)
  assert calls == []  # every cell was already finished
  rows = sweep.sweep(base, str(tmp_path), ["fedavg", "sd_prev"], [0.3, 1.0, 2.0], [0], variants, table_only=True)
  assert calls == [] and len(rows) == 4  # α = 2 has no finished cell: listed as missing, not run
  assert not (tmp_path / "fedavg" / "alpha=2").exists()


def test_table_matches_numpy_over_summaries(tmp_path):
  base = tiny.get_config()
  base.rounds, base.validation_fraction = 2, 0.2
  sweep.sweep(base, str(tmp_path), ["fedavg"], [0.5], [0, 1])
  finals, vals = [], []
  for seed in (0, 1):
    with open(tmp_path / "fedavg" / "alpha=0.5" / f"seed={seed}" / "summary.json") as f:
      summary = json.load(f)
    finals.append(summary["final_accuracy"])
    vals.append(summary["last5_mean_val_accuracy"])
  cell = lambda values: f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"
  text = (tmp_path / "results.md").read_text()
  header = [line for line in text.splitlines() if line.startswith("| algorithm")][0].split(" | ")
  row = [line for line in text.splitlines() if line.startswith("| fedavg")][0].split(" | ")
  assert row[header.index("final acc")] == cell(finals)
  assert row[header.index("val last-5 mean")] == cell(vals)
  with open(tmp_path / "results.csv") as f:
    assert [float(r["final_accuracy"]) for r in csv.DictReader(f)] == finals


def _first_round_at(path, target):
  with open(path / "metrics.jsonl") as f:
    accs = np.array([json.loads(line)["test_accuracy"] for line in f])
  return int(np.argmax(accs >= target)) + 1  # rounds are numbered from 1 and evaluated every round


def test_rounds_to_target_ratio_and_diagnostics(tmp_path, monkeypatch):
  base = tiny.get_config()
  base.rounds = 3
  base.fedsnd.synthesis.samples, base.fedsnd.synthesis.steps, base.fedsnd.distillation.steps = 16, 20, 5
  sweep.sweep(base, str(tmp_path), ["fedavg", "fednd"], [0.5], [0])
  cells = {alg: tmp_path / alg / "alpha=0.5" / "seed=0" for alg in ("fedavg", "fednd")}
  finals = {}
  for alg, path in cells.items():
    with open(path / "summary.json") as f:
      finals[alg] = json.load(f)["final_accuracy"]
  base.target_accuracy = min(finals.values())  # every cell reaches it, at a round the metrics decide
  monkeypatch.setattr(train_lib, "train_and_evaluate", lambda *a, **k: pytest.fail("a finished cell ran again"))
  rows = sweep.sweep(base, str(tmp_path), ["fedavg", "fednd"], [0.5], [0])
  expected = {alg: _first_round_at(path, base.target_accuracy) for alg, path in cells.items()}
  assert {r["algorithm"]: r["rounds_to_target"] for r in rows} == expected
  text = (tmp_path / "results.md").read_text()
  ratios = text.split("relative to FedAvg")[1].split("Server diagnostics")[0].splitlines()
  ratio_row = [line for line in ratios if line.startswith("| fednd | 0.5 | ")][0]
  assert ratio_row.split(" | ")[2] == f"{expected['fednd'] / expected['fedavg']:.2f}"
  diagnostics = text.split("Server diagnostics")[1].splitlines()
  assert not [line for line in diagnostics if line.startswith("| fedavg")]  # FedAvg does not distil
  with open(cells["fednd"] / "metrics.jsonl") as f:
    last = [r for r in map(json.loads, f) if r.get("distill_gate", 0) > 0][-1]  # the last that distilled
  row = [line for line in diagnostics if line.startswith("| fednd | 0.5 |")][0].split(" | ")
  assert row[2] == str(last["round"])
  assert row[4] == f"{last['teacher_agreement']:.1%}".replace("%", " %")
  assert row[6] == f"{last['kl_before']:.2f}"


@pytest.mark.parametrize("spec", ["noalg", "x:algorithm=fedsnd:nosuchfield=1", "x:algorithm=fedsnd:fedsnd=1",
                                  "x:algorithm=fedsnd:noise_projection=True",  # the section is part of the name
                                  "x:algorithm=fedsnd:fedsnd.synthesis.projection=maybe"])
def test_bad_variants(spec):
  with pytest.raises(InputError, match="^variant: "):
    sweep.parse_variants([spec], tiny.get_config())


def test_bad_cell_is_caught_before_any_run(tmp_path):
  with pytest.raises(InputError, match="^algorithm: "):
    sweep.sweep(tiny.get_config(), str(tmp_path), ["fedavg", "fedbogus"], [0.5], [0])
  assert not os.path.exists(tmp_path / "fedavg")


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsnd"])
def test_vectorised_sweep_equals_cell_by_cell(tmp_path, algorithm):
  # Epochs (not fixed steps) over Dirichlet partitions: the runs' n_max differ, so the stacked index tables are
  # padded and every run's local schedule must still be its own. Validation splits differ per seed too.
  base = tiny.get_config()
  base.rounds, base.local_steps, base.local_epochs, base.validation_fraction = 2, 0, 1, 0.1
  base.fedsnd.synthesis.samples, base.fedsnd.synthesis.steps, base.fedsnd.distillation.steps = 4, 3, 2
  seq, vec = tmp_path / "seq", tmp_path / "vec"
  alphas, vectorize = ([0.3, 1.0], ["seeds", "alphas"]) if algorithm == "fedavg" else ([0.3], ["seeds"])
  sweep.sweep(base, str(seq), [algorithm], alphas, [0, 1])
  sweep.sweep(base, str(vec), [algorithm], alphas, [0, 1], vectorize=vectorize)
  counts = set()
  for alpha in alphas:
    for seed in (0, 1):
      cell = f"{algorithm}/alpha={alpha:g}/seed={seed}"
      want, got = report.read_metrics(str(seq / cell)), report.read_metrics(str(vec / cell))
      for key in ("test_accuracy", "test_loss", "val_accuracy", "train_loss"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{cell} {key}")
      with open(vec / cell / "summary.json") as f:
        assert json.load(f)["vectorized_runs"] == 2 * len(alphas)
      with open(vec / cell / "config.json") as f:
        counts.add(json.load(f)["resolved"]["max_client_examples"])
  assert len(counts) > 1  # the runs were padded to a common n_max
  def table(folder):  # the results table without its seconds columns (timings differ)
    return [line.split(" | ")[:-2] for line in (folder / "results.md").read_text().splitlines()
            if line.startswith(f"| {algorithm} |")]

  assert table(vec) == table(seq) and len(table(seq)) >= len(alphas)


def test_vectorised_groups_and_refusals(tmp_path):
  todo = [("fedavg", 0.1, 0), ("fedavg", 0.1, 1), ("fedavg", 0.5, 0), ("fedsnd", 0.1, 0)]
  os.makedirs(tmp_path / "fedavg" / "alpha=0.5" / "seed=0")  # interrupted: resumes alone
  assert sweep.groups(todo, str(tmp_path), ["seeds"]) == [todo[:2], [todo[2]], [todo[3]]]
  assert sweep.groups(todo, str(tmp_path), []) == [[cell] for cell in todo]
  with pytest.raises(InputError, match="vectorize"):
    sweep.sweep(tiny.get_config(), str(tmp_path / "x"), ["fedavg"], [0.1], [0], vectorize=["alphas"])
  a, b = tiny.get_config(), tiny.get_config()
  b.client_lr = 0.5
  with pytest.raises(InputError, match="client_lr"):
    train_lib.train_and_evaluate_many([a, b], [str(tmp_path / "a"), str(tmp_path / "b")])
  assert not (tmp_path / "a").exists()


def test_vectorised_secure_aggregation_equals_runs_alone(tmp_path, capsys):
  # Its host-side protocol (a pure_callback) runs once per run under the run axis, each with its own round seed:
  # with a client dropping out, wrong seeds would unmask wrongly (or drop another client).
  configs = []
  for seed in (0, 1):
    c = tiny.get_config()
    c.rounds, c.clients_per_round, c.secagg.enabled, c.secagg.dropout, c.seed = 2, 3, True, 0.34, seed
    configs.append(c)
  for c in configs:
    train_lib.train_and_evaluate(c, str(tmp_path / f"alone{c.seed}"))
  capsys.readouterr()
  train_lib.train_and_evaluate_many(configs, [str(tmp_path / f"vec{c.seed}") for c in configs])
  printed = capsys.readouterr().out.splitlines()  # each run's accuracy is labelled with its index in the header
  assert f"runs: [0] {tmp_path / 'vec0'}, [1] {tmp_path / 'vec1'}" in printed
  assert any(line.startswith("round 2/2 | acc [0] ") and " [1] " in line for line in printed)
  for seed in (0, 1):
    want = report.read_metrics(str(tmp_path / f"alone{seed}"))
    got = report.read_metrics(str(tmp_path / f"vec{seed}"))
    for key in ("test_loss", "train_loss"):
      np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, err_msg=key)


def test_vectorised_runs_resume_together_and_refuse_different_rounds(tmp_path):
  configs = []
  for seed in (0, 1):
    c = tiny.get_config()
    c.rounds, c.seed = 2, seed
    configs.append(c)
  dirs = [str(tmp_path / f"vec{c.seed}") for c in configs]
  train_lib.train_and_evaluate_many(configs, dirs)
  for c in configs:
    c.rounds = 3
  train_lib.train_and_evaluate_many(configs, dirs)  # resumes both from round 2
  for c, d in zip(configs, dirs, strict=True):
    train_lib.train_and_evaluate(c, str(tmp_path / f"alone{c.seed}"))
    want, got = report.read_metrics(str(tmp_path / f"alone{c.seed}")), report.read_metrics(d)
    assert [r["round"] for r in got] == [1, 2, 3]
    np.testing.assert_allclose([r["test_loss"] for r in got], [r["test_loss"] for r in want], rtol=1e-5)
  for c in configs:
    c.rounds = 4
  with pytest.raises(InputError, match="resume together"):  # a checkpoint of round 3 in one, none in the other
    train_lib.train_and_evaluate_many(configs, [dirs[0], str(tmp_path / "fresh")])
