"""Two processes on JAX's distributed runtime (gloo CPU collectives), client_map=sharded, equal one process."""

import json
import os
import socket
import subprocess
import sys

import pytest

from experiments import cli, report
from fedsnd_jax import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, rounds: int, expect: int = 0) -> list[str]:
  """Runs the binary as processes 0 and 1 of one run; returns their stdouts (files: a full pipe would stall one
  process, and the other with it at the next collective)."""
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  logs = [workdir.parent / f"{workdir.name}.{rounds}.{i}.log" for i in (0, 1)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [*TRAIN, f"--workdir={workdir}", "--config.client_map=sharded", f"--config.rounds={rounds}", address,
           "--num_processes=2", f"--process_id={i}"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True))
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:  # a process left waiting in a collective must not outlive the test
      p.kill()
  texts = [log.read_text(errors="replace") for log in logs]
  assert codes == [expect, expect], "\n".join(t[-3000:] for t in texts)
  return texts


def test_two_processes_equal_one_and_resume(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  subprocess.run([*TRAIN, f"--workdir={single}", "--config.client_map=vmap"], cwd=ROOT, check=True,
                 capture_output=True, timeout=600)
  _two_processes(multi, rounds=2)  # interrupted after round 2 ...
  outs = _two_processes(multi, rounds=3)  # ... and resumed by both processes from process 0's checkpoint
  assert all("resuming" in out for out in outs)
  want, got = report.read_metrics(str(single)), report.read_metrics(str(multi))
  assert [r["round"] for r in got] == [1, 2, 3]  # one writer: no record twice
  for key in ("test_accuracy", "test_loss", "train_loss"):
    assert [r[key] for r in got] == pytest.approx([r[key] for r in want], abs=1e-4), key
  with open(multi / "summary.json") as f:
    assert json.load(f)["final_accuracy"] == pytest.approx(want[-1]["test_accuracy"], abs=1e-4)


def test_a_refusal_on_process_0_stops_every_process(tmp_path):
  # Process 0 cannot take the workdir's lock (held here): both processes exit 2, none waits in a collective.
  workdir = tmp_path / "held"
  with loop.locked_workdir(str(workdir)):
    outs = _two_processes(workdir, rounds=1, expect=2)
  assert "in use by another run" in outs[0] and "process 0 refused the run" in outs[1]


def test_partial_multi_process_flags_exit_2(tmp_path):
  out = subprocess.run([*TRAIN, f"--workdir={tmp_path}", "--num_processes=2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2 and "--process_id" in out.stderr and not os.listdir(tmp_path)


@pytest.mark.parametrize("flags, field", [
    (("127.0.0.1:1234", 2, None), "coordinator_address"),
    (("127.0.0.1:1234", 0, 0), "num_processes"),
    (("127.0.0.1:1234", 2, 2), "process_id"),  # out of range: jax.distributed would wait for ever
    (("127.0.0.1:1234", 2, -1), "process_id"),
])
def test_bad_multi_process_flags_name_the_flag(flags, field):
  assert cli.multi_process_problem(*flags).startswith(f"{field}: ")
  assert cli.multi_process_problem(None, None, None) == "" == cli.multi_process_problem("h:1", 2, 1)

