"""When FedSND's server distils and how much work each round's server does: the first rounds only
(`distill_rounds`), the regime gate on the teachers' agreement, and the regime-aware server budget (both ours).

The teacher agreement (`pool.agreement`) is what the server sees, without data, of how much the uploads still
know that the others do not.
"""

from typing import NamedTuple

import jax.numpy as jnp

from fedsnd_jax.algorithms.fedsnd import distillation
from fedsnd_jax.errors import check_range
from fedsnd_jax.rounds import Federation


class Settings(NamedTuple):
  """The server's schedule (`fedsnd.schedule.*`).

  Attributes:
    distill_rounds: distil only in the first R_d rounds (0 = every round).
    distill_agreement: the regime gate: distil in a round only while the teachers agree on less than this share
      of each other's noise (`teacher_agreement`; 1 = every round). Each round's decision is logged as
      `distill_gate`.
    gate_partial_participation: apply that gate also when fewer clients take part in a round than the
      federation has (default on). Off, cross-device runs distil every round (the `always_distil` candidate of
      `python -m benchmarks.tuning --defaults` measures the difference).
    full_server_below: the regime-aware server budget: the first round, and every round after one whose
      teacher agreement was below this, run the full server — synthesis from a Gaussian start for
      `full_noise_steps` steps and `full_distill_steps` distillation steps — and the others the cheap one (the
      warm start, `synthesis.steps`, `distillation.steps`); 0 = never. Low agreement is the regime where each
      upload knows what the others do not (near-single-class clients) and fitted noise pays; the decision is
      logged as `full_server`.
    recheck_every: while the gate is closed, synthesise noise (to measure the teachers' agreement again) only
      every this many rounds, and only aggregate in between: the server's work of a closed round is skipped
      (0 = synthesise every round). Under noise consensus the rounds between still synthesise, to score the
      uploads, but do not distil.
  """

  distill_rounds: int = 0
  distill_agreement: float = 0.85
  gate_partial_participation: bool = True
  full_server_below: float = 0.0
  full_noise_steps: int = 50
  full_distill_steps: int = 10
  recheck_every: int = 10


def validate(settings: Settings, section: str) -> None:
  check_range(settings, section, positive=("distill_agreement",),
              non_negative=("distill_rounds", "full_server_below", "full_noise_steps", "full_distill_steps",
                            "recheck_every"))


def budgeted(settings: Settings) -> bool:
  """Whether the regime-aware server budget is on (the server then remembers the last agreement)."""
  return settings.full_server_below > 0


def distills_in(settings: Settings, round_index: int) -> bool:
  return settings.distill_rounds == 0 or round_index < settings.distill_rounds


def rechecks_in(settings: Settings, round_index, gate_open):
  """Whether a round measures the gate under `recheck_every` (> 0), given the last measuring round's gate: host
  bools, numpy arrays (one per vectorised run) or traced ones alike."""
  return gate_open | (round_index % settings.recheck_every == 0)


def gate_threshold(settings: Settings, federation: Federation) -> float:
  """The agreement below which a round distils (∞ under partial participation with the gate off there)."""
  partial = federation.clients_per_round < federation.num_clients
  return settings.distill_agreement if settings.gate_partial_participation or not partial else float("inf")


def full_server(settings: Settings, last_agreement):
  """Whether this round runs the full server (bool []), from the last distilling round's teacher agreement."""
  return last_agreement < settings.full_server_below if budgeted(settings) else jnp.bool_(False)


def synthesis_steps(settings: Settings, steps: int, full):
  """This round's synthesis steps: `full_noise_steps` in a full-server round, else `steps`."""
  return jnp.where(full, settings.full_noise_steps, steps) if budgeted(settings) else steps


def plan(settings: Settings, distill: distillation.Settings, threshold: float, round_index, agreement, full):
  """This round's distillation, and the gate's decision (float32 [], 1 open, 0 closed).

  Args:
    threshold: `gate_threshold`. round_index: int32 [] the round. agreement: [] this round's teacher agreement.
    full: bool [] whether this round runs the full server (`full_server`).
  """
  gate = (agreement < threshold).astype(jnp.float32)
  scale = gate * jnp.float32(distill.lr_decay) ** round_index.astype(jnp.float32)
  if not budgeted(settings):
    return distillation.Plan(scale, None, distill.steps), gate
  steps = jnp.where(full, settings.full_distill_steps, distill.steps)
  return distillation.Plan(scale, steps, max(distill.steps, settings.full_distill_steps)), gate

