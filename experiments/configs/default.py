"""Default experiment: FedAvg with the MLP on scikit-learn's bundled digits (offline), 20 non-IID clients.

Every field is documented here; the binaries turn them into builder arguments.
"""

import ml_collections

from fedsnd_jax import algorithms, mechanisms, settings


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # fedavg | fedsd (client self-distillation) | fednd (server noise-distillation) | fedsnd (both)
  # | fedprox | scaffold | moon | feddyn | fedntd | fednova (baselines) | fedgen | fedftg (data-free distillation
  # peers):
  # fedsnd_jax/algorithms/, one module each
  c.algorithm = "fedavg"
  # Data (fedsnd_jax/data.py; partitions: fedsnd_jax/partition.py).
  c.dataset = "digits"  # digits | idx:<dir> | npz:<file> | a TFDS name (mnist, fashion_mnist, cifar10, ...)
  c.data_dir = ""  # TFDS data_dir ("" = TFDS default)
  c.download = False  # let TFDS download (off: with no network a download hangs for minutes)
  c.partition = "dirichlet_label"  # iid | dirichlet_label | dirichlet_client | shards | quantity
  c.alpha = 0.1  # Dirichlet concentration; lower is more heterogeneous (conventions: fedsnd_jax/partition.py)
  c.min_size = 2  # least examples per client (dirichlet_label, quantity)
  c.shards_per_client = 2  # `shards` partition only
  c.num_clients = 20  # K
  c.train_examples = 0  # > 0: train on a fixed (seed-independent) random subset of this many examples
  c.validation_fraction = 0.0  # seeded share of the training set held out from clients (val_* metrics)
  c.clients_per_round = 20  # C ≤ K, sampled without replacement each round (the expected cohort under poisson)
  # fixed | poisson: every client in with probability C/K each round (rounds padded to a cap that overflows with
  # probability 1e-15; for algorithms without per-client state or server steps, without a robust rule or secure
  # aggregation; DP accounting amplified by Poisson sampling)
  c.client_sampling = "fixed"
  # Model.
  c.model = "mlp"  # mlp | cnn2 | simple_cnn | resnet8 | resnet18 | text_mean | text_conv
  c.dropout = 0.2
  # auto (XLA's convolution in the CPU loop's top-level steps, else im2col on CPU/GPU, XLA's on TPU) | xla | im2col
  c.conv_impl = "auto"
  c.batch_norm = False  # BatchNorm after each conv (cnn2, simple_cnn); needed for bn_prior
  # Local training: SGD with momentum and weight decay (NIID-Bench's client optimiser).
  c.local_epochs = 2
  c.local_steps = 0  # > 0: exactly this many local steps instead of epochs
  c.batch_size = 32
  c.client_lr = 0.05
  c.client_momentum = 0.9
  c.weight_decay = 1e-5
  # Server optimiser on the averaged update (FedOpt); sgd with lr 1 and momentum 0 is plain FedAvg.
  c.server_opt = "sgd"  # sgd | adam
  c.server_lr = 1.0
  c.server_momentum = 0.0
  # Mechanisms, one section each, every one off by default (fedsnd_jax/mechanisms.py: its registry and the rules
  # between them; each module's `Settings` documents its fields): dp.* client-level differential privacy
  # (fedsnd_jax/privacy.py; on when dp.clip_norm > 0), secagg.* secure aggregation, simulated
  # (fedsnd_jax/secure_aggregation.py; secagg.enabled), robust.* robust aggregation (fedsnd_jax/robust.py;
  # robust.rule other than mean), attack.* Byzantine clients (fedsnd_jax/attacks.py; attack.kind other than
  # none, with attack.fraction > 0), systems.* client speeds, bandwidths, availability, a round deadline and
  # FedBuff on a simulated clock (fedsnd_jax/systems.py; systems.enabled), compression.* compressed uploads with
  # optional error feedback (fedsnd_jax/compression.py; compression.kind other than none).
  for section, mechanism in mechanisms.sections().items():
    c[section] = ml_collections.ConfigDict(settings.as_dict(mechanism()))
  # Each algorithm's own hyperparameters, one section per algorithm (`--config.<section>.<field>=`), with
  # the defaults its module cites from the paper: fedprox.mu; moon.mu, moon.tau, moon.projection_dim,
  # moon.classifier_on_projection; feddyn.alpha; fedntd.beta, fedntd.tau; fedgen.*, fedftg.* (their modules'
  # `Hyperparameters`); fedsnd.* (FedSND's settings, shared by fedsd and fednd, nested by concern:
  # fedsnd.self_distillation.*, fedsnd.synthesis.*, fedsnd.distillation.*, fedsnd.schedule.*, fedsnd.consensus.*
  # and fedsnd.temperature; each part's `Settings` in fedsnd_jax/algorithms/fedsnd/<part>.py documents it).
  # FedAvg, SCAFFOLD and FedNova have none of their own.
  for section, hyperparameters in algorithms.sections().items():
    c[section] = ml_collections.ConfigDict(settings.as_dict(hyperparameters()))
  # Run.
  c.rounds = 30
  c.seed = 0
  c.eval_every = 1
  c.eval_batch_size = 500
  c.target_accuracy = 0.9  # rounds_to_target is the first evaluated round at or above this
  c.client_map = "auto"  # auto (loop on CPU, vmap elsewhere) | vmap | chunked | loop | sharded (all devices)
  c.chunk_size = 8  # clients per chunk for client_map=chunked
  c.checkpoint_every = 10  # rounds between checkpoints (the last round is always checkpointed)
  return c
