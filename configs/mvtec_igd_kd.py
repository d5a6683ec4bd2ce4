"""The knowledge-distillation pre-training of IGD's local encoder on one MVTec AD category (the
paper's; the released code loads its result, which is not published).

  dmad train --config 'configs/mvtec_igd_kd.py:root=/data/mvtec;category=bottle;weights=r18.npz' \
    --workdir runs/kd_b
  dmad train --workdir runs/igd_local_b \
    --config 'configs/mvtec_igd.py:root=/data/mvtec;category=bottle;variant=local;kd=runs/kd_b'

Args (';'-separated): root, category, weights (the converted torchvision ResNet18 whose pooled
layer4 feature the encoder learns), steps (default 50000), runlocal (tests only). The IGD
configs take the finished run's workdir as ``kd=DIR`` (``config.init_from``).
"""

import ml_collections

from dmad_jax.configs import common, igd, mvtec


def parse_arg(arg: str | None) -> dict:
  return common.parse_arg(
    "mvtec_igd_kd",
    arg,
    {"root": None, "category": None, "weights": "", "steps": 50_000},
    choices={"category": mvtec.CATEGORIES},
    required=("root", "category"),
    example="root=/data/mvtec;category=bottle;weights=r18.npz",
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = igd.kd_recipe(weights=a["weights"])
  c.data.root = mvtec.category_root(a["root"], a["category"])
  common.set_duration(c, "total", steps=a["steps"])
  if a["runlocal"]:
    c.model.random_backbone = True
    c.model.update(igd.KD_TEST_ENCODER)
    c.batch_size = 2
    common.set_test_durations(c)
    c.eval.batch_size = 4
    c.eval.figure_samples = 2
  return c
