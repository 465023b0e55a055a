"""fedsnd-jax: vectorised simulation of federated learning on non-IID data, centred on FedSND."""

from fedsnd_jax import platform as _platform

_platform.configure_xla_flags()
