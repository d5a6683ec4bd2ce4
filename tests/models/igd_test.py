"""IGD: the released models' sizes, the patch folding, the E-step, the scores, and one train step
on 8 devices against 1 (float64)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.configs import load_module
from dmad_jax.models import get_detector, igd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
mvtec_igd = load_module(os.path.join(ROOT, "configs", "mvtec_igd.py"))
digits_igd = load_module(os.path.join(ROOT, "configs", "digits_igd.py"))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "variant,generator,critic,encoder",
  [
    # Counted from the released code's modules (the facts): the trainable generator is
    # Linear(512 -> 128) plus the decoder; the frozen encoder is ResNet18 up to the average pool
    # (global) or the custom 32x32 residual encoder (local).
    ("global", 10_969_027, 17_715_201, 11_176_512),
    ("local", 3_622_339, 2_964_993, 6_694_656),
  ],
)
def test_parameter_counts_of_the_released_models(variant, generator, critic, encoder):
  config = mvtec_igd.get_config(f"root=/x;category=bottle;variant={variant}")
  config.model.random_backbone = True  # shapes only: no weights are read
  detector = get_detector(config)
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  v = jax.eval_shape(detector._init, jax.random.PRNGKey(0), images)
  assert sorted(v["params"]) == [f"{variant}_critic", f"{variant}_generator"]
  assert _count(v["params"][f"{variant}_generator"]) == generator
  assert _count(v["params"][f"{variant}_critic"]) == critic
  assert _count(v["batch_stats"][f"{variant}_encoder"]["params"]) == encoder
  # Output 256x256x3 (global) or 32x32x3 (local) from z in R^128.
  gen = detector.generators[variant]
  z = jax.ShapeDtypeStruct((2, 128), jnp.float32)
  gv = {"params": v["params"][f"{variant}_generator"]}
  gv["batch_stats"] = v["batch_stats"][f"{variant}_generator"]
  out = jax.eval_shape(lambda gv, z: gen.apply(gv, z, train=False), gv, z)
  size = 256 if variant == "global" else 32
  assert out.shape == (2, size, size, 3)


def test_patches_are_torch_unfold_and_fold_sums_the_overlaps():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 64, 80, 3)).astype(np.float32)
  p = np.asarray(igd.extract_patches(jnp.asarray(x), 32, 16))  # (B, 3, 4, 32, 32, C)
  assert p.shape == (2, 3, 4, 32, 32, 3)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  # unfold: (B, C * 32 * 32, L) with L row-major over the patch grid.
  u = torch.nn.functional.unfold(xt, 32, stride=16).numpy()
  ref = u.reshape(2, 3, 32, 32, 3, 4).transpose(0, 4, 5, 2, 3, 1)
  np.testing.assert_array_equal(p, ref)
  folded = torch.nn.functional.fold(torch.from_numpy(u), (64, 80), 32, stride=16).numpy()
  np.testing.assert_allclose(
    np.asarray(igd.fold_patches(jnp.asarray(p), 16)), folded.transpose(0, 2, 3, 1), rtol=1e-6
  )
  with pytest.raises(ValueError, match="size == 2 \\* stride"):
    igd.extract_patches(jnp.asarray(x), 32, 8)


def _direct_centre(z, floor):
  c = z.mean(axis=0)
  out = c.copy()
  for i, v in enumerate(c):
    if abs(v) < floor and v != 0:
      out[i] = floor if v > 0 else -floor
  return out


def _direct_width(z, c, group, kappa):
  sigmas = []
  for start in range(0, len(z), group):
    rows = z[start : start + group]
    sigmas.append(max(1.0, kappa * np.mean([np.sum((r - c) ** 2) for r in rows])))
  return np.mean(sigmas)


def test_e_step_helpers_against_a_direct_computation():
  rng = np.random.default_rng(1)
  z = rng.standard_normal((37, 6)) * np.array([0.05, 1.0, 0.02, 2.0, 0.3, 0.0])
  z[:, 5] = 0.0  # an exact zero stays 0
  z[:, 2] += -0.01  # a small negative mean -> -0.1
  c = igd.centre(z, 0.1)
  np.testing.assert_allclose(c, _direct_centre(z, 0.1), rtol=1e-12)
  assert c[5] == 0.0 and c[2] == -0.1 and abs(c[0]) == 0.1
  d = np.sum((z - c) ** 2, axis=1)
  for kappa in (1.0, 0.5):
    for group in (4, 10, 37):
      want = _direct_width(z, c, group, kappa)
      assert igd.width(d, group, kappa) == pytest.approx(want, rel=1e-12)
  # The floor at 1 is active for some groups: small latents give sigma = 1 exactly.
  assert igd.width(d * 1e-3, 4, 1.0) == 1.0


def _tiny_local(**loss):
  config = digits_igd.get_config("runlocal")
  for k, v in loss.items():
    config.loss[k] = v
  return config, get_detector(config)


@pytest.mark.parametrize("kappa", [1.0, 0.5])
def test_fit_to_data_is_the_e_step_over_the_training_split(kappa):
  """The detector's E-step (c and sigma over every record, sigma grouped by the training batch)
  equals the direct computation on the latents of the same variables."""
  config, detector = _tiny_local(kappa=kappa)
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (10, 32, 32, 1)).astype(np.float32)
  v = detector.init(jax.random.PRNGKey(0), {"image": jnp.asarray(images[:2])})

  def collect(fn):  # what the trainer's collect returns: every record, in order
    out = [fn(v, {"image": jnp.asarray(images[i : i + 3])}) for i in range(0, 10, 3)]
    return {k: np.concatenate([np.asarray(o[k]) for o in out]) for k in out[0]}

  fitted = detector.fit_to_data(v, collect)["local_gsvdd"]
  s = detector._prepare(jnp.asarray(images))
  z, _ = detector._latent("local", v["params"], v["batch_stats"], s, train=False)
  z = np.asarray(z, np.float64)
  c = _direct_centre(z, 0.1)
  np.testing.assert_allclose(fitted["c"], c, rtol=1e-5, atol=1e-6)
  want = _direct_width(z, c, config.batch_size, kappa)
  assert float(fitted["sigma"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_local_scores_maps_and_the_score_recipes():
  """Local image score = max over patches of 0.9 recon + 0.1 gsvdd (the code's); the map has
  the image's size with the folded patches; the signed L1 option and Eq. 11 change the score."""
  config, detector = _tiny_local()
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 64, 64, 1)), jnp.float32)
  v = detector.init(jax.random.PRNGKey(0), {"image": x})
  v["batch_stats"]["local_gsvdd"] = {"c": jnp.full((v_dim(v),), 0.1), "sigma": jnp.asarray(2.0)}
  pred = detector.predict(v, {"image": x})
  recon, svdd, amap, x_hat = detector._branch_scores("local", v, detector._prepare(x))
  assert recon.shape == svdd.shape == (2, 9)  # 3 x 3 patches of 32 at stride 16
  np.testing.assert_allclose(pred.scores["score"], np.max(0.9 * recon + 0.1 * svdd, axis=1))
  assert pred.maps["igd"].shape == (2, 64, 64) and np.all(np.asarray(pred.maps["igd"]) >= 0)
  assert pred.images["reconstruction"].shape == x.shape

  signed_cfg = digits_igd.get_config("runlocal")
  signed_cfg.score.patch_l1 = "signed"
  signed = get_detector(signed_cfg).predict(v, {"image": x})
  assert not np.allclose(signed.scores["score"], pred.scores["score"])
  paper_cfg = digits_igd.get_config("runlocal")
  paper_cfg.score.recipe = "paper"
  paper = get_detector(paper_cfg).predict(v, {"image": x})
  np.testing.assert_allclose(
    paper.scores["score"], 0.5 * np.max(recon, axis=1) + 0.5 * np.max(svdd, axis=1), rtol=1e-6
  )


