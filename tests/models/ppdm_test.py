"""DMAD-PPDM and RD4AD (dmad_jax.models.ppdm): shapes, the RD special case, the frozen teacher,
the warps, and end-to-end training and evaluation on a tiny MVTec-layout folder.

Variables of the tiny models are filled with numpy random numbers from ``jax.eval_shape`` trees
instead of running ``init``: compiling Flax's per-parameter random initialisers is the slowest
part of these tests on a CPU, and no test here depends on the initial distribution.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from dmad_jax import convert
from dmad_jax.configs import load_module, mvtec
from dmad_jax.models import get_detector, ppdm, teacher
from dmad_jax.models.pdm import OffsetNet
from dmad_jax.nn import resnet
from dmad_jax.ops import filters, sampling
from dmad_jax.train import durations, trainer
from dmad_jax.train.state import TrainState

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
mvtec_ppdm = load_module(os.path.join(CONFIGS, "mvtec_ppdm.py"))
mvtec_rd = load_module(os.path.join(CONFIGS, "mvtec_rd.py"))

SIZE = 32
ROOT = "/nonexistent/mvtec"


def _config(module=mvtec_ppdm, category="bottle", extra="", **model):
  c = module.get_config(f"root={ROOT};category={category};image_size={SIZE};runlocal{extra}")
  with c.unlocked():
    for k, v in model.items():
      c.model[k] = v
    if not c.model.deform:
      c.score.pixel_map = "rec"
  return c


def _batch(n=2, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.uniform(-1, 1, (n, SIZE, SIZE, 3)), jnp.float32)}


def _fill(shapes, seed):
  """Numpy values for a tree of ShapeDtypeStructs: He-normal kernels, BN 1 / 0, VQ codebooks
  U(-1/K, 1/K), identity score statistics."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0, math.sqrt(2 / np.prod(s.shape[:-1])), s.shape), s.dtype)
    if name == "codebook":
      k = s.shape[0]
      return jnp.asarray(rng.uniform(-1 / k, 1 / k, s.shape), s.dtype)
    if name in ("scale", "var") or name.endswith("_max"):
      return jnp.ones(s.shape, s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _variables(det, batch, seed=0):
  return _fill(jax.eval_shape(det.init, jax.random.PRNGKey(0), batch), seed)


# ---------------------------------------------------------------------------------------------
# Shapes (traced only, at the paper's size).
# ---------------------------------------------------------------------------------------------
def test_paper_size_shapes():
  """wide_resnet50_2 at 256x256: the spec's channel plan, traced without running."""
  c = mvtec_ppdm.get_config(f"root={ROOT};category=bottle;weights=unused.npz")
  det = get_detector(c)
  batch = {"image": jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)}
  v = jax.eval_shape(det.init, jax.random.PRNGKey(0), batch)
  out = jax.eval_shape(det.outputs, v, batch["image"])
  assert [t.shape for t in out["forward"]] == [(2, 256, 256, 2)] * 2
  assert [t.shape for t in out["backward"]] == [(2, 256, 256, 2)] * 2
  assert out["warped"].shape == out["cycle"].shape == (2, 256, 256, 3)
  want = {"layer1": (2, 64, 64, 256), "layer2": (2, 32, 32, 512), "layer3": (2, 16, 16, 1024)}
  assert {k: t.shape for k, t in out["teacher"].items()} == want
  assert {k: t.shape for k, t in out["student"].items()} == want
  # Heads before upsampling: 1/8 (coarse) and 1/2 (fine), forward then backward.
  net = OffsetNet(64, ((2, 2, 2, 1), (2, 1)) * 2, (8.0, 3.0) * 2, 64)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  raw = jax.eval_shape(lambda x: net.init_with_output(jax.random.PRNGKey(0), x, False)[0], x)
  assert [o.shape for o in raw] == [(2, 32, 32, 2), (2, 128, 128, 2)] * 2
  # VQ bottleneck: 3 x 64 reduced channels + the 1024-d quantised layer3 = 1216 channels into
  # RD's residual stage (stride 2 -> 2048 @ 8x8); 200 codes of width 1024.
  p = v["params"]["bottleneck"]
  assert p["vq"]["codebook"].shape == (200, 1024)
  assert p["bn_layer"]["0"]["conv1"]["kernel"].shape == (1, 1, 1216, 1024)
  assert p["bn_layer"]["0"]["downsample"]["0"]["kernel"].shape == (1, 1, 1216, 2048)
  assert p["reduce1_conv"]["kernel"].shape == (3, 3, 256, 64)
  assert set(v["params"]) == {"offset_net", "bottleneck", "decoder"}
  assert set(v["batch_stats"]) == {"model", "teacher", "score_stats"}
  # RD: the 3072-channel OCBE, no OffsetNet.
  rd = get_detector(mvtec_rd.get_config(f"root={ROOT};category=bottle;weights=unused.npz"))
  v_rd = jax.eval_shape(rd.init, jax.random.PRNGKey(0), batch)
  assert set(v_rd["params"]) == {"bottleneck", "decoder"}
  assert v_rd["params"]["bottleneck"]["bn_layer"]["0"]["conv1"]["kernel"].shape == (
    1,
    1,
    3072,
    1024,
  )


