"""Checkpoints of a run with orbax: the algorithm state (server and per-client) and the metrics so far."""

import os

import jax
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(tree):
  """Typed PRNG keys become their uint32 key data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_saved(saved, like):
  return jax.tree.map(lambda s, ref: jax.random.wrap_key_data(s, impl=jax.random.key_impl(ref))
                      if _is_key(ref) else s, saved, like)


class Checkpointer:
  """Saves and restores (state, metrics records) under `directory`, keeping the newest `keep`."""

  def __init__(self, directory: str, keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def save(self, round_index: int, state, records: list[dict]) -> None:
    """Writes a checkpoint and waits for it to be complete on disk."""
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
