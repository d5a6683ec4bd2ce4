"""Tests of the video frame-dump source, its label formats and the background templates."""

import sys
import types

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dmad_jax.data import get_sources
from dmad_jax.data import video as video_mod
from dmad_jax.data.labels import load_frame_labels
from dmad_jax.data.templates import (
  estimate_template,
  image_template,
  template_bank,
  video_templates,
)
from dmad_jax.data.video import VideoFrameSource, extract_frames

SIZE = 16
# Frame numbers as written on disk; test video "01" starts at 3 so that "10.png" sorts last only
# when sorted numerically.
LAYOUT = {
  "training": {"01": range(0, 7), "02": range(1, 10)},
  "testing": {"01": range(3, 11), "02": range(0, 6)},
}
# Per-frame labels of the test videos (0-indexed frames); frame 1 of "01" falls in the trimmed part.
TEST_FRAME_LABELS = {
  "01": np.array([0, 1, 0, 0, 0, 1, 1, 1]),
  "02": np.array([0, 0, 0, 0, 1, 1]),
}
TRIMMED = np.array([0, 1, 1, 1, 1, 1])


def _base(video_index: int, position: int) -> int:
  """Distinct base value of each frame (position = order inside the video)."""
  return 8 * position + 30 * video_index


def _frame(video_index: int, position: int) -> np.ndarray:
  """An RGB frame whose channels are base, base + 1, base + 2."""
  base = _base(video_index, position)
  return np.broadcast_to(np.array([base, base + 1, base + 2], np.uint8), (SIZE, SIZE, 3)).copy()


def _write_dump(root, layout=LAYOUT):
  for split, videos in layout.items():
    for v, (name, numbers) in enumerate(sorted(videos.items())):
      folder = root / split / "frames" / name
      folder.mkdir(parents=True)
      for position, number in enumerate(numbers):
        Image.fromarray(_frame(v, position)).save(folder / f"{number}.png")
      (folder / "notes.txt").write_text("not a frame")
      (folder / ".DS_Store").write_bytes(b"\0")
  return root


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
  return _write_dump(tmp_path_factory.mktemp("video"))


def _unit(x):
  return np.asarray(x, np.float32) / np.float32(127.5) - np.float32(1.0)


def test_clip_counts_and_order(dump):
  src = VideoFrameSource(dump, "train", image_size=SIZE)
  assert src.split == "training" and src.videos == ["01", "02"]
  assert src.frame_counts.tolist() == [7, 9] and src.video_lengths.tolist() == [3, 5]
  assert len(src) == 8 and src.image_shape == (SIZE, SIZE, 3)
  assert src.labels.tolist() == [0] * 8
  expected = [(0, s) for s in range(3)] + [(1, s) for s in range(5)]
  for i, (v, start) in enumerate(expected):
    rec = src[i]
    assert rec["frames"].shape == (SIZE, SIZE, 15) and rec["frames"].dtype == np.float32
    assert int(rec["video"]) == v and int(rec["index"]) == i and int(rec["frame"]) == start + 4
    for k in range(5):
      np.testing.assert_array_equal(
        rec["frames"][..., 3 * k : 3 * k + 3], _unit(_frame(v, start + k))
      )
    np.testing.assert_array_equal(rec["image"], rec["frames"][..., 12:])
    assert rec["label"].dtype == np.int32 and int(rec["label"]) == 0
  np.testing.assert_array_equal(src[-1]["image"], _unit(_frame(1, 8)))
  assert "video" in src.describe() and "01: 3, 02: 5" in src.describe()


def test_numeric_frame_order(dump):
  src = VideoFrameSource(dump, "testing", image_size=SIZE)
  names = [p.rsplit("/", 1)[-1] for p in src.frame_paths[0]]
  assert names == [f"{n}.png" for n in range(3, 11)]
  np.testing.assert_array_equal(src[3]["image"], _unit(_frame(0, 7)))  # 10.png is the last frame.


def test_gray_repeats_luminance(dump):
  src = VideoFrameSource(dump, "test", image_size=SIZE, gray=True)
  frames = src[0]["frames"]
  for k in range(5):
    chunk = frames[..., 3 * k : 3 * k + 3]
    assert np.all(chunk == chunk[..., :1])
    # Luma of (b, b + 1, b + 2) rounds to b + 1.
    np.testing.assert_allclose(chunk[0, 0, 0], _unit(_base(0, k) + 1), atol=1 / 127.5 + 1e-6)


