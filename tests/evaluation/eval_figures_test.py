"""Tests for dmad_jax.evaluation.figures."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dmad_jax.evaluation.figures import deformation_panel, score_histogram


def _batch(rng, n, size, channels):
  return rng.uniform(-1.0, 1.0, size=(n, size, size, channels)).astype(np.float32)


def _open_png(path):
  with Image.open(path) as img:
    assert img.format == "PNG"
    img.load()
    return img.size


@pytest.mark.parametrize("channels", [1, 3])
def test_panel_gray_and_rgb(tmp_path, channels):
  rng = np.random.default_rng(0)
  rows = {name: _batch(rng, 4, 32, channels) for name in ("input", "reference", "coarse", "fine")}
  maps = {"anomaly map": rng.uniform(size=(4, 32, 32))}
  out = deformation_panel(
    tmp_path / "sub" / "dir" / "panel.png",
    rows,
    labels=[0, 1, 0, 1],
    scores=[0.1, 2.5, 0.3, 1.7],
    maps=maps,
    title="test panel",
  )
  assert out == str(tmp_path / "sub" / "dir" / "panel.png")
  width, height = _open_png(out)
  assert width > 0 and height > 0


def test_panel_single_sample(tmp_path):
  rng = np.random.default_rng(1)
  out = deformation_panel(tmp_path / "one.png", {"input": _batch(rng, 1, 32, 1)})
  _open_png(out)


def test_panel_more_rows_is_taller(tmp_path):
  rng = np.random.default_rng(2)
  batch = _batch(rng, 3, 32, 3)
  w2, h2 = _open_png(deformation_panel(tmp_path / "a.png", {"input": batch, "fine": batch}))
  maps = {"map a": rng.uniform(size=(3, 32, 32)), "map b": rng.uniform(size=(3, 32, 32))}
  w4, h4 = _open_png(
    deformation_panel(tmp_path / "b.png", {"input": batch, "fine": batch}, maps=maps)
  )
  assert h4 / w4 > h2 / w2
  assert h4 > 1.5 * h2


def test_panel_more_samples_is_wider(tmp_path):
  rng = np.random.default_rng(3)
  w2, h2 = _open_png(deformation_panel(tmp_path / "a.png", {"input": _batch(rng, 2, 32, 1)}))
  w16, h16 = _open_png(deformation_panel(tmp_path / "b.png", {"input": _batch(rng, 16, 32, 1)}))
  assert w16 / h16 > w2 / h2
  assert w16 > 4 * w2


def test_panel_large_images_and_nan_map(tmp_path):
  rng = np.random.default_rng(4)
  amap = rng.uniform(size=(2, 256, 256))
  amap[0, :10, :10] = np.nan
  amap[1, 5, 5] = np.inf
  out = deformation_panel(
    tmp_path / "big.png",
    {"input": _batch(rng, 2, 256, 3), "fine": _batch(rng, 2, 256, 3) * 1.2},
    scores=[np.nan, 1.0],
    maps={"anomaly map": amap},
  )
  _open_png(out)


def test_panel_all_nan_map(tmp_path):
  rng = np.random.default_rng(5)
  out = deformation_panel(
    tmp_path / "nan.png",
    {"input": _batch(rng, 2, 32, 1)},
    maps={"anomaly map": np.full((2, 32, 32), np.nan)},
  )
  _open_png(out)


def test_panel_validates_shapes(tmp_path):
  rng = np.random.default_rng(6)
  with pytest.raises(ValueError, match="at least one"):
    deformation_panel(tmp_path / "x.png", {})
  with pytest.raises(ValueError, match=r"row 'input' must be"):
    deformation_panel(tmp_path / "x.png", {"input": np.zeros((2, 32, 32))})
  with pytest.raises(ValueError, match=r"row 'fine' has 3 samples, expected 2"):
    deformation_panel(
      tmp_path / "x.png", {"input": _batch(rng, 2, 32, 1), "fine": _batch(rng, 3, 32, 1)}
    )
  with pytest.raises(ValueError, match=r"map 'm' has 1 samples, expected 2"):
    deformation_panel(
      tmp_path / "x.png", {"input": _batch(rng, 2, 32, 1)}, maps={"m": np.zeros((1, 32, 32))}
    )
  with pytest.raises(ValueError, match=r"labels has 3 entries, expected 2"):
    deformation_panel(tmp_path / "x.png", {"input": _batch(rng, 2, 32, 1)}, labels=[0, 1, 0])
  assert not (tmp_path / "x.png").exists()


def test_histogram_both_classes(tmp_path):
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, size=100)
  scores = rng.normal(size=100) + labels
  out = score_histogram(tmp_path / "h" / "hist.png", scores, labels, title="t", score_name="s")
  assert out == str(tmp_path / "h" / "hist.png")
  _open_png(out)


@pytest.mark.parametrize(
  "scores,labels",
  [
    ([0.1, 0.2, 0.3], [0, 0, 0]),
    ([0.5, 0.5], [0, 1]),
    ([np.nan, np.inf, 0.3, 0.4], [0, 1, 0, 1]),
    ([np.nan], [1]),
  ],
)
def test_histogram_edge_cases(tmp_path, scores, labels):
  _open_png(score_histogram(tmp_path / "edge.png", scores, labels))


def test_histogram_validates(tmp_path):
  with pytest.raises(ValueError, match="same length"):
    score_histogram(tmp_path / "x.png", [0.1, 0.2], [0])
  with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
    score_histogram(tmp_path / "x.png", [0.1, 0.2], [0, 2])


@settings(max_examples=50)
@given(
  labels=st.lists(st.integers(0, 1), max_size=60),
  batch=st.integers(1, 9),
  n=st.integers(0, 5),
)
def test_figure_rows_kept_per_batch_are_the_rows_the_figure_picks(labels, batch, n):
  from dmad_jax.evaluation import figures

  labels = np.asarray(labels, np.int32)
  rows = figures.FigureRows(n)
  positions = np.arange(len(labels))
  for start in range(0, len(labels), batch):
    part = slice(start, start + batch)
    rows.add(labels[part], positions[part] * 0.5, {"images": {"pos": positions[part]}})
  # Only the figure's rows are held, and picking from them equals picking from all rows.
  assert sum(len(x) for x in rows._labels) <= 2 * n
  picked_labels, scores, groups = rows.picked()
  expected = figures.pick_rows(labels, n)
  np.testing.assert_array_equal(groups.get("images", {}).get("pos", expected[:0]), expected)
  np.testing.assert_array_equal(picked_labels, labels[expected])
  np.testing.assert_array_equal(scores, expected * 0.5)