# ---------------------------------------------------------------------------------------------
# RD is PPDM without deformation and VQ.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rd_is_ppdm_with_deformation_and_vq_off():
  batch = _batch()
  rd = get_detector(_config(mvtec_rd))
  plain = get_detector(_config(deform=False, vq=False))
  shapes = jax.eval_shape(rd.init, jax.random.PRNGKey(0), batch)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(
    lambda s: s.shape, jax.eval_shape(plain.init, jax.random.PRNGKey(0), batch)
  )
  with pytest.raises(ValueError, match="model_name 'rd' is PPDM with deform=False"):
    get_detector(_config(mvtec_rd, deform=True))

  # PPDM with deformation ON but zero fields (the heads' last convs zeroed) and VQ off gives
  # RD's loss on the shared parameters: the warps are identities and the regularisers vanish.
  deform = get_detector(_config(vq=False))
  v_rd = _fill(shapes, 1)
  v = _variables(deform, batch, 2)
  params = {**v["params"], "bottleneck": v_rd["params"]["bottleneck"]}
  params["decoder"] = v_rd["params"]["decoder"]
  net = dict(params["offset_net"])
  last = [f"Conv_{i}" for i in (3, 5, 9, 11)]  # each head's 2-channel conv
  for name in last:
    assert net[name]["Conv_0"]["kernel"].shape[-1] == 2
    net[name] = jax.tree.map(jnp.zeros_like, net[name])
  params["offset_net"] = net
  stats = {**v["batch_stats"], "teacher": v_rd["batch_stats"]["teacher"]}
  stats["model"] = {**stats["model"], **v_rd["batch_stats"]["model"]}
  v = {"params": params, "batch_stats": stats}
  # Eval-mode BatchNorm: with train-mode statistics of a batch of 2 at the 1x1 bottleneck the
  # loss is ill-conditioned (two values per channel), which would hide a real difference.
  out = jax.jit(deform.outputs)(v, batch["image"])
  loss, terms = jax.jit(ppdm.ppdm_loss, static_argnums=1)(out, deform.weights)
  # A zero field is an identity warp only up to float32 rounding of the base grid (~1e-5 here,
  # as in torch); RD gets the same warped image.
  mean, std = np.asarray(resnet.IMAGENET_MEAN), np.asarray(resnet.IMAGENET_STD)
  image_rd = (out["warped"] * std + mean) * 2 - 1
  out_rd = jax.jit(rd.outputs)(v_rd, image_rd)
  loss_rd, terms_rd = jax.jit(ppdm.ppdm_loss, static_argnums=1)(out_rd, rd.weights)
  assert set(terms_rd) == {"distill", "distill_layer1", "distill_layer2", "distill_layer3"}
  for k in terms_rd:
    np.testing.assert_allclose(terms[k], terms_rd[k], rtol=1e-5, err_msg=k)
  assert float(terms["offset"]) == 0.0
  assert float(terms["cycle"]) < 1e-8
  np.testing.assert_allclose(loss, loss_rd, rtol=1e-5)
  assert 0.1 < float(loss_rd) < 3.0  # three levels of 1 - cos


