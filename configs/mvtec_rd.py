"""Reverse distillation (RD4AD) on one MVTec AD category: DMAD-PPDM's baseline (spec Sec. 6).

  dmad train --config 'configs/mvtec_rd.py:root=/data/mvtec;category=bottle;weights=wrn50_2.npz' \
    --workdir runs/rd_bottle
  dmad eval  --config 'configs/mvtec_rd.py:root=/data/mvtec;category=bottle;weights=wrn50_2.npz' \
    --workdir runs/rd_bottle

ImageNet weights: download and convert as in dmad_jax/convert.py's docstring.

The same model as configs/mvtec_ppdm.py with ``model.deform = False`` (no OffsetNet) and
``model.vq = False`` (RD's 3072-channel OCBE). Recipe of hq-deng/RD4AD: 256x256, frozen
wide_resnet50_2, flattened-cosine loss, Adam lr 5e-3, betas (0.5, 0.999), no weight decay, no
schedule, batch 16, 200 epochs, seed 111, a checkpoint every 10 epochs (the last is evaluated).
Score: the maximum of the Gaussian-smoothed (sigma 4) cosine map; pixel metrics on that map.

Args (';'-separated): root, category, weights, epochs (default 200), image_size (default 256),
runlocal (resnet18 with a RANDOM teacher at 64x64, two steps: tests only). The RD paper reports
image 98.5, pixel 97.8, PRO 93.9 (%, mean over the 15 categories).
"""

import ml_collections

from dmad_jax.configs import mvtec


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = mvtec.parse_ppdm_arg(arg, name="mvtec_rd")
  if a["vq"] != 1:
    raise ValueError(
      "configs/mvtec_rd.py: RD has no VQ layer; the vq arg belongs to configs/mvtec_ppdm.py"
    )
  c = mvtec.rd_settings(mvtec.ppdm_base(a, model_name="rd", epochs=200, batch_size=16))
  if a["runlocal"]:
    mvtec.shrink_ppdm_for_tests(c, a)
  return c
