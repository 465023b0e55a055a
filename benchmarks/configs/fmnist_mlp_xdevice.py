"""The leaderboard's cross-device protocol: 100 clients, 10 sampled per round, real Fashion-MNIST, the MLP.

As `fmnist_mlp.py` (the MLP, 2 local epochs of batch 32 at lr 0.05 before tuning, 32 pseudo-samples per
uploaded model at FedSND's server), with a 10,000-example training subset less 10 % validation (~90 examples
per client) and 300 rounds of 10 clients: with a tenth of the clients in a round and ~6 local steps each, the
curves are still rising by 1-3 points per 30 rounds at round 150, so the run is twice that.
"""

from benchmarks.configs import fmnist_mlp


def get_config():
  c = fmnist_mlp.get_config()
  c.train_examples = 10000
  c.num_clients = 100
  c.clients_per_round = 10
  c.rounds = 300
  return c
