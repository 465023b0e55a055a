"""Client local training over on-device batches: one pure function (`lax.scan` over the local steps). The CPU
`loop` map drives the same steps from the host (`host_loop.make_stepped_client_update`)."""

import functools
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


def local_displacement(steps, lr: float, momentum: float):
  """[C] distance K steps [C] of `client_optimizer`'s SGD (lr η, heavy-ball momentum β, a fresh buffer each
  round) move under a unit gradient.

  Σ_{k=1..K} Σ_{j<k} β^j·η = η·[K − β(1 − β^K)/(1 − β)]/(1 − β); η·K without momentum.
  """
  k = steps.astype(jnp.float32)
  if momentum == 0:
    return lr * k
  return lr * (k - momentum * (1.0 - momentum**k) / (1.0 - momentum)) / (1.0 - momentum)


def supervised_loss(model) -> LossFn:
  """FedAvg's local loss: CE(f(x; w, ξ), y) with dropout ξ drawn from `rng`."""

  def loss_fn(params, x, y, rng, context):
    del context
    return losses.cross_entropy(model.apply(params, x, train=True, rng=rng), y)

  return loss_fn


def masked_step(loss_fn: LossFn, optimizer, context, x_all, y_all, mean, std, carry, inputs):
  """One local step on a masked batch: (params, opt_state), (idx [B], mask [B], key) -> carry, (loss sum over
  the valid examples, their count)."""
  (params, opt_state), (idx_s, mask_s, key_s) = carry, inputs
  x, y = normalize(x_all[idx_s], mean, std), y_all[idx_s]

  def objective(p):
    return losses.masked_mean(loss_fn(p, x, y, key_s, context), mask_s)

  loss, grads = jax.value_and_grad(objective)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  valid = jnp.sum(mask_s)
  return (optax.apply_updates(params, updates), opt_state), (loss.astype(jnp.float32) * valid, valid)


def local_step(loss_fn: LossFn, optimizer, context, x_all, y_all, mean, std, carry, inputs):
  """`masked_step`, except that a fully masked step (a client smaller than the largest one) leaves params and
  optimiser untouched: on an unbatched client it runs no gradient at all (`cond`); under vmap it lowers to a
  select of both branches."""
  step = functools.partial(masked_step, loss_fn, optimizer, context, x_all, y_all, mean, std)
  skip = (carry, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)))
  return jax.lax.cond(jnp.any(inputs[1]), lambda c: step(c, inputs), lambda c: skip, carry)


def train_steps(loss_fn: LossFn, optimizer, params, context, x_all, y_all, mean, std, idx, mask, key):
  """Runs S masked local steps (`local_step`) in one `lax.scan`.

  Args:
    loss_fn: per-example loss, see `LossFn`.
    optimizer: optax transformation, initialised here (local state starts fresh every round).
    params: starting params.
    context: the ClientContext passed to every `loss_fn` call.
    x_all: [N, ...] training inputs; y_all: [N] labels; mean, std: [ch] normalisation.
    idx: [S, B] int32 example indices; mask: [S, B] bool.
    key: PRNG key for dropout (step s uses the s-th of split(key, S)).

  Returns:
    (params, mean loss over valid examples).
  """
  step = functools.partial(local_step, loss_fn, optimizer, context, x_all, y_all, mean, std)
  keys = jax.random.split(key, idx.shape[0])
  (params, _), (loss_sums, valids) = jax.lax.scan(step, (params, optimizer.init(params)), (idx, mask, keys))
  return params, jnp.sum(loss_sums) / jnp.maximum(jnp.sum(valids), 1)


CALIBRATION_SIZE = 256


def batch_arguments(schedule, num_steps: int) -> dict:
  """`client_batches`' schedule arguments from a `rounds.LocalSchedule` and the round's step count."""
  return dict(batch_size=schedule.batch_size, num_steps=num_steps, local_epochs=schedule.epochs,
              local_steps=schedule.steps)


def local_batches(key, client_id, data: FederatedData, schedule: dict, limit):
  """(idx [S, B], mask [S, B], train key) of one client's round, cut after its first `limit` (int32 [])
  non-empty steps: a client that a deadline stopped early uploads the steps it finished (`systems`)."""
  batch_key, train_key = jax.random.split(key)
  idx, mask = client_batches(batch_key, data.index[client_id], data.counts[client_id], **schedule,
                             own_max_count=data.own_max_count)
  finished = jnp.cumsum(jnp.any(mask, axis=1)) <= limit
  return idx, mask & finished[:, None], train_key


def uploaded_examples(data: FederatedData, client_id, limit):
  """The upload's aggregation weight: the client's example count, 0 if it took no step (dropped)."""
  return jnp.where(limit > 0, data.counts[client_id], 0)


def calibrated(calibrate, params, key, client_id, data: FederatedData):
  """BatchNorm statistics set from CALIBRATION_SIZE of the client's examples drawn with replacement."""
  pick = jax.random.randint(jax.random.fold_in(key, 1), (CALIBRATION_SIZE,), 0, data.counts[client_id])
  return calibrate(params, normalize(data.x[data.index[client_id][pick]], data.mean, data.std))


def make_client_update(loss_fn: LossFn, optimizer, schedule, num_steps: int, calibrate=None):
  """Builds client_update(params, context, client_id, key, data, limit) -> ClientOutput for one client.

  The client gathers its own batch schedule (`client_batches`: `num_steps` slots of the `rounds.LocalSchedule`
  `schedule`, of which it takes the first `limit` non-empty steps) from `data` by its id, then trains
  from `params`. With `calibrate` (BatchNorm models, `Model.calibrate`) it then sets the BatchNorm
  statistics from CALIBRATION_SIZE of its examples drawn with replacement. Pure and vmappable over
  (client_id, key).
  """
  schedule = batch_arguments(schedule, num_steps)

  def client_update(params, context, client_id, key, data: FederatedData, limit) -> ClientOutput:
    idx, mask, train_key = local_batches(key, client_id, data, schedule, limit)
    new_params, loss = train_steps(loss_fn, optimizer, params, context, data.x, data.y, data.mean,
                                   data.std, idx, mask, train_key)
    if calibrate is not None:
      new_params = calibrated(calibrate, new_params, key, client_id, data)
    return ClientOutput(new_params, uploaded_examples(data, client_id, limit), loss)

  return client_update