def test_sequential_pass_reads_each_frame_once(dump, monkeypatch):
  calls = []
  real = video_mod.load_image

  def counting(path, **kwargs):
    calls.append(path)
    return real(path, **kwargs)

  monkeypatch.setattr(video_mod, "load_image", counting)
  src = VideoFrameSource(dump, "training", image_size=SIZE, t_length=3)
  for i in range(len(src)):
    src[i]
  assert len(calls) == len(set(calls)) == 16


def _write_labels(tmp_path):
  """The same test labels in the four supported formats."""
  out = {}
  out["trimmed"] = tmp_path / "dmad.npy"
  np.save(out["trimmed"], TRIMMED.astype(np.float64))
  out["untrimmed"] = tmp_path / "mnad.npy"
  np.save(out["untrimmed"], np.concatenate(list(TEST_FRAME_LABELS.values()))[None].astype(np.int8))
  out["per_video"] = tmp_path / "test_frame_mask"
  out["per_video"].mkdir()
  for name, labels in TEST_FRAME_LABELS.items():
    np.save(out["per_video"] / f"{name}.npy", labels.astype(np.uint8))
  gt = np.empty((1, 2), object)
  gt[0, 0] = np.array([[2, 6], [2, 8]], np.float64)  # Intervals [2, 2] and [6, 8], 1-indexed.
  gt[0, 1] = np.array([[5], [6]], np.float64)
  out["mat"] = tmp_path / "ped.mat"
  scipy.io.savemat(out["mat"], {"gt": gt})
  return out


@pytest.mark.parametrize("fmt", ["trimmed", "untrimmed", "per_video", "mat"])
def test_label_formats_agree(dump, tmp_path, fmt):
  path = _write_labels(tmp_path)[fmt]
  src = VideoFrameSource(dump, "testing", image_size=SIZE, labels=path)
  assert src.labels.dtype == np.int32 and src.labels.tolist() == TRIMMED.tolist()
  assert [int(src[i]["label"]) for i in range(len(src))] == TRIMMED.tolist()
  assert "anomalous: 5" in src.describe()


def test_label_mismatch_lists_frames(dump, tmp_path):
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros(13))
  with pytest.raises(ValueError) as err:
    VideoFrameSource(dump, "testing", image_size=SIZE, labels=bad)
  message = str(err.value)
  assert "01: 8, 02: 6" in message and "13 labels" in message and str(bad) in message
  with pytest.raises(FileNotFoundError, match="02.npy"):
    folder = tmp_path / "partial"
    folder.mkdir()
    np.save(folder / "01.npy", TEST_FRAME_LABELS["01"])
    VideoFrameSource(dump, "testing", image_size=SIZE, labels=folder)


def test_skip_first_matches_longer_clips(dump, tmp_path):
  path = _write_labels(tmp_path)["untrimmed"]
  long = VideoFrameSource(dump, "testing", image_size=SIZE, labels=path)
  short = VideoFrameSource(dump, "testing", image_size=SIZE, t_length=2, skip_first=4, labels=path)
  assert len(short) == len(long) and short.labels.tolist() == long.labels.tolist()
  np.testing.assert_array_equal(short[2]["image"], long[2]["image"])
  np.testing.assert_array_equal(short[2]["frames"], long[2]["frames"][..., 9:])
  with pytest.raises(ValueError, match="skip_first"):
    VideoFrameSource(dump, "testing", image_size=SIZE, t_length=5, skip_first=2)


def test_layout_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    VideoFrameSource(tmp_path / "nowhere", "training")
  (tmp_path / "ds" / "training").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="testing"):
    VideoFrameSource(tmp_path / "ds", "testing")
  with pytest.raises(FileNotFoundError, match="frames"):
    VideoFrameSource(tmp_path / "ds", "training")
  with pytest.raises(ValueError, match="split"):
    VideoFrameSource(tmp_path / "ds", "val")
  short = _write_dump(tmp_path / "short", {"training": {"a": range(6), "b": range(3)}})
  with pytest.raises(ValueError, match=r"frames.b.*has 3 frames"):
    VideoFrameSource(short, "training", image_size=SIZE, t_length=5)


