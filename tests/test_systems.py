"""The simulated clock (`fedsnd_jax.systems`): a hand-timed 3-client round, deadlines that drop or cut clients,
the clock switched on without a deadline == no clock, device-profile files, and the rules."""

import json
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train_lib
from experiments.configs import tiny
from fedsnd_jax import aggregation, algorithms, client, driver, mechanisms, models, sampling, systems
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import AlgorithmInfo, MechanismParts

# Three clients: 1 s, 2 s and 0.5 s a step; 8 bits each way at 8 bit/s: 2 s of communication. Four steps each:
# rounds of 6, 10 and 4 simulated seconds.
HAND = systems.Profiles(jnp.array([1.0, 2.0, 0.5]), jnp.full(3, 8.0), jnp.full(3, 8.0))
IDS, STEPS = jnp.arange(3), jnp.array([4, 4, 4])


def _timing(**clock):
  t = systems.round_timing(systems.Clock(HAND, **clock), IDS, STEPS, 8.0, 8.0)
  return t.steps.tolist(), float(t.seconds), int(t.dropped), int(t.partial)


def test_a_hand_timed_round():
  assert _timing() == ([4, 4, 4], 10.0, 0, 0)  # the round waits for its slowest client
  assert _timing(deadline_s=7.0) == ([4, 0, 4], 7.0, 1, 0)  # client 1 (10 s) misses 7 s and is dropped
  # Partial work: client 1 has 7 − 2 = 5 s for steps of 2 s, so it uploads 2 of its 4 steps.
  assert _timing(deadline_s=7.0, partial=True) == ([4, 2, 4], 7.0, 0, 1)
  assert _timing(deadline_s=12.0) == ([4, 4, 4], 10.0, 0, 0)  # a deadline nobody reaches changes nothing
  assert _timing(deadline_quantile=0.5) == ([4, 0, 4], 6.0, 1, 0)  # the median of 6, 10, 4 s
  assert _timing(deadline_s=2.5, partial=True) == ([0, 0, 1], 2.5, 2, 1)  # no step finished: dropped


def test_a_cut_client_takes_the_first_steps_of_its_schedule(federation):
  data, fed = federation(local_epochs=2)  # two epochs: each client's non-empty steps are spread over slots
  schedule = client.batch_arguments(fed.schedule, fed.schedule.num_steps(data.max_count))
  key = jax.random.key(3)
  _, whole, _ = client.local_batches(key, 1, data, schedule, jnp.int32(1 << 20))
  _, cut, _ = client.local_batches(key, 1, data, schedule, jnp.int32(3))
  live = np.flatnonzero(np.asarray(whole).any(axis=1))
  assert len(live) > 3
  np.testing.assert_array_equal(np.asarray(cut)[live[:3]], np.asarray(whole)[live[:3]])
  assert not np.asarray(cut)[live[3:]].any()


@pytest.mark.parametrize("name", ["fedavg", "fednova"])
def test_the_clock_without_a_deadline_changes_no_result(name, tiny, federation, run_rounds):
  data, fed = federation(3, 2)
  model = models.build_model("mlp", tiny.shape, 3)
  clock = systems.build(systems.Settings(enabled=True), fed, seed=0).clock  # unequal speeds, no deadline
  timed, timed_out = run_rounds(algorithms.build(name, model, fed, mechanisms=MechanismParts(clock=clock)),
                                data, 2)
  plain, plain_out = run_rounds(algorithms.build(name, model, fed), data, 2)
  jax.tree.map(np.testing.assert_array_equal, timed.params, plain.params)  # bit for bit
  assert [o.bytes_up for o in timed_out] == [o.bytes_up for o in plain_out]
  assert all(o.sim_time_s > 0 for o in timed_out) and all(o.sim_time_s is None for o in plain_out)