# ---------------------------------------------------------------------------------------------
# The frozen teacher.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_teacher_is_frozen_and_the_offsetnet_learns_through_it():
  """Two trainer steps with ONLY the distillation loss: the teacher is bit-identical, and the
  OffsetNet moves, which it can only do through the teacher (the loss sees the warped image
  nowhere else)."""
  c = _config()
  with c.unlocked():
    c.loss.vq = c.loss.offset = c.loss.cycle = 0.0
  det = get_detector(c)
  batch = _batch(4)
  v = _variables(det, batch)
  assert "teacher" not in v["params"]
  # Adam without weight decay: a parameter moves iff its gradient is non-zero.
  tx = optax.adam(1e-3)
  state = TrainState.create(
    apply_fn=None,
    params=v["params"],
    tx=tx,
    batch_stats=v["batch_stats"],
    rng=jnp.asarray(jax.random.PRNGKey(0)),
  )
  opt_leaves = {str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert not any("teacher" in p for p in opt_leaves)
  step = jax.jit(lambda s, b: trainer.train_step(s, b, detector=det, lr_schedule=lambda i: 1e-3))
  new = state
  for _ in range(2):
    new, metrics = step(new, batch)
  assert bool(metrics["finite"]) and float(metrics["loss"]) > 0
  same = jax.tree.map(
    lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
    new.batch_stats["teacher"],
    v["batch_stats"]["teacher"],
  )
  assert all(jax.tree.leaves(same))
  # The trained parts' BatchNorm statistics do move (train mode), the teacher's do not.
  assert not np.array_equal(
    new.batch_stats["model"]["decoder"]["layer1"]["0"]["bn1"]["mean"],
    v["batch_stats"]["model"]["decoder"]["layer1"]["0"]["bn1"]["mean"],
  )
  moved = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
    new.params["offset_net"],
    v["params"]["offset_net"],
  )
  heads = {k: max(jax.tree.leaves(moved[k])) for k in ("Conv_3", "Conv_5", "Conv_9", "Conv_11")}
  # The forward heads get gradient through the warp -> teacher path; the backward heads only
  # act on the cycle and the test-time maps, so with the cycle loss off they must stay put.
  assert heads["Conv_3"] > 0 and heads["Conv_5"] > 0, heads
  assert heads["Conv_9"] == 0 and heads["Conv_11"] == 0, heads


def test_teacher_weights_file_errors(tmp_path):
  shapes = teacher.teacher_shapes("resnet18")
  path = convert.save_variables(tmp_path / "r18.npz", _fill(shapes, 0), "resnet18")
  read = teacher.read_teacher(path, "resnet18", shapes)
  assert jax.tree.map(lambda a: a.shape, read) == jax.tree.map(lambda s: s.shape, shapes)
  with pytest.raises(ValueError, match="holds resnet18 weights"):
    teacher.read_teacher(path, "resnet34", teacher.teacher_shapes("resnet34"))
  with pytest.raises(FileNotFoundError, match="convert.py"):
    teacher.read_teacher(str(tmp_path / "missing.npz"), "resnet18", shapes)
  # A config without weights fails at construction and says how to get them.
  c = _config()
  with c.unlocked():
    c.model.random_teacher = False
  with pytest.raises(ValueError, match="convert.py"):
    get_detector(c)
  with c.unlocked():
    c.model.random_teacher = True
    c.model.backbone_weights = path
  with pytest.raises(ValueError, match="contradict"):
    get_detector(c)


def test_random_teacher_warns_and_has_torchvision_statistics(caplog):
  with caplog.at_level(logging.WARNING, logger="dmad_jax"):
    get_detector(_config())
  assert "RANDOM weights" in caplog.text
  v = teacher.random_teacher_variables("resnet18", jax.random.PRNGKey(3))
  k = np.asarray(v["params"]["layer3"]["0"]["conv2"]["kernel"])  # 3x3, 256 -> 256
  assert abs(k.std() - math.sqrt(2 / (9 * 256))) < 0.02 * math.sqrt(2 / (9 * 256))
  assert np.all(np.asarray(v["batch_stats"]["layer1"]["0"]["bn1"]["var"]) == 1)


# ---------------------------------------------------------------------------------------------
# Warps, maps and the cycle loss (pure functions).
# ---------------------------------------------------------------------------------------------
def _feats(seed, b=2):
  rng = np.random.default_rng(seed)
  sizes = {"layer1": (8, 4), "layer2": (4, 6), "layer3": (2, 8)}
  return {k: jnp.asarray(rng.normal(size=(b, s, s, c)), jnp.float32) for k, (s, c) in sizes.items()}


def _shift(px, b=2, size=SIZE):
  """A constant field moving the sampling point ``px`` pixels right (x) and ``py`` down."""
  dx, dy = (2.0 * p / (size - 1) for p in px)
  return jnp.broadcast_to(jnp.asarray([dx, dy], jnp.float32), (b, size, size, 2))


