"""Arithmetic on params pytrees (and on stacked ones, [C, P]), and per-client state stacked [K, P] gathered and
scattered by client id."""

import jax
import jax.numpy as jnp


def dot(a, b):
  """⟨a, b⟩ summed over every leaf."""
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def sq_dist(a, b):
  """‖a − b‖² summed over every leaf."""
  return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def zeros_like(params):
  return jax.tree.map(jnp.zeros_like, params)


def stacked(params, num: int):
  """[num, P]: `num` copies of params [P]."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num, *a.shape)).copy(), params)


def stack(trees):
  """[N, P]: a list of N pytrees of one structure, stacked leaf by leaf."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def gather(stacked_tree, ids):
  """[C, P]: the rows `ids` [C] of a [K, P] pytree."""
  return jax.tree.map(lambda a: a[ids], stacked_tree)


def scatter(stacked_tree, ids, values):
  """The [K, P] pytree with rows `ids` [C] replaced by `values` [C, P]."""
  return jax.tree.map(lambda a, v: a.at[ids].set(v.astype(a.dtype)), stacked_tree, values)


def updates(stacked, reference):
  """[C, P]: every client's pytree minus the reference [P] (its update)."""
  return jax.tree.map(lambda m, r: m - r[None], stacked, reference)


def norms(stacked):
  """[C] L2 norm of every client's whole pytree ([C, P] leaves)."""
  return jnp.sqrt(sum(jnp.sum(x.reshape(x.shape[0], -1).astype(jnp.float32) ** 2, axis=1)
                      for x in jax.tree.leaves(stacked)))


def normal_like(key, tree, stddev):
  """Independent N(0, stddev²) of every leaf's shape and dtype."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [(stddev * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                                      for k, x in zip(keys, leaves, strict=True)])
