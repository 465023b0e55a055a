r"""Our engine against FedJAX, Flower and pfl-research on the same FedAvg work, in alternating blocks.

  python -m benchmarks.peers [--repeats=2] [--rounds=3] [--frameworks=fedjax,flower,pfl] [--results=FILE]

The work: real Fashion-MNIST (Debian's dataset-fashion-mnist), K = 100 clients × 320 examples (a seeded IID split
of 32,000 training images), every client in every round, 1 local epoch of batch 32, plain SGD at lr 0.05, cnn2
(824,458 params, dropout 0.2), FedAvg. Each peer runs in its own venv, built once and reused, as a subprocess on
the work written to --npz: FedJAX 0.0.17 (jax 0.5.3, dm-haiku; `benchmarks/peers_fedjax.py`, cnn2 in Haiku;
--venv), Flower 1.42's Ray simulation engine (`benchmarks/peers_flower.py`, clients in PyTorch 2.13 CPU, cnn2 in
Torch, --flower_client_cpus CPUs and threads per client; --flower_venv) and Apple's pfl-research 0.6
(`benchmarks/peers_pfl.py`: its FederatedAveraging on a SimulatedBackend, the same Torch cnn2 in PyTorch 2.13 CPU;
--pfl_processes processes, each with CPUs / processes PyTorch threads, more than 1 being pfl's distributed
simulation under `torch.distributed.run`; 0, the default: one single-threaded process per CPU; --pfl_venv). Our
engine runs in this process at the library defaults (`client_map=auto`, `conv_impl=auto`). A block times --rounds
warm rounds (a first round compiles or warms up and is not counted); blocks alternate FedJAX, Flower, pfl, ours,
FedJAX, …; a framework's rate is K·n examples / its median round seconds over all its blocks. A peer whose venv
cannot be built or whose block fails is reported in one line (`peers: <name> failed: …`) and left out of the later
blocks and the table. The last lines are `project/<peer>: R.RRx` for the peers that ran (pfl, flower, fedjax); the
table, the ratios and any failure lines are written as block `peers` of --results (benchmarks/RESULTS.md; '' writes
none).
"""

import json
import os
import re
import statistics
import subprocess
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import results, venvs
from fedsnd_jax import algorithms, data, federated_data, mapping, models, rounds
from fedsnd_jax.partition import partition

FEDJAX_REQUIREMENTS = ("fedjax==0.0.17", "jax[cpu]==0.5.3", "jaxlib==0.5.3", "dm-haiku==0.0.17")
# flwr 1.42.0 pins ray==2.55.1. torch==2.13.0 takes a local 2.13.0+cpu wheel where pip finds one (192 MB; the
# venv is ~1.4 GB); from PyPI alone it is the CUDA build with its nvidia-* wheels, which runs on CPU too.
FLOWER_REQUIREMENTS = ("flwr[simulation]==1.42.0", "torch==2.13.0")
# pfl 0.6.0 asks for torch>=2.0.1,<3 (its `pytorch` extra), numpy<3, dp-accounting, prv-accountant; the same
# torch pin as Flower's (the venv is ~1.1 GB with the CPU wheel).
PFL_REQUIREMENTS = ("pfl[pytorch]==0.6.0", "torch==2.13.0")
FRAMEWORKS = ("fedjax", "flower", "pfl")
WORKERS = {name: os.path.join(os.path.dirname(os.path.abspath(__file__)), f"peers_{name}.py")
           for name in FRAMEWORKS}


def fedjax_python(venv: str) -> str:
  """The venv's python, after building the venv with FEDJAX_REQUIREMENTS if it cannot import them yet."""
  return venvs.venv_python(venv, "import fedjax, haiku", [list(FEDJAX_REQUIREMENTS)], "peers")


def flower_python(venv: str) -> str:
  """The venv's python, after building the venv with FLOWER_REQUIREMENTS if it cannot import them yet."""
  return venvs.venv_python(venv, "import flwr.simulation, ray, torch", [list(FLOWER_REQUIREMENTS)], "peers")


def pfl_python(venv: str) -> str:
  """The venv's python, after building the venv with PFL_REQUIREMENTS if it cannot import them yet."""
  return venvs.venv_python(venv, "import pfl.model.pytorch, torch", [list(PFL_REQUIREMENTS)], "peers")


