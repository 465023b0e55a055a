"""The binary's output contract, resume, and input validation (docs/design.md §10)."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import cli, configuration, train_lib
from experiments.configs import tiny
from fedsnd_jax import loop
from fedsnd_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_workdir_contract(tmp_path):
  summary = train_lib.train_and_evaluate(tiny.get_config(), str(tmp_path))
  for name in ("config.json", "partition.npz", "metrics.jsonl", "summary.json", "checkpoints"):
    assert (tmp_path / name).exists(), name
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))
  records = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["round"] for r in records] == [1, 2, 3]
  for r in records:
    for field in ("round", "test_accuracy", "test_loss", "client_time_s", "server_time_s", "bytes_up",
                  "bytes_down", "wall_s"):
      assert field in r, field
    assert 0.0 <= r["test_accuracy"] <= 1.0
  assert records[1]["bytes_up"] == 2 * records[0]["bytes_up"] > 0  # cumulative, constant per round
  with open(tmp_path / "summary.json") as f:
    assert json.load(f) == summary
  for field in ("final_accuracy", "best_accuracy", "rounds_to_target", "total_wall_s", "algorithm",
                "dataset", "partition", "alpha"):
    assert field in summary, field
  assert summary["final_accuracy"] == records[-1]["test_accuracy"]
  assert summary["best_accuracy"] == max(r["test_accuracy"] for r in records)
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["num_clients"] == 3 and config["resolved"]["num_steps"] == 2
  # `auto` settings are resolved per backend and recorded (the suite runs on CPU).
  assert config["client_map"] == "auto" and config["resolved"]["client_map"] == "loop"
  assert config["resolved"]["conv_impl"] == "xla in top-level client steps, im2col elsewhere"
  assert config["resolved"]["backend"] == "cpu"
  part = np.load(tmp_path / "partition.npz")
  assert part["histograms"].shape == (3, 10) and part["counts"].sum() == part["histograms"].sum()


def _fedsnd_tiny():
  config = tiny.get_config()
  config.algorithm, config.fedsnd.synthesis.warm_start, config.validation_fraction = "fedsnd", "client", 0.2
  synthesis, distillation = config.fedsnd.synthesis, config.fedsnd.distillation
  synthesis.samples, synthesis.steps, distillation.steps, distillation.batch = 8, 5, 3, 8
  return config


def test_fedsnd_end_to_end(tmp_path):
  summary = train_lib.train_and_evaluate(_fedsnd_tiny(), str(tmp_path))
  records = _read_jsonl(tmp_path / "metrics.jsonl")
  for field in ("val_accuracy", "test_accuracy_no_distill", "teacher_ce", "teacher_agreement", "kl_before",
                "kl_after", "noise_norm", "synthesis_time_s", "distill_time_s"):
    assert field in records[-1], field
  assert summary["algorithm"] == "fedsnd" and 0 <= summary["final_accuracy"] <= 1
  assert summary["final_val_accuracy"] == records[-1]["val_accuracy"]
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["fedsnd"]["synthesis"]["warm_start"] == "client"


def _scaffold_tiny():
  config = tiny.get_config()
  config.algorithm = "scaffold"
  return config


@pytest.mark.parametrize("make_config", [tiny.get_config, _fedsnd_tiny, _scaffold_tiny],
                         ids=["fedavg", "fedsnd_warm_start", "scaffold_client_state"])
def test_resumed_run_equals_uninterrupted(tmp_path, make_config):
  config = make_config()
  config.rounds, config.checkpoint_every = 4, 2
  full = train_lib.train_and_evaluate(config, str(tmp_path / "full"))
  # "Killed" after round 3 was logged but before its checkpoint: metrics.jsonl holds round 3.
  assert train_lib.train_and_evaluate(config, str(tmp_path / "cut"), stop_after=3) is None
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "3")  # only round 2's checkpoint survived the "kill"
  assert len(_read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == 3
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / "cut"))
  strip = lambda rs: [{k: v for k, v in r.items() if not (k.endswith("time_s") or k == "wall_s")} for r in rs]
  assert strip(_read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == strip(
      _read_jsonl(tmp_path / "full" / "metrics.jsonl"))
  for field in ("final_accuracy", "best_accuracy", "rounds_to_target", "last5_mean_accuracy"):
    assert resumed[field] == full[field], field


def test_rerun_with_other_config_is_refused(tmp_path):
  train_lib.train_and_evaluate(tiny.get_config(), str(tmp_path))
  config = tiny.get_config()
  config.alpha = 0.7
  with pytest.raises(InputError, match="^workdir: .*alpha"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_a_run_of_an_earlier_version_resumes_where_a_new_section_is_at_its_default(tmp_path):
  train_lib.train_and_evaluate(tiny.get_config(), str(tmp_path))
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  with open(tmp_path / "config.json", "w") as f:  # as written before the systems and compression sections
    json.dump({k: v for k, v in saved.items() if k not in ("systems", "compression")}, f)
  assert train_lib.train_and_evaluate(tiny.get_config(), str(tmp_path))["rounds"] == tiny.get_config().rounds
  config = tiny.get_config()
  config.systems.enabled = True
  with pytest.raises(InputError, match="^workdir: .*systems"):
    train_lib.train_and_evaluate(config, str(tmp_path))


# Bad values, each refused in-process naming its field before anything is written.
BAD_VALUES = [
    ({"dataset": "nosuchsource:x"}, "dataset"),
    ({"dataset": "idx:/nonexistent/dir"}, "dataset"),
    ({"algorithm": "fedfoo"}, "algorithm"),
    ({"model": "vgg99"}, "model"),
    ({"partition": "striped"}, "partition"),
    ({"client_map": "pmap"}, "client_map"),
    ({"conv_impl": "fft"}, "conv_impl"),
    ({"alpha": 0.0}, "alpha"),
    ({"clients_per_round": 4}, "clients_per_round"),
    ({"num_clients": 5000}, "num_clients"),
    ({"rounds": 0}, "rounds"),
    ({"batch_size": -1}, "batch_size"),
    ({"client_lr": 0.0}, "client_lr"),
    ({"algorithm": "fedsnd", "fedsnd.distillation.teacher_weighting": "loudest"},
     "fedsnd.distillation.teacher_weighting"),
    ({"algorithm": "fednd", "clients_per_round": 1}, "clients_per_round"),
    ({"client_lr": float("inf")}, "client_lr"),
    ({"algorithm": "fedsnd", "fedsnd.distillation.lr": float("nan")}, "fedsnd.distillation.lr"),
    ({"algorithm": "moon", "moon.tau": 0.0}, "moon.tau"),
    ({"dataset": "npz:{nan_npz}"}, "dataset"),
    ({"algorithm": "fedsnd", "dp.clip_norm": 1.0}, "dp.local"),
    ({"algorithm": "fedsnd", "secagg.enabled": True}, "secagg.enabled"),
    ({"attack.kind": "alie", "attack.fraction": 0.5}, "attack.fraction"),
    ({"robust.rule": "krum", "robust.f": 1}, "robust.f"),  # 2 clients per round; Krum needs 5
    ({"algorithm": "scaffold", "systems.enabled": True, "systems.deadline_s": 1.0}, "systems.deadline_s"),
    ({"systems.enabled": True, "systems.profile": "/nonexistent/profiles.pkl"}, "systems.profile"),
]


def test_bad_values_are_refused_naming_the_field_and_nothing_is_written(tmp_path):
  nan_npz = tmp_path / "nan.npz"
  x = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
  x[3, 2] = np.nan
  np.savez(nan_npz, x_train=x, y_train=np.arange(20) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
  for i, (fields, field) in enumerate(BAD_VALUES):
    fields = {k: v.format(nan_npz=nan_npz) if isinstance(v, str) else v for k, v in fields.items()}
    workdir = tmp_path / f"w{i}"
    with pytest.raises(InputError, match=f"^{re.escape(field)}: "):
      train_lib.train_and_evaluate(configuration.set_fields(tiny.get_config(), fields), str(workdir))
    assert not workdir.exists(), fields  # nothing written that looks like a result
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder")
  with pytest.raises(InputError, match="^workdir: "):
    train_lib.train_and_evaluate(tiny.get_config(), str(a_file))
  assert a_file.read_text() == "not a folder"


# What only the binary sees: flags it cannot parse, the earlier flat layout, a missing --workdir.
BAD_FLAGS = [
    ("--config.alpha=abc", "alpha"),
    ("--config.nofield=3", "nofield"),
    ("--config.dp_clip_norm=1", "dp.clip_norm"),
    ("--config.rounds=0", "rounds"),
    ("", "workdir"),
]


def _train(workdir, *flags):
  cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
         *([f"--workdir={workdir}"] if workdir else []), *flags]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_binary_exits_2_with_one_line_on_bad_input_and_3_on_divergence(tmp_path):
  procs = [(flag, field, _train(tmp_path / f"w{i}" if field != "workdir" else None, *flag.split()))
           for i, (flag, field) in enumerate(BAD_FLAGS)]
  # A run that diverges: exit 3, one line, summary.json marked, no checkpoint of the non-finite state.
  diverging = _train(tmp_path / "diverged", "--config.client_lr=1e12")
  for i, (flag, field, proc) in enumerate(procs):
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, (flag, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], (flag, err[-2000:])
    assert not (tmp_path / f"w{i}").exists(), flag
  _, err = diverging.communicate(timeout=300)
  lines = err.strip().splitlines()
  assert diverging.returncode == 3, err[-2000:]
  assert len(lines) == 1 and lines[0].startswith("diverged: round ") and "not finite" in lines[0], err[-2000:]
  with open(tmp_path / "diverged" / "summary.json") as f:
    summary = json.load(f)
  assert summary["diverged"] is True
  saved = [int(name) for name in os.listdir(tmp_path / "diverged" / "checkpoints") if name.isdigit()]
  assert all(r < summary["diverged_round"] for r in saved)


def test_diverged_run_raises_and_keeps_finite_records(tmp_path):
  config = tiny.get_config()
  config.client_lr = 1e12
  with pytest.raises(loop.Diverged, match="^round 1: "):
    train_lib.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert summary["diverged"] is True and summary["diverged_round"] == 1 and summary["rounds"] == 0
  assert _read_jsonl(tmp_path / "metrics.jsonl") == []  # the non-finite round is not logged


def test_a_live_run_holds_its_workdir(tmp_path):
  holder = tmp_path / "held"
  with loop.locked_workdir(str(holder)):
    with pytest.raises(InputError, match=f"^workdir: .*in use by another run \\(pid {os.getpid()} "):
      train_lib.train_and_evaluate(tiny.get_config(), str(holder))
  assert not (holder / "metrics.jsonl").exists()
  # A lock file left by a dead process is no lock: flock is released with its holder.
  (holder / loop.LOCK_FILE).write_text("pid 999999 on nowhere since 2000-01-01\n")
  assert train_lib.train_and_evaluate(tiny.get_config(), str(holder))["rounds"] == 3


def test_an_unknown_nested_field_is_named_with_the_suggestion():
  c = tiny.get_config()
  with pytest.raises(AttributeError) as e:
    getattr(c.fedsnd.synthesis, "stepz")  # noqa: B009 (ml_collections on --config.fedsnd.synthesis.stepz=5)
  assert cli.unknown_field(e.value) == 'stepz (Did you mean "steps" instead of "stepz"?)'
  with pytest.raises(AttributeError) as e:
    getattr(c, "nosuch")  # noqa: B009
  assert cli.unknown_field(e.value) == "nosuch"
