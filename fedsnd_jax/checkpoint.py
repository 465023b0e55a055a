"""Checkpoints of a run with orbax: the algorithm state (server and per-client) and the metrics so far."""

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(tree):
  """Host (numpy) copies, typed PRNG keys as their uint32 key data: orbax stores plain arrays, and host arrays
  are what process 0 of a multi-process run may save alone (a device array there is process-local)."""
  return jax.device_get(jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree))


def _from_saved(saved, like):
  return jax.tree.map(lambda s, ref: jax.random.wrap_key_data(jnp.asarray(s), impl=jax.random.key_impl(ref))
                      if _is_key(ref) else jnp.asarray(s), saved, like)


class Checkpointer:
  """Saves and restores (state, metrics records) under `directory`, keeping the newest `keep`.

  In a multi-process run (`jax.distributed`) every process holds the same state: process 0 alone writes, the
  others only restore (they share the folder) and their `save` does nothing.
  """

  def __init__(self, directory: str, keep: int = 2):
    process = jax.process_index()
    self._writes = process == 0
    options = ocp.CheckpointManagerOptions(max_to_keep=keep if self._writes else None, create=False,
                                           read_only=not self._writes)
    if self._writes:
      os.makedirs(directory, exist_ok=True)
    if jax.process_count() > 1:  # no barriers with the other processes: each manager works alone
      options.multiprocessing_options = ocp.options.MultiprocessingOptions(primary_host=process,
                                                                           active_processes={process})
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def save(self, round_index: int, state, records: list[dict]) -> None:
    """Writes a checkpoint and waits for it to be complete on disk (process 0 only)."""
    if not self._writes:
      return
    self._manager.save(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_savable(state)), metrics=ocp.args.JsonSave({"records": records})))
    self._manager.wait_until_finished()

  def restore(self, like_state) -> tuple[object, list[dict]]:
    """Restores the newest checkpoint; `like_state` (e.g. a freshly initialised state) gives its structure."""
    step = self._manager.latest_step()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_to_savable(like_state)), metrics=ocp.args.JsonRestore()))
    return _from_saved(restored["state"], like_state), restored["metrics"]["records"]

  def close(self) -> None:
    self._manager.close()
