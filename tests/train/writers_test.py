"""MetricWriter: JSONL always, TensorBoard through clu when TensorFlow is importable."""

import json
import os
import sys

from dmad_jax.train.writers import MetricWriter


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  w = MetricWriter(str(tmp_path))
  w.write_scalars(3, {"loss": 0.5, "lr": 1e-3})
  w.write_scalars(4, {"loss": float("nan")})
  w.close()
  assert _rows(tmp_path / "metrics.jsonl") == [
    {"step": 3, "loss": 0.5, "lr": 1e-3},
    {"step": 4, "loss": "nan"},
  ]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_without_tensorflow_scalars_still_reach_jsonl(tmp_path, monkeypatch, caplog):
  # A None entry in sys.modules makes `from clu import metric_writers` raise ImportError, as it
  # does in an install without TensorFlow.
  import clu

  monkeypatch.setitem(sys.modules, "clu.metric_writers", None)
  monkeypatch.delattr(clu, "metric_writers", raising=False)
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
