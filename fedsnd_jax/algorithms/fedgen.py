"""FedGen: Z. Zhu, J. Hong, J. Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021; where the paper leaves a detail open we follow the authors' code (github.com/zhuangdizhu/FedGen,
`serverpFedGen.py`, `userpFedGen.py`, MNIST settings of `model_config.py`).

A lightweight generator G(ε, y) on the server produces *features* z — the input of the classifier h, the
model's last layer — that the uploaded classifiers agree are of class y; clients learn from it as an
inductive bias. With r the round index:

  server:  G ← S Adam steps (learning rate η_G·0.98^r, L2 weight decay 10⁻²) on
             Σ_k mean_i a_{k,y_i}·CE(h(z_i; θ_k), y_i) + η·L_div(ε, z),   z_i = G(ε_i, y_i),
           y_i uniform over the labels some sampled client holds, a_{k,y} = (n_{k,y} + 1) / Σ_k' (n_{k',y} + 1)
           from the uploaded label counts n, θ_k client k's classifier, L_div `generators.diversity_loss`;
           w ← FedAvg's weighted mean of the uploads.
  client k (from round 1 on; α_r = max(10⁻⁴, α·0.98^r) unless α = 0, β_r likewise):
           CE(f(x; w), y) + β_r·KL(σ(h(G(ε, y); w)) ‖ σ(f(x; w))) + α_r·CE(h(G(ε', ŷ); w), ŷ),
           ŷ uniform over the classes, G fixed and in eval mode (BatchNorm by the running averages the server's
           training kept, as the authors' clients call `generative_model.eval()`: a client batch of one class
           would otherwise normalise the label away, `generators`), one generated feature of each kind per example.

Where we differ from the authors' code, and why:
  - Clients train with the protocol's client optimiser and learning rate, tuned per setting like every
    method's (the authors: plain SGD, lr 0.01 × 0.99 per round).
  - Label counts n are the client's label histogram (the authors count the labels drawn in the round's local
    steps, starting from 1: the same up to a factor when the steps cover whole epochs; our +1 smoothing is their
    starting count).
  - The generator's teacher loss weights each sample by a_{k,y_i} (the paper's formula). The authors' code
    multiplies a [B] loss by [B, 1] weights, which broadcasts to mean(loss)·mean(a) per teacher.

Uploads: the model and its label counts (NC int32); downloads: the model and the generator (with its running
averages).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import client, federated_data, generators, losses
from fedsnd_jax.errors import InputError, check_range
from fedsnd_jax.models import Model
from fedsnd_jax.rounds import (
  AGGREGATE,
  AlgorithmSpec,
  Federation,
  RoundContext,
  RoundParts,
  ServerCarry,
  ServerStep,
  param_bytes,
)
from fedsnd_jax.shapes import Params

COEFFICIENT_DECAY = 0.98  # per round, of α, β and the generator's learning rate (the authors' code)
MIN_COEFFICIENT = 1e-4


class Hyperparameters(NamedTuple):
  """Defaults: the authors' MNIST settings, except α = β = 1 where they use 10. Their clients take plain SGD
  steps at lr 0.01; the protocols here take SGD steps at 0.03 (Fashion-MNIST) or 0.05 (digits) with momentum
  0.9, about 30–50× theirs in effect, and so would weigh the generated terms at 10. With α = β = 10 the model
  collapsed to one class in round 2 (cross-device Fashion-MNIST, α = 0.1, seed 0; measured while clients still
  used the generator in train mode).
  α and β are tuned per setting (benchmarks/tuning.py)."""

  generative_alpha: float = 1.0  # α: the clients' CE on generated features
  generative_beta: float = 1.0  # β: the clients' KL to the head on generated features of their own labels
  generator_steps: int = 50  # S per round (the code's ensemble_epochs)
  generator_batch: int = 32  # the code uses the clients' batch size
  generator_lr: float = 3e-4  # η_G (the code's ensemble_lr for MNIST)
  generator_weight_decay: float = 1e-2
  diversity: float = 1.0  # η (the code's ensemble_eta)
  noise_dim: int = 32
  hidden_dim: int = 256


class FedGenState(NamedTuple):
  """generator: G's variables (params and BatchNorm running averages); opt_state: Adam's state of its params;
  alpha, beta: [] the next round's client weights (0 before the first generator exists)."""

  generator: Params
  opt_state: Any
  alpha: jax.Array
  beta: jax.Array


def validate(hp: Hyperparameters, federation: Federation) -> None:
  del federation
  check_range(hp, "fedgen", positive=("generator_batch", "generator_lr", "noise_dim", "hidden_dim"),
              non_negative=("generative_alpha", "generative_beta", "generator_steps", "generator_weight_decay",
                            "diversity"))


def label_weights(histograms):
  """a [C, NC]: a_{k,y} = (n_{k,y} + 1) / Σ_k' (n_{k',y} + 1), and [NC] bool: labels some client holds.

  Args:
    histograms: [C, NC] label counts of the sampled clients.
  """
  smoothed = histograms.astype(jnp.float32) + 1.0
  return smoothed / jnp.sum(smoothed, axis=0, keepdims=True), jnp.max(histograms, axis=0) > 0


