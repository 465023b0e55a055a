"""Compressed uploads (`fedsnd_jax.compression`): exact compression == none, error feedback by hand, unbiased
compressors, the bytes a client sends, and the rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configuration
from experiments.configs import tiny
from fedsnd_jax import algorithms, compression, models
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import MechanismParts


def _run(tiny_data, federation, run_rounds, settings=None, name="fedavg", rounds=3):
  data, fed = federation(3, 2)
  model = models.build_model("mlp", tiny_data.shape, 3)
  mechanisms = MechanismParts(compression=settings) if settings else MechanismParts()
  return run_rounds(algorithms.build(name, model, fed, mechanisms=mechanisms), data, rounds)


@pytest.mark.parametrize("feedback", ["none", "ef", "ef21"])
def test_exact_compression_with_or_without_feedback_is_no_compression(feedback, tiny, federation, run_rounds,
                                                                     assert_close):
  exact = compression.Settings("topk", ratio=1.0, feedback=feedback)  # k = P keeps every value
  state, outs = _run(tiny, federation, run_rounds, exact)
  plain, plain_outs = _run(tiny, federation, run_rounds)
  assert_close(state.params, plain.params)
  assert [o.bytes_up for o in outs] == [o.bytes_up for o in plain_outs]  # sent dense: 8P would be more
  if feedback == "ef":
    assert state.uploads.shape[0] == 3 and float(jnp.abs(state.uploads).max()) < 1e-6  # nothing left behind


def _compress(feedback, state, delta):
  compressor = compression.make(compression.Settings("topk", ratio=0.25, feedback=feedback), {"w": jnp.zeros(4)})
  received = {"w": jnp.zeros(4)}
  uploads = {"w": jnp.asarray([delta], jnp.float32)}
  out, state = compression.compress_uploads(compressor, received, uploads, jnp.array([1]), state, jnp.array([0]),
                                            jax.random.split(jax.random.key(0), 1))
  return out["w"][0].tolist(), state


def test_error_feedback_by_hand():
  # Top-1 of 4. Round 1: Δ = (3, −1, 0.5, 2) sends (3, 0, 0, 0) and keeps e = (0, −1, 0.5, 2). Round 2:
  # Δ = (0, 0, 0, 1) adds e: v = (0, −1, 0.5, 3) sends (0, 0, 0, 3) and keeps (0, −1, 0.5, 0).
  sent, e = _compress("ef", jnp.zeros((1, 4)), [3.0, -1.0, 0.5, 2.0])
  assert sent == [3.0, 0.0, 0.0, 0.0] and e[0].tolist() == [0.0, -1.0, 0.5, 2.0]
  sent, e = _compress("ef", e, [0.0, 0.0, 0.0, 1.0])
  assert sent == [0.0, 0.0, 0.0, 3.0] and e[0].tolist() == [0.0, -1.0, 0.5, 0.0]


def test_ef21_by_hand():
  # g = 0. Round 1: C(Δ − g) = (3, 0, 0, 0) = g, the upload. Round 2: Δ − g = (−3, 0, 0, 1) compresses to
  # (−3, 0, 0, 0), so g = 0 and the client's upload is its received model.
  sent, g = _compress("ef21", jnp.zeros((1, 4)), [3.0, -1.0, 0.5, 2.0])
  assert sent == [3.0, 0.0, 0.0, 0.0] and g[0].tolist() == sent
  sent, g = _compress("ef21", g, [0.0, 0.0, 0.0, 1.0])
  assert sent == [0.0, 0.0, 0.0, 0.0] and g[0].tolist() == sent


def test_a_client_that_uploaded_nothing_keeps_its_memory():
  compressor = compression.make(compression.Settings("topk", ratio=0.25, feedback="ef"), {"w": jnp.zeros(4)})
  memory = jnp.arange(8.0).reshape(2, 4)
  _, after = compression.compress_uploads(compressor, {"w": jnp.zeros(4)}, {"w": jnp.ones((2, 4))},
                                          jnp.array([5, 0]), memory, jnp.array([0, 1]),
                                          jax.random.split(jax.random.key(0), 2))
  np.testing.assert_array_equal(after[1], memory[1])
  assert not np.array_equal(after[0], memory[0])


@pytest.mark.parametrize("settings", [compression.Settings("randk", ratio=0.3),
                                      compression.Settings("qsgd", levels=2)])
def test_random_compressors_are_unbiased(settings):
  v = jnp.linspace(-1.0, 2.0, 20)
  compressor = compression.make(settings, {"w": v})
  keys = jax.random.split(jax.random.key(1), 20000)
  mean = jnp.mean(jax.vmap(compressor.compress, in_axes=(None, 0))(v, keys), axis=0)
  np.testing.assert_allclose(mean, v, atol=0.06)


def test_rand_k_sends_k_distinct_coordinates_scaled_by_p_over_k():
  v = jnp.ones(1000)
  compressor = compression.make(compression.Settings("randk", ratio=0.3), {"w": v})
  for i in range(5):
    sent = np.asarray(compressor.compress(v, jax.random.key(i)))
    np.testing.assert_allclose(sent[sent != 0], 1000 / 300, rtol=1e-6)
    assert np.count_nonzero(sent) == 300


@pytest.mark.parametrize("kind", ["randk", "qsgd"])
def test_error_feedback_keeps_a_bounded_memory_with_random_compressors(kind):
  # A constant update v, 6 rounds of error feedback: with a contractive compressor the memory grows at most
  # linearly (‖e‖ ≤ 6‖v‖); the unbiased, rescaled rand-k (P/k = 100) or QSGD would blow it up geometrically.
  v = jax.random.normal(jax.random.key(0), (10000,))
  compressor = compression.make(compression.Settings(kind, ratio=0.01, levels=16, feedback="ef"), {"w": v})
  e = jnp.zeros_like(v)
  for i in range(6):
    sent = compressor.compress(v + e, jax.random.key(i))
    assert float(jnp.linalg.norm(sent - (v + e))) <= float(jnp.linalg.norm(v + e))  # contractive
    e = v + e - sent
  assert float(jnp.linalg.norm(e)) < 6 * float(jnp.linalg.norm(v))


def test_scaled_sign_and_qsgd_compress_tensor_by_tensor():
  like = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  sign = compression.make(compression.Settings("sign"), like)
  # Flattened as a = (1, −3), b = (0.5, 0.5): each tensor scaled by its own mean |v|.
  np.testing.assert_allclose(sign.compress(jnp.array([1.0, -3.0, 0.5, 0.5]), jax.random.key(0)),
                             [2.0, -2.0, 0.5, 0.5])


@pytest.mark.parametrize("settings, per_client", [
    (compression.Settings("topk", ratio=0.01), lambda p, t: 8 * math.ceil(0.01 * p)),
    (compression.Settings("randk", ratio=0.01), lambda p, t: 4 * math.ceil(0.01 * p) + 4),
    (compression.Settings("qsgd", levels=3), lambda p, t: -(-p * 3 // 8) + 4 * t),
    (compression.Settings("sign"), lambda p, t: -(-p // 8) + 4 * t),
])
def test_upload_bytes_count_what_is_sent(settings, per_client, tiny, federation, run_rounds):
  params = models.build_model("mlp", tiny.shape, 3).init(jax.random.key(0))
  size, tensors = sum(x.size for x in jax.tree.leaves(params)), len(jax.tree.leaves(params))
  _, outs = _run(tiny, federation, run_rounds, settings, rounds=1)
  _, plain = _run(tiny, federation, run_rounds, rounds=1)
  assert plain[0].bytes_up == 2 * (4 * size + 4)  # 2 clients: float32 params and the example count
  assert outs[0].bytes_up == 2 * (per_client(size, tensors) + 4)


def _config(fields):
  return configuration.set_fields(tiny.get_config(), fields)


@pytest.mark.parametrize("fields, field", [
    ({"compression.kind": "topk", "secagg.enabled": True}, "compression.kind"),
    ({"compression.feedback": "ef"}, "compression.feedback"),
    ({"compression.kind": "topk", "compression.ratio": 0.0}, "compression.ratio"),
    ({"compression.kind": "zip"}, "compression.kind"),
])
def test_bad_combinations_are_refused(fields, field):
  with pytest.raises(InputError, match=f"^{field}: "):
    configuration.validate(_config(fields))


def test_compression_composes_with_local_dp_robust_rules_and_fednova(tiny, federation, run_rounds):
  for fields in ({"compression.kind": "qsgd", "dp.clip_norm": 1.0, "dp.local": True},
                 {"compression.kind": "topk", "robust.rule": "median", "num_clients": 7, "clients_per_round": 7},
                 {"compression.kind": "sign", "compression.feedback": "ef21", "algorithm": "fednova"}):
    configuration.validate(_config(fields))
  state, outs = _run(tiny, federation, run_rounds, compression.Settings("topk", 0.1, feedback="ef"), "fednova")
  assert all(np.isfinite(o.train_loss) for o in outs) and state.uploads.shape[0] == 3
