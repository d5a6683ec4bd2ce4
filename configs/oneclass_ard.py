"""ARD (RD with attention in its bottleneck; a RECONSTRUCTION, see dmad_jax/configs/ard.py) on
the one-class protocol (dmad_jax/configs/oneclass.py), with the settings of ARD's supplementary.

  dmad train --config 'configs/oneclass_ard.py:dataset=cifar10;normal=0;weights=r34.npz' \\
    --workdir runs/ard_cifar0
  dmad eval  --config 'configs/oneclass_ard.py:dataset=cifar10;normal=0;weights=r34.npz' \\
    --workdir runs/ard_cifar0 --watch

Everything but the attention is configs/oneclass_rd.py. Args (';'-separated): as there, plus
attention (se, eca, cbam, sspcab; default cbam) and position (fusion, embedding; default fusion).
ARD's supplementary means: MNIST 99.3, Fashion-MNIST 95.2, CIFAR-10 85.3 (%).
"""

import ml_collections

from dmad_jax.configs import ard, oneclass


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c, a = oneclass.resnet_config(
    "oneclass_ard", arg, model_name="rd", extra=ard.parse_keys(), choices=ard.choices()
  )
  return ard.apply(c, a["attention"], a["position"])
