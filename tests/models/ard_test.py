"""ARD (RD with attention in the OCBE; a reconstruction): where the block sits, what it adds to
RD, the SSPCAB loss term, config errors, and each attention kind trained and evaluated through
the installed ``dmad`` script on DAGM 2007 data in the release's layout."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dmad_jax import configs
from dmad_jax.models import get_detector
from dmad_jax.models.base import schema
from dmad_jax.nn import attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 32


def _config(name, arg):
  return configs.load(os.path.join(ROOT, "configs", name), arg)


def _abstract_params(config):
  """The parameter shapes of the config's detector (traced, not computed)."""
  detector = get_detector(config)
  batch = {"image": jnp.zeros((2, SIZE, SIZE, 3), jnp.float32)}
  variables = jax.eval_shape(detector.init, jax.random.key(0), batch)
  return traverse_util.flatten_dict(variables["params"], sep="/")


@pytest.mark.parametrize("position", ["fusion", "embedding"])
@pytest.mark.parametrize("kind", list(attention.ATTENTIONS))
def test_ard_is_rd_plus_one_attention_block_in_the_ocbe(kind, position, tmp_path):
  root = str(tmp_path)  # never read: shapes only
  base = f"root={root};class=1;runlocal;image_size={SIZE}"
  rd = _abstract_params(_config("dagm_rd.py", base))
  ard = _abstract_params(_config("dagm_ard.py", f"{base};attention={kind};position={position}"))
  added = {k: v for k, v in ard.items() if k not in rd}
  assert {k: v.shape for k, v in rd.items()} == {
    k: v.shape for k, v in ard.items() if k not in added
  }
  assert added and all(k.startswith("bottleneck/attention/") for k in added), sorted(added)
  # The block's own parameter count at the width it sees: resnet18's OCBE concatenates 3 x 256
  # channels at the fusion and embeds 512.
  c = 768 if position == "fusion" else 512
  expected = {
    "se": c * (c // 16) + c // 16 + (c // 16) * c + c,
    "eca": attention.eca_kernel_size(c),
    "cbam": c * (c // 16) + c // 16 + (c // 16) * c + c + 7 * 7 * 2,
    "sspcab": 4 * (c * c + c) + c * (c // 8) + c // 8 + (c // 8) * c + c,
  }[kind]
  assert sum(int(np.prod(v.shape)) for v in added.values()) == expected


def test_recorded_attention_losses_enter_the_training_loss():
  """What the model sows into "losses" (SSPCAB's MSE) is added times loss.attention (0.1); with
  nothing recorded there is no such term. That the real SSPCAB block records its MSE is
  tests/nn/attention_test.py's; that ARD's training passes it on is asserted on the logged terms
  of the CLI runs below."""
  from dmad_jax.models import ppdm

  rng = np.random.default_rng(0)
  feats = {s: jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32) for s in ppdm.STAGES}
  outputs = dict(
    teacher=feats,
    student={s: f * 0.5 + 0.1 for s, f in feats.items()},
    vq=None,
    forward=[],
    backward=[],
  )
  weights = ppdm.LossWeights()
  plain, terms = ppdm.ppdm_loss(outputs, weights)
  assert "attention" not in terms
  total, terms = ppdm.ppdm_loss(outputs, weights, {"attention": {"sspcab": (jnp.float32(2.5),)}})
  assert float(terms["attention"]) == pytest.approx(0.25)
  assert float(total) == pytest.approx(float(plain) + 0.25)


def test_config_errors_name_the_fix(tmp_path):
  config = _config("dagm_ard.py", f"root={tmp_path};class=1;runlocal")
  config.model.attention = "none"
  with pytest.raises(schema.ConfigError, match="model_name 'ard' needs config.model.attention"):
    get_detector(config)
  config = _config("dagm_rd.py", f"root={tmp_path};class=1;runlocal")
  config.model.attention = "se"
  with pytest.raises(schema.ConfigError, match="'ard' for attention"):
    get_detector(config)
  with pytest.raises(
    ValueError, match="attention must be one of se, eca, cbam, sspcab, got 'bogus'"
  ):
    _config("dagm_ard.py", f"root={tmp_path};class=1;attention=bogus")
  config = _config("mvtec_ppdm.py", f"root={tmp_path};category=bottle;runlocal")
  config.model.attention = "se"
  with pytest.raises(ValueError, match="the VQ bottleneck has none"):
    _abstract_params(config)


@pytest.mark.slow  # four `dmad train` processes, each compiling a ResNet train step and the eval
@pytest.mark.parametrize("kind", list(attention.ATTENTIONS))
def test_each_attention_trains_and_evaluates_through_the_cli(kind, tmp_path, dagm_writer, dmad_cli):
  root = dagm_writer(tmp_path / "dagm", class_id=2, pixels=48)
  arg = f"root={root};class=2;runlocal;image_size={SIZE};attention={kind}"
  config = f"--config={ROOT}/configs/dagm_ard.py:{arg}"
  proc = dmad_cli("train", config, "--workdir=run", "--config.eval_at_end=True", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "model ard:" in proc.stderr
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  # Only SSPCAB records a loss of its own: its MSE times loss.attention joins RD's distillation.
  assert all(("attention" in row) == (kind == "sspcab") for row in logged if "distill" in row)
  if kind == "sspcab":
    assert all(row["attention"] > 0 for row in logged if "distill" in row)
  with open(tmp_path / "run" / "eval" / "metrics.json") as f:
    m = json.load(f)
  assert (m["num_normal"], m["num_anomalous"]) == (3, 3)
  assert m["pixel_map"] == "rec" and m["step"] == 2
  for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_AUROC_rec"):
    assert 0.0 <= m[key] <= 1.0, (key, m)
  for figure in ("heatmaps_2.png", "panel_2.png"):
    assert os.path.getsize(tmp_path / "run" / "eval" / figure) > 0
