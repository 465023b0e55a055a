"""Client mapping strategies: how one client's function runs over the C clients of a round.

  vmap     all clients at once in one compiled program.
  chunked  vmap over chunks of `chunk_size` clients, chunks one after another (`lax.map`): memory is
           bounded by the chunk, not by C.
  loop     one jitted per-client function called in a Python loop (the FedJAX-style reference).

The algorithm code is the same for every strategy.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

CLIENT_MAPS = ("vmap", "chunked", "loop")


def map_clients(fn: Callable, strategy: str, chunk_size: int = 8) -> Callable:
  """Maps fn(*shared, *per_client) over a leading client axis of the per-client arguments.

  Args:
    fn: one client's function; returns a pytree.
    strategy: one of CLIENT_MAPS.
    chunk_size: clients per chunk for `chunked`.

  Returns:
    mapped(shared: tuple, per_client: tuple) -> fn's outputs stacked on a leading [C] axis. The
    result is jitted (per client for `loop`).
  """
  if strategy == "vmap":
    return jax.jit(lambda shared, per_client: jax.vmap(lambda *pc: fn(*shared, *pc))(*per_client))
  if strategy == "chunked":
    return jax.jit(lambda shared, per_client: _chunked(fn, shared, per_client, chunk_size))
  if strategy == "loop":
    one = jax.jit(lambda shared, per_client: fn(*shared, *per_client))

    def looped(shared, per_client):
      num = jax.tree.leaves(per_client)[0].shape[0]
      outs = [one(shared, jax.tree.map(lambda a, i=i: a[i], per_client)) for i in range(num)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return looped
  raise ValueError(f"unknown client_map {strategy!r}; allowed: {', '.join(CLIENT_MAPS)}")


def _chunked(fn, shared, per_client, chunk_size):
  num = jax.tree.leaves(per_client)[0].shape[0]
  chunk = min(chunk_size, num)
  padded = -(-num // chunk) * chunk

  def to_chunks(a):  # Pad by repeating client 0; its extra results are dropped below.
    a = jnp.concatenate([a, jnp.repeat(a[:1], padded - num, axis=0)]) if padded > num else a
    return a.reshape((padded // chunk, chunk, *a.shape[1:]))

  out = jax.lax.map(lambda pc: jax.vmap(lambda *c: fn(*shared, *c))(*pc),
                    jax.tree.map(to_chunks, per_client))
  return jax.tree.map(lambda a: a.reshape((padded, *a.shape[2:]))[:num], out)
