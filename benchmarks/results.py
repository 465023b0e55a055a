"""RESULTS.md as generated blocks: each table lies between markers and is written by the command that made it.

A block is

  <!-- NAME:begin -->
  _`COMMAND` · MACHINE · commit COMMIT · DATE · wall time W_

  TEXT
  <!-- NAME:end -->

`publish` replaces exactly one block (or appends it, under a `## TITLE` heading, when the file has none of
that name) and leaves every other byte of the file as it was, so rerunning a benchmark rewrites its own table
and nothing else. The header is measured, not written by hand: the command as it was typed, the machine's
cores and accelerator, the git commit (marked "+ local changes" when tracked files other than the benchmarks'
outputs differ from it) and the seconds since the process started.
"""

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time

_START = time.monotonic()
_STARTED_AT = time.time()  # wall clock, to compare with files' modification times
REUSED = "finished by an earlier invocation of this command (same configuration, same machine) and reused"


def made_earlier(run: str) -> bool:
  """Whether the finished run folder `run` (its summary.json) predates this process: a reused run, whose time the
  header's wall time does not cover."""
  return os.path.getmtime(os.path.join(run, "summary.json")) < _STARTED_AT


def markers(name: str) -> tuple[str, str]:
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def machine() -> str:
  """"2 CPU cores (x86_64), no accelerator", or the accelerator jax sees: "1 × NVIDIA H100 …"."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  text = f"{cores} CPU cores ({platform.machine()})"
  if "jax" in sys.modules:  # only a benchmark that imported jax can have used an accelerator
    import jax
    devices = [d for d in jax.devices() if d.platform != "cpu"]
    if devices:
      return f"{text}, {len(devices)} × {devices[0].device_kind}"
  return text + ", no accelerator"


# What benchmarks write (their own or another's tables and plots): not the code a table ran.
OUTPUTS = ("benchmarks/RESULTS.md", "benchmarks/plots/")


def commit() -> str:
  """The short HEAD commit, "+ local changes to <paths>" when tracked files other than benchmark outputs
  (`OUTPUTS`) differ from it; "unknown" outside git."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "diff", "--name-only", "-z", "HEAD"], capture_output=True, text=True,
                           check=True)  # tracked files, staged or not, by their paths as they are
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  changed = [path for path in dirty.stdout.split("\0") if path and not path.startswith(OUTPUTS)]
  if not changed:
    return head.stdout.strip()
  return f"{head.stdout.strip()} + local changes to {', '.join(changed[:3])}" + (" …" if len(changed) > 3 else "")


def command() -> str:
  """The command line that is running, as a user would type it again."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  program = f"python -m {spec.name}" if spec and spec.name else f"python {sys.argv[0]}"
  return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def _duration(seconds: float) -> str:
  minutes, s = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return (f"{hours} h {minutes} min" if hours else f"{minutes} min {s} s" if minutes else f"{s} s")


def header(wall_s: float | None = None) -> str:
  wall_s = time.monotonic() - _START if wall_s is None else wall_s
  date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
  return f"_`{command()}` · {machine()} · commit {commit()} · {date} · wall time {_duration(wall_s)}_"


def replace_block(content: str, name: str, body: str, title: str) -> str:
  """`content` with block `name` holding `body` (appended under `## title` if there is no such block)."""
  begin, end = markers(name)
  block = f"{begin}\n{body.strip()}\n{end}"
  if begin not in content:
    return content.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
  head, rest = content.split(begin, 1)
  if end not in rest:
    raise ValueError(f"block {name} has a begin marker and no end marker")
  return head + block + rest.split(end, 1)[1]


def publish(path: str, name: str, text: str, title: str, wall_s: float | None = None) -> None:
  """Writes `text`, under a measured header, as block `name` of the Markdown file `path` ("" writes nothing)."""
  if not path:
    return
  content = ""
  if os.path.exists(path):
    with open(path) as f:
      content = f.read()
  content = replace_block(content, name, f"{header(wall_s)}\n\n{text}", title)  # before the file is opened
  with open(path, "w") as f:
    f.write(content)
  print(f"[results] block {name} of {path} rewritten", flush=True)


def define_flags(block: str) -> None:
  """--results (the Markdown file the block goes to; "" writes none) and --block (its name)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  flags.DEFINE_string("results", "benchmarks/RESULTS.md", "Markdown file whose block this run rewrites ('': "
                      "none).")
  flags.DEFINE_string("block", block, "That block's name (markers <!-- NAME:begin --> … <!-- NAME:end -->).")
