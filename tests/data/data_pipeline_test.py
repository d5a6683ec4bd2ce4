"""Tests of the grain pipelines and of get_sources."""

import types

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from dmad_jax.data import (
  MASK_KEY,
  dataset_median,
  eval_batch_count,
  get_sources,
  make_eval_batches,
  make_train_iterator,
)
from dmad_jax.data.base import ArraySource


def _source(n, shape=(4, 4, 1), seed=0):
  """An in-memory source whose images are random and whose record i has label i % 2."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  return ArraySource(images, np.arange(n) % 2, [f"c{i % 2}" for i in range(n)], name="toy")


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_train_batches_shape_and_epochs():
  src = _source(24)
  it = make_train_iterator(src, global_batch_size=4, seed=3)
  batches = _take(it, 12)
  assert batches[0]["image"].shape == (4, 4, 4, 1) and batches[0]["image"].dtype == np.float32
  assert batches[0]["label"].dtype == np.int32 and batches[0]["index"].shape == (4,)
  first = np.concatenate([b["index"] for b in batches[:6]])
  second = np.concatenate([b["index"] for b in batches[6:]])
  # Each epoch is a permutation, and the second epoch is shuffled differently.
  assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(24))
  assert first.tolist() != second.tolist() and first.tolist() != list(range(24))
  for b in batches:
    np.testing.assert_array_equal(b["label"], b["index"] % 2)


def test_seed_changes_the_order_and_is_reproducible():
  src = _source(24)
  a = _take(make_train_iterator(src, global_batch_size=8, seed=1), 3)
  b = _take(make_train_iterator(src, global_batch_size=8, seed=1), 3)
  c = _take(make_train_iterator(src, global_batch_size=8, seed=2), 3)
  _assert_same_batches(a, b)
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_state_restores_the_exact_position(num_threads):
  src = _source(23)  # Not a multiple of the batch size: batches straddle epochs.
  kwargs = dict(global_batch_size=4, seed=7, num_threads=num_threads)
  it = make_train_iterator(src, **kwargs)
  _take(it, 7)
  state = it.get_state()
  expected = _take(it, 5)
  fresh = make_train_iterator(src, **kwargs)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 5), expected)


def test_orbax_checkpoint_manager_round_trip(tmp_path):
  src = _source(23)
  it = make_train_iterator(src, global_batch_size=4, seed=0)
  _take(it, 7)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _take(it, 5)
  fresh = make_train_iterator(src, global_batch_size=4, seed=0)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 7
    restored = manager.restore(
      7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
    )
  _assert_same_batches(_take(restored.data, 5), expected)


def test_processes_read_disjoint_slices_of_the_one_process_batches():
  src = _source(10)
  single = _take(make_train_iterator(src, global_batch_size=4, seed=0), 6)
  per_process = [
    _take(
      make_train_iterator(src, global_batch_size=4, seed=0, process_index=p, process_count=2), 6
    )
    for p in range(2)
  ]
  for k in range(6):
    local = [per_process[p][k]["index"] for p in range(2)]
    assert local[0].shape == (2,)
    if k < 2:  # inside the first epoch no record is read twice
      assert not set(local[0]) & set(local[1])
    # Stacked in process order, the local batches are the one-process global batch.
    np.testing.assert_array_equal(np.concatenate(local), single[k]["index"])
    np.testing.assert_array_equal(
      np.concatenate([per_process[p][k]["image"] for p in range(2)]), single[k]["image"]
    )
  # Two and a half epochs of 10 records: every record seen twice in the first 20 positions.
  seen = np.concatenate([b["index"] for b in single])[:20]
  assert np.bincount(seen, minlength=10).tolist() == [2] * 10


def test_train_argument_errors():
  src = _source(8)
  with pytest.raises(ValueError, match="10.*3"):
    make_train_iterator(src, global_batch_size=10, seed=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    make_train_iterator(src, global_batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seed"):
    make_train_iterator(src, global_batch_size=4, seed=-1)


@pytest.mark.parametrize(
  "n, batch, procs",
  [(1, 1, 1), (5, 4, 1), (8, 4, 1), (23, 8, 2), (24, 8, 4), (7, 12, 3), (100, 6, 3), (3, 8, 4)],
)
def test_eval_covers_each_record_exactly_once(n, batch, procs):
  src = _source(n)
  kept, counts = [], set()
  for p in range(procs):
    batches = list(
      make_eval_batches(src, global_batch_size=batch, process_index=p, process_count=procs)
    )
    counts.add(len(batches))
    for b in batches:
      assert b["image"].shape == (batch // procs, 4, 4, 1)
      assert b[MASK_KEY].dtype == np.bool_
      kept.extend(b["index"][b[MASK_KEY]].tolist())
      pad = ~b[MASK_KEY]
      assert (b["index"][pad] == -1).all() and (b["image"][pad] == 0).all()
      real = np.flatnonzero(b[MASK_KEY])
      for k in real:
        np.testing.assert_array_equal(b["image"][k], src[int(b["index"][k])]["image"])
  # All processes yield the same number of batches, and together cover the split once.
  assert counts == {eval_batch_count(n, batch)}
  assert sorted(kept) == list(range(n))


def test_eval_order_is_the_split_order_on_one_process():
  batches = list(make_eval_batches(_source(10), global_batch_size=4))
  idx = np.concatenate([b["index"] for b in batches])
  assert idx.tolist() == list(range(10)) + [-1, -1]


def test_eval_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="6.*4"):
    make_eval_batches(_source(5), global_batch_size=6, process_count=4)


def test_dataset_median():
  src = _source(9, shape=(3, 5, 2))
  want = np.median(np.stack([src[i]["image"] for i in range(9)]), axis=0)
  got = dataset_median(src)
  assert got.shape == (3, 5, 2) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6)
  want4 = np.median(np.stack([src[i]["image"] for i in range(4)]), axis=0)
  np.testing.assert_allclose(dataset_median(src, max_items=4), want4, atol=1e-6)
  with pytest.raises(ValueError):
    dataset_median(src, max_items=0)


def test_get_sources_digits_and_folder(tmp_path):
  config = ml_collections.ConfigDict(
    {"name": "digits", "protocol": "normal=1,3,5,7,9", "image_size": 16, "seed": 1}
  )
  src = get_sources(config)
  assert set(src) == {"train", "test"} and src["train"].image_shape == (16, 16, 1)
  for split, defect in (("train", "good"), ("test", "good"), ("test", "dent")):
    folder = tmp_path / split / defect
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(folder / "0.png")
  src = get_sources(types.SimpleNamespace(name="folder", root=str(tmp_path), image_size=8))
  assert len(src["train"]) == 1 and src["test"].labels.tolist() == [1, 0]
  assert src["test"].image_shape == (8, 8, 3)


def test_get_sources_errors():
  with pytest.raises(ValueError, match="digits, folder, tfds"):
    get_sources(ml_collections.ConfigDict({"name": "imagenet"}))
  with pytest.raises(ValueError, match="protocol"):
    get_sources(ml_collections.ConfigDict({"name": "digits"}))
