"""DAAD / DAAD+: the ablation variants train, the GAN players are updated apart, and DAAD+'s
score scaling comes from the training split and is stored with the checkpoint."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

from dmad_jax import data as data_lib
from dmad_jax.configs import daad as daad_configs
from dmad_jax.configs import load_module
from dmad_jax.evaluation import job
from dmad_jax.evaluation.inference import Runner
from dmad_jax.models import daad, get_detector
from dmad_jax.ops import augment
from dmad_jax.train import sharding, trainer
from dmad_jax.train import state as state_lib
from dmad_jax.train.optim import learning_rate_schedule

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
digits_daad = load_module(os.path.join(CONFIGS, "digits_daad.py"))


def _config(variant, **optimizer):
  c = digits_daad.get_config(f"variant={variant};protocol=one_class=3;runlocal")
  for k, v in optimizer.items():
    setattr(c.optimizer, k, v)
  return c


@functools.cache
def _detector(variant):
  """One detector per variant for the whole module: its jitted init compiles once."""
  config = _config(variant, lr=3e-3)
  return config, get_detector(config)


def _batch(n=4, seed=0):
  x = np.random.default_rng(seed).uniform(-1, 1, size=(n, 32, 32, 1)).astype(np.float32)
  return {"image": jnp.asarray(x)}


def _memories(params):
  g = params["generator"]
  return {k: g[k]["memory"].shape for k in sorted(g) if k.startswith("memory")}


# Which memories each row of the paper's Table 3 has (runlocal: two levels, maps 16x16x4 and
# 8x8x8, rates 2x2x1, N = 10), and whether the decoder's level-1 convolution sees a skip.
_STRUCTURE = {
  "ae": ({}, False),
  "memae": ({"memory2": (10, 8)}, False),  # per pixel at the deepest level: D = C
  "ae_skip": ({}, True),
  "daad": ({"memory1": (10, 8 * 8 * 4), "memory2": (10, 4 * 4 * 8)}, True),
  "daad_plus": ({"memory1": (10, 8 * 8 * 4), "memory2": (10, 4 * 4 * 8)}, True),
}


@pytest.mark.parametrize("variant", list(daad_configs.VARIANTS))
@pytest.mark.slow
def test_each_variant_trains_a_few_steps(variant):
  config, detector = _detector(variant)
  batch = _batch()
  state = state_lib.initial(config, detector, data_lib.element_spec(config.data), total_steps=4)
  memories, skip = _STRUCTURE[variant]
  assert _memories(state.params) == memories
  # dec1_1 reads the up-sampled deepest features (8 channels), plus the level-1 skip (4).
  dec_in = state.params["generator"]["dec1_1"]["Conv_0"]["Conv_0"]["kernel"].shape[2]
  assert dec_in == (12 if skip else 8)
  assert ("discriminator" in state.params) == (variant == "daad_plus")

  step = jax.jit(
    functools.partial(
      trainer.train_step,
      detector=detector,
      lr_schedule=learning_rate_schedule(config.optimizer, 4),
    )
  )
  mse = []
  for _ in range(4):
    state, metrics = step(state, batch)
    assert bool(metrics["finite"]), metrics
    mse.append(float(metrics["mse"]))
  assert int(state.step) == 4
  assert mse[-1] < mse[0], mse  # the same batch four times: the reconstruction improves


@pytest.mark.slow
def test_generator_and_discriminator_change_only_through_their_own_optimizer():
  config, detector = _detector("daad_plus")
  batch = _batch()
  spec = data_lib.element_spec(config.data)
  state = state_lib.initial(config, detector, spec, total_steps=4)  # same init as above
  params, stats = state.params, state.batch_stats
  rng = jax.random.key(1)

  # The hook's gradients: each player's gradient is that of its own loss only. The gradient of
  # D's loss alone has no generator part and equals the hook's discriminator gradients; as the
  # hook differentiates the sum of both losses, its generator part is then the generator loss's.
  @jax.jit
  def grads_of_hook_and_of_disc_loss(params):
    _, grads = detector.value_and_grad(params, stats, batch, rng)
    d_grads = jax.grad(lambda p: detector.loss(p, stats, batch, rng)[1][0]["discriminator_loss"])
    return grads, d_grads(params)

  grads, d_grads = grads_of_hook_and_of_disc_loss(params)
  assert all(not np.any(g) for g in jax.tree.leaves(d_grads["generator"]))
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
    grads["discriminator"],
    d_grads["discriminator"],
  )
  assert all(np.any(g) for g in jax.tree.leaves(grads))

  # One optax state per player; a zero learning rate for one freezes exactly that player.
  def changed(lr_gen, lr_disc):
    cfg = _config("daad_plus", lr=lr_gen)
    cfg.discriminator_optimizer.lr = lr_disc
    tx = state_lib.make_optimizer(cfg, get_detector(cfg), 10, params)
    opt_state = tx.init(params)
    assert set(opt_state.inner_states) == {"generator", "discriminator"}
    new = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, opt_state, p)[0]))(params, grads)
    return {
      k: any(
        np.any(a != b) for a, b in zip(*map(jax.tree.leaves, (new[k], params[k])), strict=True)
      )
      for k in params
    }

  assert changed(1e-3, 0.0) == {"generator": True, "discriminator": False}
  assert changed(0.0, 1e-3) == {"generator": False, "discriminator": True}


@pytest.mark.slow  # trains, calibrates and evaluates: compiles DAAD+'s init, step and scores.
def test_score_scaling_comes_from_the_training_split_and_is_checkpointed(tmp_path):
  config = _config("daad_plus")
  config.total_steps = 2
  config.checkpoint_every_steps = 1
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)

  detector = get_detector(config)
  train = data_lib.get_source(config.data, "train")
  mesh = sharding.make_mesh(None)
  variables, var_sh = state_lib.restore_variables(
    config, detector, train.element_spec, workdir, 2, mesh
  )
  stats = {k: np.asarray(v) for k, v in variables["batch_stats"]["score_stats"].items()}
  assert stats.pop("calibrated") == 1.0

  # The stored ranges are those of R and L over the training split: recomputed by the same
  # function in the same batches as the trainer's statistics step, they are equal, bit for bit
  # (a recomputation in other batches moves L, about 1e-8 here, by float32 summation order).
  runner = Runner(
    detector.statistics,
    mesh=mesh,
    variables_sharding=var_sh,
    batch_size=config.eval.batch_size,
    keep=(),
  )
  rows, _ = runner.collect(variables, train)
  assert rows["r_min"].shape == (len(train),)
  assert stats == {
    "r_min": rows["r_min"].min(),
    "r_max": rows["r_max"].max(),
    "l_min": rows["l_min"].min(),
    "l_max": rows["l_max"].max(),
  }

  # predict scales both scores with exactly these ranges (Eq. 7). Each float32 operation of the
  # formula rounds by at most eps = 1.2e-7 relative: a few eps of the result, or of 1 for results
  # near zero, where the scaled terms are differences of near-equal numbers.
  test = data_lib.get_source(config.data, "test")
  images = jnp.asarray(np.stack([test[i]["image"] for i in range(16)]))
  scores = jax.jit(detector.predict)(variables, {"image": images}).scores
  rec, ali = np.asarray(scores["rec"], np.float64), np.asarray(scores["ali"], np.float64)
  r_lo, r_hi, l_lo, l_hi = (float(stats[k]) for k in ("r_min", "r_max", "l_min", "l_max"))
  fused = 0.9 * (rec - r_lo) / (r_hi - r_lo) + 0.1 * (ali - l_lo) / (l_hi - l_lo)
  np.testing.assert_allclose(np.asarray(scores["score"]), fused, rtol=1e-6, atol=1e-6)

  # The eval job reads them from the checkpoint and reports both parts' AUROC; no metric of
  # the test-informed protocols unless asked for.
  result = job.evaluate(config, workdir)
  for key in ("image_AUROC", "image_AUROC_rec", "image_AUROC_ali"):
    assert 0.0 <= result[key] <= 1.0
  assert not [k for k in result if "test_selected" in k]

  # eval.test_selected: the fusion with the TEST split's ranges, labelled, next to the default
  # numbers (unchanged), and the best of the evaluated checkpoints on the test split.
  config.eval.test_selected = True
  first = job.evaluate(config, workdir, step=1)
  labelled = job.evaluate(config, workdir, step=2)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    written = json.load(f)
  for key in ("image_AUROC", "image_AUROC_rec", "image_AUROC_ali"):
    assert labelled[key] == result[key] == written[key]
  with np.load(os.path.join(workdir, "eval", "scores_2.npz")) as f:
    r, a, labels = f["rec"], f["ali"], f["labels"]
  mm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
  want = roc_auc_score(labels, 0.9 * mm(r) + 0.1 * mm(a))
  assert written["image_AUROC_score_test_minmax_test_selected"] == pytest.approx(want, abs=1e-12)
  best_step = 1 if first["image_AUROC"] >= labelled["image_AUROC"] else 2  # ties: the earlier
  best = max(first["image_AUROC"], labelled["image_AUROC"])
  assert written["image_AUROC_best_checkpoint_test_selected"] == best
  assert written["best_checkpoint_step_test_selected"] == best_step
  assert written["checkpoints_compared_test_selected"] == 2


def test_fused_score_and_flips():
  stats = {"r_min": 1.0, "r_max": 3.0, "l_min": 0.0, "l_max": 10.0}
  s = daad.fused_score(jnp.array([1.0, 3.0, 2.0]), jnp.array([0.0, 10.0, 5.0]), stats, 0.9)
  np.testing.assert_allclose(np.asarray(s), [0.0, 1.0, 0.5], rtol=1e-6)
  x = jnp.arange(2 * 3 * 3).reshape(2, 3, 3, 1).astype(jnp.float32)
  flipped = augment.random_flips(jax.random.key(0), x, horizontal=True, vertical=True)
  for a, b in zip(np.asarray(flipped), np.asarray(x), strict=True):
    assert any(np.array_equal(a, f(b)) for f in (lambda t: t, np.fliplr, np.flipud, np.flip))
  assert np.array_equal(
    augment.random_flips(jax.random.key(0), x, horizontal=False, vertical=False), x
  )


def _video_config(input_mode, variant="daad_plus"):
  return load_module(os.path.join(CONFIGS, "ped2_daad.py")).get_config(
    f"root=/d;variant={variant};input_mode={input_mode};runlocal"
  )


def test_video_input_modes_change_only_what_the_generator_sees():
  """On 5-frame clips, "reconstruct" feeds and targets the clip's last frame (the record's
  image), "predict" feeds the 4 earlier frames and targets the last; both score the target, and
  the training flips move input and target together."""
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 15)), jnp.float32)
  batch = {"frames": frames, "image": frames[..., 12:]}
  rec, pred = (get_detector(_video_config(m)) for m in ("reconstruct", "predict"))
  x, target = rec.split(batch)
  np.testing.assert_array_equal(x, frames[..., 12:])
  np.testing.assert_array_equal(target, frames[..., 12:])
  x, target = pred.split(batch)
  np.testing.assert_array_equal(x, frames[..., :12])
  np.testing.assert_array_equal(target, frames[..., 12:])
  # The generator's first convolution reads 3 or 12 channels; the discriminator judges frames.
  for det, channels in ((rec, 3), (pred, 12)):
    v = jax.eval_shape(det.init, jax.random.PRNGKey(0), batch)
    first = v["params"]["generator"]["enc1_1"]["Conv_0"]["Conv_0"]["kernel"]
    assert first.shape[2] == channels
    assert v["params"]["discriminator"]["conv1"]["kernel"].shape[2] == 3
  # Flipped together: the target stays the 5th frame of the flipped clip.
  for seed in range(4):
    x, target = pred._inputs(jax.random.PRNGKey(seed), batch)
    both = jnp.concatenate([x, target], -1)
    flipped = [
      np.asarray(f) for f in (frames, frames[:, ::-1], frames[:, :, ::-1], frames[:, ::-1, ::-1])
    ]
    for i in range(4):
      assert any(np.array_equal(both[i], f[i]) for f in flipped)
  # An image source has no clips: "predict" says so.
  with pytest.raises(ValueError, match="input_mode 'predict' needs video clips"):
    pred.split({"image": frames[..., 12:]})


def test_eq6_l2_alignment_changes_only_the_alignment_terms():
  """``loss.ali_distance="l2"`` makes the alignment loss Eq. 6's norm and changes no other
  term; ``score.ali_distance="l2"`` makes L(x) the norm and changes no other score; both
  default to the mean squared difference."""
  base_config = _config("daad_plus")
  assert base_config.loss.ali_distance == base_config.score.ali_distance == "mse"
  detector = get_detector(base_config)
  batch = _batch()
  variables = detector.init(jax.random.PRNGKey(0), batch)
  params, stats = variables["params"], variables["batch_stats"]
  rng = jax.random.PRNGKey(1)

  def terms_and_scores(**keys):
    config = _config("daad_plus")
    for section, value in keys.items():
      config[section].ali_distance = value
    det = get_detector(config)
    terms = det.loss(params, stats, batch, rng)[1][0]
    return terms, det.predict(variables, batch).scores, det

  t0, s0, _ = terms_and_scores()
  t1, s1, _ = terms_and_scores(loss="l2")
  t2, s2, _ = terms_and_scores(score="l2")
  # The direct computation: features of the flipped input and of its reconstruction.
  x, _ = detector._inputs(rng, batch)
  g = {"params": params["generator"], "batch_stats": stats["generator"]}
  x_hat = detector.generator.apply(g, x, train=True, mutable=["batch_stats"])[0]["reconstruction"]
  d = {"params": params["discriminator"], "batch_stats": stats["discriminator"]}
  f = detector.discriminator.apply(d, x, train=True, mutable=["batch_stats"])[0][1]
  f_hat = detector.discriminator.apply(d, x_hat, train=True, mutable=["batch_stats"])[0][1]
  diff = np.asarray(f, np.float64) - np.asarray(f_hat, np.float64)
  np.testing.assert_allclose(t0["ali"], 0.5 * np.mean(diff**2), rtol=1e-4)
  np.testing.assert_allclose(t1["ali"], 0.5 * np.mean(np.linalg.norm(diff, axis=-1)), rtol=1e-4)
  assert abs(float(t1["ali"]) - float(t0["ali"])) > 1e-3 * abs(float(t0["ali"]))
  for k in t0:
    if k not in ("ali", "generator_loss"):
      np.testing.assert_array_equal(t1[k], t0[k], err_msg=k)
    np.testing.assert_array_equal(t2[k], t0[k], err_msg=k)
  # Scores: only L(x) (and the fusion) change with score.ali_distance.
  np.testing.assert_array_equal(s1["rec"], s0["rec"])
  np.testing.assert_array_equal(s1["ali"], s0["ali"])
  np.testing.assert_array_equal(s2["rec"], s0["rec"])
  fd = {"params": params["discriminator"], "batch_stats": stats["discriminator"]}
  rec_img = detector._reconstruct(variables, batch["image"])
  f_x = detector.discriminator.apply(fd, batch["image"], train=False)[1]
  f_r = detector.discriminator.apply(fd, rec_img, train=False)[1]
  np.testing.assert_allclose(s2["ali"], np.linalg.norm(f_x - f_r, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(s0["ali"], np.mean((f_x - f_r) ** 2, axis=-1), rtol=1e-5)
