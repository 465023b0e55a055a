"""Process-wide XLA set-up; must run before jax is first imported.

On CPU, jaxlib ≥ 0.10's default YNN fusions made a small CNN train 2.5–4× slower and compile 3–5× slower
(docs/design.md §11); `--xla_cpu_experimental_ynn_fusion_type=reduce,individual_convolution` keeps only the two
that pay.
Measured on 2 cores (jax 0.10.2; 20 clients × 10 cnn2 SGD steps of batch 32 at top level, two
worker threads, as the CPU `loop` map runs them): no YNN fusion 3,510–3,729 examples/s, these two 4,541, the
default set 4,451–4,533 (without `reduce`: 3,876–4,061); the same clients vmapped with im2col 2,263 vs 2,633, and
FedSND's server on digits (MLP) 1.02 vs 1.08 s and on Fashion-MNIST (cnn2, im2col) 7.54 vs 7.61 s a round.
Vectorised runs stay bit-identical to runs alone with them (tests/test_sweep.py). An XLA flag, or a value of it,
that the installed jaxlib does not know aborts the process, so the two fusions are named only for the jaxlib
they were measured on (0.10.2 up to 0.11), other jaxlibs ≥ 0.10 get them all off (the empty value, which 0.11.2
accepts too), older ones nothing; a user's own XLA_FLAGS are kept (appended to, never overwritten).
"""

import importlib.metadata
import os
import sys

CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=reduce,individual_convolution"
ALL_OFF_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_FIRST_JAXLIB_WITH_FLAG = (0, 10)
_TESTED_JAXLIBS = ((0, 10, 2), (0, 11))  # [first, end) where CPU_FLAG's values were measured


def _jaxlib_version() -> tuple[int, ...]:
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def with_cpu_flag(xla_flags: str, jaxlib_version: tuple[int, ...]) -> str:
  """XLA_FLAGS with the CPU flag appended (its value for this jaxlib), unless already set or unknown to it."""
  if "xla_cpu_experimental_ynn_fusion_type" in xla_flags or jaxlib_version < _FIRST_JAXLIB_WITH_FLAG:
    return xla_flags
  first, end = _TESTED_JAXLIBS
  return f"{xla_flags} {CPU_FLAG if first <= jaxlib_version < end else ALL_OFF_FLAG}".strip()


def configure_xla_flags() -> None:
  """Applies `with_cpu_flag` to this process's XLA_FLAGS, if jax has not been imported yet."""
  if "jax" in sys.modules:
    return  # Too late to change XLA_FLAGS for this process.
  flags = with_cpu_flag(os.environ.get("XLA_FLAGS", ""), _jaxlib_version())
  if flags:
    os.environ["XLA_FLAGS"] = flags