def test_templates_median_and_hist_mode():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (10, 4, 5)).astype(np.uint8)
  # Pixel (1, 2) is 100 in 7 of 10 frames; the other 3 values are far from 100.
  frames[:, 1, 2] = [100, 100, 7, 100, 100, 240, 100, 30, 100, 100]
  # Pixel (0, 0) is 100 in 7 frames and uniform random otherwise: the mode stays near 100.
  frames[:, 0, 0] = 100
  frames[[1, 4, 8], 0, 0] = rng.integers(0, 256, 3)
  frames[:, 3, 4] = 255  # Constant at the top bin, where the zero padding cuts the kernel.
  mode = estimate_template(frames, method="hist_mode")
  assert mode.shape == (4, 5) and mode.dtype == np.float32
  assert mode[1, 2] == _unit(100) and abs(mode[0, 0] - _unit(100)) <= 2 / 127.5 + 1e-6
  assert mode[3, 4] == 1.0
  np.testing.assert_array_equal(
    estimate_template(frames, method="median"), _unit(np.median(frames, 0))
  )
  const = np.full((6, 3, 3), 77, np.uint8)
  for method in ("hist_mode", "median"):
    np.testing.assert_array_equal(estimate_template(const, method=method), _unit(const[0]))
  with pytest.raises(ValueError, match="method"):
    estimate_template(const, method="mean")


def test_video_templates(tmp_path):
  root = tmp_path / "bg"
  for name, value in (("a", 77), ("b", 200)):
    folder = root / "training" / "frames" / name
    folder.mkdir(parents=True)
    for i in range(6):
      frame = np.full((SIZE, SIZE), value, np.uint8)
      frame[i % SIZE, :] = 0  # A passing "object" that the template must ignore.
      Image.fromarray(frame).save(folder / f"{i}.png")
  src = VideoFrameSource(root, "training", image_size=SIZE)
  for method in ("hist_mode", "median"):
    bank = video_templates(src, method=method, max_frames=5)
    assert bank.shape == (2, SIZE, SIZE, 3) and bank.dtype == np.float32
    np.testing.assert_array_equal(bank[0], np.full((SIZE, SIZE, 3), _unit(77)))
    np.testing.assert_array_equal(bank[1], np.full((SIZE, SIZE, 3), _unit(200)))


def test_image_template(dump, tmp_path):
  path = tmp_path / "bkg.png"
  Image.fromarray(_frame(0, 5)).save(path)  # channels 40, 41, 42
  color = image_template(path, VideoFrameSource(dump, "training", image_size=SIZE))
  assert color.shape == (SIZE, SIZE, 3) and color.dtype == np.float32
  np.testing.assert_array_equal(color, _unit(_frame(0, 5)))
  gray = image_template(path, VideoFrameSource(dump, "training", image_size=SIZE, gray=True))
  assert gray.shape == (SIZE, SIZE, 3) and np.all(gray == gray[..., :1])
  np.testing.assert_allclose(gray[0, 0, 0], _unit(41), atol=1 / 127.5 + 1e-6)  # luma
  one = image_template(path, types.SimpleNamespace(image_shape=(8, 8, 1)))
  assert one.shape == (8, 8, 1) and one.dtype == np.float32


def test_load_frame_labels_mat_without_gt(tmp_path):
  path = tmp_path / "x.mat"
  scipy.io.savemat(path, {"labels": np.zeros(3)})
  with pytest.raises(ValueError, match="no key 'gt'"):
    load_frame_labels(path, ["a"], [3], 0)


def test_get_sources_video(dump, tmp_path):
  labels = _write_labels(tmp_path)["mat"]
  config = types.SimpleNamespace(name="video", root=str(dump), image_size=SIZE, labels=str(labels))
  sources = get_sources(config)
  assert len(sources["train"]) == 8 and len(sources["test"]) == 6
  assert sources["train"].split == "training" and sources["test"].split == "testing"
  assert sources["test"].labels.tolist() == TRIMMED.tolist()
  assert sources["test"][0]["frames"].shape == (SIZE, SIZE, 15)


