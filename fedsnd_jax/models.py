"""Models as `Model(init, apply)` pairs over flax.linen modules, and a registry by name.

`apply(params, x, train=False, rng=None)` maps normalised inputs [B, *input_shape] (token ids [B, L]
for text) to logits [B, NC]; dropout is active only with `train=True`, drawing from `rng`. Text models
also have `apply_embedded(params, e, ...)` starting from token embeddings [B, L, d], so noise can live
in embedding space.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedsnd_jax import host_loop
from fedsnd_jax.errors import InputError
from fedsnd_jax.shapes import Params


class Model(NamedTuple):
  """A pure model pair.

  Attributes:
    init: key -> params.
    apply: (params, x [B, ...], train=False, rng=None) -> logits [B, NC].
    apply_embedded: text models only: (params, e [B, L, d], train=False, rng=None) -> logits [B, NC].
    embed_table: text models only: params -> the token embedding matrix [V, d].
    calibrate: BatchNorm models only: (params, x [B, ...]) -> params whose BatchNorm statistics are
      this batch's per-layer input mean and variance (differentiable in x).
    represent: mlp, cnn2, simple_cnn: (params, x, train=False, rng=None) -> [B, d] penultimate features
      (or the projection head's output), for MOON.
    classify: mlp, cnn2, simple_cnn without a projection head: (params, z [B, d]) -> logits [B, NC], the
      classifier alone on representations z (FedGen's generator lives in this space).

  BatchNorm models keep their statistics inside `params` ({"params": …, "batch_stats": …}); training
  uses batch statistics and leaves them alone (their gradient is 0), and clients `calibrate` them on
  their own data after local training, so the aggregate averages the clients' statistics.
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[..., jax.Array]
  apply_embedded: Callable[..., jax.Array] | None = None
  embed_table: Callable[[Params], jax.Array] | None = None
  calibrate: Callable[[Params, jax.Array], Params] | None = None
  represent: Callable[..., jax.Array] | None = None
  classify: Callable[[Params, jax.Array], jax.Array] | None = None


CONV_IMPLS = ("auto", "xla", "im2col")

class Im2colConv(nn.Module):
  """A stride-1 2-D convolution as shifted slices + one matmul; the same params as `nn.Conv`.

  y[b, i, j] = Σ_{u, v, c} x_pad[b, i + u, j + v, c] · kernel[u, v, c, :] + bias, with SAME (zero) or
  VALID padding. x: [B, H, W, ch] -> [B, H', W', features].
  """

  features: int
  kernel_size: tuple[int, int]
  padding: str = "SAME"

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if self.padding == "SAME":
      x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate([x[:, u:u + h, v:v + w, :] for u in range(kh) for v in range(kw)], axis=-1)
    return cols @ kernel.reshape(-1, self.features) + bias


def _conv(impl: str, features: int, kernel_size, padding: str, name: str):
  if impl == "auto":  # decided where the model is traced: both modules hold the same params
    impl = host_loop.conv_impl_here(jax.default_backend())
  if impl == "im2col":
    return Im2colConv(features, kernel_size, padding, name=name)
  return nn.Conv(features, kernel_size, padding=padding, name=name)


def _head(module: nn.Module, features, projection_dim: int, classifier_on_projection: bool, num_classes: int):
  """Penultimate features → (projection head →) classifier; records what `Model.represent` returns.

  With projection_dim > 0 a 2-layer projection head (Dense·d → ReLU → Dense·projection_dim) maps the features
  to the representation. `classifier_on_projection` puts the classifier on the head's output, as in MOON's
  own network (Li, He, Song, CVPR 2021: every method in its tables uses it); otherwise the classifier reads
  the features and the head only feeds the representation (SimCLR style). Without a head the representation
  is the features.
  """
  if projection_dim > 0:
    features_in = features
    features = nn.Dense(projection_dim, name="proj_out")(nn.relu(nn.Dense(features.shape[-1], name="proj_in")(
        features)))
    module.sow("intermediates", "representation", features)
    return nn.Dense(num_classes)(features if classifier_on_projection else features_in)
  module.sow("intermediates", "representation", features)
  return nn.Dense(num_classes)(features)


def _maybe_bn(on: bool, x, train: bool):
  # momentum 0: a train-mode pass with mutable statistics sets them to the batch's own (see calibrate).
  return nn.BatchNorm(use_running_average=not train, momentum=0.0)(x) if on else x


class MLP(nn.Module):
  """Flatten → [Dense → ReLU → Dropout] × len(hidden) → Dense."""

  num_classes: int
  hidden: Sequence[int] = (200, 200)
  dropout: float = 0.2
  projection_dim: int = 0
  classifier_on_projection: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(nn.Dense(width)(x)))
    return _head(self, x, self.projection_dim, self.classifier_on_projection, self.num_classes)


class CNN2(nn.Module):
  """The 2-conv CNN for 28×28 grayscale (the flax MNIST example, 824,458 params, plus dropout).

  conv3×3·32 → ReLU → avgpool 2 → conv3×3·64 → ReLU → avgpool 2 → Dense 256 → ReLU → Dropout → Dense.
  """

  num_classes: int
  dropout: float = 0.2
  batch_norm: bool = False  # BatchNorm after each conv (statistics: see `Model.calibrate`)
  conv_impl: str = "xla"  # auto | xla | im2col (see `host_loop.default_conv_impl`)
  projection_dim: int = 0
  classifier_on_projection: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, features in enumerate((32, 64)):
      x = _maybe_bn(self.batch_norm, _conv(self.conv_impl, features, (3, 3), "SAME", f"Conv_{i}")(x), train)
      x = nn.avg_pool(nn.relu(x), (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(nn.Dense(256)(x)))
    return _head(self, x, self.projection_dim, self.classifier_on_projection, self.num_classes)


class SimpleCNN(nn.Module):
  """The simple CNN of NIID-Bench (Li et al., 2022) and MOON for 32×32 colour (62,006 params on CIFAR-10).

  conv5×5·6 → ReLU → maxpool 2 → conv5×5·16 → ReLU → maxpool 2 → fc 120 → fc 84 → fc NC, dropout after
  each hidden fc layer.
  """

  num_classes: int
  dropout: float = 0.2
  batch_norm: bool = False
  conv_impl: str = "xla"
  projection_dim: int = 0
  classifier_on_projection: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, features in enumerate((6, 16)):
      x = _maybe_bn(self.batch_norm, _conv(self.conv_impl, features, (5, 5), "VALID", f"Conv_{i}")(x), train)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    for width in (120, 84):
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(nn.Dense(width)(x)))
    return _head(self, x, self.projection_dim, self.classifier_on_projection, self.num_classes)


class _BasicBlock(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x):
    norm = lambda: nn.GroupNorm(num_groups=min(32, self.features // 4) or 1)  # noqa: E731
    y = nn.relu(norm()(nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)))
    y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet with GroupNorm (BatchNorm's running statistics do not average across clients).

  3×3 stem → stages of basic blocks (`blocks` per stage, widths doubling, stride 2 between stages) →
  global average pool → Dropout → Dense.
  """

  num_classes: int
  blocks: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(32, self.width // 4))(x))
    for stage, n in enumerate(self.blocks):
      for b in range(n):
        x = _BasicBlock(self.width * 2**stage, 2 if stage > 0 and b == 0 else 1)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(self.num_classes)(x)


class TextClassifier(nn.Module):
  """Embedding → (conv1d·width → ReLU → max-pool over tokens | mean-pool) → Dropout → Dense.

  Padding (id 0) is excluded from the mean pool. `from_embeddings` starts after the token lookup.
  """

  num_classes: int
  vocab_size: int
  embed_dim: int = 64
  pooling: str = "mean"  # mean | conv
  width: int = 128
  dropout: float = 0.2

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embed_dim)
    self.conv = nn.Conv(self.width, (3,)) if self.pooling == "conv" else None
    self.drop = nn.Dropout(self.dropout)
    self.head = nn.Dense(self.num_classes)

  def __call__(self, tokens, train: bool = False):
    valid = (tokens > 0).astype(jnp.float32)
    return self.from_embeddings(self.embed(tokens), train, valid)

  def from_embeddings(self, e, train: bool = False, valid=None):
    """e: [B, L, d] embeddings; valid: [B, L] 1 for real tokens (all real when None)."""
    valid = jnp.ones(e.shape[:2]) if valid is None else valid
    if self.conv is not None:
      h = nn.relu(self.conv(e))
      h = jnp.max(jnp.where(valid[..., None] > 0, h, -jnp.inf), axis=1)
      h = jnp.where(jnp.isfinite(h), h, 0.0)
    else:
      h = (e * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1, keepdims=True), 1.0)
    return self.head(self.drop(h, deterministic=not train))


def _pair(module: nn.Module, input_shape, input_dtype=jnp.float32):
  """(init, apply) for a module without BatchNorm: params are the "params" collection."""

  def init(key):
    return module.init(key, jnp.zeros((1, *input_shape), input_dtype))["params"]

  def apply(params, x, train=False, rng=None, **kwargs):
    rngs = {"dropout": rng} if train else {}
    return module.apply({"params": params}, x, train, rngs=rngs, **kwargs)

  return init, apply


def _with_represent(model: Model, module: nn.Module, variables_of) -> Model:
  """Adds `represent`: the sown penultimate features of a forward pass; and, without a projection head,
  `classify`: the classifier (the last auto-named Dense layer, `_head`'s) applied to given features."""

  def represent(params, x, train=False, rng=None):
    rngs = {"dropout": rng} if train else {}
    _, state = module.apply(variables_of(params), x, train, rngs=rngs, mutable=["intermediates", "batch_stats"])
    return state["intermediates"]["representation"][0]

  def classify(params, z):
    layers = variables_of(params)["params"]
    dense = max((k for k in layers if k.startswith("Dense_")), key=lambda k: int(k[len("Dense_"):]))
    return z @ layers[dense]["kernel"] + layers[dense]["bias"]

  return model._replace(represent=represent, classify=None if module.projection_dim else classify)


def _bn_model(module: nn.Module, input_shape) -> Model:
  """A BatchNorm model: params are all variables, statistics included."""

  def init(key):
    return dict(module.init(key, jnp.zeros((1, *input_shape))))

  def apply(params, x, train=False, rng=None):
    if not train:
      return module.apply(params, x, False)
    logits, _ = module.apply(params, x, True, rngs={"dropout": rng}, mutable=["batch_stats"])
    return logits

  def calibrate(params, x):
    # Dropout sits after every BatchNorm, so its key cannot change the statistics.
    _, new = module.apply(params, x, True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    return {**params, "batch_stats": new["batch_stats"]}

  return Model(init, apply, calibrate=calibrate)


MODELS = ("mlp", "cnn2", "simple_cnn", "resnet8", "resnet18", "text_mean", "text_conv")


BATCH_NORM_MODELS = ("cnn2", "simple_cnn")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, dropout: float = 0.2,
                vocab_size: int = 0, batch_norm: bool = False, conv_impl: str = "xla",
                projection_dim: int = 0, classifier_on_projection: bool = True) -> Model:
  """Builds a registered model.

  Args:
    name: one of MODELS.
    input_shape: one example's shape, e.g. (28, 28, 1), or (L,) for text.
    num_classes: NC.
    dropout: dropout rate of every dropout layer.
    vocab_size: text models only.
    batch_norm: BatchNorm after each conv (BATCH_NORM_MODELS only).
    conv_impl: one of CONV_IMPLS, for cnn2 and simple_cnn (`auto`: see `host_loop.default_conv_impl`).
    projection_dim: > 0 adds MOON's 2-layer projection head of this width (see `_head`).
    classifier_on_projection: the classifier reads the projection head's output (MOON's network) rather
      than the features (mlp, cnn2, simple_cnn with projection_dim > 0).
  """
  if conv_impl not in CONV_IMPLS:
    raise InputError("conv_impl", f"unknown {conv_impl!r}; allowed: {', '.join(CONV_IMPLS)}")
  if batch_norm and name not in BATCH_NORM_MODELS:
    raise InputError("batch_norm", f"only {', '.join(BATCH_NORM_MODELS)} have a BatchNorm option, not {name}")
  if projection_dim and name not in ("mlp", *BATCH_NORM_MODELS):
    raise InputError("projection_dim", f"only mlp, {', '.join(BATCH_NORM_MODELS)} have a projection head")
  if name in BATCH_NORM_MODELS:
    module = (CNN2 if name == "cnn2" else SimpleCNN)(num_classes, dropout=dropout, batch_norm=batch_norm,
                                                     conv_impl=conv_impl, projection_dim=projection_dim,
                                                     classifier_on_projection=classifier_on_projection)
    if batch_norm:
      return _with_represent(_bn_model(module, input_shape), module, lambda p: p)
    return _with_represent(Model(*_pair(module, input_shape)), module, lambda p: {"params": p})
  if name == "mlp":
    module = MLP(num_classes, dropout=dropout, projection_dim=projection_dim,
                 classifier_on_projection=classifier_on_projection)
    return _with_represent(Model(*_pair(module, input_shape)), module, lambda p: {"params": p})
  if name in ("resnet8", "resnet18"):
    blocks, width = ((1, 1, 1), 16) if name == "resnet8" else ((2, 2, 2, 2), 64)
    return Model(*_pair(ResNet(num_classes, blocks, width, dropout), input_shape))
  if name in ("text_mean", "text_conv"):
    if vocab_size <= 0:
      raise InputError("model", f"{name} needs a text dataset (token ids), not images")
    module = TextClassifier(num_classes, vocab_size, pooling=name[len("text_"):], dropout=dropout)
    init, apply = _pair(module, input_shape, jnp.int32)

    def apply_embedded(params, e, train=False, rng=None):
      return apply(params, e, train, rng, method=TextClassifier.from_embeddings)

    return Model(init, apply, apply_embedded, lambda params: params["embed"]["embedding"])
  raise InputError("model", f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


STATISTICS = "batch_stats"  # the collection BatchNorm models keep their running statistics in


def has_statistics(params) -> bool:
  return isinstance(params, dict) and STATISTICS in params


def with_statistics_of(params, source):
  """`params` with its BatchNorm statistics taken from `source` (models without BatchNorm: unchanged)."""
  return {**params, STATISTICS: source[STATISTICS]} if has_statistics(params) else params


def freeze_statistics(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` on everything but BatchNorm statistics, which get zero updates.

  Statistics are calibrated by clients and averaged by the server, never stepped by a gradient-based update
  (an eval-mode student reads them, so distillation would otherwise move a variance, possibly below 0).
  Models without BatchNorm get `optimizer` itself.
  """
  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: "frozen" if k == STATISTICS else "train", v) for k, v in params.items()}

  frozen = optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)

  def init(params):
    return (frozen if has_statistics(params) else optimizer).init(params)

  def update(updates, state, params=None):
    return (frozen if has_statistics(updates) else optimizer).update(updates, state, params)

  return optax.GradientTransformation(init, update)


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
