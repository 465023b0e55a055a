"""Importing the package first sets XLA_FLAGS (fedsnd_jax.platform) before any module here imports jax."""

import fedsnd_jax  # noqa: F401
