"""Run outputs: metrics.jsonl (one object per evaluated round), TensorBoard events, atomic JSON files."""

import json
import os
import socket
import tempfile
import time


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temporary file in the same folder, then renames it over `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.chmod(tmp, 0o644)  # mkstemp creates 0600 files.
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON line per evaluated round to metrics.jsonl, and scalars to TensorBoard.

  Opening rewrites metrics.jsonl atomically with `records` (those a checkpoint holds), so after a
  resume the file never keeps rounds the restored state has not done, and never a half line.
  """

  def __init__(self, workdir: str, records: list[dict]):
    self.path = os.path.join(workdir, "metrics.jsonl")
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    os.chmod(tmp, 0o644)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")  # noqa: SIM115  # Kept open for the whole run.
    self._tb = _event_writer(workdir)

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record, sort_keys=True) + "\n")  # One write call per whole line.
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._tb is not None:
      self._tb.add(record)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class Discard:
  """A MetricsWriter that writes nothing (the processes of a multi-process run other than process 0)."""

  def write(self, record: dict) -> None:
    del record

  def close(self) -> None:
    pass


class _TensorBoard:
  """Scalar event files written with the `tensorboard` package's protos and record format.

  The package's own EventFileWriter imports TensorFlow (seconds of start-up, and absent on the GPU
  machines), so the file is written directly: one `events.out.tfevents.*` file per process.
  """

  def __init__(self, workdir):
    # pylint: disable=import-outside-toplevel
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    folder = os.path.join(workdir, "tensorboard")
    os.makedirs(folder, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self._event, self._summary = event_pb2, summary_pb2
    self._file = open(os.path.join(folder, name), "wb")  # noqa: SIM115
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    self._records.write(event.SerializeToString())
    self._file.flush()

  def add(self, record):
    values = [self._summary.Summary.Value(tag=k, simple_value=float(v)) for k, v in sorted(record.items())
              if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    self._write(self._event.Event(wall_time=time.time(), step=int(record["round"]),
                                  summary=self._summary.Summary(value=values)))

  def close(self):
    self._file.close()


def _event_writer(workdir):
  try:
    return _TensorBoard(workdir)
  except ImportError:
    print("warning: the tensorboard package is not installed; no TensorBoard event files are written")
    return None