def test_a_dropped_client_is_left_out_of_the_aggregate(tiny, federation, assert_close):
  data, fed = federation()
  model = models.build_model("mlp", tiny.shape, 3)
  slow = systems.Profiles(jnp.array([0.01, 100.0, 0.01]), jnp.full(3, 1e9), jnp.full(3, 1e9))
  alg = algorithms.build("fedavg", model, fed, mechanisms=MechanismParts(clock=systems.Clock(slow, 5.0)))
  state = alg.init(jax.random.key(0))
  new, out = alg.apply(state, data)
  assert out.diagnostics["dropped_clients"] == 1 and out.sim_time_s == pytest.approx(5.0)
  plain = algorithms.build("fedavg", model, fed).apply(state, data)[1]
  assert out.bytes_up == plain.bytes_up * 2 // 3 and out.bytes_down == plain.bytes_down  # its upload never left
  phase = driver.make_client_phase(model, client.supervised_loss(model), fed,
                                   fed.schedule.num_steps(data.max_count), "vmap", 8)
  ids, keys, _ = sampling.round_keys(state.rng, 0, 3, 3)
  kept = jnp.array([0, 2])
  uploads = phase((state.params, None, data),
                  (ids[kept], keys[kept], None, fed.schedule.steps_taken(data.counts[ids[kept]])))
  assert_close(new.params, aggregation.weighted_average(uploads.params, uploads.num_examples))


def test_a_round_every_client_missed_leaves_the_model(tiny, federation):
  data, fed = federation()
  model = models.build_model("mlp", tiny.shape, 3)
  for name in ("fedavg", "fednova"):
    alg = algorithms.build(name, model, fed, mechanisms=MechanismParts(clock=systems.Clock(HAND, 0.1)))
    state = alg.init(jax.random.key(0))
    new, out = alg.apply(state, data)
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    assert out.diagnostics["dropped_clients"] == 3 and out.bytes_up == 0


def test_profiles_are_seeded_lognormals():
  s = systems.Settings(enabled=True, step_s=0.2, step_sigma=0.0, up_mbps=2.0, bandwidth_sigma=1.0)
  a, b = systems.draw(s, 50, 0), systems.draw(s, 50, 1)
  np.testing.assert_allclose(a.step_s, 0.2, rtol=1e-6)  # σ = 0: every client at the median
  assert not np.allclose(a.up_bps, b.up_bps)
  jax.tree.map(np.testing.assert_array_equal, a, systems.draw(s, 50, 0))
  assert 1e6 < np.median(systems.draw(s, 4001, 0).up_bps) < 4e6  # median 2 Mbit/s


def test_a_fedscale_profile_file_round_trips(tmp_path):
  path = str(tmp_path / "profiles.pkl")
  systems.write_fedscale(path, [10.0, 40.0], [1000.0, 250.0])
  with open(path, "rb") as f:
    assert pickle.load(f) == {1: {"computation": 10.0, "communication": 1000.0},
                              2: {"computation": 40.0, "communication": 250.0}}
  p = systems.read_fedscale(path, 3, batch_size=32)
  # A step: 3 passes × 32 examples × 10 ms = 0.96 s; client 2 reuses entry 1.
  np.testing.assert_allclose(p.step_s, [0.96, 3.84, 0.96], rtol=1e-6)
  np.testing.assert_allclose(p.up_bps, [1e6, 2.5e5, 1e6])
  np.testing.assert_array_equal(p.up_bps, p.down_bps)


def test_a_profile_file_that_holds_code_is_refused(tmp_path):
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({1: {"computation": 1.0, "communication": 1.0, "x": np.float64(1)}}))
  with pytest.raises(InputError, match="systems.profile"):
    systems.read_fedscale(str(path), 2, 32)


def _chosen(**sections):
  chosen = {section: mechanisms.settings(section) for section in mechanisms.REGISTRY}
  return {**chosen, **{k: mechanisms.settings(k, v) for k, v in sections.items()}}


