"""The reduced cross-device Fashion-MNIST protocol: 100 clients, 10 sampled per round, on 2 CPU cores.

Real Fashion-MNIST (`idx:` source), 2-conv CNN, a fixed 10,000-example training subset less 10 % validation
(~90 examples per client), dirichlet_label, 20 rounds of 10 clients. Client settings are the 10-client
protocol's (`fmnist_cpu.py`: 2 local epochs of batch 32 at lr 0.03, chosen for FedAvg on that protocol's
validation split), not re-tuned here. FedSND's server budget is that protocol's too: 32
pseudo-samples per uploaded model and the library's synthesis and distillation steps, so its server cost per
round is the same in both settings.
"""

from benchmarks.configs import fmnist_cpu


def get_config():
  c = fmnist_cpu.get_config()
  c.train_examples = 10000
  c.num_clients = 100
  c.clients_per_round = 10
  c.rounds = 20
  return c
