"""`sharded` equals `vmap` on 4 forced CPU devices (in a subprocess: the device count is fixed at start-up)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np
from fedsnd_jax import algorithms, federated_data, models
from fedsnd_jax.rounds import Federation, LocalSchedule
from fedsnd_jax.partition import partition

assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
x = rng.integers(0, 17, (40, 4, 4, 1)).astype(np.uint8)
y = (x.reshape(40, -1).sum(1) % 3).astype(np.int32)
data = federated_data.to_device(x, y, partition(y, 5, "iid", seed=0), np.array([8.0]), np.array([5.0]))
model = models.build_model("mlp", (4, 4, 1), 3)
fed = Federation(5, 5, LocalSchedule(4, steps=2), 0.05, 0.9, 0.0, (4, 4, 1), 3)
server = {"synthesis.samples": 4, "synthesis.steps": 3, "distillation.steps": 2, "distillation.batch": 4}
for build in (lambda cm: algorithms.build("fedavg", model, fed, client_map=cm),
              lambda cm: algorithms.build("fednd", model, fed, server, client_map=cm)):
  finals = {}
  for cm in ("vmap", "sharded"):  # 5 clients on 4 devices: padding is exercised too
    alg = build(cm)
    state = alg.init(jax.random.key(0))
    for _ in range(2):
      state, _ = alg.apply(state, data)
    finals[cm] = state.params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), finals["vmap"],
               finals["sharded"])
print("SHARDED_OK")
"""


def test_sharded_equals_vmap_on_four_cpu_devices():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", "import fedsnd_jax\n" + SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "SHARDED_OK" in out.stdout, out.stderr[-3000:]
