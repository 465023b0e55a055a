"""FedSND: F. Zheng et al., "Federated Learning on Non-iid Data via Local and Global Distillation",
arXiv 2306.14443, 2023 (the abstract calls it FedND), as this project reads it (docs/design.md).

  client k (self-distillation, `self_distillation.py`):
    L = ½[CE(z₁, y) + CE(z₂, y)] + λ_m·T²·½[KL(σ(z₁/T) ‖ σ(z₂/T)) + KL(σ(z₂/T) ‖ σ(z₁/T))]
        + λ_p·T²·KL(σ(f(x; w⁰)/T) ‖ σ(z₁/T)),   z_i = f(x; w, ξ_i) two dropout views, w⁰ the received model
  server, per uploaded w_k (noise synthesis, `synthesis.py`):
    x̃_k = argmin_x mean CE(f(x; w_k), ỹ) + β·mean‖x‖²   (G Adam steps from Gaussian noise),
    p_k = σ(f(x̃_k; w_k)/T)
  server, per uploaded w_j (cross-client distillation, `distillation.py`):
    w_j' = D Adam steps on T²·KL(p_k ‖ σ(f(x̃; w_j)/T)) over the noise of clients k ≠ j
  aggregation: w ← Σ_j (n_j / Σ_i n_i)·w_j'   (`round.py` puts the steps together)

FedSD (client side only) and FedND (server side only) are its ablations; all three share the config section
`fedsnd`, nested by concern: `fedsnd.self_distillation.*`, `fedsnd.synthesis.*`, `fedsnd.distillation.*`,
`fedsnd.schedule.*` (which rounds distil, the server's budget: `schedule.py`), `fedsnd.consensus.*` (noise
consensus: `consensus.py`) and `fedsnd.temperature`.
"""

import functools

from fedsnd_jax.algorithms.fedsnd.round import MOVED, Hyperparameters, ServerMemory, build, validate
from fedsnd_jax.rounds import AlgorithmSpec

__all__ = ["FEDND", "FEDSD", "FEDSND", "Hyperparameters", "ServerMemory"]


def server_privacy(hp: Hyperparameters) -> tuple[str, ...]:
  """The server distils between individual models, so one client's update reaches every distilled model and
  central DP's clipping no longer bounds its influence on the aggregate, and secure aggregation (the server
  sees only a sum) cannot run it at all: only local DP (noised uploads, the server's work post-processing)
  covers it, and not when clients also upload label histograms."""
  return () if hp.uploads_histograms else ("local",)


# A deadline may drop or cut FedSND's clients: its server leaves a dropped client out as teacher, owner of noise
# and from the aggregate (`round.Server.synthesise`), and distils partial work like any upload. Under FedBuff
# its server distils a buffer's stale uploads, rebased onto the global model (`buffered`).
SYSTEMS = {"partial_work": True, "asynchronous": True}
FEDSND = AlgorithmSpec(build, Hyperparameters, validate, "fedsnd", privacy=server_privacy, moved=MOVED, **SYSTEMS)
FEDSD = AlgorithmSpec(functools.partial(build, server_side=False), Hyperparameters,
                      functools.partial(validate, server_side=False), "fedsnd", moved=MOVED, **SYSTEMS)
FEDND = AlgorithmSpec(functools.partial(build, client_side=False), Hyperparameters, validate, "fedsnd",
                      privacy=server_privacy, moved=MOVED, **SYSTEMS)
