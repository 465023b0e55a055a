"""Real Fashion-MNIST from Debian's `dataset-fashion-mnist` package, with the 2-conv CNN.

Install the data once with `apt-get install -y dataset-fashion-mnist`.
"""

from experiments.configs import default

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def get_config():
  c = default.get_config()
  c.dataset = f"idx:{FASHION_MNIST_DIR}"
  c.model = "cnn2"
  c.num_clients = 10
  c.clients_per_round = 10
  c.alpha = 0.5
  c.local_epochs = 1
  c.client_lr = 0.01
  c.rounds = 20
  c.target_accuracy = 0.8
  c.checkpoint_every = 5
  return c