def failure(error: Exception) -> str:
  """One line saying what failed: a subprocess's exception (the last line of its stderr naming one, past launchers'
  summaries) or its last line of stderr, or the exception itself."""
  if isinstance(error, subprocess.CalledProcessError):
    lines = [line.strip() for line in (error.stderr or "").splitlines() if re.search(r"\w", line)]
    raised = [line for line in lines  # torch.distributed.run prefixes its workers' lines with "[rankN]: "
              if re.match(r"(\[rank\d+\]: )?[\w.]*(Error|Exception)\b", line) and "ChildFailedError" not in line]
    command = " ".join(map(str, error.cmd if isinstance(error.cmd, list) else [error.cmd]))
    last = (raised or lines)[-1:]
    return f"`{command}` exited {error.returncode}" + (f": {last[0]}" if last else "")
  return f"{type(error).__name__}: {error}".splitlines()[0]


def work(data_dir: str, num_clients: int, per_client: int, seed: int = 0):
  """(x uint8 [N, 28, 28, 1], y [N], the IID Partition of K clients × n, mean, std) of K·n training images."""
  dataset = data.load_dataset(f"idx:{data_dir}")
  rng = np.random.default_rng(seed)
  keep = rng.permutation(len(dataset.y_train))[: num_clients * per_client]
  x, y = dataset.x_train[keep], dataset.y_train[keep].astype(np.int32)
  return x, y, partition(y, num_clients, "iid", seed=seed), dataset.mean, dataset.std


def peer_block(name: str, command: list[str], npz: str, rounds: int, *args: str) -> list[float]:
  """Warm round seconds of one run of the peer `name` (its first round compiles or warms up: dropped).

  `command` is the venv's python and any launcher arguments before the worker script.
  """
  # Our XLA_FLAGS (fedsnd_jax/platform.py) name a flag jaxlib 0.5.3 does not know, and it aborts on unknown flags.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([*command, WORKERS[name], npz, str(rounds), *args], check=True, capture_output=True,
                       text=True, env={**env, "JAX_PLATFORMS": "cpu"})
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  return [r["seconds"] for r in records if r["round"] > 0]


def ours(x, y, part, mean, std):
  """A function block(rounds) -> warm round seconds of our FedAvg at the library defaults on the work."""
  num_clients = len(part.client_indices)
  fed_data = federated_data.to_device(x, y, part, mean, std)
  fed = rounds.Federation(num_clients, num_clients, rounds.LocalSchedule(32, epochs=1), 0.05, 0.0, 0.0,
                          x.shape[1:], 10)
  backend = jax.default_backend()
  model = models.build_model("cnn2", x.shape[1:], 10, dropout=0.2, conv_impl="auto")
  alg = algorithms.build("fedavg", model, fed, client_map=mapping.default_client_map(backend))
  state = alg.init(jax.random.key(0))
  state, _ = alg.apply(state, fed_data)  # compiles

  def block(rounds: int) -> list[float]:
    nonlocal state
    seconds = []
    for _ in range(rounds):
      state, out = alg.apply(state, fed_data)
      seconds.append(out.times["client_time_s"] + out.times["server_time_s"])
    return seconds

  return block


