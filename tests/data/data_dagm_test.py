"""DAGMSource: DAGM 2007 (Class<k>/{Train,Test}, Label/Labels.txt) served like FolderSource."""

from __future__ import annotations

import logging
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageDraw

from dmad_jax.configs.schema import ConfigError
from dmad_jax.data import FolderSource, ImageReadError
from dmad_jax.data.dagm import DAGMSource, read_labels
from dmad_jax.data.pipeline import element_spec, get_source

PIXELS = 32  # written size; records are resized to SIZE, so masks go through the resize too
SIZE = 24
CLASS = 3


def _ellipse(box):
  img = Image.new("L", (PIXELS, PIXELS), 0)
  ImageDraw.Draw(img).ellipse(box, fill=255)
  return np.asarray(img)


def _rect(y0, y1, x0, x1):
  mask = np.zeros((PIXELS, PIXELS), np.uint8)
  mask[y0:y1, x0:x1] = 255
  return mask


# name -> mask (None: non-defective). Listed out of order to check the sort by file name.
TRAIN = {"0004.PNG": None, "0001.PNG": None, "0002.PNG": _ellipse((4, 6, 20, 16)), "0003.PNG": None}
TEST = {
  "0003.PNG": _rect(8, 20, 2, 30),
  "0001.PNG": None,
  "0002.PNG": _ellipse((10, 4, 28, 26)),
  "0004.PNG": None,
}


def _labels_text(files, header="1"):
  lines = [header]
  for i, (name, mask) in enumerate(files.items(), start=1):
    mask_name = "0" if mask is None else name.replace(".PNG", "_label.PNG")
    lines.append(f"{i}\t{0 if mask is None else 1}\t{name}\t0\t{mask_name}")
  return "\n".join(lines) + "\n"


def _write_split(folder, files, rng):
  (folder / "Label").mkdir(parents=True)
  for name, mask in files.items():
    Image.fromarray(rng.integers(0, 256, (PIXELS, PIXELS), dtype=np.uint8)).save(folder / name)
    if mask is not None:
      Image.fromarray(mask).save(folder / "Label" / name.replace(".PNG", "_label.PNG"))
  (folder / "Label" / "Labels.txt").write_text(_labels_text(files))


@pytest.fixture
def root(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "DAGM"
  _write_split(root / f"Class{CLASS}" / "Train", TRAIN, rng)
  _write_split(root / f"Class{CLASS}" / "Test", TEST, rng)
  return root


def _labels_file(root, split="Test"):
  return root / f"Class{CLASS}" / split / "Label" / "Labels.txt"


def _expected_mask(mask):
  if mask is None:
    return np.zeros((SIZE, SIZE), np.float32)
  resized = Image.fromarray(mask).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
  return (np.asarray(resized) >= 128).astype(np.float32)


def test_train_split_is_the_non_defective_training_images(root, caplog):
  with caplog.at_level(logging.INFO, logger="dmad_jax.data.dagm"):
    src = DAGMSource(root, CLASS, "train", image_size=SIZE)
  assert [p.rsplit("/", 1)[-1] for p in src.paths] == ["0001.PNG", "0003.PNG", "0004.PNG"]
  assert src.labels.tolist() == [0, 0, 0] and src.defects == ["good"] * 3
  assert src.mask_paths is None and not src.has_masks
  assert "leaving out the 1 defective training images" in caplog.text
  record = src[1]
  assert set(record) == {"image", "label", "index"}
  assert record["image"].shape == (SIZE, SIZE, 3) and record["image"].dtype == np.float32
  assert int(record["index"]) == 1 and -1.0 <= record["image"].min() <= record["image"].max() <= 1.0
  # Gray images repeated to 3 channels.
  np.testing.assert_array_equal(record["image"][..., 0], record["image"][..., 2])
  assert src.describe().startswith(f"dagm {root} Class{CLASS} train: 3 images {SIZE}x{SIZE}x3")


def test_test_split_labels_and_masks(root):
  src = DAGMSource(root, CLASS, "test", image_size=SIZE, channels=1)
  names = sorted(TEST)
  assert [p.rsplit("/", 1)[-1] for p in src.paths] == names
  assert src.labels.tolist() == [0, 1, 1, 0] and src.defects == ["good", "defect", "defect", "good"]
  assert src.has_masks and src.image_shape == (SIZE, SIZE, 1)
  assert [m and m.rsplit("/", 2)[-2:] for m in src.mask_paths] == [
    None,
    ["Label", "0002_label.PNG"],
    ["Label", "0003_label.PNG"],
    None,
  ]
  for i, name in enumerate(names):
    record = src[i]
    assert record["mask"].dtype == np.float32 and record["mask"].shape == (SIZE, SIZE)
    np.testing.assert_array_equal(record["mask"], _expected_mask(TEST[name]))
    assert int(record["label"]) == (TEST[name] is not None)
  assert src[1]["mask"].sum() > 0 and src[0]["mask"].sum() == 0
  line = src.describe()
  assert line.startswith(f"dagm {root} Class{CLASS} test: 4 images")
  assert "normal: 2, anomalous: 2; defect: 2, good: 2" in line and "masks from" in line


def _mvtec_copy(root, dst):
  """The same files in the MVTec layout that FolderSource reads."""
  for name, mask in TRAIN.items():
    if mask is None:
      (dst / "train" / "good").mkdir(parents=True, exist_ok=True)
      shutil.copy(root / f"Class{CLASS}" / "Train" / name, dst / "train" / "good" / name)
  test_dir = root / f"Class{CLASS}" / "Test"
  for name, mask in TEST.items():
    folder = dst / "test" / ("good" if mask is None else "defect")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(test_dir / name, folder / name)
    if mask is not None:
      (dst / "ground_truth" / "defect").mkdir(parents=True, exist_ok=True)
      label = test_dir / "Label" / name.replace(".PNG", "_label.PNG")
      shutil.copy(label, dst / "ground_truth" / "defect" / name.replace(".PNG", "_mask.PNG"))
  return dst


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("split", ["train", "test"])
def test_records_equal_a_folder_source_over_the_same_files(root, tmp_path, split, channels):
  dagm = DAGMSource(root, CLASS, split, image_size=SIZE, channels=channels)
  folder = FolderSource(
    _mvtec_copy(root, tmp_path / "mvtec"), split, image_size=SIZE, channels=channels
  )
  assert len(dagm) == len(folder) and dagm.has_masks == folder.has_masks
  assert dagm.element_spec == folder.element_spec and dagm.image_shape == folder.image_shape
  by_name = {p.rsplit("/", 1)[-1]: i for i, p in enumerate(folder.paths)}
  for i, path in enumerate(dagm.paths):
    ours, theirs = dagm[i], folder[by_name[path.rsplit("/", 1)[-1]]]
    assert set(ours) == set(theirs)
    for key in ours:
      if key != "index":
        assert ours[key].dtype == theirs[key].dtype
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{path} {key}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_element_spec_matches_the_records(root, split):
  src = DAGMSource(root, CLASS, split, image_size=SIZE)
  spec = src.element_spec
  record = src[0]
  assert set(spec) == set(record)
  for key, value in record.items():
    assert spec[key] == jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype), key