def teacher_loss(head_logits, labels, weights):
  """Σ_k mean_i a_{k,y_i}·CE(logits_{k,i}, y_i).

  Args:
    head_logits: [C, B, NC] every client classifier's logits on the generated features.
    labels: [B]. weights: [C, NC] from `label_weights`.
  """
  ce = jax.vmap(lambda logits: losses.cross_entropy(logits, labels))(head_logits)  # [C, B]
  return jnp.sum(jnp.mean(ce * weights[:, labels], axis=1))


def client_loss(model: Model, generator: generators.Generator, num_classes: int) -> client.LossFn:
  """CE + β·KL(σ(h(G(ε, y))) ‖ σ(f(x))) + α·CE(h(G(ε', ŷ)), ŷ), with (G, α, β) the `shared` FedGenState."""

  def loss_fn(params, x, y, rng, ctx):
    logits = model.apply(params, x, train=True, rng=rng)
    state = ctx.shared
    own_key, any_key, label_key = jax.random.split(jax.random.fold_in(rng, 1), 3)
    batch = y.shape[0]
    generate = lambda key, labels: generator.apply(state.generator, generator.noise(key, batch), labels, False)[0]
    z_own = generate(own_key, y)
    target = jax.nn.softmax(jax.lax.stop_gradient(model.classify(params, z_own)))
    latent = losses.kl_divergence(target, logits, 1.0)
    sampled = jax.random.randint(label_key, (batch,), 0, num_classes)
    z_any = generate(any_key, sampled)
    generated = losses.cross_entropy(model.classify(params, z_any), sampled)
    return losses.cross_entropy(logits, y) + state.beta * latent + state.alpha * generated

  return loss_fn


def build(model: Model, hp: Hyperparameters, federation: Federation) -> RoundParts:
  if model.classify is None:
    raise InputError("model", "fedgen needs a model whose classifier reads its representation (mlp, cnn2, "
                     "simple_cnn without a projection head)")
  num_classes = federation.num_classes
  features = jax.eval_shape(lambda: model.represent(model.init(jax.random.key(0)),
                                                    jnp.zeros((1, *federation.input_shape)))).shape[1:]
  generator = generators.conditional_mlp(num_classes, features, noise_dim=hp.noise_dim, hidden=(hp.hidden_dim,))
  schedule = optax.exponential_decay(hp.generator_lr, transition_steps=max(hp.generator_steps, 1),
                                     decay_rate=COEFFICIENT_DECAY, staircase=True)
  optimizer = optax.chain(optax.add_decayed_weights(hp.generator_weight_decay), optax.adam(schedule))

  def init_state(params):
    del params
    g = generator.init(jax.random.key(0))  # the server's own generator; the run's seed drives everything else
    return FedGenState(g, optimizer.init(g["params"]), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  def train_generator(ctx: RoundContext, carry: ServerCarry):
    weights, qualified = label_weights(federated_data.label_histograms(ctx.data, ctx.ids, num_classes))
    heads = ctx.uploads.params

    def objective(params, variables, key):
      label_key, noise_key = jax.random.split(key)
      labels = jax.random.categorical(label_key, jnp.where(qualified, 0.0, -jnp.inf), shape=(hp.generator_batch,))
      eps = generator.noise(noise_key, hp.generator_batch)
      z, variables = generator.apply({**variables, "params": params}, eps, labels, True)  # train mode
      fidelity = teacher_loss(jax.vmap(lambda p: model.classify(p, z))(heads), labels, weights)
      diversity = generators.diversity_loss(eps, z)
      return fidelity + hp.diversity * diversity, ((fidelity, diversity), variables)

    def step(state, key):
      g, opt_state = state
      (_, (parts, g)), grads = jax.value_and_grad(objective, has_aux=True)(g["params"], g, key)
      updates, opt_state = optimizer.update(grads, opt_state, g["params"])
      return ({**g, "params": optax.apply_updates(g["params"], updates)}, opt_state), parts

    keys = jax.random.split(jax.random.fold_in(ctx.key, 0), hp.generator_steps)
    (g, opt_state), (fidelity, diversity) = jax.lax.scan(step, (ctx.state.generator, ctx.state.opt_state), keys)
    decay = jnp.float32(COEFFICIENT_DECAY) ** (ctx.round + 1).astype(jnp.float32)
    coefficient = lambda c: jnp.maximum(MIN_COEFFICIENT, c * decay) if c > 0 else jnp.zeros((), jnp.float32)
    state = FedGenState(g, opt_state, coefficient(hp.generative_alpha), coefficient(hp.generative_beta))
    last = lambda a: a[-1] if hp.generator_steps else jnp.float32(jnp.nan)
    return carry._replace(state=state), {"generator_teacher_loss": last(fidelity),
                                         "generator_diversity_loss": last(diversity)}

  generator_bytes = param_bytes(jax.eval_shape(generator.init, jax.random.key(0)))
  return RoundParts(client_loss(model, generator, num_classes), init_state,
                   client_inputs=lambda state, ids: (state._replace(opt_state=None), None),
                   server_steps=lambda r, state: (ServerStep("generator", train_generator), AGGREGATE),
                   extra_bytes=lambda r: (num_classes * 4, generator_bytes))


def privacy(hp: Hyperparameters) -> tuple[str, ...]:
  """The generator is trained on individual classifiers and label counts (neither noised nor aggregated)."""
  del hp
  return ()


SPEC = AlgorithmSpec(build, Hyperparameters, validate, "fedgen", privacy=privacy)
