"""Client mapping strategies: how one client's function runs over the C clients of a round.

  vmap     all clients at once in one compiled program.
  chunked  vmap over chunks of `chunk_size` clients, chunks one after another (`lax.map`): memory is
           bounded by the chunk, not by C.
  loop     per client, FedJAX-style. As the round's client phase, driven from the host (`host_loop`): each
           local step is its own jitted call, and on CPU one client per core trains at once; inside a traced
           program (vectorised runs): one jitted per-client function called in a Python loop.
  sharded  vmap with the client axis sharded over the `clients` axis of a device mesh (all devices of all
           processes); shared arguments are replicated. C is padded to a multiple of the device count. Over
           several processes the clients' results are gathered to every device and each process goes on with
           its own copy, so the server phase runs alike in every process (on data every process holds whole).

The algorithm code is the same for every strategy.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from fedsnd_jax import tree_math

CLIENT_MAPS = ("vmap", "chunked", "loop", "sharded")
MESH_AXIS = "clients"


def default_client_map(backend: str) -> str:
  """`loop` on CPU, `vmap` elsewhere.

  Measured on 2 CPU cores (the round driver's client phase, 20 clients × 10 SGD steps of batch 32 on
  Fashion-MNIST, conv_impl=auto): cnn2 loop 4,541 examples/s (host-stepped, two threads), vmap 2,633 (0.58×);
  the MLP loop 81k, vmap 92k (1.13×, within a few ms a round). With the loop's local steps scanned on device (as
  in vectorised runs) instead, cnn2 at 100 clients (benchmarks/throughput.py's setting): loop 2,781, chunked(10)
  2,293, vmap 2,110. On an H100 at 100 clients vmap ran cnn2 (im2col) 3.3–4.5× and the MLP 53× faster than the
  (scanned) loop, cnn2 at 0.98× of one model's step at batch 3,200.
  """
  return "loop" if backend == "cpu" else "vmap"


def client_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh named `clients` over every device (jax ≥ 0.10 needs explicit Auto axis types)."""
  return jax.make_mesh((jax.device_count(),), (MESH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


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
      return tree_math.stack(outs)

    return looped
  if strategy == "sharded":
    return _sharded(fn, client_mesh())
  raise ValueError(f"unknown client_map {strategy!r}; allowed: {', '.join(CLIENT_MAPS)}")


def _pad_clients(a, padded: int):
  """Pads the leading client axis to `padded` by repeating client 0 (its extra results are dropped)."""
  num = a.shape[0]
  return jnp.concatenate([a, jnp.repeat(a[:1], padded - num, axis=0)]) if padded > num else a


def _global(a, sharding: NamedSharding) -> jax.Array:
  """A global array over `sharding`'s mesh from `a`, the whole array, which every process holds alike (each
  process contributes the shards of its own devices: `device_put` cannot reach other processes' devices)."""
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def _sharded(fn, mesh):
  clients = NamedSharding(mesh, PartitionSpec(MESH_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  devices = mesh.devices.size
  # One process keeps the results split by client (no gather); several gather them to every process.
  alone = jax.process_count() == 1

  @jax.jit
  def run(shared, per_client):
    out = jax.vmap(lambda *pc: fn(*shared, *pc))(*per_client)
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, clients if alone else replicated), out)

  def mapped(shared, per_client):
    num = jax.tree.leaves(per_client)[0].shape[0]
    padded = -(-num // devices) * devices
    per_client = jax.tree.map(lambda a: _global(_pad_clients(a, padded), clients), per_client)
    out = run(jax.tree.map(lambda a: _global(a, replicated), shared), per_client)
    # Several processes: this process's copy, so the server phase runs on local arrays, alike in every process.
    return jax.tree.map(lambda a: (a if alone else a.addressable_data(0))[:num], out)

  return mapped


def _chunked(fn, shared, per_client, chunk_size):
  num = jax.tree.leaves(per_client)[0].shape[0]
  chunk = min(chunk_size, num)
  padded = -(-num // chunk) * chunk

  def to_chunks(a):
    return _pad_clients(a, padded).reshape((padded // chunk, chunk, *a.shape[1:]))

  out = jax.lax.map(lambda pc: jax.vmap(lambda *c: fn(*shared, *c))(*pc),
                    jax.tree.map(to_chunks, per_client))
  return jax.tree.map(lambda a: a.reshape((padded, *a.shape[2:]))[:num], out)