def test_extract_frames_without_cv2(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "cv2", None)  # Makes `import cv2` raise ImportError.
  with pytest.raises(ImportError, match="pip install opencv-python-headless"):
    extract_frames(tmp_path / "in.avi", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# anomalib's raw label layouts, per-scene templates.
# ---------------------------------------------------------------------------------------------
def _mask(anomalous: int) -> np.ndarray:
  m = np.zeros((6, 9), np.uint8)
  if anomalous:
    m[2, 5] = 255  # a single pixel is enough
  return m


def _write_ucsd(folder, names, skip_frame=None):
  """UCSDped2/Test/<name>_gt/NNN.bmp masks (1-indexed, zero-padded like the real set)."""
  for name, labels in zip(names, TEST_FRAME_LABELS.values(), strict=True):
    gt = folder / "Test" / f"{name}_gt"
    gt.mkdir(parents=True)
    for t, lab in enumerate(labels):
      if (name, t) != skip_frame:
        Image.fromarray(_mask(lab)).save(gt / f"{t + 1:03d}.bmp")
    (gt / "Thumbs.db").write_bytes(b"\0")
  return folder


@pytest.mark.parametrize("pass_test_folder", [False, True])
def test_ucsd_bmp_masks_matched_by_name(tmp_path, pass_test_folder):
  names = ["Test001", "Test002"]
  dump = _write_dump(
    tmp_path / "dump", {"testing": dict(zip(names, LAYOUT["testing"].values(), strict=True))}
  )
  ucsd = _write_ucsd(tmp_path / "UCSDped2", names)
  labels = ucsd / "Test" if pass_test_folder else ucsd
  src = VideoFrameSource(dump, "testing", image_size=SIZE, labels=labels)
  assert src.videos == names and src.labels.tolist() == TRIMMED.tolist()


def test_ucsd_masks_matched_by_number_and_length_mismatch(dump, tmp_path):
  # The FramePred dump names the Ped2 test videos 01, 02, ...: Test001_gt maps to 01.
  ucsd = _write_ucsd(tmp_path / "ok", ["Test001", "Test002"])
  src = VideoFrameSource(dump, "testing", image_size=SIZE, labels=ucsd)
  assert src.labels.tolist() == TRIMMED.tolist()
  short = _write_ucsd(tmp_path / "short", ["Test001", "Test002"], skip_frame=("Test002", 5))
  with pytest.raises(ValueError) as err:
    VideoFrameSource(dump, "testing", image_size=SIZE, labels=short)
  message = str(err.value)
  assert "5 mask images for video '02'" in message and "01: 8, 02: 6" in message
  assert "Test002_gt" in message
  missing = tmp_path / "missing"
  _write_ucsd(missing, ["Test001", "Test007"])
  with pytest.raises(ValueError, match=r"video '02' has no \*_gt mask folder.*Test007"):
    VideoFrameSource(dump, "testing", image_size=SIZE, labels=missing)


def _write_avenue(folder, frame_labels, key="volLabel"):
  """ground_truth_demo/testing_label_mask/<n>_label.mat with a 1 x T cell of masks."""
  base = folder / "ground_truth_demo" / "testing_label_mask"
  base.mkdir(parents=True)
  for n, labels in enumerate(frame_labels, start=1):
    cell = np.empty((1, len(labels)), object)
    for t, lab in enumerate(labels):
      cell[0, t] = _mask(lab)
    scipy.io.savemat(base / f"{n}_label.mat", {key: cell})
  return folder


@pytest.mark.parametrize("level", ["root", "ground_truth_demo", "testing_label_mask"])
def test_avenue_vollabel_mat_masks(dump, tmp_path, level):
  root = _write_avenue(tmp_path / "avenue", list(TEST_FRAME_LABELS.values()))
  path = {
    "root": root,
    "ground_truth_demo": root / "ground_truth_demo",
    "testing_label_mask": root / "ground_truth_demo" / "testing_label_mask",
  }[level]
  src = VideoFrameSource(dump, "testing", image_size=SIZE, labels=path)
  assert src.labels.tolist() == TRIMMED.tolist()


def test_avenue_mat_errors(dump, tmp_path):
  wrong = list(TEST_FRAME_LABELS.values())
  wrong[0] = wrong[0][:-1]
  with pytest.raises(ValueError) as err:
    VideoFrameSource(dump, "testing", image_size=SIZE, labels=_write_avenue(tmp_path / "a", wrong))
  message = str(err.value)
  assert "7 masks in 'volLabel'" in message and "1_label.mat" in message
  assert "01: 8, 02: 6" in message
  with pytest.raises(ValueError, match="no key 'volLabel'"):
    labels = _write_avenue(tmp_path / "b", list(TEST_FRAME_LABELS.values()), key="gt")
    VideoFrameSource(dump, "testing", image_size=SIZE, labels=labels)


def test_per_video_pixel_mask_npy(dump, tmp_path):
  """ShanghaiTech test_pixel_mask/<video>.npy: (T, H, W) masks."""
  folder = tmp_path / "test_pixel_mask"
  folder.mkdir()
  for name, labels in TEST_FRAME_LABELS.items():
    np.save(folder / f"{name}.npy", np.stack([_mask(lab) // 255 for lab in labels]))
  src = VideoFrameSource(dump, "testing", image_size=SIZE, labels=folder)
  assert src.labels.tolist() == TRIMMED.tolist()


SCENES = {
  "training": {"01_001": range(6), "01_002": range(5), "02_001": range(6)},
  "testing": {"01_0014": range(5), "02_0003": range(6)},
}


def test_video_sources_template_indices(tmp_path):
  root = _write_dump(tmp_path / "st", SCENES)
  scene = video_mod.video_sources(root, templates="scene", image_size=SIZE)
  train, test = scene["train"], scene["test"]
  assert train.template_of.tolist() == [0, 0, 1] and test.template_of.tolist() == [0, 1]
  assert train.num_templates == test.num_templates == 2
  assert video_mod.count_templates(root, "scene") == (2, 0)
  # Scene templates come from training frames only (11 of scene 01, 6 of scene 02).
  assert [len(f) for f in test.template_frames] == [11, 6]
  assert all("training" in p for f in test.template_frames for p in f)
  assert [int(test[i]["template_index"]) for i in range(len(test))] == [0] + [1] * 2
  assert int(train[len(train) - 1]["template_index"]) == 1

  trans = video_mod.video_sources(root, templates="video_transductive", image_size=SIZE)
  assert trans["train"].template_of.tolist() == [0, 1, 2]
  assert trans["test"].template_of.tolist() == [3, 4] and trans["test"].num_templates == 5
  assert video_mod.count_templates(root, "video_transductive") == (3, 2)
  single = video_mod.video_sources(root, image_size=SIZE)
  assert single["test"].template_of.tolist() == [0, 0] and single["test"].num_templates == 1

  with pytest.raises(ValueError, match="templates must be one of"):
    video_mod.video_sources(root, templates="per_frame", image_size=SIZE)
  unknown = _write_dump(
    tmp_path / "unknown", {"training": SCENES["training"], "testing": {"03_0001": range(6)}}
  )
  with pytest.raises(ValueError, match=r"\['03_0001'\].*training scenes: \['01', '02'\]"):
    video_mod.video_sources(unknown, templates="scene", image_size=SIZE)


def test_template_bank_per_scene(tmp_path):
  root = tmp_path / "bank"
  for split, videos in SCENES.items():
    for name, numbers in videos.items():
      value = 60 if name.startswith("01") else 200
      folder = root / split / "frames" / name
      folder.mkdir(parents=True)
      for i in numbers:
        frame = np.full((SIZE, SIZE), value, np.uint8)
        frame[i % SIZE, :] = 255 - value  # a passing object the template must ignore
        Image.fromarray(frame).save(folder / f"{i}.png")
  sources = video_mod.video_sources(root, templates="scene", image_size=SIZE)
  bank = template_bank(sources["train"], max_frames=5)
  assert bank.shape == (2, SIZE, SIZE, 3) and bank.dtype == np.float32
  np.testing.assert_array_equal(bank[0], _unit(60))
  np.testing.assert_array_equal(bank[1], _unit(200))


def test_raw_ucsd_folder_serves_as_frames_and_labels(tmp_path):
  """UCSDped2/Test holds Test001/*.tif frames next to Test001_gt/*.bmp masks: linked as
  testing/frames, the mask folders are not taken for videos and give the labels."""
  test = tmp_path / "UCSDped2" / "Test"
  for name, numbers in (("Test001", range(1, 9)), ("Test002", range(1, 7))):
    (test / name).mkdir(parents=True)
    for position, number in enumerate(numbers):
      Image.fromarray(_frame(0, position)[..., 0]).save(test / name / f"{number:03d}.tif")
  _write_ucsd(tmp_path / "UCSDped2", ["Test001", "Test002"])
  root = tmp_path / "ped2"
  (root / "testing").mkdir(parents=True)
  (root / "testing" / "frames").symlink_to(test)
  src = VideoFrameSource(root, "testing", image_size=SIZE, labels=test)
  assert src.videos == ["Test001", "Test002"] and src.frame_counts.tolist() == [8, 6]
  assert src.labels.tolist() == TRIMMED.tolist()
