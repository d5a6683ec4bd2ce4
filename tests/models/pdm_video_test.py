"""DMAD-PDM for Avenue and ShanghaiTech: configs, parameter counts, the ShanghaiTech loss terms,
per-scene templates and the maps of the host-side errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dmad_jax.configs import load_module
from dmad_jax.evaluation.video import box_mean_max
from dmad_jax.models import get_detector, pdm
from dmad_jax.nn.layers import count_params

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
avenue_pdm = load_module(os.path.join(CONFIGS, "avenue_pdm.py"))
shanghai_pdm = load_module(os.path.join(CONFIGS, "shanghai_pdm.py"))

# Two scenes in ShanghaiTech naming (training / testing frame folders of 6 frames each).
VIDEOS = {"training": ("01_001", "01_002", "02_001"), "testing": ("01_0014", "02_0003")}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("scenes")
  for split, names in VIDEOS.items():
    for name in names:
      folder = root / split / "frames" / name
      folder.mkdir(parents=True)
      for t in range(6):
        frame = np.full((32, 32), 40 if name.startswith("01") else 180, np.uint8)
        frame[4:10, 2 + 3 * t : 8 + 3 * t] = 250
        Image.fromarray(frame).save(folder / f"{t}.jpg")
  return root


def _shapes(config):
  """Parameter shapes of the config's model at its full size (no compilation)."""
  model = get_detector(config).module
  x = jnp.zeros((1, config.model.image_size, config.model.image_size, config.model.in_channels))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]


def test_full_size_parameter_counts_equal_the_official_models(root):
  """Counted layer by layer from the released Avenue / ShanghaiTech model files (without the
  unused weight and bias every CoordConv2d inherits): Avenue 14,412,362 trainable values
  including its 3x256x256 template and 420x512 codebook; ShanghaiTech 13,671,240 without its
  template bank, 99,588,936 with the official 437 per-video templates."""
  av = _shapes(avenue_pdm.get_config(f"root={root}"))
  assert count_params(av) == 14_412_362
  assert av["template"].shape == (1, 256, 256, 3) and av["vq"]["codebook"].shape == (420, 512)

  sh = _shapes(shanghai_pdm.get_config(f"root={root};templates=video_transductive"))
  # 3 training videos train their templates; the 2 test-video templates are frozen.
  assert sh["template"].shape == (3, 256, 256, 3)
  assert sh["template_frozen"].shape == (2, 256, 256, 3)
  no_bank = {k: v for k, v in sh.items() if not k.startswith("template")}
  assert count_params(no_bank) == 13_671_240
  assert count_params(no_bank) + 437 * 3 * 256 * 256 == 99_588_936
  # 12 frame channels + the template: the encoder and the OffsetNet see 15 channels.
  assert sh["encoder"]["conv1"]["Conv_0"]["Conv_0"]["kernel"].shape == (3, 3, 15, 64)
  assert sh["offset_net"]["CoordConv_0"]["conv"]["kernel"].shape == (3, 3, 19, 64)
  scene = _shapes(shanghai_pdm.get_config(f"root={root}"))
  assert scene["template"].shape == (2, 256, 256, 3) and "template_frozen" not in scene


@pytest.mark.parametrize("dataset,channels", [("avenue", 12), ("shanghai", 15)])
def test_runlocal_configs_build_and_initialise(root, dataset, channels):
  from dmad_jax.data import get_source

  module = avenue_pdm if dataset == "avenue" else shanghai_pdm
  config = module.get_config(f"root={root};runlocal")
  train = get_source(config.data, "train")
  records = [train[i] for i in range(2)]
  batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
  assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == {
    k: (s.shape, s.dtype) for k, s in train.element_spec.items()
  }
  assert batch["frames"].shape == (2, 32, 32, 15)
  # Traced, not run: the end-to-end tests (tests/video_e2e_test.py) run these models.
  variables = jax.eval_shape(get_detector(config).init, jax.random.key(0), batch)
  kernel = variables["params"]["encoder"]["conv1"]["Conv_0"]["Conv_0"]["kernel"]
  assert kernel.shape[2] == channels
  # Avenue and ShanghaiTech read gray frames: every frame repeats one channel 3 times.
  frames = batch["frames"]
  np.testing.assert_array_equal(frames[..., 0], frames[..., 1])


def _tiny(**kw):
  args = dict(
    image_size=32,
    in_channels=12,
    out_channels=3,
    channels=(8, 8, 16, 16),
    skip_channels=(4, 4),
    num_codes=8,
    gen_features=8,
    offset_features=8,
    coord_blocks=4,
    head_strides=((2, 2, 1), (1, 1)),
    mask_source="decoder",
    aggregation="additive",
    template_input=True,
    num_templates=2,
  )
  args.update(kw)
  return pdm.PDM(**args)


SHANGHAI = dict(
  recon=(1.0, 1.0),
  grad=(1.0, 1.0),
  norm=(1.0, 1.0),
  smooth_kind="2d",
  template=0.0,
  foreground=100.0,
  mask=0.1,
  template_masked=1.0,
)


