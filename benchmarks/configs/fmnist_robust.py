"""Fashion-MNIST for the attack × aggregator grid (benchmarks/robustness.py), ~10 s per FedAvg cell on 2 CPU cores.

Real Fashion-MNIST (Debian's dataset-fashion-mnist), the 2-hidden-layer MLP (199k parameters), a fixed
10,000-example training subset over 20 clients all participating (so robust rules see every upload each round,
as Krum's and the median's guarantees assume), 20 rounds of 1 local epoch (batch 32, lr 0.05), the full
10,000-image test set. FedSND's server: 32 pseudo-samples per model, 50 synthesis steps from Gaussian noise, 10
distillation steps (`benchmarks.tuning.FULL_SERVER`). Scaled down to fit: the MLP instead of the CNN, and a
training subset instead of the full training set.
"""

from experiments.configs import fmnist


def get_config():
  c = fmnist.get_config()
  c.model = "mlp"
  c.train_examples = 10000
  c.num_clients = 20
  c.clients_per_round = 20
  c.rounds = 20
  c.local_epochs = 1
  c.batch_size = 32
  c.client_lr = 0.05
  c.client_map = "loop"
  c.fedsnd.synthesis.samples = 32
  c.fedsnd.synthesis.steps = 50
  c.fedsnd.distillation.steps = 10
  c.fedsnd.synthesis.warm_start = "none"  # from Gaussian noise, not the library's warm start
  c.checkpoint_every = 0
  c.target_accuracy = 0.8
  return c