def v_dim(v):
  return v["batch_stats"]["local_gsvdd"]["c"].shape[0]


@pytest.mark.slow
def test_critic_and_generator_are_updated_by_their_own_losses():
  """The critic's gradient is that of the critic loss alone, the generator's that of the
  generator loss alone (each sees the other player stop-gradient'ed)."""
  _, detector = _tiny_local()
  x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
  v = detector.init(jax.random.PRNGKey(0), {"image": x})
  batch, key = {"image": x}, jax.random.PRNGKey(5)

  @jax.jit  # one program for the three gradients
  def gradients(params):
    def term(name):
      return lambda p: detector._objective(p, v["batch_stats"], batch, key)[1][0][name]

    _, both = detector.value_and_grad(params, v["batch_stats"], batch, key)
    return both, jax.grad(term("generator_loss"))(params), jax.grad(term("critic_loss"))(params)

  grads, g_only, d_only = gradients(v["params"])
  for player, alone in (("local_critic", d_only), ("local_generator", g_only)):
    pairs = zip(jax.tree.leaves(grads[player]), jax.tree.leaves(alone[player]), strict=True)
    for a, b in pairs:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  # Neither loss reaches the other player.
  assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(g_only["local_critic"]))
  assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(d_only["local_generator"]))


EIGHT_DEVICES = textwrap.dedent(
  """
  import json
  import jax, numpy as np
  from dmad_jax.configs import load_module
  from dmad_jax.models import get_detector
  from dmad_jax.train import sharding, state as state_lib, trainer
  from dmad_jax.train.optim import learning_rate_schedule

  assert jax.device_count() == 8
  out = {{}}
  for variant, size in (("global", 32), ("local", 32)):
    c = load_module({root!r} + "/configs/mvtec_igd.py").get_config(
      f"root=/x;category=bottle;variant={{variant}};runlocal")
    c.batch_size, c.param_dtype, c.total_steps = 8, "float64", 2
    c.data.image_size = size  # local at 32x32: one 32x32 patch per image
    if variant == "global":  # the global model at 32x32: one up block, three MS-SSIM scales
      c.model.global_decoder, c.model.global_critic = (8,), (8,)
      c.loss.global_window, c.loss.global_weights = 3, (0.3, 0.3, 0.4)
    detector = get_detector(c)
    spec = {{"image": jax.ShapeDtypeStruct((size, size, 3), np.float32)}}
    rng = np.random.default_rng(0)
    batch = {{"image": rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float64)}}
    res = {{}}
    for name, axes in (("one", [("data", 1)]), ("eight", [("data", -1)])):
      mesh = sharding.make_mesh(axes)
      tx = state_lib.optimizer(c, detector, spec, 2)
      abstract = state_lib.abstract(c, detector, spec, tx)
      sh = state_lib.shardings(abstract, mesh, c)
      state = jax.jit(lambda: state_lib.create(c, detector, spec, tx), out_shardings=sh)()
      step = jax.jit(
        lambda s, b: trainer.train_step(s, b, detector=detector,
                                        lr_schedule=learning_rate_schedule(c.optimizer, 2)),
        in_shardings=(sh, sharding.data_sharding(mesh)))
      state, metrics = step(state, sharding.global_batch(batch, sharding.data_sharding(mesh)))
      losses = [float(metrics["loss"])]
      params = [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.params)]
      res[name] = dict(losses=losses, critic=float(metrics[variant + "_critic_loss"]),
                       params=params)
    out[variant] = res
  print("RESULT" + json.dumps(out))
  """
)


