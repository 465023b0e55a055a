"""A seconds-long run for tests: 3 clients on digits, 3 rounds of 2 local steps."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.num_clients = 3
  c.clients_per_round = 2
  c.rounds = 3
  c.local_steps = 2
  c.batch_size = 16
  c.checkpoint_every = 1
  c.target_accuracy = 0.3
  return c
