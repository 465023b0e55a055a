r"""What FedSND's server distillation adds round by round, read off finished runs.

  python -m benchmarks.distill_gain --workdir=runs/tuning

Every FedSND run also evaluates the same round's plain average of the uploads (`val_accuracy_no_distill`, from
`eval_models`). For the finished runs under `--workdir` that distilled in every round (their `distill_gate` is 1
throughout), the table gives distilled minus undistilled validation accuracy, in points, averaged over the rounds
whose teacher agreement was below `--agreement` and over the others: the rounds the agreement gate at that
threshold would have closed.
"""

import glob
import json
import os

from absl import app, flags


def split_gains(records: list[dict], agreement: float) -> tuple[list[float], list[float]]:
  """(gains in rounds with teacher agreement below `agreement`, gains in the others), points."""
  below, above = [], []
  for r in records:
    gain = 100 * (r["val_accuracy"] - r["val_accuracy_no_distill"])
    (below if r["teacher_agreement"] < agreement else above).append(gain)
  return below, above


def distilled_every_round(records: list[dict]) -> bool:
  return bool(records) and all(r.get("distill_gate") == 1 and "val_accuracy_no_distill" in r for r in records)


def table(workdir: str, agreement: float) -> str:
  def cell(gains):
    return f"{sum(gains) / len(gains):+.2f} ({len(gains)})" if gains else "— (0)"

  lines = [f"| run | agreement < {agreement} | agreement ≥ {agreement} |", "|---|---|---|"]
  for path in sorted(glob.glob(os.path.join(workdir, "**", "metrics.jsonl"), recursive=True)):
    with open(path) as f:
      records = [json.loads(line) for line in f]
    finished = os.path.exists(os.path.join(os.path.dirname(path), "summary.json"))
    if finished and distilled_every_round(records):
      below, above = split_gains(records, agreement)
      lines.append(f"| {os.path.relpath(os.path.dirname(path), workdir)} | {cell(below)} | {cell(above)} |")
  return "\n".join(lines)


def main(argv):
  del argv
  print(table(flags.FLAGS.workdir, flags.FLAGS.agreement))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/tuning", "Folder searched for FedSND runs.")
  flags.DEFINE_float("agreement", 0.85, "The agreement gate's threshold to split rounds at.")
  app.run(main)
