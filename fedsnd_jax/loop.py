"""The experiment loop as library code: rounds, evaluation, checkpoint and resume, metrics, summary.

  summary = loop.run(algorithm, model, train_data, {"test": test_set}, workdir="runs/x",
                     settings=loop.LoopSettings(rounds=30))

writes into `workdir` metrics.jsonl (one record per evaluated round), TensorBoard events, resumable
`checkpoints/` and summary.json, with no config system involved. In a multi-process run (`jax.distributed`,
client_map=sharded) every process runs this loop alike and process 0 alone writes; all processes must see the
same workdir (a shared file system across machines). A second run in the same workdir is refused while the first
is alive (a lock file naming its holder; a dead holder's lock is taken over). A round whose training loss or
parameters are not finite stops the run: its state is not checkpointed (the last finite checkpoint stays),
summary.json says `"diverged": true`, and `run` raises `Diverged`; so does a round whose evaluated loss is not
finite (parameters so large that the logits overflow). `run_many` runs R runs vectorised together the same way.
"""

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fedsnd_jax import checkpoint, evaluation, metrics, tree_math
from fedsnd_jax.errors import InputError
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import FederatedAlgorithm, RoundOutput

LOCK_FILE = ".lock"
# What DP does not cover (privacy.py): the uploads' raw training losses, and what is computed with their example
# counts (the undistilled aggregate's metrics, FedSND's regime signal on it). Left out of metrics.jsonl under DP.
PRIVATE_METRICS = ("train_loss", "average_noise_accuracy")


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


def sim_seconds_to_target(records: list[dict], target: float) -> dict:
  """{"sim_seconds_to_target": the simulated seconds (`systems`) at `rounds_to_target`, or None}; {} for a run
  without a simulated clock."""
  if not records or "sim_time_s" not in records[-1]:
    return {}
  return {"sim_seconds_to_target": next((r["sim_time_s"] for r in records if r["test_accuracy"] >= target), None)}


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
          **sim_seconds_to_target(records, target_accuracy),
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


class LoopSettings(NamedTuple):
  """How the loop runs a built algorithm.

  Attributes:
    rounds: total rounds (a resumed run continues up to it).
    eval_every: rounds between evaluations (the last round is always evaluated).
    checkpoint_every: rounds between checkpoints (0: the last round only).
    target_accuracy: for `rounds_to_target`.
    accountant: differential privacy's ε after r rounds (`privacy.Accountant`), or None: `epsilon` in every
      record and in the summary; with it, what DP does not cover (PRIVATE_METRICS, extra models) is not logged.
    target_epsilon: > 0 stops the run before a round would take ε above it (summary.json: `stopped`).
    stop_after: return None after this round's checkpoint, as if killed (for tests).
  """

  rounds: int
  eval_every: int = 1
  checkpoint_every: int = 10
  target_accuracy: float = 0.9
  accountant: Any = None
  target_epsilon: float = 0.0
  stop_after: int | None = None


class RunSpec(NamedTuple):
  """One run of the loop: its output folder, PRNG seed, held-out sets by name ("test" required, "val" adds
  val_* metrics) and the fields copied into its summary.json (algorithm, dataset, ...)."""

  workdir: str
  seed: int = 0
  eval_sets: dict[str, evaluation.EvalData] | None = None
  info: dict | None = None


def run(algorithm: FederatedAlgorithm, model: Model, train_data: FederatedData,
        eval_sets: dict[str, evaluation.EvalData], *, workdir: str, settings: LoopSettings, seed: int = 0,
        info: dict | None = None, on_start: Callable[[str], None] | None = None) -> dict | None:
  """Runs (or resumes) `settings.rounds` rounds and writes the output contract into `workdir`; returns the
  summary.

  Args:
    algorithm: a built algorithm (`fedsnd_jax.algorithms.build`); model: its model (for evaluation).
    train_data: the clients' data on the device.
    eval_sets, workdir, seed, info: the run's (`RunSpec`); workdir is resumed from its newest checkpoint.
    settings: rounds, evaluation, checkpoints, privacy budget.
    on_start: called with `workdir` once its lock is held, before anything else is written (the binaries
      check and write config.json there).

  Raises:
    InputError: the workdir is unusable or held by another run.
    Diverged: a non-finite training loss or parameter.
  """
  summary = run_many(algorithm, model, train_data, [RunSpec(workdir, seed, eval_sets, info)], settings,
                     on_start=on_start, stacked=False)
  if summary is None:
    return None
  if summary[0].get("diverged"):
    raise Diverged(summary[0].pop("diverged_message"))
  return summary[0]


