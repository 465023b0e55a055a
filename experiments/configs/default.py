"""Default experiment: FedAvg with the MLP on scikit-learn's bundled digits (offline), 20 non-IID clients.

Every field is documented here; the binaries turn them into builder arguments.
"""

import ml_collections

from fedsnd_jax import algorithms


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # fedavg | fedsd (client self-distillation) | fednd (server noise-distillation) | fedsnd (both)
  # | fedprox | scaffold | moon | feddyn | fedntd (baselines) | fedgen | fedftg (data-free distillation peers):
  # fedsnd_jax/algorithms/, one module each
  c.algorithm = "fedavg"
  # Data (DESIGN §4).
  c.dataset = "digits"  # digits | idx:<dir> | npz:<file> | a TFDS name (mnist, fashion_mnist, cifar10, ...)
  c.data_dir = ""  # TFDS data_dir ("" = TFDS default)
  c.download = False  # let TFDS download (off: with no network a download hangs for minutes)
  c.partition = "dirichlet_label"  # iid | dirichlet_label | dirichlet_client | shards | quantity
  c.alpha = 0.1  # Dirichlet concentration; lower is more heterogeneous (conventions differ, DESIGN §4)
  c.min_size = 2  # least examples per client (dirichlet_label, quantity)
  c.shards_per_client = 2  # `shards` partition only
  c.num_clients = 20  # K
  c.train_examples = 0  # > 0: train on a fixed (seed-independent) random subset of this many examples
  c.validation_fraction = 0.0  # seeded share of the training set held out from clients (val_* metrics)
  c.clients_per_round = 20  # C ≤ K, sampled without replacement each round (the expected cohort under poisson)
  # fixed | poisson: every client in with probability C/K each round (rounds padded to a cap that overflows with
  # probability 1e-9; for algorithms without per-client state or server steps, aggregator mean; DP accounting
  # amplified by Poisson sampling)
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
  # Client-level differential privacy (fedsnd_jax/privacy.py; accounted with dp-accounting, ε at dp_delta in
  # every metrics record and in summary.json). Central DP by default: the server clips every model update to
  # dp_clip_norm, sums, adds N(0, (dp_noise_multiplier·dp_clip_norm)²) and divides by clients_per_round.
  c.dp_clip_norm = 0.0  # S, the L2 clip of a client's whole update; 0 = no differential privacy
  c.dp_noise_multiplier = 1.0  # σ: the noise std in units of S
  c.dp_adaptive_clip = False  # adapt S to the dp_target_quantile of update norms (Andrew et al., NeurIPS 2021)
  c.dp_target_quantile = 0.5  # γ: the share of updates S should leave unclipped
  c.dp_clip_count_stddev = 0.0  # σ_b, noise on the unclipped count; 0 = clients_per_round / 20 (the paper's)
  c.dp_clip_learning_rate = 0.2  # η of the geometric update S ← S·exp(−η(b̄ − γ)) (the paper's)
  c.dp_delta = 1e-5
  c.dp_accountant = "rdp"  # rdp | pld (dp-accounting's; PLD, tighter, needs client_sampling=poisson or dp_local)
  c.dp_target_epsilon = 0.0  # > 0: stop before a round would spend more (exit 0, summary.json says so)
  c.dp_local = False  # local DP: every client clips and noises its own update (no trusted server)
  # Secure aggregation, simulated (fedsnd_jax/secure_aggregation.py, Bonawitz et al. 2017): the server learns
  # only the sum of the surviving clients' quantised updates.
  c.secure_aggregation = False
  c.secagg_bits = 16  # b: bits per quantised coordinate (clients_per_round·(2^b − 1) < 2^32)
  c.secagg_range = 0.1  # r: update coordinates are clipped to [−r, r] before quantisation
  c.secagg_dropout = 0.0  # share of each round's clients that drop after masking (≤ C − (⌊C/2⌋ + 1) of C)
  # Robust aggregation and Byzantine clients (fedsnd_jax/robust.py, fedsnd_jax/attacks.py).
  c.aggregator = "mean"  # mean (example-weighted) | median | trimmed_mean | krum | multi_krum | geometric_median
  #                        | centered_clipping
  c.aggregator_f = 1  # f: Byzantine uploads per round the robust rule is built to tolerate
  c.aggregator_tau = 1.0  # centered_clipping's τ (L2 norm of an update)
  c.nearest_neighbor_mixing = False  # NNM pre-aggregation before the robust rule (Allouah et al., 2023)
  c.byzantine_fraction = 0.0  # share of the K clients (fixed per seed) that attack; < 0.5
  c.attack = "none"  # none | sign_flip | gaussian | alie | ipm | label_flip
  c.attack_scale = 0.0  # s of sign_flip, gaussian, ipm; 0 = the attack's default (1, 1, 0.1)
  # Each algorithm's own hyperparameters, one section per algorithm (`--config.<section>.<field>=`), with
  # the defaults its module cites from the paper: fedprox.mu; moon.mu, moon.tau, moon.projection_dim,
  # moon.classifier_on_projection; feddyn.alpha; fedntd.beta, fedntd.tau; fedgen.*, fedftg.* (their modules'
  # `Hyperparameters`); fedsnd.* (FedSND's client and
  # server settings, shared by fedsd and fednd: fedsnd_jax/algorithms/fedsnd/round.py, `Hyperparameters`).
  # FedAvg and SCAFFOLD have none of their own.
  for section, hyperparameters in algorithms.sections().items():
    c[section] = ml_collections.ConfigDict(hyperparameters()._asdict())
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
