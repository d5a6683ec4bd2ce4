"""MetricWriter: JSONL always, TensorBoard event files through the tensorboard package."""

import json
import os
import subprocess
import sys

import pytest

from dmad_jax.train.writers import MetricWriter


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _events(folder):
  """Every event of the one event file in ``folder``, as stored, read by TensorBoard's own record
  reader (which checks the framing and both CRCs)."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2

  (name,) = [f for f in os.listdir(folder) if f.startswith("events.out.tfevents.")]
  loader = event_file_loader.RawEventFileLoader(os.path.join(folder, name))
  return [event_pb2.Event.FromString(record) for record in loader.Load()]


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  w = MetricWriter(str(tmp_path))
  w.write_hparams({"batch_size": 16, "model": "pdm"})
  w.write_scalars(3, {"loss": 0.5, "lr": 1e-3})
  w.write_scalars(4, {"loss": float("nan")})
  # Readable before close: every record is flushed when written (a crash loses nothing).
  scalars = [(e.step, v.tag, v.simple_value) for e in _events(tmp_path) for v in e.summary.value]
  w.close()
  assert _rows(tmp_path / "metrics.jsonl") == [
    {"step": 3, "loss": 0.5, "lr": 1e-3},
    {"step": 4, "loss": "nan"},
  ]
  events = _events(tmp_path)
  assert events[0].file_version == "brain.Event:2"
  hparams = [v for e in events for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
  assert len(hparams) == 1 and hparams[0].metadata.plugin_data.plugin_name == "hparams"
  assert [s for s in scalars if not s[1].startswith("_hparams_")][:2] == [
    (3, "loss", 0.5),
    (3, "lr", pytest.approx(1e-3)),
  ]
  assert scalars[-1][:2] == (4, "loss") and scalars[-1][2] != scalars[-1][2]  # NaN kept


def test_writing_events_does_not_import_tensorflow(tmp_path):
  """TensorFlow is installed in the test environment; the writer still never imports it."""
  code = (
    "import sys; from dmad_jax.train.writers import MetricWriter\n"
    f"w = MetricWriter({str(tmp_path)!r}); w.write_hparams({{'a': 1}})\n"
    "w.write_scalars(1, {'loss': 1.0}); w.close()\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
  assert len(_events(tmp_path)) == 3  # file version, hparams, one scalar


def test_without_tensorboard_scalars_still_reach_jsonl(tmp_path, monkeypatch, caplog):
  # A None entry in sys.modules makes the import raise ImportError, as in an install without the
  # tensorboard package.
  monkeypatch.setitem(sys.modules, "tensorboard.summary.writer", None)
  monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.record_writer", None)
  w = MetricWriter(str(tmp_path))
  w.write_scalars(1, {"loss": 2.0})
  w.close()
  assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
  assert not any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  assert "TensorBoard events are off" in caplog.text


def test_disabled_writer_writes_nothing(tmp_path):
  w = MetricWriter(str(tmp_path / "x"), enabled=False)
  w.write_scalars(1, {"loss": 1.0})
  w.close()
  assert not os.path.exists(tmp_path / "x")