def test_labels_file_parsing_is_robust(root, caplog):
  path = _labels_file(root)
  text = _labels_text(TEST).replace("\t", "  ").replace("\n", "\r\n")
  path.write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\r\n\r\n")  # BOM, CRLF, blank lines
  entries = read_labels(path)
  assert [(e.line, e.image, e.defective, e.mask) for e in entries] == [
    (2, "0003.PNG", True, "0003_label.PNG"),
    (3, "0001.PNG", False, None),
    (4, "0002.PNG", True, "0002_label.PNG"),
    (5, "0004.PNG", False, None),
  ]
  # A non-defective line naming a mask keeps the image, without the mask, and says so.
  path.write_text(_labels_text(TEST).replace("0001.PNG\t0\t0", "0001.PNG\t0\t0001_label.PNG"))
  with caplog.at_level(logging.WARNING):
    assert read_labels(path)[1].mask is None
  assert "name a mask file, ignored (e.g. line 3)" in caplog.text


@pytest.mark.parametrize(
  "line, message",
  [
    ("3\t0\t0003.PNG\t0", "line 3: expected 5 fields"),
    ("3\t2\t0003.PNG\t0\t0", "line 3: flag must be 0 .* got '2'"),
    ("3\t1\t0003.PNG\t0\t0", "line 3: defective image '0003.PNG' .* names no mask file"),
    ("3\t0\t0001.PNG\t0\t0", r"line 3: image '0001.PNG' is listed again \(first on line 2\)"),
  ],
)
def test_malformed_labels_line_names_the_file_and_line(root, line, message):
  path = _labels_file(root)
  path.write_text(f"1\n1\t0\t0001.PNG\t0\t0\n{line}\n")
  with pytest.raises(ValueError, match=f"Labels.txt' {message}"):
    DAGMSource(root, CLASS, "test", image_size=SIZE)


def test_labels_file_without_its_header_is_an_error(root):
  path = _labels_file(root)
  path.write_text(_labels_text(TEST).split("\n", 1)[1])
  with pytest.raises(ValueError, match="Labels.txt' line 1: expected the header line"):
    read_labels(path)


def test_missing_mask_names_the_mask_path(root):
  mask = root / f"Class{CLASS}" / "Test" / "Label" / "0003_label.PNG"
  mask.unlink()
  with pytest.raises(ValueError, match="has no ground-truth mask") as info:
    DAGMSource(root, CLASS, "test", image_size=SIZE)
  assert str(mask) in str(info.value) and "Labels.txt' line 2" in str(info.value)
  # Training never reads masks: a missing training mask does not matter.
  (root / f"Class{CLASS}" / "Train" / "Label" / "0002_label.PNG").unlink()
  assert len(DAGMSource(root, CLASS, "train", image_size=SIZE)) == 3


