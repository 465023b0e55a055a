"""pfl-research's FedAvg simulation (Apple's `pfl`, PyTorch backend) on the peer benchmark's work;
`benchmarks.peers` runs this in pfl's own venv.

  <pfl venv>/bin/python benchmarks/peers_pfl.py DATA.npz ROUNDS [--accuracy]
  <pfl venv>/bin/python -m torch.distributed.run --standalone --nproc_per_node=P benchmarks/peers_pfl.py \
      DATA.npz ROUNDS [--accuracy]

DATA.npz as for `peers_fedjax.py`: x [N, 28, 28, 1] float32 (normalised), y [N] int32, index [K, n]. pfl 0.6's own
simulation API, as its image-classification benchmark drives it: a `FederatedDataset.from_slices` of the K clients'
tensors with the `minimize_reuse` user sampler (a cohort of K is every client once), a `PyTorchModel` (cnn2 in
PyTorch, the same layers and init as `peers_flower.py`'s: 824,458 params, dropout 0.2; local optimiser plain
`torch.optim.SGD`, central optimiser SGD at lr 1, i.e. the model plus the mean update), `FederatedAveraging`, and a
`SimulatedBackend` weighting each client's update by its examples (`WeightByDatapoints`; no DP, no validation
cohort). Local training is pfl's: 1 epoch of batch 32 at lr 0.05 over the client's examples in their stored order
(pfl does not shuffle a user's data; the work's images are in a seeded random order).

One process trains the K clients one after another, PyTorch on CPU with os.cpu_count() / P threads. Under
`torch.distributed.run` with P processes (pfl's distributed simulation: each process takes every P-th client of the
cohort and the updates are summed with an all-reduce over gloo), every process does the same and rank 0 prints. A
round is timed from the end of one central iteration to the end of the next (sampling the cohort, local training,
aggregation, the central update); round 0 also evaluates every client before and after its training (pfl evaluates
on iteration 0 whatever the frequency) and is the warm-up. Prints one JSON line per round: {"round": r, "seconds":
s}; --accuracy also evaluates the global model on all N examples after every round (outside the timed span) and
prints {"rounds_trained": r, "accuracy": a}.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.internal.ops import pytorch_ops
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn

BATCH, LR = 32, 0.05


class CNN2(nn.Module):
  """conv3×3·32 (SAME) → ReLU → avgpool 2 → conv3×3·64 (SAME) → ReLU → avgpool 2 → Dense 256 → ReLU → Dropout 0.2
  → Dense 10, as `peers_flower.CNN2`, with the `loss` and `metrics` methods pfl's PyTorchModel calls."""

  def __init__(self, num_classes: int = 10, dropout: float = 0.2):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
    self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
    self.pool = nn.AvgPool2d(2)
    self.dense1 = nn.Linear(64 * 7 * 7, 256)
    self.dropout = nn.Dropout(dropout)
    self.dense2 = nn.Linear(256, num_classes)
    for layer in (self.conv1, self.conv2, self.dense1, self.dense2):  # flax's (and Haiku's) init: LeCun normal
      std = (1 / layer.weight[0].numel()) ** 0.5 / 0.87962566103423978  # truncated at ±2σ, as in flax
      nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
      nn.init.zeros_(layer.bias)

  def forward(self, x):
    x = self.pool(torch.relu(self.conv1(x)))
    x = self.pool(torch.relu(self.conv2(x)))
    return self.dense2(self.dropout(torch.relu(self.dense1(x.flatten(1)))))

  def loss(self, x, y):
    self.train()
    return nn.functional.cross_entropy(self(x), y)

  @torch.no_grad()
  def metrics(self, x, y):
    self.eval()
    logits = self(x)
    return {"loss": Weighted(nn.functional.cross_entropy(logits, y, reduction="sum").item(), len(y)),
            "accuracy": Weighted((logits.argmax(1) == y).sum().item(), len(y))}


class RoundTimer(TrainingProcessCallback):
  """Prints each central iteration's seconds (from the end of the previous one) and, if asked, the accuracy."""

  def __init__(self, x: torch.Tensor, y: torch.Tensor, accuracy: bool, rank: int):
    self.x, self.y, self.accuracy, self.rank = x, y, accuracy, rank
    self.start = time.perf_counter()

  def print_accuracy(self, module: nn.Module, rounds_trained: int) -> None:
    module.eval()
    with torch.no_grad():
      correct = sum(int((module(self.x[i:i + 1000]).argmax(1) == self.y[i:i + 1000]).sum())
                    for i in range(0, len(self.y), 1000))
    print(json.dumps({"rounds_trained": rounds_trained, "accuracy": correct / len(self.y)}), flush=True)

  def on_train_begin(self, *, model):
    if self.accuracy and self.rank == 0:
      self.print_accuracy(model.pytorch_model, 0)
    self.start = time.perf_counter()
    return Metrics()

  def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
    seconds = time.perf_counter() - self.start
    if self.rank == 0:
      print(json.dumps({"round": central_iteration, "seconds": seconds}), flush=True)
      if self.accuracy:
        self.print_accuracy(model.pytorch_model, central_iteration + 1)
    self.start = time.perf_counter()
    return False, Metrics()


def main(path: str, rounds: int, accuracy: bool) -> None:
  distributed = pytorch_ops.distributed
  torch.set_num_threads(max(1, os.cpu_count() // distributed.world_size))
  torch.manual_seed(0)
  np.random.seed(0)
  data = np.load(path)
  x = pytorch_ops.to_tensor(np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2)))
  y = pytorch_ops.to_tensor(data["y"].astype(np.int64), dtype=None)
  index = data["index"]
  clients = {k: (x[rows], y[rows]) for k, rows in enumerate(index)}
  federated = FederatedDataset.from_slices(clients, get_user_sampler("minimize_reuse", list(clients)))
  module = CNN2().to(pytorch_ops.get_default_device())
  assert sum(p.numel() for p in module.parameters()) == 824_458, "not cnn2"
  model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
  backend = SimulatedBackend(training_data=federated, val_data=None, postprocessors=[WeightByDatapoints()])
  # Iteration 0 evaluates whatever the frequency; a frequency past the last iteration keeps the others plain.
  params = NNAlgorithmParams(central_num_iterations=rounds + 1, evaluation_frequency=rounds + 2,
                             train_cohort_size=len(index), val_cohort_size=0)
  FederatedAveraging().run(
      algorithm_params=params, backend=backend, model=model,
      model_train_params=NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=1, local_batch_size=BATCH),
      model_eval_params=NNEvalHyperParams(local_batch_size=1000),
      callbacks=[RoundTimer(x, y, accuracy, distributed.global_rank)])


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("npz")
  parser.add_argument("rounds", type=int)
  parser.add_argument("--accuracy", action="store_true", help="Print the global model's accuracy every round.")
  args = parser.parse_args()
  main(args.npz, args.rounds, args.accuracy)
