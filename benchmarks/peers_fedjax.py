"""FedJAX 0.0.17's FedAvg on the peer benchmark's work; `benchmarks.peers` runs this in FedJAX's own venv.

  <fedjax venv>/bin/python benchmarks/peers_fedjax.py DATA.npz ROUNDS

DATA.npz holds x [N, 28, 28, 1] float32 (normalised), y [N] int32 and index [K, n] (every client's examples).
Every round all K clients train 1 epoch of batch 32 with plain SGD at lr 0.05 (FedJAX's own
`federated_averaging`, server SGD at lr 1); the network is cnn2 written in Haiku (824,458 params, dropout 0.2).
Prints one JSON line per round: {"round": r, "seconds": s}, round 0 including compilation.
"""

import json
import sys
import time

import fedjax
import haiku as hk
import jax
import numpy as np


def cnn2(batch, is_train=True):
  """conv3×3·32 → ReLU → avgpool 2 → conv3×3·64 → ReLU → avgpool 2 → Dense 256 → ReLU → Dropout 0.2 → Dense 10."""
  x = batch["x"]
  for features in (32, 64):
    x = hk.avg_pool(jax.nn.relu(hk.Conv2D(features, 3)(x)), (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  x = jax.nn.relu(hk.Linear(256)(hk.Flatten()(x)))
  if is_train:
    x = hk.dropout(hk.next_rng_key(), 0.2, x)
  return hk.Linear(10)(x)


def main(path: str, rounds: int) -> None:
  data = np.load(path)
  x, y = data["x"], data["y"]
  clients = {str(k).encode(): {"x": x[idx], "y": y[idx]} for k, idx in enumerate(data["index"])}
  federated = fedjax.InMemoryFederatedData(clients)
  model = fedjax.create_model_from_haiku(
      hk.transform(cnn2), {"x": np.zeros((1, *x.shape[1:]), np.float32)},
      lambda batch, logits: fedjax.metrics.unreduced_cross_entropy_loss(batch["y"], logits),
      train_kwargs={"is_train": True}, eval_kwargs={"is_train": False})
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(0.05), fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=32, num_epochs=1))
  params = model.init(jax.random.PRNGKey(0))
  assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 824_458, "not cnn2"
  state = algorithm.init(params)
  sampler = fedjax.client_samplers.UniformGetClientSampler(federated, num_clients=len(clients), seed=0)
  for r in range(rounds + 1):
    sampled = sampler.sample()
    start = time.perf_counter()
    state, _ = algorithm.apply(state, sampled)
    jax.block_until_ready(state.params)
    print(json.dumps({"round": r, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