def run_many(algorithm: FederatedAlgorithm, model: Model, train_data: FederatedData, runs: list[RunSpec],
             settings: LoopSettings, on_start: Callable[[str], None] | None = None,
             stacked: bool = True) -> list[dict] | None:
  """`run` for R runs at once: an algorithm built with `runs=R` over `federated_data.stack`ed data (`stacked`),
  each run writing its own workdir as if alone; returns their summaries. Runs resume together (their newest
  checkpoints must be of one round). A run that diverges gets its summary (`"diverged": true`) and drops out
  while the others go on. Seconds per round are the vectorised round's, all runs together.
  """
  assert stacked or len(runs) == 1, "several runs need stacked (vectorised) data"
  primary = jax.process_index() == 0  # in a multi-process run the others compute alike and write nothing
  with contextlib.ExitStack() as locks:
    refusal = None
    if primary:
      try:
        for spec in runs:  # every lock first, then the writing: a refusal leaves no cell half-started
          locks.enter_context(locked_workdir(spec.workdir))
        for spec in runs:
          if on_start is not None:
            on_start(spec.workdir)
      except InputError as e:
        refusal = e
    _agree("process 0 refused the run", refusal)
    lanes = [_Lane(i, spec, stacked, primary) for i, spec in enumerate(runs)]
    try:
      state = _restore(algorithm, lanes, stacked)
      return _Loop(algorithm, model, train_data, settings).rounds(lanes, state)
    finally:
      for lane in lanes:
        lane.close()


