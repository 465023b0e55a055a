"""Full Fashion-MNIST (60,000 training examples less a 10 % validation split) for the GPU checks.

10 clients all participating (the NIID-Bench protocol), 2-conv CNN, 2 local epochs of batch 32 at the
client lr chosen for FedAvg on the validation split of the reduced CPU protocol (0.03, `fmnist_cpu.py`), 20
rounds, FedSND's default server settings. Scaled down from the literature's 50 rounds × 10 epochs to fit the
time budget of benchmarks/gpu_checks.sh.
"""

from experiments.configs import fmnist


def get_config():
  c = fmnist.get_config()
  c.validation_fraction = 0.1
  c.num_clients = 10
  c.clients_per_round = 10
  c.local_epochs = 2
  c.client_lr = 0.03
  c.rounds = 20
  c.client_map = "vmap"
  c.checkpoint_every = 0
  return c