def test_missing_listed_image_is_named(root):
  image = root / f"Class{CLASS}" / "Test" / "0004.PNG"
  image.unlink()
  with pytest.raises(
    FileNotFoundError, match="listed in .*Labels.txt' line 5 does not exist"
  ) as info:
    DAGMSource(root, CLASS, "test", image_size=SIZE, validate=False)
  assert str(image) in str(info.value)


def test_missing_folders_and_labels_file_show_the_layout(root, tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a folder; expected the DAGM 2007 layout"):
    DAGMSource(tmp_path / "nowhere", CLASS, "train", image_size=SIZE)
  with pytest.raises(FileNotFoundError, match="Class7' does not exist; expected the DAGM"):
    DAGMSource(root, 7, "train", image_size=SIZE)
  shutil.rmtree(root / f"Class{CLASS}" / "Test")
  with pytest.raises(FileNotFoundError, match="Test' does not exist; expected the DAGM"):
    DAGMSource(root, CLASS, "test", image_size=SIZE)
  _labels_file(root, "Train").unlink()
  with pytest.raises(FileNotFoundError, match="Labels.txt' does not exist; expected the DAGM"):
    DAGMSource(root, CLASS, "train", image_size=SIZE)


def test_unlisted_images_are_left_out_with_a_warning(root, caplog):
  train = root / f"Class{CLASS}" / "Train"
  shutil.copy(train / "0001.PNG", train / "0099.PNG")
  shutil.copy(train / "0001.PNG", train / "0100.png")
  with caplog.at_level(logging.WARNING):
    src = DAGMSource(root, CLASS, "train", image_size=SIZE)
  assert len(src) == 3
  assert "ignoring 2 images" in caplog.text and "e.g. 0099.PNG" in caplog.text


def test_validation_modes(root, caplog):
  bad = root / f"Class{CLASS}" / "Test" / "0004.PNG"
  bad.write_bytes(bad.read_bytes()[:40])
  with pytest.raises(ImageReadError, match="0004.PNG"):
    DAGMSource(root, CLASS, "test", image_size=SIZE)
  with caplog.at_level(logging.WARNING):
    src = DAGMSource(root, CLASS, "test", image_size=SIZE, validate="skip")
  assert len(src) == 3 and "skipping unreadable image" in caplog.text
  src = DAGMSource(root, CLASS, "test", image_size=SIZE, validate=False)
  assert len(src) == 4
  with pytest.raises(ImageReadError, match="0004.PNG"):
    src[3]


def test_bad_arguments(root):
  with pytest.raises(ValueError, match="no validation split"):
    DAGMSource(root, CLASS, "validation", image_size=SIZE)
  with pytest.raises(ValueError, match="split must be one of"):
    DAGMSource(root, CLASS, "Train", image_size=SIZE)
  for class_id in (0, 11, "3", True, 2.0):
    with pytest.raises(ValueError, match="class_id"):
      DAGMSource(root, class_id, "train", image_size=SIZE)
  with pytest.raises(ValueError, match="validate"):
    DAGMSource(root, CLASS, "train", image_size=SIZE, validate="yes")


def _config(root, **overrides):
  return ml_collections.ConfigDict(
    {"name": "dagm", "root": str(root), "class_id": CLASS, "image_size": SIZE, **overrides}
  )


def test_pipeline_round_trip(root):
  config = _config(root, channels=1, validate=False)
  train, test = get_source(config, "train"), get_source(config, "test")
  assert isinstance(train, DAGMSource) and isinstance(test, DAGMSource)
  assert len(train) == 3 and test.labels.tolist() == [0, 1, 1, 0] and test.has_masks
  assert element_spec(config) == train.element_spec
  direct = DAGMSource(root, CLASS, "test", image_size=SIZE, channels=1)
  for key, value in direct[2].items():
    np.testing.assert_array_equal(test[2][key], value)
  assert get_source(_config(root), "train").image_shape == (SIZE, SIZE, 3)  # default channels


@pytest.mark.parametrize("class_id", [0, 11, "3", True, 2.5])
def test_pipeline_rejects_bad_class_id(root, class_id):
  with pytest.raises(ConfigError, match="class_id must be a DAGM 2007 class"):
    get_source(_config(root, class_id=class_id), "train")


def test_pipeline_config_errors(root):
  config = _config(root)
  del config["class_id"]
  with pytest.raises(ConfigError, match="needs config.data.class_id"):
    get_source(config, "train")
  with pytest.raises(ValueError, match="'dagm' has none"):
    get_source(_config(root), "validation")
