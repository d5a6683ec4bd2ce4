"""DAAD (block-wise memory autoencoder) or DAAD+ on the one-class protocol
(dmad_jax/configs/oneclass.py) that DAAD's Tab. 2 uses (OCGAN's): one class of MNIST or CIFAR-10
(or Fashion-MNIST) normal, the whole test split scored.

  dmad train --config 'configs/oneclass_daad.py:dataset=mnist;normal=3' --workdir runs/daad_mnist3
  dmad eval  --config 'configs/oneclass_daad.py:dataset=mnist;normal=3' --workdir runs/daad_mnist3

The paper's model and losses (dmad_jax/configs/daad.py) at 32x32: four levels give 16, 8, 4 and 2
pixel maps, so the blocks are r = 2 (the paper's r = 8 cannot divide them); no flips for the
digit sets (a flipped digit can be another digit), both flips for CIFAR-10 as for MVTec. DAAD
gives no epochs for these sets: 100 epochs of batch 64, a checkpoint every 10.

Args (';'-separated): dataset, normal (0-9), data_dir, variant (daad or daad_plus; default daad),
epochs (default 100), runlocal (tests only). DAAD's means: MNIST 99.0, CIFAR-10 75.3 (%).
"""

import ml_collections

from dmad_jax.configs import common, daad, oneclass


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = oneclass.parse_arg(
    "oneclass_daad", arg, {"variant": "daad"}, choices={"variant": tuple(daad.VARIANTS)}
  )
  channels = oneclass.DATASETS[a["dataset"]]
  c = daad.paper_config(image_size=32, channels=channels)
  c.data = oneclass.data(a, 32)
  c.model.rates = (2, 2, 1)
  c.augment.hflip = c.augment.vflip = a["dataset"] == "cifar10"
  c.batch_size = 64
  common.set_duration(c, "total", epochs=float(a["epochs"] or 100))
  common.set_duration(c, "checkpoint_every", epochs=10.0)
  c.keep_checkpoints = 10
  c.eval.batch_size = 256
  if a["runlocal"]:
    daad.shrink_for_tests(c)
  daad.apply_variant(c, a["variant"])
  return c