def _variables(model, x, idx):
  """Random variables of the right shapes: tracing init is much cheaper than running it (its
  per-parameter random initialisers dominate the compile time of these tiny models)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False, template_index=idx))
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = str(path[-1])
    if "mean" in name:
      return jnp.zeros(s.shape, s.dtype)
    if "var" in name:
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rng.uniform(-0.3, 0.3, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
  # Two trained (scene) templates and one frozen (test-video) template.
  model = _tiny(num_templates=2, frozen_templates=1)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 12), minval=-1, maxval=1)
  idx = jnp.array([0, 1])
  variables = _variables(model, x, idx)
  bank = jnp.stack([jnp.full((32, 32, 3), v) for v in (-0.5, 0.5, 0.2)])
  params = pdm.set_template(variables["params"], bank)
  return model, params, variables["batch_stats"], x, idx


def _outputs(tiny, params=None, idx=None):
  model, p, bs, x, i = tiny
  out, _ = model.apply(
    {"params": p if params is None else params, "batch_stats": bs},
    x,
    train=True,
    template_index=i if idx is None else idx,
    mutable=["batch_stats"],
  )
  return out


def test_template_index_selects_each_samples_template(tiny):
  out = _outputs(tiny)
  np.testing.assert_allclose(out["template"][0], -0.5)
  np.testing.assert_allclose(out["template"][1], 0.5)
  swapped = _outputs(tiny, idx=jnp.array([1, 0]))
  np.testing.assert_allclose(swapped["template"][0], 0.5)
  # The template is part of the input, so changing it changes the prediction.
  assert float(jnp.abs(swapped["prediction"] - out["prediction"]).max()) > 1e-4


def test_foreground_weights_reduce_to_the_plain_loss(tiny):
  out = _outputs(tiny)
  # Where the frame equals its template the weights are 1 everywhere, so the weighted loss is
  # exactly the unweighted one, however strong the weighting.
  target = out["template"]
  plain = pdm.LossWeights(**{**SHANGHAI, "foreground": 0.0})
  strong = pdm.LossWeights(**SHANGHAI)
  a, ta = pdm.pdm_loss(out, target, plain)
  b, tb = pdm.pdm_loss(out, target, strong)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  for k in ("recon", "grad", "offset"):
    np.testing.assert_allclose(float(ta[k]), float(tb[k]), rtol=1e-5)
  # Away from the template the weights stress the pixels that differ from the background.
  x = target.at[0, 10:16, 10:16].set(1.0)
  w = pdm.foreground_weights(x, target, 100.0, 15)
  assert w.shape == x.shape and float(w.min()) >= 1.0
  assert float(w[0, 13, 13, 0]) > float(w[0, 30, 30, 0]) >= 1.0
  np.testing.assert_allclose(w[1], 1.0 + 0.0 * w[1])  # the second sample is its own template
  # Default weights (Ped2, digits) add no new terms.
  _, terms = pdm.pdm_loss(out, target, pdm.LossWeights())
  assert not {"mask", "template_masked"} & set(terms)


@pytest.mark.slow
def test_shanghai_mask_loss_and_template_gradients(tiny):
  model, params, bs, x, _ = tiny
  target = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3), minval=-1, maxval=1)
  # Sample 0 uses trained template 0, sample 1 the frozen (test-video) template 2.
  idx = jnp.array([0, 2])

  def terms(p):
    out = _outputs(tiny, params=p, idx=idx)
    total, t = pdm.pdm_loss(out, target, pdm.LossWeights(**SHANGHAI))
    return jnp.stack([t["mask"], t["template_masked"], total]), out

  grads, out = jax.jacrev(terms, has_aux=True)(params)
  g_mask, g_tpl, g_total = (jax.tree.map(lambda g, i=i: g[i], grads) for i in range(3))
  np.testing.assert_allclose(out["template"][1], 0.2)
  # The mask regulariser reaches the decoder's mask head (and nothing in the OffsetNet).
  head = jax.tree.leaves(g_mask["decoder"]["mask"])
  assert sum(float(jnp.abs(a).sum()) for a in head) > 0
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(g_mask["offset_net"]))
  # The masked template MSE trains the templates in the batch; unused and frozen ones get
  # nothing, from it or from the whole loss.
  assert float(jnp.abs(g_tpl["template"][0]).sum()) > 0
  assert float(jnp.abs(g_tpl["template"][1]).max()) == 0
  assert float(jnp.abs(g_total["template"][1]).max()) == 0
  assert float(jnp.abs(g_total["template_frozen"]).max()) == 0
  # Its value follows the official formula: 3-channel numerator over a 1-channel mask.
  keep = 1 - out["masks"][-1]
  expected = jnp.sum(keep * (out["template"] - target) ** 2) / jnp.sum(keep)
  got = pdm.pdm_loss(out, target, pdm.LossWeights(**SHANGHAI))[1]["template_masked"]
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
  with pytest.raises(ValueError, match="bank of 3"):
    pdm.set_template(params, jnp.zeros((2, 32, 32, 3)))


def test_shanghai_frame_errors_and_host_maps(tiny):
  model, params, bs, x, idx = tiny
  out = model.apply({"params": params, "batch_stats": bs}, x, train=False, template_index=idx)
  target = jnp.zeros((2, 32, 32, 3))
  e = pdm.frame_errors(out, target, "dmad_shanghai")
  assert set(e) == {"deformation", "reconstruction"} and e["deformation"].shape == (2,)
  sq = (out["prediction"] - target) ** 2
  # Channels summed, 42x31 box mean after zero padding, maximum (official Test_Loss).
  expected = [box_mean_max(np.asarray(s).sum(-1), (42, 31)) for s in sq]
  np.testing.assert_allclose(e["reconstruction"], expected, rtol=1e-4)
  maps = pdm.host_maps(out, target, "dmad_shanghai")
  assert maps["object_mask"].dtype == jnp.bool_ and maps["object_mask"].shape == (2, 32, 32)
  np.testing.assert_allclose(maps["error"], sq.mean(-1), rtol=1e-6)
  av = pdm.host_maps(out, target, "dmad_avenue")
  assert av["diff"].shape == av["offset"].shape == (2, 16, 16)
  # (max over channels of the 2x2-mean |x - x_K|, halved)^2: 8-bit |x - x_K| * 127.5 / 255.
  d = jnp.abs(out["prediction"]).reshape(2, 16, 2, 16, 2, 3).mean((2, 4)).max(-1)
  np.testing.assert_allclose(av["diff"], (d / 2) ** 2, rtol=1e-5)
  assert pdm.host_maps(out, target, "dmad_ped2") == {}


def test_shanghai_loss_matches_a_torch_transcription_of_the_official_formula():
  """The ShanghaiTech training loss (spec Sec. 1.3) written out in PyTorch, NCHW, float64."""
  import types

  import torch
  import torch.nn.functional as tF

  rng = np.random.default_rng(0)
  b, s = 2, 24

  def u(*shape, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, shape).astype(np.float32)

  x, x1, x2, bkg = u(b, s, s, 3), u(b, s, s, 3), u(b, s, s, 3), u(b, s, s, 3)
  o1, o2 = u(b, s, s, 2, lo=-0.1, hi=0.1), u(b, s, s, 2, lo=-0.1, hi=0.1)
  mask, m2 = u(b, s, s, 1, lo=0.01, hi=0.99), u(b, s, s, 1, lo=0.01, hi=0.99)
  vq = types.SimpleNamespace(codebook_loss=0.3, commitment_loss=0.2, perplexity=1.0)
  outputs = dict(
    stages=[jnp.asarray(x1), jnp.asarray(x2)],
    offsets=[jnp.asarray(o1), jnp.asarray(o2)],
    vq=vq,
    template=jnp.asarray(bkg),
    mask=jnp.asarray(mask),
    masks=[jnp.asarray(mask), jnp.asarray(m2)],
  )
  total, terms = pdm.pdm_loss(outputs, jnp.asarray(x), pdm.LossWeights(**SHANGHAI))

  def t(a):  # NHWC numpy -> NCHW float64 torch
    return torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)

  X, X1, X2, B, O1, O2, M, M2 = map(t, (x, x1, x2, bkg, o1, o2, mask, m2))
  w = 1 + 100 * tF.avg_pool2d((X - B).abs() ** 0.5, 15, stride=1, padding=7)

  def wmean(v, weight):
    return (v * weight).sum() / weight.sum()

  def grad_map(a, c):
    s_a, s_c = a.sum(1, keepdim=True), c.sum(1, keepdim=True)
    dx = lambda v: v - tF.pad(v, (1, 0, 0, 0))[..., :-1]  # noqa: E731
    dy = lambda v: v - tF.pad(v, (0, 0, 1, 0))[..., :-1, :]  # noqa: E731
    return (dx(s_a) - dx(s_c)).abs() + (dy(s_a) - dy(s_c)).abs()

  def smooth(o, ks):
    k = torch.full((1, 2, ks, ks), -1.0 / (ks * ks - 1), dtype=torch.float64)
    k[:, :, ks // 2, ks // 2] = 1.0
    return tF.conv2d(tF.pad(o, (ks // 2,) * 4), k).abs()

  norm = lambda o: (o**2).sum(1) ** 0.5  # noqa: E731
  ref = wmean((X1 - X) ** 2, w) + wmean((X2 - X) ** 2, w)
  ref += wmean(grad_map(X, X2), w) + wmean(grad_map(X, X1), w)
  ref += 0.3 + 0.2
  ref += 0.25 * (
    wmean(norm(O1), w[:, 0]) + wmean(norm(O2), w[:, 0]) + wmean(smooth(O1, 7), w)
  ) + 0.25 * wmean(smooth(O2, 3), w)
  entropy = -(M * torch.log(M + 1e-8)).mean() + 0.1 * torch.relu(M.mean() - 0.01)
  ref += 0.1 * entropy + ((1 - M2) * (B - X) ** 2).sum() / (1 - M2).sum()
  np.testing.assert_allclose(float(total), float(ref), rtol=2e-5)
  assert set(terms) >= {"mask", "template_masked"} and float(terms["template"]) == 0
