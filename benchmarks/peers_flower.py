"""Flower's simulation engine (Ray) running FedAvg on the peer benchmark's work; `benchmarks.peers` runs this in
Flower's own venv.

  <flower venv>/bin/python benchmarks/peers_flower.py DATA.npz ROUNDS [--client_cpus=1] [--accuracy]

DATA.npz as for `peers_fedjax.py`: x [N, 28, 28, 1] float32 (normalised), y [N] int32, index [K, n]. Flower
1.42's `run_simulation` (deprecated there for the `flwr run` CLI, which drives the same Ray backend) with a
ServerApp (the Message-API `FedAvg` strategy: every one of the K clients trains every round, weighted mean of
their models, federated evaluation off) and a ClientApp (PyTorch on CPU: cnn2, 824,458 params, dropout 0.2; 1
shuffled epoch of batch 32, plain SGD at lr 0.05). Ray gets every CPU; each client asks for --client_cpus of
them and runs PyTorch with as many threads (1: one client per core at once; all CPUs: one client at a time; on
2 idle cores, 2 threads a client one at a time ran 2,416 examples/s against 3,087 for 1). Each Ray
actor loads the work and builds the model once and keeps them.

A round is timed on the server, from `configure_train` to the end of `aggregate_train`: building the K train
messages, Flower sending them to the actors and collecting the replies, the clients' training and the
aggregation. Prints one JSON line per round: {"round": r, "seconds": s}, round 0 the first one (actors warm up);
--accuracy also evaluates the global model on all N examples after every round (outside the timed span) and
prints {"rounds_trained": r, "accuracy": a} (r = 0: the initial model).
"""

import argparse
import functools
import json
import os
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

BATCH, LR = 32, 0.05


class CNN2(nn.Module):
  """conv3×3·32 (SAME) → ReLU → avgpool 2 → conv3×3·64 (SAME) → ReLU → avgpool 2 → Dense 256 → ReLU → Dropout 0.2
  → Dense 10: the flax example CNN of `fedsnd_jax.models.CNN2`, written in PyTorch (channels first)."""

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


@functools.cache
def load_work(path: str):
  """(x [N, 1, 28, 28], y [N] int64, index [K, n]) as tensors, read once per process."""
  data = np.load(path)
  x = torch.from_numpy(np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2)))
  return x, torch.from_numpy(data["y"].astype(np.int64)), torch.from_numpy(data["index"].astype(np.int64))


@functools.cache
def actor_model(threads: int) -> CNN2:
  """The model this Ray actor trains every client on (its weights are replaced by each round's global model)."""
  torch.set_num_threads(threads)
  return CNN2()


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
  """One client's round: the global model → 1 shuffled epoch of batch 32, SGD lr 0.05 → its model and n."""
  config = msg.content["config"]
  x, y, index = load_work(str(config["npz"]))
  client = int(context.node_config["partition-id"])
  model = actor_model(int(config["threads"]))
  model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=LR)
  rows = index[client]
  order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(
      int(config["server-round"]) * len(index) + client))]
  for start in range(0, len(order), BATCH):
    batch = order[start:start + BATCH]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
    optimizer.step()
  metrics = MetricRecord({"num-examples": len(rows)})
  return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


class TimedFedAvg(FedAvg):
  """Flower's FedAvg, printing each round's seconds from `configure_train` to the end of `aggregate_train`."""

  def configure_train(self, server_round, arrays, config, grid):
    self.round_start = time.perf_counter()
    return super().configure_train(server_round, arrays, config, grid)

  def aggregate_train(self, server_round, replies):
    replies = list(replies)
    assert len(replies) == self.min_train_nodes and not any(r.has_error() for r in replies), "a client failed"
    out = super().aggregate_train(server_round, replies)
    print(json.dumps({"round": server_round - 1, "seconds": time.perf_counter() - self.round_start}), flush=True)
    return out


def accuracy_fn(path: str):
  """evaluate_fn for the strategy: the global model's accuracy on all N examples of the work."""
  def evaluate(server_round: int, arrays: ArrayRecord):
    x, y, _ = load_work(path)
    model = CNN2()
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
      correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    print(json.dumps({"rounds_trained": server_round, "accuracy": correct / len(y)}), flush=True)
    return MetricRecord({"accuracy": correct / len(y)})

  return evaluate


def main(path: str, rounds: int, client_cpus: int, accuracy: bool) -> None:
  num_clients = len(np.load(path)["index"])
  torch.manual_seed(0)
  initial = CNN2()
  assert sum(p.numel() for p in initial.parameters()) == 824_458, "not cnn2"
  server_app = ServerApp()

  @server_app.main()
  def server(grid: Grid, context: Context) -> None:
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
                           min_available_nodes=num_clients)
    strategy.start(grid, ArrayRecord(initial.state_dict()), num_rounds=rounds + 1,
                   train_config=ConfigRecord({"npz": os.path.abspath(path), "threads": client_cpus}),
                   evaluate_fn=accuracy_fn(path) if accuracy else None)

  # This module's `client_app` (imported by name, see below) pickles by reference, so the Ray actors import this
  # file (its folder is on the PYTHONPATH Flower gives them) and keep `load_work` and `actor_model` cached.
  run_simulation(server_app, client_app, num_supernodes=num_clients,
                 backend_config={"init_args": {"num_cpus": os.cpu_count()},
                                 "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}})


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("npz")
  parser.add_argument("rounds", type=int)
  parser.add_argument("--client_cpus", type=int, default=1, help="CPUs (and PyTorch threads) per client.")
  parser.add_argument("--accuracy", action="store_true", help="Print the global model's accuracy every round.")
  args = parser.parse_args()
  import peers_flower  # the same code as an importable module: what the Ray actors get must not live in __main__

  peers_flower.main(args.npz, args.rounds, min(args.client_cpus, os.cpu_count()), args.accuracy)
