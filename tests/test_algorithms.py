"""Every registered algorithm through the one round driver: init, two rounds without retracing, a checkpoint
round-trip, and resume == uninterrupted."""

import chex
import jax
import pytest

from fedsnd_jax import algorithms, checkpoint, models

# Small server budgets so FedND/FedSND rounds take milliseconds; the other algorithms keep their defaults.
SMALL = {"fedsnd": {"synthesis": {"samples": 6, "steps": 3, "warm_start": "client"},
                    "distillation": {"steps": 2, "batch": 4}},
         "moon": dict(projection_dim=8)}


@pytest.mark.parametrize("name", list(algorithms.REGISTRY))
def test_every_algorithm_runs_checkpoints_and_resumes(name, tiny, federation, run_rounds, traced, tmp_path):
  data, fed = federation(3, 2)  # 2 of 3 clients: per-client state is gathered and scattered by id
  spec = algorithms.get(name)
  hp = algorithms.hyperparameters(name, SMALL.get(spec.section))
  model = models.build_model("mlp", tiny.shape, 3, **algorithms.model_options(name, hp))
  build = lambda **kw: algorithms.build(name, model, fed, hp, **kw)

  alg = build()
  state1, _ = run_rounds(alg, data, 1)
  with traced() as names:  # the second round reuses every phase compiled in the first
    uninterrupted, outs = run_rounds(alg, data, 1, state=state1)
  assert names == []
  assert int(uninterrupted.round) == 2 and outs[0].train_loss > 0 and outs[0].bytes_up > 0

  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, state1, [{"round": 1}])
  fresh = build()  # a new process: a new build, restoring into its own initial state
  restored, records = ckpt.restore(fresh.init(jax.random.key(0)))
  ckpt.close()
  assert records == [{"round": 1}]
  chex.assert_trees_all_equal(jax.tree.map(_comparable, restored), jax.tree.map(_comparable, state1))
  resumed, _ = run_rounds(fresh, data, 1, state=restored)
  chex.assert_trees_all_equal(jax.tree.map(_comparable, resumed), jax.tree.map(_comparable, uninterrupted))


def _comparable(x):
  """Typed PRNG keys compare by their key data."""
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