def test_identity_fields_give_the_plain_cosine_map():
  t, s = _feats(0), _feats(1)
  zero = [jnp.zeros((2, SIZE, SIZE, 2))] * 2
  out = {"input": jnp.zeros((2, SIZE, SIZE, 3)), "teacher": t, "student": s, "backward": zero}
  maps = jax.jit(ppdm.anomaly_maps, static_argnums=1)(out, 4.0)
  # The reference computed independently: per level 1 - cos over channels, upsampled with
  # align_corners=True, summed, then scipy's Gaussian filter.
  plain = 0.0
  for k in teacher.STAGES:
    a, b = np.asarray(t[k], np.float64), np.asarray(s[k], np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    plain = (
      plain
      + np.asarray(sampling.resize_bilinear(jnp.asarray(1 - cos, jnp.float32)[..., None], SIZE))[
        ..., 0
      ]
    )
  from scipy.ndimage import gaussian_filter

  want = np.stack([gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in plain])
  np.testing.assert_allclose(maps["rec"], want, atol=2e-5)
  np.testing.assert_allclose(maps["df"], 0.0, atol=1e-12)
  assert ppdm.fuse(maps, ppdm._identity_stats(), 0.05)["maps"]["fused"].shape == (2, SIZE, SIZE)


def test_back_warp_moves_maps_by_the_backward_fields():
  m = jnp.asarray(np.random.default_rng(0).normal(size=(2, SIZE, SIZE)), jnp.float32)
  # O_2^T samples one pixel to the right, O_1^T two pixels down: applied fine first, so
  # out[y, x] = m[y + 2, x + 1] away from the clamped borders.
  out = np.asarray(ppdm.back_warp(m, [_shift((0, 2)), _shift((1, 0))]))
  np.testing.assert_allclose(out[:, :-2, :-1], np.asarray(m)[:, 2:, 1:], atol=1e-4)
  # Deformation map: ||O_1^T|| + ||O_2^T|| warped by O_1^T (official os2 for K = 2).
  o2 = jnp.asarray(np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 2)) * 0.01, jnp.float32)
  df = np.asarray(ppdm.deformation_map([_shift((0, 2)), o2]))
  n2 = np.linalg.norm(np.asarray(o2), axis=-1)
  np.testing.assert_allclose(df[:, :-2], 4.0 / (SIZE - 1) + n2[:, 2:], atol=1e-5)


def test_cycle_loss():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  zero = [jnp.zeros((2, SIZE, SIZE, 2))] * 2
  assert float(ppdm.cycle_loss(x, zero, zero)) < 1e-10
  # Forward samples (+1, 0) then (0, +2); the exact inverses, applied fine first, restore every
  # pixel whose path stayed inside the clamped grid (rows >= 2, columns >= 1); the wrong-sign
  # "inverse" does not.
  fwd = [_shift((1, 0)), _shift((0, 2))]
  inv = [_shift((-1, 0)), _shift((0, -2))]
  x_cyc = ppdm.apply_fields(ppdm.apply_fields(x, fwd), inv[::-1])
  np.testing.assert_allclose(x_cyc[:, 2:, 1:], x[:, 2:, 1:], atol=1e-4)
  good, bad = ppdm.cycle_loss(x, fwd, inv), ppdm.cycle_loss(x, fwd, fwd)
  assert float(bad) > 3 * float(good) > 0  # good: only the ~9% border pixels differ
  # The smoothness term of a constant field vanishes inside the image.
  assert np.allclose(filters.smoothness_2d(_shift((1, 0)), 3, reduce=False)[:, 1:-1, 1:-1], 0)