@pytest.mark.parametrize("systems_settings, other, field", [
    (dict(enabled=True, deadline_s=1.0), {}, None),
    (dict(enabled=True, deadline_s=1.0, deadline_quantile=0.5), {}, "systems.deadline_quantile"),
    (dict(enabled=True, deadline_quantile=1.5), {}, "systems.deadline_quantile"),
    (dict(enabled=True, step_s=0.0), {}, "systems.step_s"),
    (dict(enabled=True, stragglers="wait"), {}, "systems.stragglers"),
    (dict(deadline_s=1.0), {}, "systems.enabled"),
    (dict(enabled=True, deadline_s=1.0), dict(robust={"rule": "median"}), "systems.deadline_s"),
    (dict(enabled=True, deadline_s=1.0), dict(dp={"clip_norm": 1.0}), "systems.deadline_s"),
    (dict(enabled=True), dict(robust={"rule": "median"}), None),  # no deadline: the clock composes
])
def test_systems_settings_and_rules(systems_settings, other, field, federation):
  _, fed = federation()
  chosen = _chosen(systems=systems_settings, **other)
  fedavg = AlgorithmInfo("fedavg", ("central", "local", "secure_aggregation"), True)
  if field is None:
    mechanisms.validate(chosen, fed, fedavg)
  else:
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
      mechanisms.validate(chosen, fed, fedavg)


def test_a_deadline_is_refused_for_algorithms_that_read_every_upload(tiny, federation):
  _, fed = federation()
  chosen = _chosen(systems=dict(enabled=True, deadline_quantile=0.9))
  with pytest.raises(InputError, match="systems.deadline_s"):
    mechanisms.validate(chosen, fed, AlgorithmInfo("scaffold", (), False))
  model = models.build_model("mlp", tiny.shape, 3)
  with pytest.raises(InputError, match="systems.deadline_s"):  # the library path too
    algorithms.build("scaffold", model, fed, mechanisms=MechanismParts(clock=systems.Clock(HAND, 1.0)))
  with pytest.raises(InputError, match="client_sampling"):
    mechanisms.validate(_chosen(systems=dict(enabled=True)), fed._replace(sampling="poisson"),
                        AlgorithmInfo("fedavg", (), True))


def _read(path):
  return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("algorithm, clock", [
    ("fednova", dict(deadline_quantile=0.7, stragglers="partial", online_s=2.0, offline_s=2.0)),
    ("fedavg", dict(buffer_size=2, concurrency=3, online_s=2.0, offline_s=2.0)),  # FedBuff's flight resumes too
])
def test_a_resumed_run_continues_its_clock(algorithm, clock, tmp_path):
  c = tiny.get_config()
  c.rounds, c.checkpoint_every, c.target_accuracy = 4, 2, 0.01  # reached in round 1
  c.systems.update(enabled=True, **clock)
  c.algorithm = algorithm
  whole = train_lib.train_and_evaluate(c, str(tmp_path / "whole"))
  assert train_lib.train_and_evaluate(c, str(tmp_path / "cut"), stop_after=3) is None
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "3")  # killed after round 3's record, before its checkpoint
  resumed = train_lib.train_and_evaluate(c, str(tmp_path / "cut"))
  clock = lambda d: [(r["sim_time_s"], r["round_sim_s"], r.get("partial_clients"), r.get("staleness"),
                      r["test_accuracy"]) for r in _read(tmp_path / d / "metrics.jsonl")]
  assert clock("cut") == clock("whole")
  times = [t for t, *_ in clock("whole")]
  assert all(b > a for a, b in zip(times, times[1:], strict=False))
  assert resumed["sim_seconds_to_target"] == whole["sim_seconds_to_target"] == times[0]


# Three clients online in [0, 3], [5, 8] and [2, 6] of every 10 s.
WINDOWS = systems.Availability(jnp.array([[0.0], [5.0], [2.0]]), jnp.array([[3.0], [8.0], [6.0]]),
                               jnp.full(3, 10.0), jnp.zeros(3))


