"""Imports fedsnd_jax first so its XLA_FLAGS set-up runs before any test imports jax."""

import fedsnd_jax  # noqa: F401
