"""DMAD-PDM: parameter count of the official Ped2 model, shapes, sizes and losses."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.models import get_detector, pdm
from dmad_jax.nn.layers import count_params


def test_ped2_parameter_count_equals_official_model():
  """256x256, 12 input channels, 200 codes of dimension 256: 3,976,842 trainable values
  (the official count minus the unused CoordConv weights), including the 196,608-value
  template and the 51,200-value codebook."""
  model = pdm.PDM()  # defaults are the Ped2 settings
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 12)), train=False)
  )
  params = shapes["params"]
  assert count_params(params) == 3_976_842
  assert params["template"].shape == (1, 256, 256, 3)
  assert params["vq"]["codebook"].shape == (200, 256)


def _small(**kw):
  args = dict(
    image_size=32,
    in_channels=1,
    out_channels=1,
    channels=(8, 8, 16, 16),
    skip_channels=(4, 4),
    num_codes=8,
    gen_features=8,
    offset_features=8,
    coord_blocks=4,
  )
  args.update(kw)
  return pdm.PDM(**args)


@pytest.mark.parametrize("size,in_ch,out_ch", [(32, 1, 1), (64, 12, 3)])
@pytest.mark.slow
def test_forward_shapes_image_and_video_mode(size, in_ch, out_ch):
  model = _small(image_size=size, in_channels=in_ch, out_channels=out_ch, coord_blocks=size // 8)
  x = jax.random.uniform(jax.random.key(0), (2, size, size, in_ch), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), x, train=False)
  out = model.apply(variables, x, train=False)
  assert out["prediction"].shape == (2, size, size, out_ch)
  assert out["reference"].shape == (2, size, size, out_ch)
  assert len(out["offsets"]) == 2 and out["offsets"][0].shape == (2, size, size, 2)
  # Offsets are bounded by max_offsets pixels (normalised by 2 / H).
  for o, px in zip(out["offsets"], (2.0, 3.0), strict=True):
    assert float(jnp.abs(o).max()) <= 2 * px / size + 1e-6
  assert out["mask"].shape == (2, size, size, out_ch)
  assert float(out["mask"].min()) >= 0 and float(out["mask"].max()) <= 1


@pytest.mark.slow
def test_generic_sizes_and_bad_sizes():
  with pytest.raises(ValueError, match="divisible by 2\\*\\*3"):
    _small(image_size=36).init(jax.random.key(0), jnp.zeros((1, 36, 36, 1)), train=False)
  with pytest.raises(ValueError, match="max_offsets"):
    _small(max_offsets=(2.0,)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False)
  # Three heads, other strides: K is a config value.
  model = _small(head_strides=((2, 2, 2), (1, 2), (1, 1)), max_offsets=(4.0, 2.0, 1.0))
  x = jnp.zeros((1, 32, 32, 1))
  out = model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)
  assert len(out["stages"]) == 3


@pytest.mark.slow
def test_loss_terms_and_gradients():
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 1), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params, x):
    out, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    return pdm.pdm_loss(out, x, pdm.LossWeights())

  (total, terms), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"], x)
  for k in ("recon", "grad", "vq", "offset", "template"):
    assert np.isfinite(float(terms[k])) and float(terms[k]) >= 0
  expected = sum(float(terms[k]) for k in ("recon", "grad", "vq", "offset", "template"))
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  # Every parameter group receives gradient (template via MSE(bkg, x), codebook via VQ).
  for group in ("encoder", "decoder", "offset_net", "vq", "template"):
    g = jax.tree.leaves(grads[group])
    assert sum(float(jnp.abs(a).sum()) for a in g) > 0, group


def test_compressed_skips_do_not_backpropagate_into_the_encoder():
  """A loss on the skip features alone must give the encoder zero gradient."""
  enc = pdm.Encoder(channels=(8, 8, 16, 16), skip_channels=(4, 4), mask_channels=0)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  v = enc.init(jax.random.key(1), x, False)

  def skip_loss(params):
    _, skips, _ = enc.apply({"params": params, "batch_stats": v["batch_stats"]}, x, False)
    return sum(jnp.sum(s**2) for s in skips.values())

  g = jax.grad(skip_loss)(v["params"])
  for name in ("conv1", "conv2", "conv3", "conv4"):
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(g[name])), name
  assert float(jnp.abs(jax.tree.leaves(g["skip4"])[0]).max()) > 0


def test_scores_and_frame_errors_have_one_value_per_sample():
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), x, train=False)
  out = model.apply(variables, x, train=False)
  maps = pdm.anomaly_maps(out, x)
  assert maps["rec"].shape == (3, 32, 32) and maps["df"].shape == (3, 32, 32)
  s = pdm.image_scores(maps, kernel_size=(3, 3), alpha=0.5)
  np.testing.assert_allclose(s["score"], s["rec"] + 0.5 * s["df"], rtol=1e-6)
  errs = pdm.frame_errors(out, x, "dmad_ped2")
  assert set(errs) == {"deformation", "reconstruction", "gradient"}
  np.testing.assert_allclose(
    errs["reconstruction"], jnp.mean(jnp.abs(out["prediction"] - x), axis=(1, 2, 3)), rtol=1e-6
  )
  with pytest.raises(ValueError, match="unknown recipe"):
    pdm.frame_errors(out, x, "nope")


def test_set_template():
  model = _small()
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False)
  img = jnp.full((32, 32, 1), 0.25)
  p = pdm.set_template(v["params"], img)
  np.testing.assert_allclose(p["template"][0], img)
  with pytest.raises(ValueError, match="template is"):
    pdm.set_template(v["params"], jnp.zeros((16, 16, 1)))


def test_paper_equation_options_change_exactly_their_terms():
  """Eq. 8 (``loss.deformation="paper_eq8"``) changes only the offset term, Supp. Eq. 24
  (``loss.template_distance="l2_norm"``) only the template term, each to the direct
  computation; Eq. 9 (``model.warp_mask=False``) keeps the reference, offsets and warped
  references and composes every stage with the unwarped mask."""
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), x, train=False)
  # Non-zero template and offsets, so that every term is exercised.
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: a + 0.3 if "template" in jax.tree_util.keystr(p) else a, variables["params"]
  )
  v = {"params": params, "batch_stats": variables["batch_stats"]}
  out = model.apply(v, x, train=False)
  base_terms = pdm.pdm_loss(out, x, pdm.LossWeights())[1]
  eq8 = pdm.pdm_loss(out, x, pdm.LossWeights(deformation="paper_eq8"))[1]
  eq24 = pdm.pdm_loss(out, x, pdm.LossWeights(template_distance="l2_norm"))[1]
  for name, terms, changed in (("eq8", eq8, "offset"), ("eq24", eq24, "template")):
    for k in base_terms:
      if k != changed:
        np.testing.assert_array_equal(terms[k], base_terms[k], err_msg=f"{name}: {k}")
    assert abs(float(terms[changed]) - float(base_terms[changed])) > 1e-6, name
  o = [np.asarray(f, np.float64) for f in out["offsets"]]
  want = sum(
    np.abs(np.diff(f, axis=2)).sum(-1).mean() + np.abs(np.diff(f, axis=1)).sum(-1).mean()
    + np.linalg.norm(f, axis=-1).mean()
    for f in o
  )  # fmt: skip
  np.testing.assert_allclose(eq8["offset"], 0.25 * want, rtol=1e-5)
  diff = (np.asarray(out["template"], np.float64) - np.asarray(x, np.float64)).reshape(3, -1)
  np.testing.assert_allclose(eq24["template"], np.linalg.norm(diff, axis=1).mean(), rtol=1e-5)

  eq9 = _small(warp_mask=False).apply(v, x, train=False)
  for k in ("reference", "mask", "template"):
    np.testing.assert_array_equal(eq9[k], out[k], err_msg=k)
  for a, b in zip(eq9["offsets"] + eq9["warped"], out["offsets"] + out["warped"], strict=True):
    np.testing.assert_array_equal(a, b)
  m, bkg = np.asarray(out["mask"]), np.asarray(out["template"])
  for t, stage, mk in zip(eq9["warped"], eq9["stages"], eq9["masks"], strict=True):
    np.testing.assert_array_equal(mk, m)
    np.testing.assert_allclose(stage, np.asarray(t) * m + (1 - m) * bkg, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(out["masks"][-1] - out["mask"]).max()) > 0  # the default warps it


def test_global_code_gives_at_most_num_codes_references():
  """One code per image: images that pick the same code get the same reference, whatever
  else differs between them, so the decoder holds a bank of at most num_codes prototypes."""
  model = _small(channels=(8, 8, 16, 16, 8), skip_channels=(), coord_blocks=2, global_code=True,
                 num_codes=3, mask_source="none")  # fmt: skip
  x = jax.random.uniform(jax.random.key(0), (16, 32, 32, 1), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), x, train=False)
  out = model.apply(variables, x, train=False)
  idx = np.asarray(out["vq"].indices).reshape(16)
  refs = np.asarray(out["reference"]).reshape(16, -1)
  for code in np.unique(idx):
    same = refs[idx == code]
    np.testing.assert_allclose(same, np.broadcast_to(same[0], same.shape), atol=1e-6)
  assert len({r.tobytes() for r in refs}) == len(np.unique(idx)) <= 3
  # Without it, every 2x2 position is quantised on its own.
  local = _small(channels=(8, 8, 16, 16, 8), skip_channels=(), coord_blocks=2, num_codes=3)
  v = local.init(jax.random.key(1), x, train=False)
  assert local.apply(v, x, train=False)["vq"].indices.size == 16 * 4


def test_offset_input_reference_lets_the_fields_see_the_prototype():
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1, maxval=1)
  model = _small(offset_input="input_reference")
  variables = model.init(jax.random.key(1), x, train=False)
  # The OffsetNet's first CoordConv reads input + reference (+ 4 coordinate channels).
  kernel = variables["params"]["offset_net"]["CoordConv_0"]["conv"]["kernel"]
  assert kernel.shape[2] == 1 + 1 + 4

  def coarse_offsets(params):
    out = model.apply({**variables, "params": params}, x, train=False)
    return jnp.sum(out["offsets"][0] ** 2)

  # The fields depend on the decoder (through the reference), which the released OffsetNet
  # (input only) never does.
  g = jax.grad(coarse_offsets)(variables["params"])
  assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g["decoder"])) > 0
  with pytest.raises(ValueError, match="offset_input must be one of"):
    _small(offset_input="reference").init(jax.random.key(0), x, train=False)


def test_score_stage_reads_the_coarse_reconstruction():
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1), minval=-1, maxval=1)
  out = model.apply(model.init(jax.random.key(1), x, train=False), x, train=False)
  coarse = pdm.anomaly_maps(out, x, "l1", stage=0)["rec"]
  np.testing.assert_allclose(coarse, jnp.mean(jnp.abs(out["stages"][0] - x), -1), rtol=1e-6)
  assert not np.allclose(coarse, pdm.anomaly_maps(out, x, "l1")["rec"])


def test_sum_stages_adds_the_errors_of_every_stage_from_the_named_one():
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1), minval=-1, maxval=1)
  out = model.apply(model.init(jax.random.key(1), x, train=False), x, train=False)
  assert len(out["stages"]) == 2
  each = [jnp.mean((s - x) ** 2, -1) for s in out["stages"]]
  summed = pdm.anomaly_maps(out, x, "l2", stage=0, sum_stages=True)["rec"]
  np.testing.assert_allclose(summed, each[0] + each[1], rtol=1e-6)
  # From the last stage there is nothing to add; stage=-1 and stage=1 name the same one.
  for stage in (-1, 1):
    last = pdm.anomaly_maps(out, x, "l2", stage=stage, sum_stages=True)["rec"]
    np.testing.assert_allclose(last, each[1], rtol=1e-6)
  # The detector reads it from config.score.
  from dmad_jax.configs import load

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = load(os.path.join(root, "configs", "digits_pdm.py"), "runlocal")
  config.score.update(distance="l2", stage=0, sum_stages=True, prototypes=1, reduce="mean")
  detector = get_detector(config)
  batch = {"image": x, "label": jnp.zeros((3,), jnp.int32)}
  variables = detector.init(jax.random.key(1), batch)
  out = detector.module.apply(variables, x, train=False)
  expected = sum(jnp.mean((s - x) ** 2, (1, 2, 3)) for s in out["stages"])
  np.testing.assert_allclose(detector.predict(variables, batch).scores["rec"], expected, rtol=1e-5)


def test_reference_loss_asks_the_unwarped_reference_to_match():
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1, maxval=1)
  out = model.apply(model.init(jax.random.key(1), x, train=False), x, train=False)
  total0, terms0 = pdm.pdm_loss(out, x, pdm.LossWeights())
  assert "reference" not in terms0  # the released loss: no such term
  total, terms = pdm.pdm_loss(out, x, pdm.LossWeights(reference=0.5))
  expected = 0.5 * float(jnp.mean((out["reference"] - x) ** 2))
  np.testing.assert_allclose(float(terms["reference"]), expected, rtol=1e-6)
  np.testing.assert_allclose(float(total), float(total0) + expected, rtol=1e-6)


def test_prototypes_score_each_image_against_its_best_fitting_prototype():
  """score.prototypes = P decodes an image's P nearest codes and keeps, per image, the one
  whose score is lowest: the outputs and the score all come from that prototype."""
  from dmad_jax.configs import load

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = load(os.path.join(root, "configs", "digits_pdm.py"), "runlocal")
  config.model.num_codes = 4
  config.score.prototypes = 1
  detector = get_detector(config)
  x = jax.random.uniform(jax.random.key(0), (6, 32, 32, 1), minval=-1, maxval=1)
  batch = {"image": x, "label": jnp.zeros((6,), jnp.int32)}
  variables = detector.init(jax.random.key(1), batch)
  # A codebook of four distinct codes, all in use.
  stats = variables["batch_stats"]["vq"]
  book = jax.random.normal(jax.random.key(2), stats["embed_sum"].shape)
  variables["batch_stats"]["vq"] = {"cluster_size": jnp.ones((4,)), "embed_sum": book}
  per_rank = []
  for rank in range(3):
    out = detector.module.apply(variables, x, train=False, code_rank=rank)
    maps = pdm.anomaly_maps(out, x, detector.distance, detector.stage)
    scores = pdm.image_scores(maps, alpha=detector.alpha, reduce=detector.reduce)
    per_rank.append((scores["score"], out["reference"]))
  config.score.prototypes = 3
  pred = get_detector(config).predict(variables, batch)
  scores = np.stack([np.asarray(s) for s, _ in per_rank])
  np.testing.assert_allclose(pred.scores["score"], scores.min(0), rtol=1e-6)
  best = scores.argmin(0)
  assert len(set(best.tolist())) > 1  # the test means something: several ranks win
  refs = np.stack([np.asarray(r) for _, r in per_rank])[best, np.arange(6)]
  np.testing.assert_allclose(pred.images["reference"], refs, rtol=1e-6)
  config.score.prototypes = 1
  np.testing.assert_allclose(
    get_detector(config).predict(variables, batch).scores["score"], scores[0], rtol=1e-6
  )
  for bad, match in ((5, r"prototypes must be in \[1, num_codes = 4\]"), (0, "must be in")):
    config.score.prototypes = bad
    with pytest.raises(ValueError, match=match):
      get_detector(config)
  config.score.prototypes = 2
  config.model.global_code = False
  with pytest.raises(ValueError, match="needs config.model.global_code = True"):
    get_detector(config)
  with pytest.raises(ValueError, match="code_rank 1 needs global_code"):
    _small().init(jax.random.key(0), x, train=False, code_rank=1)


def test_augment_shift_moves_the_training_images_and_only_those():
  """augment.shift translates the training batch (drawn from the step's rng); without it the
  loss does not depend on the rng; prediction never shifts."""
  from dmad_jax.configs import load

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = load(os.path.join(root, "configs", "digits_pdm.py"), "runlocal")
  assert config.augment.shift == 0
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 1), minval=-1, maxval=1)
  batch = {"image": x, "label": jnp.zeros((4,), jnp.int32)}
  plain = get_detector(config)
  variables = plain.init(jax.random.key(1), batch)
  params, stats = variables["params"], variables["batch_stats"]

  def loss(detector, key):
    return float(detector.loss(params, stats, batch, jax.random.key(key))[0])

  assert loss(plain, 0) == loss(plain, 1)
  config.augment.shift = 3
  shifted = get_detector(config)
  assert loss(shifted, 0) != loss(shifted, 1) and loss(shifted, 0) != loss(plain, 0)
  # The loss sees exactly the images random_shifts draws from that rng.
  from dmad_jax.ops import augment

  moved = {"image": augment.random_shifts(jax.random.key(0), x, 3), "label": batch["label"]}
  np.testing.assert_allclose(
    loss(shifted, 0), float(plain.loss(params, stats, moved, jax.random.key(7))[0]), rtol=1e-6
  )
  np.testing.assert_array_equal(
    shifted.predict(variables, batch).scores["score"],
    plain.predict(variables, batch).scores["score"],
  )
  for bad in (-1, 16):
    config.augment.shift = bad
    with pytest.raises(ValueError, match=f"augment.shift must be in \\[0, .*got {bad}"):
      get_detector(config)
