"""The MNAD recipe (prediction variant; shared/spec/seed_systems.md Sec. 6), without data set
specifics: what ``configs/{ped2,avenue,shanghai}_mnad.py`` share."""

from __future__ import annotations

import ml_collections

from dmad_jax.configs import common


def video_base(
  *, runlocal: bool, root: str, labels: str, epochs: float = 60
) -> ml_collections.ConfigDict:
  """MNAD as released: clips of 5 frames (4 in, the 5th predicted) at 256x256 in [-1, 1], read
  in colour (MNAD reads every data set with OpenCV's colour reader), memory of 10 x 512; Adam
  2e-4 with a cosine decay, batch 4, ``epochs`` passes over the training clips; the ``mnad``
  frame recipe (per-video min-max, 0.6 PSNR + 0.4 feature distance) with the test-time memory
  update at point scores below 0.01.

  ``runlocal``: a tiny model at 32x32 and a 2-step run, for tests.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  common.set_compute(c)
  c.param_dtype = "float32"
  c.model_name = "mnad"
  c.t_length = 5
  size = 32 if runlocal else 256
  c.data = common.video_data(root=root, labels=labels, runlocal=runlocal)
  c.model = ml_collections.ConfigDict(
    dict(
      image_size=size,
      in_channels=12,
      out_channels=3,
      channels=(64, 128, 256, 512),
      gen_features=64,
      memory_size=10,
    )
  )
  c.loss = ml_collections.ConfigDict(dict(compactness=0.1, separateness=0.1, margin=1.0))
  c.score = ml_collections.ConfigDict(dict(update_threshold=0.01, test_update=True))
  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=2e-4,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      schedule="cosine",
      warmup_steps=0,
      lr_multipliers={},
      grad_clip_norm=0.0,
    )
  )
  c.batch_size = 4
  common.set_duration(c, "total", epochs=float(epochs))
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.nonfinite = "stop"
  c.eval_at_end = False
  # Batches of 8 frames scored one after another (the memory update is sequential).
  c.eval = common.eval_section(batch_size=8, figure_samples=6, recipe="mnad")
  if runlocal:
    c.model.channels = (8, 8, 16, 16)
    c.model.gen_features = 8
    c.batch_size = 4
    common.set_test_durations(c)
    c.eval.figure_samples = 2
  return c


def from_arg(name: str, arg: str | None, dataset: str) -> ml_collections.ConfigDict:
  """The config of ``configs/<name>.py`` (arg keys: root, labels, epochs, runlocal)."""
  defaults = {"root": None, "labels": None, "epochs": 60}
  a = common.parse_arg(
    name, arg, defaults, required=("root",), example=f"root=/data/{dataset};labels=L.npy"
  )
  return video_base(
    runlocal=a["runlocal"], root=a["root"], labels=a["labels"], epochs=float(a["epochs"])
  )
