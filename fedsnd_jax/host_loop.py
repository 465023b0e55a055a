"""The CPU fast path: the `loop` client map driven from the host, and what makes it fast.

On CPU the round's clients train one local step per jitted call (`make_stepped_client_update`), one client per
core at once on worker threads (`threaded_loop`, `worker_threads`: the process's cores, capped by a cgroup CFS
quota), and a model with `conv_impl=auto` traces XLA's convolution in those top-level steps and im2col in loop
bodies and under vmap (`default_conv_impl`, `top_level_step`). `driver.make_client_phase` picks this path for
`client_map=loop` outside vectorised runs.
"""

import concurrent.futures
import contextlib
import contextvars
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsnd_jax import client, tree_math
from fedsnd_jax.federated_data import FederatedData

# Set while a client's local step is traced as its own top-level program (`make_stepped_client_update`).
_TOP_LEVEL_STEP = contextvars.ContextVar("top_level_step", default=False)


@contextlib.contextmanager
def top_level_step():
  """Marks the model calls traced inside as a top-level step (not a loop body): `auto` picks XLA's convolution
  there on CPU."""
  token = _TOP_LEVEL_STEP.set(True)
  try:
    yield
  finally:
    _TOP_LEVEL_STEP.reset(token)


def default_conv_impl(backend: str, top_level_step: bool = False) -> str:
  """What `auto` runs: XLA's convolution in a CPU client's top-level steps and on TPUs, im2col elsewhere.

  On XLA:CPU (jax 0.10) a convolution inside a loop body (`lax.scan` over local steps) or under vmap
  runs ~10–20× slower than the same convolution at top level (2-core CPU, cnn2, batch 32: 297 vs 3,529
  examples/s in a scan; 144 under vmap over 10 clients); im2col (shifted slices + one matmul) keeps
  3,144 and 2,410. At top level XLA's convolution is the faster one once two steps run at once (2-core CPU,
  cnn2 SGD steps of batch 32: one thread 2,642–3,007 examples/s with XLA's, 3,171–3,306 with
  im2col; two threads 4,137–4,857 against 3,391–3,639), which is how the CPU `loop` map runs clients
  (`make_stepped_client_update`, one worker thread per core). On an H100 (jax 0.11.2,
  benchmarks/throughput.py, cnn2, 10 local steps) a vmapped XLA convolution becomes a grouped convolution: vmap
  over 100 clients ran 358k examples/s with it and 742k with im2col (2.1×; 1,000 clients: 351k vs 805k), and
  the per-client loop ran 2–4× faster with im2col too.
  """
  if backend == "cpu" and top_level_step:
    return "xla"
  return "im2col" if backend in ("cpu", "gpu") else "xla"


def conv_impl_here(backend: str) -> str:
  """What `conv_impl=auto` runs for a model traced here: inside `top_level_step` or not."""
  return default_conv_impl(backend, _TOP_LEVEL_STEP.get())