def _check_in(t, need, windows=WINDOWS):
  start, online = systems.check_in(windows, jnp.float32(t), jnp.ones(windows.period.shape, bool), need)
  return round(float(start), 1), np.asarray(online).tolist()  # (a check-in counts a moment after a start)


def test_check_in_by_hand():
  assert _check_in(2.5, 2) == (2.5, [True, False, True])  # two online already
  assert _check_in(4.0, 2) == (5.0, [False, True, True])  # client 1 comes online at 5 s
  assert _check_in(9.0, 1) == (10.0, [True, False, False])  # the trace repeats: client 0 again at 10 s
  assert _check_in(14.0, 3) == (14.0, [True, True, True])  # never three at once: taken as if online
  # Periods of 10 and 100 s, online in [5, 6] and [50, 65]: together first at 55 s, a later repeat of the first.
  apart = systems.Availability(jnp.array([[5.0], [50.0]]), jnp.array([[6.0], [65.0]]), jnp.array([10.0, 100.0]),
                               jnp.zeros(2))
  assert _check_in(0.0, 2, apart) == (55.0, [True, True])
  # Far into a run, float32 rounding of t mod period must not miss the start a check-in waits for.
  late = systems.Availability(jnp.array([[500.0]]), jnp.array([[500.5]]), jnp.array([1000.0]), jnp.zeros(1))
  assert _check_in(123456.0, 1, late)[1] == [True]  # at 123,500 s and a quarter (the tolerance there)


def test_a_round_samples_among_the_online_clients(tiny, federation):
  data, fed = federation(3, 2, local_steps=4)
  model = models.build_model("mlp", tiny.shape, 3)
  profiles = systems.Profiles(jnp.array([3.0, 2.0, 0.5]), jnp.full(3, 1e15), jnp.full(3, 1e15))
  clock = systems.Clock(profiles, availability=WINDOWS._replace(phase=jnp.full(3, 4.0)))  # from 4 s of the trace
  alg = algorithms.build("fedavg", model, fed, mechanisms=MechanismParts(clock=clock))
  state, out = alg.apply(alg.init(jax.random.key(0)), data)
  # At 4 s only client 2 is online; at 5 s clients 1 and 2: they take part, in rounds of 8 and 2 s (client 0
  # would take 12 s).
  assert out.diagnostics["waited_s"] == pytest.approx(1.0, abs=0.01)
  assert out.sim_time_s == float(state.clock.time) == pytest.approx(9.0, abs=0.01)


def test_a_behaviour_trace_round_trips(tmp_path):
  path = str(tmp_path / "trace.pkl")
  systems.write_trace(path, [[0.0, 50.0], [10.0]], [[20.0, 60.0], [90.0]], [100.0, 200.0])
  with open(path, "rb") as f:
    assert pickle.load(f)[1] == {"active": [0.0, 50.0], "inactive": [20.0, 60.0], "finish_time": 100.0,
                                 "duration": 30.0, "model": ""}
  a = systems.read_trace(path, 3)  # client 2 reuses entry 1
  assert np.asarray(systems.online(a, jnp.float32(55.0))).tolist() == [True, True, True]
  assert np.asarray(systems.online(a, jnp.float32(150.0))).tolist() == [True, False, True]
  assert np.asarray(systems.online(a, jnp.float32(30.0))).tolist() == [False, True, False]
  with pytest.raises(InputError, match="systems.trace"):
    systems.write_trace(path, [[5.0]], [[1.0]], [10.0])  # goes offline before it comes online
    systems.read_trace(path, 1)


def test_seeded_availability_is_on_about_the_share_it_should_be():
  s = systems.Settings(enabled=True, online_s=100.0, offline_s=300.0)
  a = systems.on_off(s, 400, seed=0)
  share = np.mean([np.asarray(systems.online(a, jnp.float32(t))).mean() for t in range(0, 20000, 500)])
  assert 0.2 < share < 0.3  # 100 / (100 + 300)
  jax.tree.map(np.testing.assert_array_equal, a, systems.on_off(s, 400, seed=0))
