"""Separate venvs for peer libraries that must not enter the project's own venv (FedJAX, ByzFL)."""

import os
import subprocess
import sys


def venv_python(venv: str, check: str, installs: list[list[str]], label: str) -> str:
  """The venv's python, after building the venv if `python -c check` fails in it.

  Building creates the venv, then runs `pip install` once per argument list in `installs`, in order.
  """
  python = os.path.join(venv, "bin", "python")

  def ready() -> bool:
    return os.path.exists(python) and subprocess.run([python, "-c", check], capture_output=True).returncode == 0

  if ready():
    return python
  print(f"{label}: building the venv {venv} (once; a few minutes)", flush=True)
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  for args in installs:
    subprocess.run([python, "-m", "pip", "install", "-q", *args], check=True)
  if not ready():
    raise RuntimeError(f"{label}: the venv {venv} still fails `python -c {check!r}` after installing")
  return python