@pytest.mark.multidevice
def test_global_and_local_train_steps_on_eight_devices_equal_one_device_in_float64(tmp_path):
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    JAX_ENABLE_X64="1",
  )
  proc = subprocess.run(
    [sys.executable, "-c", EIGHT_DEVICES.format(root=ROOT)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.split("RESULT", 1)[1])
  for variant in ("global", "local"):
    one, eight = res[variant]["one"], res[variant]["eight"]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-12)
    assert eight["critic"] == pytest.approx(one["critic"], rel=1e-12)
    for a, b in zip(eight["params"], one["params"], strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_training_resumes_exactly_across_e_steps(tmp_path):
  """The E-step's values live in batch_stats and are checkpointed, and the E-step runs at fixed
  steps (before steps 1 and 3 with refit every 2): a run stopped after step 3 and resumed (no
  E-step before step 4) ends with the bits of an uninterrupted 4-step run."""
  from dmad_jax.train import state as state_lib
  from dmad_jax.train import trainer

  def config(steps):
    c = digits_igd.get_config("protocol=one_class=3;runlocal")
    c.total_steps, c.keep_checkpoints, c.refit_every_steps = steps, 5, 2
    return c

  import shutil

  straight = trainer.train_and_evaluate(config(4), str(tmp_path / "a"))
  # The same run stopped after step 3: its workdir without the step-4 checkpoint.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  resumed = trainer.train_and_evaluate(config(4), str(tmp_path / "b"))
  a = jax.tree.leaves((straight.params, straight.batch_stats, straight.opt_state))
  b = jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.opt_state))
  assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  g = straight.batch_stats["local_gsvdd"]
  assert float(g["sigma"]) >= 1.0 and np.all(np.abs(np.asarray(g["c"])) >= 0.1 - 1e-7)
  # The E-step ran on the state of step 2 before step 3: the final centre differs from step 1's.
  c1 = state_lib.variables_at(config(4), str(tmp_path / "a"), 1)["batch_stats"]["local_gsvdd"]
  assert not np.array_equal(np.asarray(c1["c"]), np.asarray(g["c"]))


