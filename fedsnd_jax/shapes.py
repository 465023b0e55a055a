"""Glossary of the shape letters used in docstrings across the library.

  N    training examples (the whole training set, on the device once)
  K    clients in the federation (num_clients)
  C    clients in the current round (clients_per_round); every per-client pytree has leading axis C
  S    local steps per client in a round
  B    examples per batch
  n    padded examples per client (n_max: the largest client's size)
  L    tokens per text example
  ch   input channels; d features
  NC   classes (num_classes)
  P    any parameter shape
"""
