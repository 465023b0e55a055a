"""Byzantine clients: a fixed, seeded set of clients whose uploads (or data) are malicious.

The Byzantine set is drawn once per seed (`byzantine_clients`). Model attacks replace the Byzantine uploads of a
round after local training, from what colluding attackers can see (the honest uploads of the round); with
x_k = w_k − w the updates, μ and σ the coordinate-wise mean and std of the honest ones, and s the scale:

  sign_flip   x_byz = −s·μ                     (the reversed honest direction; ByzFL's SignFlipping)
  gaussian    x_byz ~ N(0, s²·I)
  alie        x_byz = μ + z·σ, z = Φ⁻¹((C − q)/C), q = max(1, ⌊C/2 + 1⌋ − b) for b Byzantine uploads
              ("A Little Is Enough", Baruch, Baruch, Goldberg, NeurIPS 2019). The paper assumes fewer than half
              attackers in an aggregation; a sampled round can hold more (q ≤ 0 would make z infinite), so q is
              bounded below by 1, the paper's value at b = ⌊C/2⌋
  ipm         x_byz = −s·μ with a small s    (inner-product manipulation, Xie, Koyejo, Gupta, UAI 2020)
  label_flip  data poisoning: the Byzantine clients' labels y become NC − 1 − y, and they train honestly

sign_flip and ipm share a formula and differ in their default scale (1 and 0.1).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from fedsnd_jax import tree_math
from fedsnd_jax.errors import require
from fedsnd_jax.federated_data import FederatedData
from fedsnd_jax.rounds import AlgorithmInfo, Federation, MechanismParts, MechanismSpec
from fedsnd_jax.shapes import Params

ATTACKS = ("none", "sign_flip", "gaussian", "alie", "ipm", "label_flip")
MODEL_ATTACKS = ("sign_flip", "gaussian", "alie", "ipm")
DEFAULT_SCALE = {"sign_flip": 1.0, "gaussian": 1.0, "alie": 0.0, "ipm": 0.1, "label_flip": 0.0, "none": 0.0}


def byzantine_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
  """[K] bool: round(fraction·K) clients drawn without replacement from a seeded generator."""
  mask = np.zeros(num_clients, bool)
  count = int(round(fraction * num_clients))
  mask[np.random.default_rng([seed, 0xB12]).choice(num_clients, count, replace=False)] = True
  return mask


def flip_labels(data: FederatedData, byzantine: np.ndarray, num_classes: int) -> FederatedData:
  """The training data with the Byzantine clients' examples relabelled NC − 1 − y."""
  index, counts = np.asarray(data.index), np.asarray(data.counts)
  owned = np.concatenate([index[k, :counts[k]] for k in np.flatnonzero(byzantine)] + [np.zeros(0, np.int64)])
  y = np.asarray(data.y).copy()
  y[owned] = num_classes - 1 - y[owned]
  return data._replace(y=jnp.asarray(y))


def model_attack(name: str, byzantine: np.ndarray, scale: float):
  """corrupt(models [C, P], ids [C], reference [P], key) -> models with the Byzantine uploads replaced."""
  flags = jnp.asarray(byzantine)

  def corrupt(models: Params, ids, reference: Params, key):
    bad = flags[ids]  # [C]
    honest = (~bad).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(honest), 1.0)
    updates = tree_math.updates(models, reference)
    mean = jax.tree.map(lambda x: jnp.tensordot(honest, x, axes=1) / count, updates)
    if name in ("sign_flip", "ipm"):
      malicious = jax.tree.map(lambda mu: -scale * mu, mean)
    elif name == "gaussian":
      malicious = tree_math.normal_like(key, mean, scale)
    elif name == "alie":
      num = bad.shape[0]
      q = jnp.maximum(math.floor(num / 2 + 1) - jnp.sum(bad), 1)
      z = ndtri((num - q) / num)
      std = jax.tree.map(lambda x, mu: jnp.sqrt(jnp.tensordot(honest, (x - mu[None]) ** 2, axes=1) / count),
                         updates, mean)
      malicious = jax.tree.map(lambda mu, s: mu + z * s, mean, std)
    else:
      raise ValueError(f"unknown model attack {name!r}; allowed: {', '.join(MODEL_ATTACKS)}")
    return jax.tree.map(lambda m, r, x: jnp.where(bad.reshape((-1,) + (1,) * (m.ndim - 1)), r[None] + x[None], m),
                        models, reference, malicious)

  return corrupt


class Settings(NamedTuple):
  """Byzantine clients, config section `attack` (off while kind is none).

  Attributes:
    kind: none | sign_flip | gaussian | alie | ipm | label_flip (module docstring).
    fraction: the share of the K clients (fixed per seed) that attack; < 0.5.
    scale: s of sign_flip, gaussian and ipm; 0 = the attack's default (1, 1, 0.1).
  """

  kind: str = "none"
  fraction: float = 0.0
  scale: float = 0.0


def enabled(s: Settings) -> bool:
  return s.kind != "none"


def validate(s: Settings, federation: Federation, algorithm: AlgorithmInfo) -> None:
  """Raises InputError naming `attack.<field>`."""
  del federation, algorithm
  require(s.kind in ATTACKS, "attack.kind", f"unknown attack {s.kind!r}; allowed: {', '.join(ATTACKS)}")
  require(0 <= s.fraction < 0.5, "attack.fraction", f"must be in [0, 0.5), got {s.fraction}")
  require(s.scale >= 0, "attack.scale", f"must be ≥ 0, got {s.scale}")
  require(enabled(s) == (s.fraction > 0), "attack.kind",
          f"attack.kind={s.kind!r} with attack.fraction={s.fraction}: set both or neither")


def build(s: Settings, federation: Federation, seed: int) -> MechanismParts:
  """The seed's Byzantine clients: label_flip poisons their data, the model attacks replace their uploads."""
  byzantine = byzantine_clients(federation.num_clients, s.fraction, seed)
  if s.kind == "label_flip":
    return MechanismParts(data_transform=lambda data: flip_labels(data, byzantine, federation.num_classes))
  return MechanismParts(attack=model_attack(s.kind, byzantine, s.scale or DEFAULT_SCALE[s.kind]))


SPEC = MechanismSpec("attack", Settings, enabled, validate, build)