def _write_category(root, n_train=4):
  from PIL import Image

  rng = np.random.default_rng(0)
  for split, folder, n in (("train", "good", n_train), ("test", "good", 2), ("test", "cut", 2)):
    d = root / "bottle" / split / folder
    d.mkdir(parents=True)
    for i in range(n):
      img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
      Image.fromarray(img).save(d / f"{i:03d}.png")


@pytest.mark.slow
def test_the_distilled_local_encoder_is_loaded_and_stays_frozen(tmp_path):
  """configs/mvtec_igd_kd.py trains the local encoder against ResNet18's feature; the local IGD
  config with kd=<its workdir> starts from exactly that encoder (config.init_from) and never
  changes it."""
  from dmad_jax.train import state as state_lib
  from dmad_jax.train import trainer

  _write_category(tmp_path / "mvtec")
  kd_config = load_module(os.path.join(ROOT, "configs", "mvtec_igd_kd.py")).get_config(
    f"root={tmp_path / 'mvtec'};category=bottle;runlocal"
  )
  kd_config.data.image_size = 64
  kd_state = trainer.train_and_evaluate(kd_config, str(tmp_path / "kd"))
  assert float(np.abs(np.asarray(jax.tree.leaves(kd_state.params)[0])).sum()) > 0

  arg = f"root={tmp_path / 'mvtec'};category=bottle;variant=local;kd={tmp_path / 'kd'};runlocal"
  config = mvtec_igd.get_config(arg)
  config.data.image_size = 64
  assert config.model.encoder == "frozen" and "init_from" in config
  trainer.train_and_evaluate(config, str(tmp_path / "igd"))
  kd = state_lib.variables_at(kd_config, str(tmp_path / "kd"))
  for step in (1, 2):
    frozen = state_lib.variables_at(config, str(tmp_path / "igd"), step)["batch_stats"]
    frozen = frozen["local_encoder"]
    for want, got in (
      (kd["params"]["encoder"], frozen["params"]),
      (kd["batch_stats"]["encoder"], frozen["batch_stats"]),
    ):
      pairs = zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True)
      assert all(np.array_equal(a, b) for a, b in pairs)
  bad = mvtec_igd.get_config(arg)
  bad.data.image_size = 64
  bad.init_from.assign = (("params/encoder", "batch_stats/local_encoder/batch_stats"),)
  with pytest.raises(ValueError, match="has shapes"):
    trainer.train_and_evaluate(bad, str(tmp_path / "bad"))
