import os
import subprocess
import sys

from fedsnd_jax import platform


def test_flag_is_appended_to_user_flags():
  assert platform.with_cpu_flag("--xla_foo=1", (0, 10, 2)) == f"--xla_foo=1 {platform.CPU_FLAG}"
  assert platform.with_cpu_flag("", (0, 10, 7)) == platform.CPU_FLAG


def test_fusion_names_only_for_the_jaxlib_they_were_measured_on():
  # An unknown value aborts the process: elsewhere every YNN fusion is turned off, a value all jaxlibs ≥ 0.10 know.
  for version in ((0, 10), (0, 10, 1), (0, 11, 2), (1, 0, 0)):
    assert platform.with_cpu_flag("", version) == platform.ALL_OFF_FLAG


def test_flag_is_not_duplicated_nor_overridden():
  user = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert platform.with_cpu_flag(user, (0, 10, 2)) == user


def test_old_jaxlib_gets_no_unknown_flag():
  assert platform.with_cpu_flag("--xla_foo=1", (0, 5)) == "--xla_foo=1"
  assert platform.with_cpu_flag("", ()) == ""


def test_importing_the_package_sets_the_flag_before_jax():
  env = {**os.environ, "XLA_FLAGS": "--xla_dump_to=/nonexistent-never-used"}
  code = "import fedsnd_jax, os, jax; jax.numpy.ones(1).block_until_ready(); print(os.environ['XLA_FLAGS'])"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  flags = out.stdout.strip()
  assert flags.startswith("--xla_dump_to=/nonexistent-never-used")
  assert platform.with_cpu_flag(flags, platform._jaxlib_version()) == flags
