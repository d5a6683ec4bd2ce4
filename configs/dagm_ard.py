"""ARD (RD with attention in its bottleneck; a RECONSTRUCTION, see dmad_jax/configs/ard.py) on one
DAGM 2007 class: the main table of ARD's supplementary.

  dmad train --config 'configs/dagm_ard.py:root=/data/dagm;class=1;weights=wrn50_2.npz' \\
    --workdir runs/dagm_ard_1
  dmad eval  --config 'configs/dagm_ard.py:root=/data/dagm;class=1;weights=wrn50_2.npz' \\
    --workdir runs/dagm_ard_1
  dmad train \\
    --config 'configs/dagm_ard.py:root=/data/dagm;class=8;weights=wrn50_2.npz;attention=se' \\
    --workdir runs/dagm_ard_8_se

Everything else is configs/dagm_rd.py. Args (';'-separated): as configs/dagm_rd.py, plus
attention (se, eca, cbam, sspcab; default cbam) and position (fusion, embedding; default fusion).
ARD's supplementary reports, as means over the ten classes: detection 95.0, localisation 96.2,
PRO 94.7 (%); dmad_jax has not reproduced them (no DAGM data or ImageNet weights here).
"""

import ml_collections

from dmad_jax.configs import ard, dagm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = dagm.parse_arg("dagm_ard", arg, with_attention=True)
  return ard.apply(dagm.rd_config(a), a["attention"], a["position"])
