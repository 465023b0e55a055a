"""The experiment loop as library code: rounds, evaluation, checkpoint and resume, metrics, summary (DESIGN §5).

  summary = experiment.run(algorithm, model, train_data, {"test": test_set}, workdir="runs/x", rounds=30)

writes into `workdir` metrics.jsonl (one record per evaluated round), TensorBoard events, resumable
`checkpoints/` and summary.json, with no config system involved. In a multi-process run (`jax.distributed`,
client_map=sharded) every process runs this loop alike and process 0 alone writes. A second run in the same
workdir is refused while the first is alive (a lock file naming its holder; a dead holder's lock is taken over).
A round whose
training loss or parameters are not finite stops the run: its state is not checkpointed (the last finite
checkpoint stays), summary.json says `"diverged": true`, and `Diverged` is raised; so does a round whose
evaluated loss is not finite (parameters so large that the logits overflow).
"""

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsnd_jax import checkpoint, evaluation, metrics, privacy
from fedsnd_jax.algorithm import FederatedAlgorithm
from fedsnd_jax.errors import InputError
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.models import Model

LOCK_FILE = ".lock"


class Diverged(RuntimeError):
  """A round produced a non-finite training loss or parameter; the run stopped there (exit code 3)."""


@contextlib.contextmanager
def locked_workdir(workdir: str):
  """Creates `workdir` and holds its lock file for the block.

  The lock is an advisory `flock`, so the kernel releases it when its process dies: a stale lock of a dead
  run is taken over. The file names its holder (pid, host, start time) for the refusal message.

  Raises:
    InputError: `workdir` is an existing file, cannot be created, or another live run holds it.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InputError("workdir", f"{workdir} exists and is not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise InputError("workdir", f"cannot create {workdir}: {e.strerror}") from None
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "an unknown process"
      raise InputError("workdir", f"{workdir} is in use by another run ({holder}); wait for it to finish or use "
                       "another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the flock


@jax.jit
def _all_finite(params):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def rounds_to_target(records: list[dict], target: float) -> int | None:
  """The first evaluated round whose test accuracy is at or above `target` (None if none is)."""
  return next((r["round"] for r in records if r["test_accuracy"] >= target), None)


def summarize(records: list[dict], target_accuracy: float, wall_s: float) -> dict:
  """summary.json's measured fields from the metrics records (accuracy fields absent without records)."""
  if not records:
    return {"rounds": 0, "total_wall_s": wall_s, "target_accuracy": target_accuracy, "rounds_to_target": None}
  accs = [r["test_accuracy"] for r in records]
  timed = [r for r in records if r["round"] > 1] or records  # Round 1 includes compilation.
  val = ({"final_val_accuracy": records[-1]["val_accuracy"],
          "last5_mean_val_accuracy": float(np.mean([r["val_accuracy"] for r in records[-5:]]))}
         if "val_accuracy" in records[-1] else {})
  return {**val, "rounds": records[-1]["round"], "final_accuracy": accs[-1], "best_accuracy": max(accs),
          "last5_mean_accuracy": float(np.mean(accs[-5:])), "target_accuracy": target_accuracy,
          "rounds_to_target": rounds_to_target(records, target_accuracy),
          "mean_client_time_s": float(np.mean([r["client_time_s"] for r in timed])),
          "mean_server_time_s": float(np.mean([r["server_time_s"] for r in timed])),
          "total_wall_s": wall_s}


