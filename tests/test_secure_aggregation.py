"""Secure aggregation: Shamir sharing by hand, the unmasked sum equals the plain quantised sum exactly, a masked
upload looks uniform, and FedAvg under it equals the unweighted mean up to quantisation."""

import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configuration, train_lib
from experiments.configs import tiny as tiny_config
from fedsnd_jax import aggregation, algorithms, models
from fedsnd_jax import secure_aggregation as sa
from fedsnd_jax.errors import InputError
from fedsnd_jax.rounds import MechanismParts


def test_shamir_any_threshold_of_shares_reconstruct():
  shares = sa.share(123456789, threshold=3, num=5, rng=random.Random(0))
  for picks in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
    assert sa.reconstruct([shares.xs[i] for i in picks], [shares.ys[i] for i in picks]) == 123456789
  assert sa.reconstruct(shares.xs[:2], shares.ys[:2]) != 123456789  # t − 1 shares say nothing (w.h.p. wrong)


@pytest.mark.parametrize("dropped", [0, 2])
def test_unmasked_sum_is_the_plain_quantised_sum_of_survivors(dropped):
  num = 6
  rng = np.random.default_rng(0)
  updates = [jnp.asarray(rng.normal(0, 0.05, (num, 40)).astype(np.float32)),
             jnp.asarray(rng.normal(0, 0.05, (num, 3, 2)).astype(np.float32))]
  quantised = [sa.quantise(x, 0.1, 16) for x in updates]
  pair, self_seed, alive, pair_hat, self_hat = (jnp.asarray(a) for a in sa.protocol_seeds(7, num, dropped))
  assert int(alive.sum()) == num - dropped
  uploads = sa.masked_uploads(quantised, pair, self_seed)
  total = sa.unmasked_sum(uploads, alive, pair_hat, self_hat)
  keep = np.asarray(alive).astype(bool)
  for t, q in zip(total, quantised, strict=True):
    np.testing.assert_array_equal(np.asarray(t), np.asarray(q)[keep].sum(0, dtype=np.uint32))


def test_decoding_is_exact_when_the_quantised_sum_passes_float32s_24_bits():
  # C = 20, b = 21: Σ q ≈ 20·2²⁰ > 2²⁴. Updates on the quantisation grid, so the only error left is decoding's:
  # through float32, Σ q lost its last bit and n·r its last digits, ≈ one quantisation step (2r/(2^b − 1)) off.
  num, bits, r = 20, 21, 0.1
  levels = (1 << bits) - 1
  rng = np.random.default_rng(0)
  q = rng.integers(levels // 2 - 1000, levels // 2 + 1000, (num, 64))
  updates = (q * (2 * r / levels) - r).astype(np.float64)
  reference = {"v": jnp.zeros(64)}
  agg = sa.secure_mean(bits=bits, value_range=r)
  out = agg.apply({"v": jnp.asarray(updates, jnp.float32)}, jnp.ones(num), agg.init(reference), reference,
                  jax.random.key(0))
  exact = (2 * q.sum(0) - num * levels) * (r / levels) / num  # in float64
  step = 2 * r / levels / num
  np.testing.assert_allclose(np.asarray(out.params["v"], np.float64), exact, atol=0.01 * step)


def test_a_masked_upload_is_indistinguishable_from_uniform():
  num, d = 4, 200_000
  quantised = [jnp.zeros((num, d), jnp.uint32)]  # all-zero updates: whatever shows is the mask
  pair, self_seed, *_ = (jnp.asarray(a) for a in sa.protocol_seeds(11, num, 0))
  y = np.asarray(sa.masked_uploads(quantised, pair, self_seed)[0][0])
  bits = np.unpackbits(y.view(np.uint8))
  assert abs(bits.mean() - 0.5) < 0.002  # every bit fair to 4.5 standard errors
  counts = np.bincount(y >> 28, minlength=16)  # top nibble: 16 equiprobable cells
  chi2 = float(((counts - d / 16) ** 2 / (d / 16)).sum())
  assert chi2 < 45.0  # χ²(15): p ≈ 1e-4


def test_fedavg_under_secure_aggregation_is_the_unweighted_mean_up_to_quantisation(tiny, federation, run_rounds):
  data, fed = federation()
  model = models.build_model("mlp", tiny.shape, 3)
  with_aggregator = lambda agg: algorithms.build("fedavg", model, fed, mechanisms=MechanismParts(agg))
  secure = with_aggregator(sa.secure_mean(bits=20, value_range=1.0))
  plain = with_aggregator(aggregation.unweighted_mean())
  a, outs = run_rounds(secure, data, 2)
  b, plain_outs = run_rounds(plain, data, 2)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), a.params, b.params)
  assert outs[0].bytes_up - plain_outs[0].bytes_up == 3 * sa.protocol_bytes(3)
  assert outs[0].diagnostics["secagg_survivors"] == 3


@pytest.mark.parametrize("fields, field", [
    ({"algorithm": "fedsnd"}, "secagg.enabled"),  # the server distils between individual models
    ({"algorithm": "scaffold"}, "secagg.enabled"),
    ({"dp.clip_norm": 1.0}, "secagg"),  # both choose the aggregator
    ({"secagg.bits": 31}, "secagg.bits"),  # 3 clients × (2^31 − 1) overflows
    ({"secagg.dropout": 0.5}, "secagg.dropout"),  # 2 of 3 dropping leaves 1 < 2 needed
])
def test_incompatible_settings_are_refused(fields, field):
  c = configuration.set_fields(tiny_config.get_config(),
                               {"clients_per_round": 3, "secagg.enabled": True, **fields})
  with pytest.raises(InputError, match=f"^{re.escape(field)}: "):
    configuration.validate(c)


def test_a_run_with_dropouts_trains(tmp_path):
  c = tiny_config.get_config()
  c.num_clients, c.clients_per_round, c.rounds = 5, 5, 3
  c.secagg.enabled, c.secagg.dropout = True, 0.4
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  assert summary["final_accuracy"] > 0.2
