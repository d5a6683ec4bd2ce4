"""DMAD-PPDM on the one-class protocol (dmad_jax/configs/oneclass.py): MNIST, Fashion-MNIST or
CIFAR-10 through TensorFlow Datasets, one class normal (DMAD supplementary, Tab. 9).

  dmad train --config 'configs/oneclass_ppdm.py:dataset=fashion_mnist;normal=0;weights=w.npz' \\
    --workdir runs/ppdm_fmnist0
  dmad eval  --config 'configs/oneclass_ppdm.py:dataset=fashion_mnist;normal=0;weights=w.npz' \\
    --workdir runs/ppdm_fmnist0

(``w.npz``: wide_resnet50_2's ImageNet weights converted as in dmad_jax/convert.py.)

PPDM's MVTec recipe (configs/mvtec_ppdm.py: frozen wide_resnet50_2, AdamW 5e-3 with cosine
decay, deformation weight alpha 0.05) for the 60 epochs of batch 8 that DMAD gives for MNIST;
DMAD set this table's hyperparameters by a grid search it does not list. Images are resized to
``image_size`` (default 256) and gray ones repeated to RGB.

Args (';'-separated): dataset, normal (0-9), data_dir, weights, epochs (default 60), image_size
(a multiple of 32), runlocal (tests only). DMAD's means: MNIST 99.5, Fashion-MNIST 96.3 (%).
"""

import ml_collections

from dmad_jax.configs import oneclass


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return oneclass.resnet_config("oneclass_ppdm", arg, model_name="ppdm")[0]
