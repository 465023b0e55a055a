"""Shared type aliases and the glossary of shape letters used in docstrings across the library.

  N    training examples (the whole training set, on the device once)
  K    clients in the federation (num_clients)
  C    clients in the current round (clients_per_round); every per-client pytree has leading axis C
  S    local steps per client in a round
  B    examples per batch
  n    padded examples per client (n_max: the largest client's size)
  L    tokens per text example
  ch   input channels; d features
  NC   classes (num_classes)
  Q    FedSND pseudo-samples (noise) per uploaded model; the round's noise pool holds C·Q of them
  D    FedSND distillation steps; Bd their batch size
  E    batches of a held-out (evaluation) set
  P    any parameter shape ([C, P] is a stacked params pytree)
"""

from typing import Any

import jax

Params = Any  # a params pytree, [P] leaves (stacked: [C, P] or [K, P])
PyTree = Any
PRNGKey = jax.Array  # a typed key (jax.random.key)
Diagnostics = dict[str, jax.Array]  # scalars a round reports, keyed by their metrics.jsonl name
