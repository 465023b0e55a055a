r"""ε at δ for the DP mechanisms of `fedsnd_jax.privacy`, across accountants and neighbouring relations.

  python -m benchmarks.privacy_accounting [--delta=1e-5]

No training: every cell is `privacy.Accountant(...).epsilon(rounds)`. Central DP under fixed-size sampling (RDP,
replace-one), under Poisson sampling (RDP and PLD, add-or-remove, the cohort cap's overflow charged as
(1 + e^ε)·rounds·p to δ, p printed), and local DP (replace-one, no amplification: RDP and PLD). Prints one
Markdown table, and for each Poisson row the check δ_M(ε) + (1 + e^ε)·T·p ≤ δ against a fresh dp-accounting
accountant; the table also rewrites its block of benchmarks/RESULTS.md (`--results`, `--block`).
"""

import math
import time

import dp_accounting
from absl import app, flags, logging

from benchmarks import results
from fedsnd_jax import privacy

_DELTA = flags.DEFINE_float("delta", 1e-5, "δ of every guarantee.")
results.define_flags("privacy-accounting")

# (K, C, σ, rounds): the reduced cross-device protocol, longer runs, and the private benchmark (fmnist_dp.py).
CASES = ((100, 10, 1.0, 20), (100, 10, 2.0, 100), (1_000, 100, 1.0, 100), (10_000, 100, 1.0, 1_000),
         (3_000, 600, 1.0, 30))


def _poisson_total(k: int, c: int, sigma: float, rounds: int, epsilon: float) -> float:
  """δ_M(ε) + (1 + e^ε)·T·p from a fresh PLD accountant (the bound the reported ε must keep within δ)."""
  reference = dp_accounting.pld.PLDAccountant(neighboring_relation=privacy.relation("poisson", False))
  reference.compose(dp_accounting.PoissonSampledDpEvent(c / k, dp_accounting.GaussianDpEvent(sigma)), rounds)
  overflow = privacy.overflow_chance(k, c, "poisson")
  return reference.get_delta(epsilon) + (1 + math.exp(epsilon)) * rounds * overflow


def _holds(total: float, delta: float) -> str:
  return f"δ − {delta - total:.1e}" if total <= delta else f"**{total:.3e} > δ**"


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  start = time.perf_counter()
  delta = _DELTA.value
  lines = [f"ε at δ = {delta:g}.\n",
           "| K | C | σ | rounds | central, fixed-size, RDP (replace-one) | central, Poisson, RDP (add/remove) | "
           "central, Poisson, PLD (add/remove) | p (cap overflow per round) | PLD row: δ_M(ε) + (1 + e^ε)·T·p | "
           "local, RDP (replace-one) | local, PLD (replace-one) |", "|---" * 11 + "|"]
  for k, c, sigma, rounds in CASES:
    eps = lambda k=k, c=c, sigma=sigma, rounds=rounds, **kw: privacy.Accountant(k, c, sigma, delta, **kw).epsilon(
        rounds)
    pld = eps(sampling="poisson", kind="pld")
    central = " | ".join(f"{e:.3f}" for e in (eps(), eps(sampling="poisson"), pld))
    local = " | ".join(f"{e:.2f}" for e in (eps(local=True), eps(local=True, kind="pld")))
    check = _holds(_poisson_total(k, c, sigma, rounds, pld), delta)
    lines.append(f"| {k:,} | {c} | {sigma:g} | {rounds:,} | {central} | "
                 f"{privacy.overflow_chance(k, c, 'poisson'):.1e} | {check} | {local} |")
  text = "\n".join(lines)
  print(text + f"\n\nwall time {time.perf_counter() - start:.1f} s", flush=True)
  results.publish(flags.FLAGS.results, flags.FLAGS.block, text, "Privacy accounting")


if __name__ == "__main__":
  app.run(main)
