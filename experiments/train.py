r"""Runs one federated experiment and writes the output contract (docs/design.md §10) into --workdir.

  python -m experiments.train --config=experiments/configs/default.py --workdir=runs/digits \
      --config.alpha=0.5 --config.client_map=chunked

Running the same command again resumes from the newest checkpoint in the workdir. Bad input exits with
code 2 and one line on stderr naming the field; nothing is written before the input has been checked. A run
whose loss or parameters stop being finite exits with code 3 and one line (summary.json: "diverged": true).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import multi_process_problem, parse_flags
from experiments.train_lib import train_and_evaluate
from fedsnd_jax.errors import InputError
from fedsnd_jax.loop import Diverged

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumed if it holds a checkpoint).")
# Multi-host runs (client_map=sharded over every process's devices): jax.distributed.initialize's arguments.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host only).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host only).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host only).")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    print("error: workdir: --workdir is required", file=sys.stderr)
    sys.exit(2)
  problem = multi_process_problem(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=import-outside-toplevel  # after fedsnd_jax, which sets XLA_FLAGS before jax loads

  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Diverged as e:
    print(f"diverged: {e}", file=sys.stderr)
    sys.exit(3)
  finally:
    if _COORDINATOR.value:
      jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