def test_paper_equation_options_change_exactly_their_terms():
  """Eq. 18's ||grad O||_1 (``loss.smooth_kind="gradient_l1"``) changes only the offset term,
  to the direct computation, and Eq. 18's backward norms (``loss.norm_backward=1``) add exactly
  their norms; Eq. 21's forward term (``score.forward_df``) adds warp(|O_1|, O_2) + |O_2| to the
  deformation map and leaves the reconstruction map alone."""
  rng = np.random.default_rng(0)
  fields = [jnp.asarray(rng.normal(size=(2, SIZE, SIZE, 2)) * 0.02, jnp.float32) for _ in range(4)]
  x = jnp.asarray(rng.normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  out = {
    "input": x, "teacher": _feats(0), "student": _feats(1), "vq": None,
    "forward": fields[:2], "backward": fields[2:], "cycle": x + 0.1,
  }  # fmt: skip
  base_terms = ppdm.ppdm_loss(out, ppdm.LossWeights())[1]
  eq18 = ppdm.ppdm_loss(out, ppdm.LossWeights(smooth_kind="gradient_l1"))[1]
  back = ppdm.ppdm_loss(out, ppdm.LossWeights(norm_backward=1.0))[1]
  for k in base_terms:
    if k != "offset":
      np.testing.assert_array_equal(eq18[k], base_terms[k], err_msg=k)
      np.testing.assert_array_equal(back[k], base_terms[k], err_msg=k)
  f = [np.asarray(o, np.float64) for o in fields]
  norms = [np.linalg.norm(o, axis=-1).mean() for o in f]
  grads = sum(np.abs(np.diff(o, axis=2)).sum(-1).mean() + np.abs(np.diff(o, axis=1)).sum(-1).mean()
              for o in f)  # fmt: skip
  np.testing.assert_allclose(eq18["offset"], norms[0] + norms[1] + grads, rtol=1e-5)
  np.testing.assert_allclose(back["offset"] - base_terms["offset"], norms[2] + norms[3], rtol=1e-4)

  plain = ppdm.anomaly_maps(out, 4.0)
  both = ppdm.anomaly_maps(out, 4.0, forward_df=True)
  np.testing.assert_array_equal(both["rec"], plain["rec"])
  # Forward half, directly: |O_2| plus |O_1| sampled through O_2's grid.
  n1 = jnp.asarray(np.linalg.norm(f[0], axis=-1)[..., None], jnp.float32)
  os1 = np.asarray(ppdm.apply_fields(n1, [fields[1]]))[..., 0] + np.linalg.norm(f[1], axis=-1)
  from scipy.ndimage import gaussian_filter

  want = np.stack([gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in os1])
  np.testing.assert_allclose(both["df"] - plain["df"], want, atol=1e-5)


def test_test_selected_protocols_are_the_released_test_and_labelled():
  """With ``eval.test_selected`` the eval job adds Eq. 22 with the TEST split's min-max ranges
  and the released report max(AUROC(that), AUROC(rec)), both named ..._test_selected."""
  import types

  from sklearn.metrics import roc_auc_score

  from dmad_jax.evaluation import job

  det = get_detector(_config())
  assert det.reported_best_of == ("score_test_minmax", "rec")
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=40) < 0.4).astype(int)
  scores = {
    "rec": rng.normal(size=40) + labels,
    "df": rng.normal(size=40) * 3 + 0.5 * labels,
    "score": rng.normal(size=40),
  }
  mm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
  fused = mm(scores["rec"]) + det.alpha * mm(scores["df"])
  np.testing.assert_allclose(det.test_selected_scores(scores)["score_test_minmax"], fused)
  scored = types.SimpleNamespace(scores=scores, labels=labels)
  out = job.Evaluator._test_selected(types.SimpleNamespace(detector=det), scored)
  assert out["image_AUROC_score_test_minmax_test_selected"] == pytest.approx(
    roc_auc_score(labels, fused), abs=1e-12
  )
  best = max(roc_auc_score(labels, fused), roc_auc_score(labels, scores["rec"]))
  assert out["image_AUROC_reported_test_selected"] == pytest.approx(best, abs=1e-12)
  assert all(k.endswith("_test_selected") for k in out)
  # RD has no deformation: nothing to recompute.
  rd = get_detector(_config(mvtec_rd))
  assert rd.test_selected_scores(scores) == {} and rd.reported_best_of == ()


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------
def test_mvtec_configs():
  for cat, n in mvtec.TRAIN_COUNTS.items():
    c = mvtec_ppdm.get_config(f"root=/d;category={cat};weights=w.npz")
    assert c.score.alpha == (0.2 if cat in ("screw", "carpet", "metal_nut") else 0.05)
    # 400 epochs of the category's training images, in steps once the data is read.
    assert c.total_epochs == 400 and c.batch_size == 8
    assert durations.plan(c, n).total_steps == math.ceil(400 * n / 8)
    assert c.data.root == f"/d/{cat}" and c.model.arch == "wide_resnet50_2"
    assert (c.optimizer.lr, c.optimizer.b1, c.optimizer.weight_decay) == (5e-3, 0.5, 0.01)
    assert c.model.backbone_weights == "w.npz" and not c.model.random_teacher
    r = mvtec_rd.get_config(f"root=/d;category={cat};weights=w.npz")
    assert r.total_epochs == 200 and r.optimizer.name == "adam"
    assert not r.model.deform and not r.model.vq
  assert (
    set(mvtec_ppdm.PAPER_AUROC) == set(mvtec_ppdm.CATEGORIES) and len(mvtec_ppdm.CATEGORIES) == 15
  )
  assert not mvtec_ppdm.get_config("root=/d;category=grid;vq=0").model.vq
  local = mvtec_ppdm.get_config("root=/d;category=grid;runlocal")
  assert local.model.arch == "resnet18" and local.model.random_teacher and local.total_steps == 2
  with pytest.raises(ValueError, match="category must be one of .*got 'cookie'"):
    mvtec_ppdm.get_config("root=/d;category=cookie")
  with pytest.raises(ValueError, match="unknown config arg"):
    mvtec_rd.get_config("root=/d;category=grid;alpha=1")
  with pytest.raises(ValueError, match="pixel_map"):
    c = _config(mvtec_rd)
    with c.unlocked():
      c.score.pixel_map = "fused"
    get_detector(c)


