"""fedsnd-jax: vectorised simulation of federated learning on non-IID data, centred on FedSND.

The public API for use from Python (docs/library.md, "A run from Python"); the modules hold the rest (a
partition of the data: `fedsnd_jax.partition.partition`, a name this namespace keeps for the module).
"""

from fedsnd_jax import platform as _platform

_platform.configure_xla_flags()  # before jax is first imported, by the imports below

from fedsnd_jax.algorithms import build as build_algorithm  # noqa: E402
from fedsnd_jax.data import load_dataset  # noqa: E402
from fedsnd_jax.evaluation import to_eval_data  # noqa: E402
from fedsnd_jax.federated_data import to_device  # noqa: E402
from fedsnd_jax.loop import LoopSettings, run  # noqa: E402
from fedsnd_jax.models import build_model  # noqa: E402
from fedsnd_jax.rounds import Federation, LocalSchedule, MechanismParts  # noqa: E402

__all__ = ["Federation", "LocalSchedule", "LoopSettings", "MechanismParts", "build_algorithm", "build_model",
           "load_dataset", "run", "to_device", "to_eval_data"]
