"""ARD facts the ARD configs share: the attention choice and the tables of ARD's supplementary
material (shared/spec/seed_systems.md Sec. 4).

ARD ("attention in reverse distillation") has no public code and no main paper: the model is a
RECONSTRUCTION, RD4AD with one attention block in its one-class bottleneck embedding
(``dmad_jax.nn.rd.OCBE``). The supplementary cites SE-Net, ECA-Net, CBAM and SSPCAB, so each is
selectable (``config.model.attention``), and so is its place (``attention_position``).

The default, CBAM at the fusion, is a guess: the OCBE's job is to fuse three scales into one
compact embedding, and CBAM is the only candidate that weighs both channels (here: which scale and
which feature) and locations (where a defect is) before that compression; SE and ECA weigh
channels only, and SSPCAB is built to add a self-supervised reconstruction task, not to select
features.
"""

from __future__ import annotations

import ml_collections

ATTENTIONS = ("se", "eca", "cbam", "sspcab")
POSITIONS = ("fusion", "embedding")
DEFAULT_ATTENTION = "cbam"
DEFAULT_POSITION = "fusion"

# ARD supplementary, Tab. I-II (DAGM 2007, classes 1-10): image-level detection AUROC per class,
# and the means of detection AUROC and of localisation AUROC and PRO, for ARD and RD as reported
# there.
PAPER_DAGM_DETECTION = {
  "ard": (0.983, 1.0, 0.935, 1.0, 0.939, 0.993, 1.0, 0.660, 0.995, 1.0),
}
PAPER_DAGM_MEAN = {
  "ard": {"image_AUROC": 0.950, "pixel_AUROC": 0.962, "pixel_AUPRO": 0.947},
  "rd": {"image_AUROC": 0.904, "pixel_AUROC": 0.947, "pixel_AUPRO": 0.894},
}
# ARD supplementary, Tab. III: mean image AUROC over the ten one-class problems.
PAPER_ONE_CLASS = {
  "ard": {"mnist": 0.993, "fashion_mnist": 0.952, "cifar10": 0.853},
  "rd": {"mnist": 0.969, "fashion_mnist": 0.936, "cifar10": 0.850},
}


def parse_keys() -> dict:
  """The args every ARD config takes, with their defaults."""
  return {"attention": DEFAULT_ATTENTION, "position": DEFAULT_POSITION}


def choices() -> dict:
  return {"attention": ATTENTIONS, "position": POSITIONS}


def apply(c: ml_collections.ConfigDict, attention: str, position: str):
  """Turns an RD config (``mvtec.rd_settings``) into ARD with ``attention`` at ``position``."""
  c.model_name = "ard"
  c.model.attention = attention
  c.model.attention_position = position
  return c
