"""Fashion-MNIST where client-level DP can train on 2 CPU cores: many small clients a round, a small model.

Client-level DP adds noise of norm ≈ σ·S·√P / C to the averaged update (P parameters, C clients a round), so the
reduced protocols' 10 clients a round and 824k-parameter CNN drown in it. Here: the full 60,000-image
training set over 3,000 clients (20 images each on average, dirichlet_label α from the command line; with
min_size 2 at α = 0.5 the partition allows no more clients), Poisson sampling at q = 0.2 (600 a round, PLD
accounting), the 2-hidden-layer MLP (199k parameters), 30 rounds of one local epoch (batch 10, lr 0.1), clients
vmapped in chunks of 100. Noise norm at σ = 1: √199,210 / 600 ≈ 0.74 of S per round.
"""

from experiments.configs import fmnist


def get_config():
  c = fmnist.get_config()
  c.model = "mlp"
  c.num_clients = 3000
  c.clients_per_round = 600
  c.client_sampling = "poisson"
  c.dp.accountant = "pld"
  c.rounds = 30
  c.local_epochs = 1
  c.batch_size = 10
  c.client_lr = 0.1
  c.client_map = "chunked"
  c.chunk_size = 100
  c.checkpoint_every = 0
  c.target_accuracy = 0.7
  return c
