"""IGD on the paper's one-class protocols through TensorFlow Datasets: train on one class of
MNIST, Fashion-MNIST or CIFAR-10, test on the whole test split (label 1 unless the class).

  dmad train --config 'configs/oneclass_igd.py:dataset=mnist;normal=3' --workdir runs/igd_mnist3
  dmad eval  --config 'configs/oneclass_igd.py:dataset=mnist;normal=3' --workdir runs/igd_mnist3

Args (';'-separated): dataset (mnist, fashion_mnist, cifar10), normal (the class, 0-9),
data_dir (TFDS data dir; default TFDS's own), epochs (default 128), runlocal (tests only). Needs
the ``tfds`` extra and the prepared data set (``download=True`` in ``config.data`` lets TFDS
fetch it).

Images are 32x32 (MNIST's 28x28 resized), one local patch each: IGD's local model on whole
images, 128 epochs, batch 64 as the paper trains. The encoder is trained with the generator
(``model.encoder="trainable"``) instead of the paper's frozen knowledge-distilled one. The
paper's means are ``dmad_jax.configs.igd.PAPER_ONE_CLASS``; dmad_jax has not reproduced them
(no data here).
"""

import ml_collections

from dmad_jax.configs import igd, oneclass


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = oneclass.parse_arg("oneclass_igd", arg)
  channels = oneclass.DATASETS[a["dataset"]]
  epochs = a["epochs"] or 128
  c = igd.recipe("local", encoder="trainable", image_size=32, channels=channels, epochs=epochs)
  c.data = oneclass.data(a, 32)
  c.augment.hflip = a["dataset"] == "cifar10"  # a flipped digit can be another digit
  c.batch_size = 64
  c.eval.batch_size = 256
  if a["runlocal"]:
    igd.shrink_for_tests(c)
  return c
