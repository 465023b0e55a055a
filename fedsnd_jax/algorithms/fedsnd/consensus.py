"""Noise consensus, FedSND's defence against Byzantine uploads (ours): every upload is scored by how often it
gives the other clients' noise its target label, and the outliers are left out as teachers, as owners of noise,
from the teacher agreement that opens the regime gate, and from the aggregate.
"""

from typing import NamedTuple

import jax.numpy as jnp

from fedsnd_jax.algorithms.fedsnd.pool import NoisePool, teacher_scores
from fedsnd_jax.errors import check_range


class Settings(NamedTuple):
  """Noise consensus (`fedsnd.consensus.*`).

  Attributes:
    enabled: score the uploads and leave out the outliers (below median − threshold·MAD, MAD ≥ 0.05), in every
      mode: with `distillation.target=global` (they are left out before aggregating), with the gate closed, and
      after `schedule.distill_rounds` (the server still synthesises noise to score the uploads, and only
      distils no more).
    threshold: that threshold, in robust standard deviations (1.4826·MAD).
  """

  enabled: bool = False
  threshold: float = 3.0


def validate(settings: Settings, section: str) -> None:
  check_range(settings, section, positive=("threshold",))


def flag(pool: NoisePool, threshold: float, present):
  """Each upload's agreement with the others' noise, and which uploads are trusted.

  score_t = mean over the samples k ≠ t made of [argmax σ(f(x̃; w_t)) = ỹ]; an upload is an outlier when
  score_t < median − threshold·1.4826·max(MAD, 0.05) (at most half of them fall below a median). Only the
  present uploads (`present` [C] bool: not dropped by a deadline) are scored, on the present others' noise,
  and count in the median and MAD; the others, and an upload alone with no present other to be scored on, are
  not judged: trusted here (the server leaves the dropped ones out anyway), score NaN.

  Returns:
    (trusted [C] bool, scores [C]).
  """
  judged = present & (jnp.sum(present) >= 2)  # another present upload's noise to be scored on
  scores = jnp.where(judged, teacher_scores(pool, present[pool.owners].astype(jnp.float32)), jnp.nan)
  median = jnp.nanmedian(scores)
  spread = 1.4826 * jnp.maximum(jnp.nanmedian(jnp.abs(scores - median)), 0.05)
  return ~judged | (scores >= median - threshold * spread), scores


def judge(pool: NoisePool, settings: Settings, order, ids, present):
  """The pool with `trusted` and `scores` set, the round's diagnostics, and the trusted mask in the round's
  order (None, and the pool as it is, when consensus is off).

  Args:
    order: [C] the permutation that put the pool in id order. ids: [C] the round's client ids.
    present: [C] bool, in the pool's order, the uploads a deadline did not drop (`flag`).
  """
  if not settings.enabled:
    return pool, {}, None
  trusted, scores = flag(pool, settings.threshold, present)
  pool = pool._replace(trusted=trusted, scores=scores)
  return pool, {"consensus_flagged": jnp.sum(~trusted), "consensus_scores": scores,
                "consensus_client_ids": ids[order], "consensus_trusted": trusted}, trusted[jnp.argsort(order)]
