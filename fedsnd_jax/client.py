"""Client local training as a pure function: `lax.scan` over on-device batches (DESIGN §3)."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import losses
from fedsnd_jax.data import normalize
from fedsnd_jax.federated_data import FederatedData, client_batches
from fedsnd_jax.shapes import Params


class ClientContext(NamedTuple):
  """What a client's local loss may look at besides its batch.

  Attributes:
    received: the round's global params (also the client's starting point).
    shared: algorithm-wide extras sent to every client (SCAFFOLD's server control), or None.
    own: this client's persistent state (SCAFFOLD's control, MOON's previous model, FedDyn's
      gradient state), or None.
  """

  received: Params
  shared: Any = None
  own: Any = None


# loss_fn(params, x [B, ...], y [B], rng, context: ClientContext) -> per-example loss [B].
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array, ClientContext], jax.Array]


class ClientOutput(NamedTuple):
  """One client's upload (stacked with a leading C axis once mapped over clients).

  Attributes:
    params: the locally trained params.
    num_examples: int32 n_k, the client's example count (the aggregation weight).
    loss: float32 mean training loss over the round's valid examples.
  """

  params: Params
  num_examples: jax.Array
  loss: jax.Array


def client_optimizer(lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
  """SGD with (optional) momentum and L2 weight decay added to the gradient, as in NIID-Bench."""
  sgd = optax.sgd(lr, momentum=momentum or None)
  return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


def supervised_loss(model) -> LossFn:
  """FedAvg's local loss: CE(f(x; w, ξ), y) with dropout ξ drawn from `rng`."""

  def loss_fn(params, x, y, rng, context):
    del context
    return losses.cross_entropy(model.apply(params, x, train=True, rng=rng), y)

  return loss_fn


def train_steps(loss_fn: LossFn, optimizer, params, context, x_all, y_all, mean, std, idx, mask, key):
  """Runs S masked local steps; a step whose batch is fully masked leaves params and optimiser untouched.

  Args:
    loss_fn: per-example loss, see `LossFn`.
    optimizer: optax transformation, initialised here (local state starts fresh every round).
    params: starting params.
    context: the ClientContext passed to every `loss_fn` call.
    x_all: [N, ...] training inputs; y_all: [N] labels; mean, std: [ch] normalisation.
    idx: [S, B] int32 example indices; mask: [S, B] bool.
    key: PRNG key for dropout (one per step is derived from it).

  Returns:
    (params, mean loss over valid examples).
  """

  def step(carry, inputs):
    idx_s, mask_s, key_s = inputs

    def train(carry):
      params, opt_state = carry
      x, y = normalize(x_all[idx_s], mean, std), y_all[idx_s]

      def objective(p):
        return losses.masked_mean(loss_fn(p, x, y, key_s, context), mask_s)

      loss, grads = jax.value_and_grad(objective)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss.astype(jnp.float32)

    # A fully masked step (a client smaller than the largest one) is skipped: on an unbatched client
    # (the `loop` map) `cond` runs no gradient at all; under vmap it lowers to a select of both branches.
    carry, loss = jax.lax.cond(jnp.any(mask_s), train, lambda c: (c, jnp.zeros((), jnp.float32)), carry)
    valid = jnp.sum(mask_s)
    return carry, (loss * valid, valid)

  keys = jax.random.split(key, idx.shape[0])
  (params, _), (loss_sums, valids) = jax.lax.scan(step, (params, optimizer.init(params)),
                                                  (idx, mask, keys))
  return params, jnp.sum(loss_sums) / jnp.maximum(jnp.sum(valids), 1)


CALIBRATION_SIZE = 256


def make_client_update(loss_fn: LossFn, optimizer, *, batch_size: int, num_steps: int,
                       local_epochs: int, local_steps: int, calibrate=None):
  """Builds client_update(params, context, client_id, key, data) -> ClientOutput for one client.

  The client gathers its own batch schedule (`client_batches`) from `data` by its id, then trains
  from `params`. With `calibrate` (BatchNorm models, `Model.calibrate`) it then sets the BatchNorm
  statistics from CALIBRATION_SIZE of its examples drawn with replacement. Pure and vmappable over
  (client_id, key).
  """

  def client_update(params, context, client_id, key, data: FederatedData) -> ClientOutput:
    batch_key, train_key = jax.random.split(key)
    count = data.counts[client_id]
    idx, mask = client_batches(batch_key, data.index[client_id], count, batch_size=batch_size,
                               num_steps=num_steps, local_epochs=local_epochs, local_steps=local_steps,
                               own_max_count=data.own_max_count)
    new_params, loss = train_steps(loss_fn, optimizer, params, context, data.x, data.y, data.mean,
                                   data.std, idx, mask, train_key)
    if calibrate is not None:
      pick = jax.random.randint(jax.random.fold_in(key, 1), (CALIBRATION_SIZE,), 0, count)
      new_params = calibrate(new_params, normalize(data.x[data.index[client_id][pick]], data.mean, data.std))
    return ClientOutput(new_params, count, loss)

  return client_update