def format_eta(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _evaluate(evaluate, params, eval_sets, suffix="") -> dict[str, float]:
  out = {}
  for name, data in eval_sets.items():
    acc, loss = evaluate(params, data)
    out[f"{name}_accuracy{suffix}"], out[f"{name}_loss{suffix}"] = float(acc), float(loss)
  return out


def run(algorithm: FederatedAlgorithm, model: Model, train_data: FederatedData,
        eval_sets: dict[str, evaluation.EvalData], *, workdir: str, rounds: int, seed: int = 0,
        eval_every: int = 1, checkpoint_every: int = 10, target_accuracy: float = 0.9,
        info: dict | None = None, on_start: Callable[[str], None] | None = None,
        accountant: privacy.Accountant | None = None, target_epsilon: float = 0.0,
        stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) `rounds` rounds and writes the output contract into `workdir`; returns the summary.

  Args:
    algorithm: a built algorithm (`fedsnd_jax.algorithms.build`).
    model: its model (for evaluation).
    train_data: the clients' data on the device.
    eval_sets: held-out sets by name; "test" is required ("val" adds val_* metrics).
    workdir: output folder; resumed from its newest checkpoint.
    rounds: total rounds. seed: the run's PRNG seed. eval_every: rounds between evaluations (the last
      round is always evaluated). checkpoint_every: rounds between checkpoints (0: the last round only).
    target_accuracy: for `rounds_to_target`.
    info: fields copied into summary.json (algorithm, dataset, ...).
    on_start: called with `workdir` once its lock is held, before anything else is written (the binaries
      check and write config.json there).
    accountant: differential privacy's ε after r rounds: `epsilon` in every record and in the summary.
    target_epsilon: > 0 stops the run before a round would take ε above it (summary.json: `stopped`).
    stop_after: return None after this round's checkpoint, as if killed (for tests).

  Raises:
    InputError: the workdir is unusable or held by another run.
    Diverged: a non-finite training loss or parameter.
  """
  primary = jax.process_index() == 0  # in a multi-process run the others compute alike and write nothing
  with locked_workdir(workdir) if primary else contextlib.nullcontext():
    if on_start is not None and primary:
      on_start(workdir)
    return _run_locked(algorithm, model, train_data, eval_sets, workdir, rounds, seed, eval_every,
                       checkpoint_every, target_accuracy, dict(info or {}), accountant, target_epsilon, stop_after)


def _run_locked(algorithm, model, train_data, eval_sets, workdir, rounds, seed, eval_every, checkpoint_every,
                target_accuracy, info, accountant, target_epsilon, stop_after):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = algorithm.init(jax.random.key(seed))
  log = {"records": [], "bytes_up": 0, "bytes_down": 0, "wall_s": 0.0}
  if ckpt.latest_round() is not None:
    state, log = ckpt.restore(state)
    print(f"resuming {workdir} from round {int(state.round)}", flush=True)
  primary = jax.process_index() == 0
  writer = metrics.MetricsWriter(workdir, log["records"]) if primary else metrics.Discard()
  evaluate = evaluation.make_evaluator(model)
  session_start, start_round = time.perf_counter(), int(state.round)

  def finish(extra):
    summary = {**info, **summarize(log["records"], target_accuracy,
                                   log["wall_s"] + time.perf_counter() - session_start), **extra}
    if accountant is not None:
      summary.update(epsilon=accountant.epsilon(int(state.round)), dp_delta=accountant.delta)
    if primary:
      metrics.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary

  stopped = {}
  budgeted = accountant is not None and target_epsilon > 0
  try:
    for _ in range(start_round, rounds):
      if budgeted and accountant.epsilon(int(state.round) + 1) > target_epsilon:
        stopped = {"stopped": f"dp_target_epsilon: round {int(state.round) + 1} would spend ε = "
                              f"{accountant.epsilon(int(state.round) + 1):.3f} > {target_epsilon}"}
        print(f"stopping before round {int(state.round) + 1}: {stopped['stopped']}", flush=True)
        break
      state, out = algorithm.apply(state, train_data)
      r = int(state.round)
      evaluated = r % eval_every == 0 or r == rounds
      scores = _evaluate(evaluate, state.params, eval_sets) if evaluated else {}
      losses = [out.train_loss] + [v for k, v in scores.items() if k.endswith("_loss")]
      if not (np.all(np.isfinite(losses)) and bool(_all_finite(state.params))):
        last = ckpt.latest_round()
        last = f"round {last}" if last is not None else "none"
        finish({"diverged": True, "diverged_round": r})
        evaluated_losses = "".join(f", {k} {v:.4g}" for k, v in scores.items() if k.endswith("_loss"))
        raise Diverged(f"round {r}: a loss or the global parameters are not finite (training loss "
                       f"{out.train_loss:.4g}{evaluated_losses}); likely a learning rate too large for this model "
                       f"and data. The last finite checkpoint is {last}.")
      log["bytes_up"] += out.bytes_up
      log["bytes_down"] += out.bytes_down
      elapsed = time.perf_counter() - session_start
      wall_s = log["wall_s"] + elapsed
      if evaluated:
        record = {"round": r, **scores, **out.times, **out.diagnostics, "train_loss": out.train_loss,
                  "bytes_up": log["bytes_up"], "bytes_down": log["bytes_down"], "wall_s": wall_s}
        if accountant is not None:
          record["epsilon"] = accountant.epsilon(r)
        for name, params in out.eval_models.items():  # e.g. the aggregate without distillation
          record.update(_evaluate(evaluate, params, eval_sets, suffix=f"_{name}"))
        log["records"].append(record)
        writer.write(record)
        per_round = elapsed / (r - start_round)
        print(f"round {r}/{rounds} | acc {record['test_accuracy']:.4f} | loss {record['test_loss']:.4f} | "
              f"{per_round:.2f} s/round | ETA {format_eta(per_round * (rounds - r))}", flush=True)
      if (checkpoint_every and r % checkpoint_every == 0) or r == rounds or r == stop_after:
        ckpt.save(r, state, {**log, "wall_s": wall_s})
      if r == stop_after:
        return None
    if stopped and int(state.round) > start_round and ckpt.latest_round() != int(state.round):
      ckpt.save(int(state.round), state, {**log, "wall_s": log["wall_s"] + time.perf_counter() - session_start})
  finally:
    writer.close()
    ckpt.close()
  summary = finish(stopped)
  if not log["records"]:
    print(f"no round was run ({stopped.get('stopped', 'nothing to do')})", flush=True)
    return summary
  print(f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}, "
        f"last-5 mean {summary['last5_mean_accuracy']:.4f}); rounds to {target_accuracy:.2f}: "
        f"{summary['rounds_to_target']}; {summary['total_wall_s']:.1f} s", flush=True)
  return summary
