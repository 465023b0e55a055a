"""FedBuff (`fedsnd_jax.buffered`): one buffer of every client from one version == a synchronous FedAvg round, a
hand-made schedule's arrivals and staleness, the staleness rebase by hand, the rules, and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configuration
from experiments.configs import tiny as tiny_config
from fedsnd_jax import algorithms, buffered, mechanisms, models, systems
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import MechanismParts

FAST = 1e15  # bits/s: communication takes no time to speak of


def _clock(step_s, **buffer):
  k = len(step_s)
  return systems.Clock(systems.Profiles(jnp.asarray(step_s, jnp.float32), jnp.full(k, FAST), jnp.full(k, FAST)),
                       **buffer)


def test_one_buffer_of_every_client_from_one_version_is_a_fedavg_round(tiny, federation):
  data, fed = federation(local_steps=2)  # equal work and speeds: the first arrivals are the K first starts
  model = models.build_model("mlp", tiny.shape, 3)
  clock = _clock([0.1] * 3, buffer_size=3, concurrency=3, staleness_exponent=0.0)
  alg = algorithms.build("fedavg", model, fed, mechanisms=MechanismParts(clock=clock))
  state = alg.init(jax.random.key(0))
  new, out = alg.apply(state, data)
  sync, sync_out = algorithms.build("fedavg", model, fed).apply(state._replace(clock=None), data)
  jax.tree.map(np.testing.assert_array_equal, new.params, sync.params)
  assert out.diagnostics["staleness"] == [0, 0, 0] and out.bytes_up == sync_out.bytes_up
  assert out.sim_time_s == pytest.approx(0.2)


def test_a_hand_made_schedule(tiny, federation):
  """Two clients of 1 and 2.5 s a round, both in flight, a buffer of one. Client 0 arrives at 1 s (stale 0)
  and, started again from version 1, at 2 s (stale 0); client 1, started at 0 s from version 0, arrives at
  2.5 s, 2 versions stale; client 0, started at 2 s from version 2, arrives at 3 s, 1 version stale."""
  data, fed = federation(2, 2, local_steps=1)
  model = models.build_model("mlp", tiny.shape, 3)
  alg = algorithms.build("fedavg", model, fed, mechanisms=MechanismParts(
      clock=_clock([1.0, 2.5], buffer_size=1, concurrency=2)))
  state, seen = alg.init(jax.random.key(0)), []
  for _ in range(4):
    state, out = alg.apply(state, data)
    seen.append((out.diagnostics["staleness"], round(out.sim_time_s, 4)))
  assert seen == [([0], 1.0), ([0], 2.0), ([2], 2.5), ([1], 3.0)]


def test_the_rebase_by_hand():
  current, start, trained = jnp.array([1.0]), jnp.array([[3.0], [3.0]]), jnp.array([[2.0], [2.0]])
  # τ = 3: s = 1/√4 = 0.5, u = 1 − 0.5·(3 − 2) = 0.5; τ = 0: the trained model itself
  np.testing.assert_allclose(buffered.rebase(current, start, trained, jnp.array([3, 0]), 0.5), [[0.5], [2.0]])
  np.testing.assert_allclose(buffered.rebase(current, start, trained, jnp.array([3, 0]), 0.0), [[0.0], [2.0]])


@pytest.mark.parametrize("overrides, field", [
    ({"algorithm": "scaffold"}, "systems.buffer_size"),
    ({"algorithm": "fednova"}, "systems.buffer_size"),
    ({"dp.clip_norm": 1.0}, "systems.buffer_size"),
    ({"compression.kind": "topk"}, "systems.buffer_size"),
    ({"systems.deadline_s": 1.0}, "systems.buffer_size"),
    ({"systems.concurrency": 99}, "systems.concurrency"),
    ({"systems.buffer_size": 0, "systems.concurrency": 4}, "systems.concurrency"),  # FedBuff's, without it
    ({"systems.buffer_size": 0, "systems.staleness_exponent": 0.0}, "systems.staleness_exponent"),
    ({"algorithm": "fedsnd"}, None),
])
def test_fedbuff_rules(overrides, field):
  c = configuration.set_fields(tiny_config.get_config(), {"systems.enabled": True, "systems.buffer_size": 2,
                                                           "num_clients": 6, "clients_per_round": 3, **overrides})
  if field is None:
    configuration.validate(c)
  else:
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
      configuration.validate(c)


def test_the_library_refuses_fedbuff_for_scaffold(tiny, federation):
  _, fed = federation()
  with pytest.raises(InputError, match="systems.buffer_size"):
    algorithms.build("scaffold", models.build_model("mlp", tiny.shape, 3), fed,
                     mechanisms=MechanismParts(clock=_clock([1.0] * 3, buffer_size=2, concurrency=2)))
  assert mechanisms.RULES["compression"].asynchronous


def test_a_client_that_starts_again_at_one_version_trains_with_another_key():
  # Clients of 1 and 10 s, both in flight: client 0 arrives at 1, 2 and 3 s, each time from version 0.
  params = {"w": jnp.zeros(2)}
  clock = systems.ClockState(jnp.float32(0.0), buffered.empty(params, 2, 2))
  buf = buffered.arrive(clock, jnp.int32(0), params, jnp.array([1.0, 10.0]), jax.random.key(0), None, 3)
  assert buf.ids.tolist() == [0, 0, 0] and buf.version.tolist() == [0, 0, 0] and buf.repeat.tolist() == [0, 1, 2]
  keys = [jax.random.key_data(buffered.client_key(jax.random.key(0), 0, 0, r)).tolist() for r in range(3)]
  assert len({str(k) for k in keys}) == 3
  first = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 3)[1]  # sync round 0's key for client 0
  assert keys[0] == jax.random.key_data(jax.random.fold_in(first, 0)).tolist()
