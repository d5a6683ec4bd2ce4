"""DAAD / DAAD+ (or an ablation row) on your own images in the MVTec-style folder layout.

  <root>/train/good/*.png|jpg|...     normal training images
  <root>/test/good/*                  normal test images
  <root>/test/<defect>/*              anomalous test images, one folder per defect type

  dmad train --config 'configs/folder_daad.py:root=/data/bottle;variant=daad_plus' --workdir runs/b
  dmad eval  --config 'configs/folder_daad.py:root=/data/bottle;variant=daad_plus' --workdir runs/b

Args (';'-separated): root (required), variant (ae, memae, ae_skip, daad, daad_plus; default
daad_plus), image_size (default 256; divisible by 16 and, with the paper's rates, by 128),
channels (3 or 1), runlocal (tiny model and run, for tests). The recipe is the paper's MVTec one
(configs/digits_daad.py:paper_config); set the run length with ``--config.total_steps``.
"""

import ml_collections

from configs import digits_daad


def parse_arg(
  arg: str | None, name: str = "folder_daad", keys=("root",), ints=("image_size", "channels")
) -> dict:
  """The ';'-separated args: ``keys`` (required strings), ``variant``, ``ints``, ``runlocal``."""
  out = {"variant": "daad_plus", "image_size": 256, "channels": 3, "runlocal": False}
  out.update({k: None for k in keys})
  for item in filter(None, (arg or "").split(";")):
    key, _, value = item.partition("=")
    if item == "runlocal":
      out["runlocal"] = True
    elif key in ints and value:
      out[key] = int(value)
    elif key in (*keys, "variant") and value:
      out[key] = value
    else:
      known = ", ".join((*keys, "variant", *ints, "runlocal"))
      raise ValueError(f"{name}: unknown config arg {item!r} ({known})")
  for k in keys:
    if not out[k]:
      raise ValueError(f"{name}: give {k}=..., e.g. configs/{name}.py:{k}=...")
  if out["image_size"] % 16:
    raise ValueError(f"{name}: image_size {out['image_size']} must be divisible by 16")
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = digits_daad.paper_config(image_size=a["image_size"], channels=a["channels"])
  c.data.root = a["root"]
  digits_daad.apply_variant(c, a["variant"])
  if a["runlocal"]:
    digits_daad.shrink_for_tests(c)
    digits_daad.apply_variant(c, a["variant"])
  return c