def make_stepped_client_update(loss_fn: client.LossFn, optimizer, schedule, num_steps: int, calibrate=None):
  """`client.make_client_update`'s client, driven from the host: each local step is its own jitted call.

  The same steps, keys and masks as the scanned client (its results equal it up to float rounding: XLA
  compiles a step alone and inside a loop body differently). Every call is traced with
  `top_level_step()` on, so a model with `conv_impl=auto` runs XLA's convolution here on CPU, which is
  10–20× faster outside a loop body (`default_conv_impl`; a `cond` branch is such a body, so fully masked
  steps are skipped on the host: they cost nothing). Not traceable: `threaded_loop` runs these clients,
  several at once.
  """
  schedule = client.batch_arguments(schedule, num_steps)

  def start(params, client_id, key, data, limit):
    idx, mask, train_key = client.local_batches(key, client_id, data, schedule, limit)
    keys = jax.random.split(train_key, num_steps)
    return idx, mask, keys, jnp.any(mask, axis=1), (params, optimizer.init(params)), jnp.zeros(2)

  def step(carry, sums, context, data, idx, mask, keys, s):
    with top_level_step():
      carry, (loss_sum, valid) = client.masked_step(loss_fn, optimizer, context, data.x, data.y, data.mean,
                                                    data.std, carry, (idx[s], mask[s], keys[s]))
    return carry, sums + jnp.stack([loss_sum, valid.astype(jnp.float32)])

  def finish(params, sums, key, client_id, data, limit):
    if calibrate is not None:
      params = client.calibrated(calibrate, params, key, client_id, data)
    return client.ClientOutput(params, client.uploaded_examples(data, client_id, limit),
                               sums[0] / jnp.maximum(sums[1], 1))

  start, step, finish = (jax.jit(fn) for fn in (start, step, finish))

  def client_update(params, context, client_id, key, data: FederatedData, limit) -> client.ClientOutput:
    idx, mask, keys, live, carry, sums = start(params, client_id, key, data, limit)
    for s in np.flatnonzero(jax.device_get(live)):  # (waits for this client's schedule only)
      carry, sums = step(carry, sums, context, data, idx, mask, keys, s)
    return finish(carry[0], sums, key, client_id, data, limit)

  return client_update


def worker_threads() -> int:
  """The `loop` map's worker threads: on CPU the cores this process may use — its affinity mask, capped by a
  cgroup CFS quota where one is set (a container limited to 2 CPUs on a 64-core host gets 2) — elsewhere 1 (an
  accelerator trains one client at a time, which bounds memory as `loop` always did)."""
  if jax.default_backend() != "cpu":
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  quota = cfs_quota_cpus()
  return min(cores, quota) if quota else cores


def cfs_quota_cpus(root: str = "/sys/fs/cgroup") -> int | None:
  """CPUs the cgroup's CFS quota allows, rounded up (cgroup v2 `cpu.max`, else v1 `cpu/cpu.cfs_quota_us` over
  `cpu.cfs_period_us`); None where no quota is set or the files are absent."""
  def read(name: str) -> list[str] | None:
    try:
      with open(os.path.join(root, name)) as f:
        return f.read().split()
    except OSError:
      return None

  v2 = read("cpu.max")  # "QUOTA PERIOD" or "max PERIOD"
  if v2:
    quota, period = v2[0], v2[1]
  else:
    v1_quota, v1_period = read("cpu/cpu.cfs_quota_us"), read("cpu/cpu.cfs_period_us")  # "-1": no quota
    if not (v1_quota and v1_period):
      return None
    quota, period = v1_quota[0], v1_period[0]
  if quota in ("max", "-1"):
    return None
  return max(1, -(-int(quota) // int(period)))


def threaded_loop(one: Callable, workers: int = 0) -> Callable:
  """Maps a host-driven client function one(*shared, *per_client) over the clients with `workers` threads
  (0: `worker_threads()`); results are stacked in client order, so they do not depend on the threads. The first
  client runs alone, so every jitted piece inside is traced and compiled once, before the threads start. jax's
  thread-local settings (`jax.default_matmul_precision`, `jax.debug_nans`, … as context managers) reach that
  first client only: set them globally (`jax.config.update`) for a `loop` run.

  Measured on 2 CPU cores (cnn2 SGD steps of batch 32, XLA's convolution): one thread 2,642–3,007
  examples/s, two threads 4,137–4,320; one thread dispatching two clients' steps in turn gained nothing
  (2,619–2,686): XLA:CPU runs a call on the thread that makes it.
  """

  def looped(shared, per_client):
    num = jax.tree.leaves(per_client)[0].shape[0]

    def client(i):
      return one(*shared, *jax.tree.map(lambda a: a[i], per_client))

    first = client(0)
    with concurrent.futures.ThreadPoolExecutor(min(workers or worker_threads(), max(num - 1, 1))) as pool:
      rest = list(pool.map(client, range(1, num)))
    return tree_math.stack([first, *rest])

  return looped