def _agree(what: str, error: InputError | None, value: int = 0) -> None:
  """Raises `error` (or an InputError naming `what`) in every process of a multi-process run if any process has
  an error or sees another `value` than process 0: one process stopping alone would leave the others waiting in
  the next collective."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  flags = np.asarray(multihost_utils.process_allgather(np.array([error is not None, value], np.int32)))
  if error is not None:
    raise error
  if flags[:, 0].any() or (flags[:, 1] != flags[0, 1]).any():
    raise InputError("workdir", f"{what} (per process: error {flags[:, 0].tolist()}, value "
                     f"{flags[:, 1].tolist()}); every process must see the same workdir")


class _Lane:
  """One run of a (possibly vectorised) loop: its workdir, checkpoints, metrics and log; `view` picks its part
  of a stacked pytree."""

  def __init__(self, index: int, spec: RunSpec, stacked: bool, primary: bool):
    self.index, self.workdir, self.seed = index, spec.workdir, spec.seed
    self.eval_sets, self.info = spec.eval_sets or {}, dict(spec.info or {})
    self.stacked, self.primary, self.summary = stacked, primary, None
    self.ckpt = checkpoint.Checkpointer(os.path.join(spec.workdir, "checkpoints"))
    self.log = {"records": [], "bytes_up": 0, "bytes_down": 0, "wall_s": 0.0}
    self.writer = None

  def view(self, tree):
    return jax.tree.map(lambda a: a[self.index], tree) if self.stacked else tree

  def output(self, out: RoundOutput) -> tuple[float, dict, dict]:
    """(training loss, diagnostics, eval models) of this lane; a vectorised round reports lists per run."""
    if not self.stacked:
      return out.train_loss, out.diagnostics, out.eval_models
    return (out.train_loss[self.index], {k: v[self.index] for k, v in out.diagnostics.items()},
            self.view(out.eval_models))

  def open(self, records):
    self.writer = metrics.MetricsWriter(self.workdir, records) if self.primary else metrics.Discard()

  def finish(self, rounds_done, wall_s, settings: LoopSettings, extra) -> dict:
    wall_s = self.log["wall_s"] + wall_s
    summary = {**self.info, **summarize(self.log["records"], settings.target_accuracy, wall_s), **extra}
    if settings.accountant is not None:
      summary.update(epsilon=settings.accountant.epsilon(rounds_done), dp_delta=settings.accountant.delta)
    if self.primary:
      metrics.write_json_atomic(os.path.join(self.workdir, "summary.json"),
                                {k: v for k, v in summary.items() if k != "diverged_message"})
    self.summary = summary
    return summary

  def close(self):
    if self.writer is not None:
      self.writer.close()
    self.ckpt.close()


def _restore(algorithm: FederatedAlgorithm, lanes: list[_Lane], stacked: bool):
  """The initial state from the lanes' seeds, or their newest checkpoints (of one round); opens their logs."""
  keys = [jax.random.key(lane.seed) for lane in lanes]
  state = algorithm.init(jnp.stack(keys) if stacked else keys[0])
  latest = {lane.ckpt.latest_round() for lane in lanes}
  _agree("the processes would resume from different rounds", None,
         -1 if None in latest or len(latest) > 1 else next(iter(latest)))
  if len(latest) > 1:
    raise InputError("workdir", "runs vectorised together resume together, but their newest checkpoints are "
                     f"of rounds {sorted(latest, key=str)}: run them one by one")
  if latest != {None}:
    restored = [lane.ckpt.restore(lane.view(state)) for lane in lanes]
    for lane, (_, log) in zip(lanes, restored, strict=True):
      lane.log = log
    states = [s for s, _ in restored]
    state = tree_math.stack(states) if stacked else states[0]
    print(f"resuming {', '.join(lane.workdir for lane in lanes)} from round {latest.pop()}", flush=True)
  for lane in lanes:
    lane.open(lane.log["records"])
  if stacked:
    print("runs: " + ", ".join(f"[{lane.index}] {lane.workdir}" for lane in lanes), flush=True)
  return state


def _diverged_message(r: int, train_loss: float, scores: dict, lane: _Lane) -> str:
  last = lane.ckpt.latest_round()
  last = f"round {last}" if last is not None else "none"
  evaluated_losses = "".join(f", {k} {v:.4g}" for k, v in scores.items() if k.endswith("_loss"))
  return (f"round {r}: a loss or the global parameters are not finite (training loss {train_loss:.4g}"
          f"{evaluated_losses}); likely a learning rate too large for this model and data. The last finite "
          f"checkpoint is {last}.")


