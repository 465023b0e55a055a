"""Separate venvs for peer libraries that must not enter the project's own venv (FedJAX, Flower, pfl, ByzFL)."""

import os
import subprocess
import sys


def venv_python(venv: str, check: str, installs: list[list[str]], label: str) -> str:
  """The venv's python, after building the venv if `python -c check` fails in it.

  Building creates the venv, then runs `pip install` once per argument list in `installs`, in order.
  """
  python = os.path.join(venv, "bin", "python")

  def import_error() -> str | None:
    """None when `python -c check` succeeds in the venv, else the last line of its stderr."""
    if not os.path.exists(python):
      return f"no {python}"
    out = subprocess.run([python, "-c", check], capture_output=True, text=True)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    return None if out.returncode == 0 else (lines[-1] if lines else f"exit status {out.returncode}")

  if import_error() is None:
    return python
  print(f"{label}: building the venv {venv} (once; a few minutes)", flush=True)
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  for args in installs:
    # pip's errors go to stderr and stay on the CalledProcessError, whose last line says what failed.
    out = subprocess.run([python, "-m", "pip", "install", "-q", *args], stderr=subprocess.PIPE, text=True)
    if out.returncode:
      sys.stderr.write(out.stderr)
      raise subprocess.CalledProcessError(out.returncode, out.args, stderr=out.stderr)
  error = import_error()
  if error is not None:
    raise RuntimeError(f"{label}: the venv {venv} still fails `python -c {check!r}` after installing: {error}")
  return python
