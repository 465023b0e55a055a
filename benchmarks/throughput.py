r"""Client-phase throughput of every client-mapping strategy, and FedSND's round time beside FedAvg's.

  python -m benchmarks.throughput [--models=mlp,cnn2] [--clients=10,100,1000] [--strategies=vmap,chunked,loop]

Synthetic 28×28×1 uint8 data, batch 32 per client, 10 local steps (SGD with momentum). For each model and
clients-per-round C it times one warm client phase per strategy and checks that the strategies gave the same
params ("gap": max over leaves of ‖p − p_ref‖ / ‖p_ref‖ against the first strategy run; above 5e-2 stops the
script). "ceiling" is one centralised jitted train step at the same batch of 32, called repeatedly: what one
model can do. "bound" (up to --max_bound_batch) is one model's step at batch C×32: what the device does with
the whole round's batch when every client shares one set of weights, an upper mark for the vectorised strategies.
Prints Markdown tables with the device named, each row as soon as its C is done, then rewrites their block of
benchmarks/RESULTS.md (`--results`, `--block`).
"""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import results
from fedsnd_jax import algorithms, client, driver, federated_data, host_loop, losses, models, rounds
from fedsnd_jax.partition import partition

_MODELS = flags.DEFINE_list("models", ["mlp", "cnn2"], "Models.")
_CLIENTS = flags.DEFINE_list("clients", ["10", "100", "1000"], "Clients per round.")
_STRATEGIES = flags.DEFINE_list("strategies", ["vmap", "chunked", "loop"], "Client-mapping strategies.")
_CHUNK = flags.DEFINE_integer("chunk_size", 10, "Clients per chunk for `chunked`.")
_STEPS = flags.DEFINE_integer("steps", 10, "Local steps per client.")
# vmap holds every client's activations at once: cnn2 at 1,000 clients needs ~27 GB, more than a 24 GiB machine.
_MAX_VMAP = flags.DEFINE_integer("max_vmap_clients", 100, "Skip `vmap` above this many clients.")
_MAX_LOOP = flags.DEFINE_integer("max_loop_clients", 1000, "Skip `loop` above this many clients.")
_ROUND_CLIENTS = flags.DEFINE_integer("round_clients", 10, "Clients per round for the FedSND/FedAvg table.")
_BOUND = flags.DEFINE_integer("max_bound_batch", 4096, "Time one model at batch C×32 up to this batch.")
_CONV = flags.DEFINE_string("conv_impl", "auto", "auto | xla | im2col.")
_ROUND_TABLE = flags.DEFINE_bool("round_table", True, "Also time FedSND's round beside FedAvg's.")
results.define_flags("throughput")

BATCH = 32
SHAPE = (28, 28, 1)
# Largest relative gap allowed between strategies: GPUs' TF32 matmuls and convolutions round differently per
# batch layout (H100: up to 3.8e-2 after 10 SGD steps); a mapping bug gives gaps of order 1.
GAP_TOL = 5e-2


def _peak_memory_mb() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # host peak RSS (KiB on Linux)


def _data(num_clients: int, examples_per_client: int):
  rng = np.random.default_rng(0)
  n = num_clients * examples_per_client
  x = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
  y = rng.integers(0, 10, n).astype(np.int32)
  part = partition(y, num_clients, "iid", seed=0)
  return federated_data.to_device(x, y, part, np.array([128.0], np.float32), np.array([64.0], np.float32))


def _timed(fn, *args, repeats=1):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(fn(*args))
  return out, first, (time.perf_counter() - start) / repeats


def _one_model_rate(model, opt, batch: int) -> float:
  """Examples/s of one jitted train step of one model at `batch`, called back to back (≥ 6 calls, ≥ 1 s)."""
  x = jax.random.normal(jax.random.key(1), (batch, *SHAPE))
  y = jnp.arange(batch) % 10
  params = model.init(jax.random.key(0))

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(lambda p: jnp.mean(losses.cross_entropy(model.apply(p, x, train=True, rng=key), y)))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

  state = (params, opt.init(params))
  state = jax.block_until_ready(step(*state, jax.random.key(2)))
  calls, elapsed = 3, 0.0
  while elapsed < 1.0:  # Calls are dispatched without waiting, as a training loop does; double until ≥ 1 s.
    calls *= 2
    start = time.perf_counter()
    for _ in range(calls):
      state = step(*state, jax.random.key(2))
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
  return calls * batch / elapsed


def _ratio(rate: float, reference: float | None) -> str:
  return f"{rate / reference:.2f}×" if reference else "–"