class _Loop:
  """The rounds of `run_many` over its lanes."""

  def __init__(self, algorithm: FederatedAlgorithm, model: Model, train_data: FederatedData,
               settings: LoopSettings):
    self.algorithm, self.train_data, self.settings = algorithm, train_data, settings
    self.evaluate = evaluation.make_evaluator(model)
    self.session_start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.session_start

  def budget_spent(self, current: int) -> dict:
    """{"stopped": why} if the next round would spend more ε than the target, else {}."""
    s = self.settings
    if s.accountant is None or s.target_epsilon <= 0 or s.accountant.epsilon(current + 1) <= s.target_epsilon:
      return {}
    return {"stopped": f"dp.target_epsilon: round {current + 1} would spend ε = "
                       f"{s.accountant.epsilon(current + 1):.3f} > {s.target_epsilon}"}

  def rounds(self, lanes: list[_Lane], state) -> list[dict] | None:
    s = self.settings
    start_round = current = int(jnp.ravel(state.round)[0])
    live, stopped = list(lanes), {}
    for _ in range(start_round, s.rounds):
      stopped = self.budget_spent(current)
      if stopped:
        print(f"stopping before round {current + 1}: {stopped['stopped']}", flush=True)
        break
      state, out = self.algorithm.apply(state, self.train_data)
      current += 1
      evaluated = current % s.eval_every == 0 or current == s.rounds
      live = [lane for lane in live if self.record(lane, state, out, current, evaluated)]
      if not live:
        break
      if evaluated:
        self.progress(live, current, self.elapsed() / (current - start_round))
      if current == s.stop_after:
        return None
    self.finish(live, state, current, start_round, stopped)
    return [lane.summary for lane in lanes]

  def record(self, lane: _Lane, state, out: RoundOutput, r: int, evaluated: bool) -> bool:
    """Logs and checkpoints round r of one lane; False (the lane finished as diverged) if it is not finite."""
    params = lane.view(state.params)
    train_loss, diagnostics, eval_models = lane.output(out)
    scores = _evaluate(self.evaluate, params, lane.eval_sets) if evaluated else {}
    elapsed = self.elapsed()
    losses = [train_loss] + [v for k, v in scores.items() if k.endswith("_loss")]
    if not (np.all(np.isfinite(losses)) and bool(_all_finite(params))):
      lane.finish(r, elapsed, self.settings, {"diverged": True, "diverged_round": r,
                                              "diverged_message": _diverged_message(r, train_loss, scores, lane)})
      return False
    lane.log["bytes_up"] += out.bytes_up
    lane.log["bytes_down"] += out.bytes_down
    clock = {} if out.sim_time_s is None else {"sim_time_s": out.sim_time_s}  # the simulated clock (`systems`)
    wall_s = lane.log["wall_s"] + elapsed
    if evaluated:
      record = {"round": r, **scores, **out.times, **diagnostics, "train_loss": train_loss,
                "bytes_up": lane.log["bytes_up"], "bytes_down": lane.log["bytes_down"], **clock, "wall_s": wall_s}
      accountant = self.settings.accountant
      if accountant is None:
        for name, extra in eval_models.items():  # e.g. the aggregate without distillation
          record.update(_evaluate(self.evaluate, extra, lane.eval_sets, suffix=f"_{name}"))
      else:
        record = {k: v for k, v in record.items() if k not in PRIVATE_METRICS}
        record["epsilon"] = accountant.epsilon(r)
      lane.log["records"].append(record)
      lane.writer.write(record)
    s = self.settings
    if (s.checkpoint_every and r % s.checkpoint_every == 0) or r == s.rounds or r == s.stop_after:
      lane.ckpt.save(r, lane.view(state), {**lane.log, "wall_s": wall_s})
    return True

  def progress(self, live: list[_Lane], r: int, per_round: float) -> None:
    tag = lambda lane: f"[{lane.index}] " if lane.stacked else ""
    accs = " ".join(f"{tag(lane)}{lane.log['records'][-1]['test_accuracy']:.4f}" for lane in live)
    loss = " ".join(f"{tag(lane)}{lane.log['records'][-1]['test_loss']:.4f}" for lane in live)
    print(f"round {r}/{self.settings.rounds} | acc {accs} | loss {loss} | {per_round:.2f} s/round | "
          f"ETA {format_eta(per_round * (self.settings.rounds - r))}", flush=True)

  def finish(self, live: list[_Lane], state, current: int, start_round: int, stopped: dict) -> None:
    """Summaries of the lanes still live (a run stopped by its ε budget is checkpointed where it stopped)."""
    elapsed = self.elapsed()
    for lane in live:
      if stopped and current > start_round and lane.ckpt.latest_round() != current:
        lane.ckpt.save(current, lane.view(state), {**lane.log, "wall_s": lane.log["wall_s"] + elapsed})
      summary = lane.finish(current, elapsed, self.settings, stopped)
      if not lane.log["records"]:
        print(f"no round was run ({stopped.get('stopped', 'nothing to do')})", flush=True)
        continue
      t = self.settings.target_accuracy
      print(f"{lane.workdir + ': ' if lane.stacked else ''}final accuracy {summary['final_accuracy']:.4f} "
            f"(best {summary['best_accuracy']:.4f}, last-5 mean {summary['last5_mean_accuracy']:.4f}); rounds to "
            f"{t:.2f}: {summary['rounds_to_target']}; {summary['total_wall_s']:.1f} s", flush=True)
