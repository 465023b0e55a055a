"""What the binaries (`train`, `sweep`) share on the command line: flags that fail as any bad input does (exit
code 2 and one line naming the field), and the multi-process flags' checks."""

import sys

from absl import flags

from experiments import configuration
from fedsnd_jax.errors import InputError


def parse_flags(argv):
  """absl flag parsing for the binaries, but a bad flag value exits with code 2 and one line, like any other
  bad input (an earlier version's flat --config field names its new place)."""
  try:
    for arg in argv[1:]:
      if arg.startswith("--config."):
        configuration.refuse_moved(arg.removeprefix("--config.").partition("=")[0])
    return flags.FLAGS(argv)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
  except flags.Error as e:  # a config file's own error comes with its traceback: its first and last lines
    lines = str(e).strip().splitlines()
    print(f"error: {lines[0]}{' ' + lines[-1] if len(lines) > 1 else ''}", file=sys.stderr)
  except (KeyError, AttributeError) as e:  # ml_collections' answer to an unknown --config.<field>
    print(f"error: config: unknown field {unknown_field(e)}; see experiments/configs/default.py", file=sys.stderr)
  except TypeError as e:  # a config file setting a field to a value of another type (a section to a value)
    print(f"error: config: {e}", file=sys.stderr)
  sys.exit(2)


def unknown_field(e: Exception) -> str:
  """The field ml_collections' error names, with its suggestion if it made one: `stepz (Did you mean "steps"
  instead of "stepz"?)`."""
  while e.args and isinstance(e.args[0], Exception):  # an AttributeError wraps the KeyError
    e = e.args[0]
  name, _, hint = str(e.args[0] if e.args else e).partition("\n")
  return name.strip("'\"") + (f" ({hint})" if hint else "")


def multi_process_problem(coordinator: str | None, num_processes: int | None, process_id: int | None) -> str:
  """What is wrong with the multi-process flags, as one line naming the flag ('' if nothing): all three or none,
  at least one process, and an index in [0, num_processes) (otherwise jax.distributed waits for ever)."""
  given = [coordinator is not None, num_processes is not None, process_id is not None]
  if not any(given):
    return ""
  if not all(given):
    return ("coordinator_address: a multi-process run needs --coordinator_address, --num_processes and "
            "--process_id together")
  if num_processes < 1:
    return f"num_processes: must be ≥ 1, got {num_processes}"
  if not 0 <= process_id < num_processes:
    return f"process_id: must be in [0, {num_processes}), got {process_id}"
  return ""