def _relative_gap(a, b) -> float:
  """max over leaves of ‖a − b‖ / ‖b‖."""
  return max(float(jnp.linalg.norm(x - y) / max(float(jnp.linalg.norm(y)), 1e-6))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def throughput_rows(model_name: str, conv_impl: str):
  """Yields the table's rows for one model, one clients-per-round value at a time (printed as they come)."""
  model = models.build_model(model_name, SHAPE, 10, conv_impl=conv_impl)
  opt = client.client_optimizer(0.01, 0.9)
  ceiling = _one_model_rate(model, opt, BATCH)
  yield f"| {model_name} | – | ceiling (1 model, batch {BATCH}) | {ceiling:,.0f} | – | – | – | – | – |"
  steps = _STEPS.value
  schedule = rounds.LocalSchedule(BATCH, steps=steps)
  for num in (int(c) for c in _CLIENTS.value):
    data = _data(num, BATCH * steps)
    params = model.init(jax.random.key(0))
    ids = jnp.arange(num, dtype=jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(ids)
    results, timings = {}, {}
    for strategy in _STRATEGIES.value:
      if (strategy == "vmap" and num > _MAX_VMAP.value) or (strategy == "loop" and num > _MAX_LOOP.value):
        continue
      federation = rounds.Federation(num, num, schedule, 0.01, 0.9, 0.0, SHAPE, 10)  # its optimiser is `opt`
      phase = driver.make_client_phase(model, client.supervised_loss(model), federation, steps, strategy,
                                       _CHUNK.value)
      limits = schedule.steps_taken(data.counts[ids])
      out, first, steady = _timed(phase, (params, None, data), (ids, keys, None, limits))
      results[strategy] = out.params
      timings[strategy] = (first, steady, _peak_memory_mb())
    reference = next(iter(results))
    gaps = {strategy: _relative_gap(p, results[reference]) for strategy, p in results.items()}
    for strategy, gap in gaps.items():  # The strategies must agree before their times mean anything.
      if gap > GAP_TOL:
        raise AssertionError(f"{strategy} disagrees with {reference}: relative gap {gap:.2e}")
    loop_rate = num * steps * BATCH / timings["loop"][1] if "loop" in timings else None
    for strategy, (first, steady, mem) in timings.items():
      rate = num * steps * BATCH / steady
      yield (f"| {model_name} | {num} | {strategy}{f' ({_CHUNK.value})' if strategy == 'chunked' else ''} | "
             f"{rate:,.0f} | {_ratio(rate, loop_rate)} | {rate / ceiling:.2f}× | {max(first - steady, 0):.1f} | "
             f"{mem:,.0f} | {gaps[strategy]:.1e} |")
    if num * BATCH <= _BOUND.value:
      bound = _one_model_rate(model, opt, num * BATCH)
      yield (f"| {model_name} | {num} | bound (1 model, batch {num * BATCH}) | {bound:,.0f} | "
             f"{_ratio(bound, loop_rate)} | {bound / ceiling:.2f}× | – | – | – |")


EVERY_ROUND = {"schedule.recheck_every": 0}  # FedSND's server synthesises in every round timed, gate open or not


def round_table(conv_impl: str) -> list[str]:
  """FedSND's and FedAvg's round time (client and server parts) for the CNN at `round_clients` clients."""
  num = _ROUND_CLIENTS.value
  model = models.build_model("cnn2", SHAPE, 10, conv_impl=conv_impl)
  data = _data(num, BATCH * _STEPS.value)
  fed = rounds.Federation(num, num, rounds.LocalSchedule(BATCH, steps=_STEPS.value), 0.01, 0.9,
                             0.0, SHAPE, 10)
  hps = {"fedavg": None, "fedsnd": EVERY_ROUND}
  algs = {name: algorithms.build(name, model, fed, hp, client_map=_STRATEGIES.value[0], chunk_size=_CHUNK.value)
          for name, hp in hps.items()}
  rows, times = [], {}
  for name, alg in algs.items():
    state = alg.init(jax.random.key(0))
    state, _ = alg.apply(state, data)  # compile
    diags = []
    for _ in range(3):
      state, diag = alg.apply(state, data)
      diags.append(diag)
    times[name] = {k: float(np.mean([d.times.get(k, 0.0) for d in diags]))
                   for k in ("client_time_s", "server_time_s", "synthesis_time_s", "distill_time_s")}
  base = times["fedavg"]["client_time_s"] + times["fedavg"]["server_time_s"]
  for name, t in times.items():
    total = t["client_time_s"] + t["server_time_s"]
    rows.append(f"| {name} | {t['client_time_s']:.3f} | {t['server_time_s']:.3f} | {t['synthesis_time_s']:.3f} | "
                f"{t['distill_time_s']:.3f} | {total:.3f} | {total / base:.2f}× |")
  return rows


def main(argv):
  del argv
  device = jax.devices()[0]
  conv_impl, backend = _CONV.value, jax.default_backend()
  resolved = (f" ({host_loop.default_conv_impl(backend, True)} in top-level client steps, "
              f"{host_loop.default_conv_impl(backend)} elsewhere)" if conv_impl == "auto" else "")
  lines = []

  def emit(*new):  # printed as it comes, and kept for the RESULTS block
    lines.extend(new)
    print("\n".join(new), flush=True)

  emit(f"device: {device.device_kind} ({backend}, {jax.device_count()} device(s)); "
       f"jax {jax.__version__}; conv_impl {conv_impl}{resolved}; batch {BATCH}/client, "
       f"{_STEPS.value} local steps\n",
       "| model | clients | strategy | examples/s | vs loop | vs ceiling | compile s | peak MiB (so far) | gap |",
       "|---|---|---|---|---|---|---|---|---|")
  for name in _MODELS.value:
    for row in throughput_rows(name, conv_impl):
      emit(row)
  if _ROUND_TABLE.value:
    hp = algorithms.hyperparameters("fedsnd", EVERY_ROUND)  # what `round_table` builds FedSND with
    synthesis, distillation = hp.synthesis, hp.distillation
    emit(f"\nRound time, cnn2, {_ROUND_CLIENTS.value} clients, client_map {_STRATEGIES.value[0]}, FedSND with "
         f"the library's server settings ({synthesis.samples} samples, warm start {synthesis.warm_start}, "
         f"{synthesis.steps} synthesis steps, {distillation.steps} distillation steps of {distillation.batch}), "
         "synthesising every round (`fedsnd.schedule.recheck_every=0`), seconds:\n",
         "| algorithm | client | server | synthesis | distillation | round | vs FedAvg |",
         "|---|---|---|---|---|---|---|", *round_table(conv_impl))
  results.publish(flags.FLAGS.results, flags.FLAGS.block, "\n".join(lines), "Client-mapping throughput")


if __name__ == "__main__":
  app.run(main)