def main(argv):
  del argv
  flag = flags.FLAGS
  peers = [name for name in FRAMEWORKS if name in flag.frameworks]
  if not peers or set(flag.frameworks) - set(FRAMEWORKS):
    raise app.UsageError(f"--frameworks: some of {','.join(FRAMEWORKS)}")
  processes = flag.pfl_processes or os.cpu_count()
  python_of = {"fedjax": lambda: fedjax_python(flag.venv), "flower": lambda: flower_python(flag.flower_venv),
               "pfl": lambda: pfl_python(flag.pfl_venv)}
  # pfl's distributed simulation: torch's own launcher starts the processes (one plain process needs none).
  launcher = {"pfl": ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                     if processes > 1 else []}
  args = {"fedjax": (), "flower": (f"--client_cpus={flag.flower_client_cpus}",), "pfl": ()}
  failed = {}
  commands = {}
  for name in peers:
    try:
      commands[name] = [python_of[name](), *launcher.get(name, [])]
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
      failed[name] = f"its venv: {failure(error)}"
      print(f"peers: {name} failed: {failed[name]}", flush=True)
  x, y, part, mean, std = work(flag.data_dir, flag.clients, flag.examples)
  os.makedirs(os.path.dirname(os.path.abspath(flag.npz)), exist_ok=True)
  np.savez(flag.npz, x=data.normalize(x, mean, std), y=y, index=np.stack(part.client_indices))
  ours_block = ours(x, y, part, mean, std)
  examples = flag.clients * flag.examples
  times = {name: [] for name in (*commands, "project")}
  for repeat in range(flag.repeats):
    for name in [name for name in times if name not in failed]:
      start = time.perf_counter()
      if name == "project":
        block = ours_block(flag.rounds)
      else:
        try:
          block = peer_block(name, commands[name], flag.npz, flag.rounds, *args[name])
          if not block:
            raise RuntimeError("printed no warm round")
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
          failed[name] = f"block {repeat + 1}: {failure(error)}"
          print(f"peers: {name} failed: {failed[name]}", flush=True)
          continue
      times[name] += block
      print(f"peers: block {repeat + 1}/{flag.repeats} {name}: {examples / statistics.median(block):,.0f} "
            f"examples/s ({time.perf_counter() - start:.0f} s)", flush=True)
  ran = [name for name in times if name not in failed]
  rate = {name: examples / statistics.median(times[name]) for name in ran}
  setup = {"fedjax": "FedJAX 0.0.17 (jax 0.5.3 CPU)",
           "flower": f"Flower 1.42 (Ray; PyTorch 2.13 CPU, {flag.flower_client_cpus} CPU(s) per client)",
           "pfl": f"pfl 0.6.0 (PyTorch 2.13 CPU; {processes} process(es) × "
                  f"{max(1, os.cpu_count() // processes)} thread(s))"}
  lines = [f"FedAvg, cnn2, {flag.clients} clients × {flag.examples} Fashion-MNIST examples, 1 epoch of batch 32, "
           f"SGD lr 0.05; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; median of "
           f"{len(times['project'])} warm rounds each; {'; '.join(setup[name] for name in peers)}", "",
           "| framework | examples/s | median round s |", "|---|---|---|"]
  lines += [f"| {name} | {rate[name]:,.0f} | {statistics.median(times[name]):.2f} |" for name in ran]
  lines.append("")
  lines += [f"project/{name}: {rate['project'] / rate[name]:.2f}x" for name in reversed(peers) if name in rate]
  lines += [f"{name} failed: {why}" for name, why in failed.items()]
  text = "\n".join(lines)
  print(f"\n{text}", flush=True)
  results.publish(flag.results, flag.block, text, "Against FedJAX, Flower and pfl-research")


def define_flags():
  flags.DEFINE_list("frameworks", list(FRAMEWORKS), f"The peers to run, some of {','.join(FRAMEWORKS)}.")
  flags.DEFINE_string("venv", os.path.expanduser("~/.cache/fedsnd-jax/fedjax-venv"), "FedJAX's own venv.")
  flags.DEFINE_string("flower_venv", os.path.expanduser("~/.cache/fedsnd-jax/flower-venv"), "Flower's own venv.")
  flags.DEFINE_integer("flower_client_cpus", 1, "Ray CPUs (and PyTorch threads) per Flower client.")
  flags.DEFINE_string("pfl_venv", os.path.expanduser("~/.cache/fedsnd-jax/pfl-venv"), "pfl-research's own venv.")
  flags.DEFINE_integer("pfl_processes", 0, "pfl simulation processes (each with CPUs / processes PyTorch "
                       "threads; more than 1 under torch.distributed.run; 0: one per CPU).")
  flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST idx files.")
  flags.DEFINE_string("npz", "runs/peers/work.npz", "Where the work is written for the peers' processes.")
  flags.DEFINE_integer("clients", 100, "K.")
  flags.DEFINE_integer("examples", 320, "Examples per client.")
  flags.DEFINE_integer("rounds", 3, "Warm rounds per block.")
  flags.DEFINE_integer("repeats", 2, "Rounds of alternating blocks (one block per framework each).")
  results.define_flags("peers")


if __name__ == "__main__":
  define_flags()
  app.run(main)
