"""SCAFFOLD: S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh, "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning", ICML 2020 (control update option II).

  client i:  y ← y − η·(g_i(y) − c_i + c)  for K_i local steps from y = w
             c_i⁺ = c_i − c + (w − y_i) / (K_i·η)
  server:    w ← the weighted mean of the y_i (global step size 1)
             c ← c + (|S| / N) · mean_{i∈S}(c_i⁺ − c_i)

The clients here may use heavy-ball momentum β (fresh buffer each round); then K_i·η, the distance K_i
plain steps move under a unit gradient, becomes the distance K_i momentum steps move:
η·[K_i − β(1 − β^{K_i})/(1 − β)]/(1 − β) (`client.local_displacement`), so c_i⁺ recovers the gradient either way.
K_i is each client's own count of (non-padding) steps.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsnd_jax import client, tree_math
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import AlgorithmSpec, Federation, RoundContext, RoundParts, ServerCarry, param_bytes
from fedsnd_jax.shapes import Params


class Hyperparameters(NamedTuple):
  """None: the global step size is the run's server optimiser (SGD at lr 1 is the paper's η_g = 1)."""


class ScaffoldState(NamedTuple):
  """c [P]: the server control variate; c_clients [K, P]: every client's control variate c_i."""

  c: Params
  c_clients: Params


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del hp, federation


def controlled_loss(model: Model) -> client.LossFn:
  """CE + ⟨w, c − c_i⟩: its gradient is SCAFFOLD's corrected g − c_i + c."""
  ce = client.supervised_loss(model)

  def loss_fn(params, x, y, rng, ctx):
    correction = jax.tree.map(lambda c, ci: jax.lax.stop_gradient(c - ci), ctx.shared, ctx.own)
    return ce(params, x, y, rng, ctx) + tree_math.dot(params, correction)

  return loss_fn


def control_update(c, c_own, received, uploaded, displacement):
  """Option II: c_i⁺ = c_i − c + (w − y_i) / displacement_i.

  Args:
    c: [P] server control. c_own: [C, P] the clients' controls. received: [P] w. uploaded: [C, P] y_i.
    displacement: [C] from `client.local_displacement`.

  Returns:
    [C, P] new client controls.
  """
  scale = 1.0 / displacement
  return jax.tree.map(
      lambda ci, cs, wg, wi: ci - cs[None] + (wg[None] - wi) * scale.reshape((-1,) + (1,) * (wi.ndim - 1)),
      c_own, c, received, uploaded)


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  del hp
  num_clients = federation.num_clients
  model_bytes = param_bytes(jax.eval_shape(model.init, jax.random.key(0)))

  def init_state(params):
    zeros = tree_math.zeros_like(params)
    return ScaffoldState(zeros, tree_math.stacked(zeros, num_clients))

  def client_inputs(state: ScaffoldState, ids):
    return state.c, tree_math.gather(state.c_clients, ids)

  def after_aggregation(context: RoundContext, carry: ServerCarry) -> ServerCarry:
    state = context.state
    displacement = client.local_displacement(context.steps, federation.client_lr, federation.client_momentum)
    new_ci = control_update(state.c, context.own, context.params, context.uploads.params, displacement)
    delta_c = jax.tree.map(lambda n, o: jnp.mean(n - o, axis=0), new_ci, context.own)
    frac = context.ids.shape[0] / num_clients
    new_c = jax.tree.map(lambda cs, d: cs + frac * d, state.c, delta_c)
    return carry._replace(state=ScaffoldState(new_c, tree_math.scatter(state.c_clients, context.ids, new_ci)))

  # Each sampled client receives c and uploads its control delta: one params-sized pytree each way.
  return RoundParts(controlled_loss(model), init_state, client_inputs, after_aggregation=after_aggregation,
                   extra_bytes=lambda round_index: (model_bytes, model_bytes))


# Each client also uploads its control variate c_i⁺ in the clear, and this server reads individual uploads: no DP
# mode or secure aggregation covers that as implemented.
SPEC = AlgorithmSpec(build, Hyperparameters, validate, "scaffold", privacy=lambda hp: ())
