"""Reverse distillation (RD4AD) on the one-class protocol (dmad_jax/configs/oneclass.py): MNIST,
Fashion-MNIST or CIFAR-10 through TensorFlow Datasets, one class normal.

  dmad train --config 'configs/oneclass_rd.py:dataset=mnist;normal=3;weights=r34.npz' \\
    --workdir runs/rd_mnist3
  dmad eval  --config 'configs/oneclass_rd.py:dataset=mnist;normal=3;weights=r34.npz' \\
    --workdir runs/rd_mnist3 --watch

The settings ARD's supplementary gives for this protocol (``oneclass.resnet_config``): ResNet34
teacher (torchvision weights converted as in dmad_jax/convert.py, arch resnet34) and student,
Adam lr 1e-3, batch 16, 200 epochs, a checkpoint every 10 epochs (``dmad eval --watch``
evaluates each one: the supplementary's "query every 10 epochs"). Images are resized to
``image_size`` (default 256; the supplementary gives none) and gray ones repeated to RGB.

Args (';'-separated): dataset (mnist, fashion_mnist, cifar10), normal (0-9), data_dir, weights,
epochs (default 200), image_size (a multiple of 32), runlocal (tests only). RD's means in ARD's
supplementary: MNIST 96.9, Fashion-MNIST 93.6, CIFAR-10 85.0 (%).
"""

import ml_collections

from dmad_jax.configs import oneclass


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return oneclass.resnet_config("oneclass_rd", arg, model_name="rd")[0]