# ---------------------------------------------------------------------------------------------
# End to end: trainer + eval job on a tiny MVTec-layout folder.
# ---------------------------------------------------------------------------------------------
def _write_mvtec(root, rng):
  """Gaussian blobs as gray and RGB files; defects are bright squares with their masks."""
  yy, xx = np.mgrid[:SIZE, :SIZE]

  def blob():
    cy, cx = rng.uniform(12, 20, 2)
    return 160 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0) + 40

  for split, folder, n in [("train", "good", 8), ("test", "good", 3), ("test", "crack", 3)]:
    (root / split / folder).mkdir(parents=True)
    for i in range(n):
      img = blob()
      if folder == "crack":
        mask = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(4, 22, 2)
        mask[y : y + 6, x : x + 6] = 255
        img[mask > 0] = 255
        (root / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth" / folder / f"{i:03d}_mask.png")
      img = np.clip(img, 0, 255).astype(np.uint8)
      pil = Image.fromarray(np.stack([img] * 3, -1)) if i % 2 else Image.fromarray(img)
      pil.save(root / split / folder / f"{i:03d}.png")


def _check_eval(workdir, pixel_map):
  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "metrics.json")) as f:
    m = json.load(f)
  assert m["pixel_map"] == pixel_map and m["num_test"] == 6 and m["num_anomalous"] == 3
  for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_AUROC_rec"):
    assert 0.0 <= m[key] <= 1.0, (key, m[key])
  assert os.path.getsize(os.path.join(out, "heatmaps_2.png")) > 0
  assert os.path.getsize(os.path.join(out, "panel_2.png")) > 0
  return m


@pytest.mark.slow  # compiling two ResNet train steps on a CPU
def test_train_and_evaluate_ppdm(tmp_path):
  _write_mvtec(tmp_path / "mvtec" / "bottle", np.random.default_rng(0))
  root = tmp_path / "mvtec"
  # PPDM with the teacher read from a converted file (random numbers, resnet18).
  teacher_vars = _fill(teacher.teacher_shapes("resnet18"), 5)
  weights = convert.save_variables(tmp_path / "r18.npz", teacher_vars, "resnet18")
  config = mvtec_ppdm.get_config(
    f"root={root};category=bottle;image_size={SIZE};weights={weights};runlocal"
  )
  with config.unlocked():
    config.eval_at_end = True
  workdir = str(tmp_path / "ppdm")
  state = trainer.train_and_evaluate(config, workdir)
  same = jax.tree.map(
    lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
    state.batch_stats["teacher"],
    teacher_vars,
  )
  assert all(jax.tree.leaves(same))  # loaded exactly, and untouched by 2 AdamW steps
  assert float(state.batch_stats["score_stats"]["calibrated"]) == 1.0
  m = _check_eval(workdir, "fused")
  assert 0.0 <= m["image_AUROC_df"] <= 1.0
  # RD (and ARD) train and evaluate with pixel metrics and figures in tests/models/ard_test.py
  # (through the installed script) and tests/reproduce_tables_test.py (DAGM).
