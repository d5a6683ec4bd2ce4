"""Reverse distillation (RD4AD) on one DAGM 2007 class, the baseline of ARD's DAGM table.

  dmad train --config 'configs/dagm_rd.py:root=/data/dagm;class=1;weights=wrn50_2.npz' \\
    --workdir runs/dagm_rd_1
  dmad eval  --config 'configs/dagm_rd.py:root=/data/dagm;class=1;weights=wrn50_2.npz' \\
    --workdir runs/dagm_rd_1

``root`` holds ``Class1`` ... ``Class10`` as the DAGM 2007 release unpacks
(``Class<k>/{Train,Test}/*.PNG``, ``Label/Labels.txt``, ``Label/*_label.PNG``). ImageNet weights:
convert as in dmad_jax/convert.py's docstring. The recipe is configs/mvtec_rd.py's (ARD runs DAGM
"with the same settings as MVTec"); the eval job reports image and pixel AUROC and AUPRO on the
weak elliptic masks. experiments/reproduce_tables.py runs all ten classes.

Args (';'-separated): root, class (1-10), weights, epochs (default 200), image_size (default
256), runlocal (resnet18 with a RANDOM teacher at 64x64, two steps: tests only). ARD's
supplementary reports RD's means on DAGM as detection 90.4, localisation 94.7 / PRO 89.4 (%).
"""

import ml_collections

from dmad_jax.configs import dagm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return dagm.rd_config(dagm.parse_arg("dagm_rd", arg))
