"""The public API (`fedsnd_jax/__init__.py`) runs the Python example of docs/library.md; modules stay reachable."""

import json

import fedsnd_jax as fj
from fedsnd_jax import partition as partition_lib
from fedsnd_jax.partition import partition


def test_the_public_api_runs_a_federation_and_writes_the_output_contract(tiny, tmp_path):
  assert hasattr(partition_lib, "PARTITIONS")  # a name of the API does not shadow a module
  data = fj.to_device(tiny.x, tiny.y, partition(tiny.y, 3, "dirichlet_label", alpha=0.5, seed=0, min_size=4),
                      tiny.mean, tiny.std)
  fed = fj.Federation(3, 3, fj.LocalSchedule(batch_size=4, epochs=1), client_lr=0.05, client_momentum=0.9,
                      weight_decay=1e-5, input_shape=tiny.shape, num_classes=tiny.num_classes)
  model = fj.build_model("mlp", tiny.shape, tiny.num_classes)
  alg = fj.build_algorithm("fedprox", model, fed, {"mu": 0.01}, client_map="loop")
  test = fj.to_eval_data(tiny.x, tiny.y, tiny.mean, tiny.std)
  summary = fj.run(alg, model, data, {"test": test}, workdir=str(tmp_path), settings=fj.LoopSettings(rounds=2))
  assert summary["rounds"] == 2
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["final_accuracy"] == summary["final_accuracy"]
