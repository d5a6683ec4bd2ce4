"""Data-parallel training and eval on 8 fake CPU devices against a single-device run."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
  """
  import json, sys
  import jax, numpy as np
  sys.path.insert(0, {root!r})
  from configs import digits_pdm
  from dmad_jax.evaluation import job
  from dmad_jax.train import checkpoint, trainer

  assert jax.device_count() == 8, jax.devices()

  def config(mesh):
    c = digits_pdm.get_config("runlocal")
    c.batch_size, c.total_steps, c.keep_checkpoints, c.mesh = 16, 5, 10, mesh
    c.fsdp_min_size = 1024  # so that the tiny model has FSDP-split arrays
    return c

  def state_at(c, work, step):
    sources = trainer.data_lib.get_sources(c.data)
    det = trainer.get_detector(c)
    abstract = job._abstract_state(c, det, trainer._sample_batch(sources["train"]))
    state = checkpoint.restore(checkpoint.manager(work, read_only=True), step, abstract)
    return [np.asarray(p).tolist() for p in jax.tree.leaves((state.params, state.batch_stats))]

  out = {{}}
  meshes = (("eight", [("data", -1)]), ("fsdp", [("data", 2), ("fsdp", 4)]), ("one", [("data", 1)]))
  for name, mesh in meshes:
    c, work = config(mesh), {tmp!r} + "/" + name
    state = trainer.train_and_evaluate(c, work)
    with open(work + "/metrics.jsonl") as f:
      rows = [json.loads(l) for l in f]
    shardings = [str(x.sharding.spec) for x in jax.tree.leaves(state.params)]
    out[name] = dict(losses=[r["loss"] for r in rows], perplexity=[r["perplexity"] for r in rows],
                     state1=state_at(c, work, 1), state5=state_at(c, work, 5),
                     sharding=str(jax.tree.leaves(state.params)[0].sharding),
                     split=sum("fsdp" in x for x in shardings), leaves=len(shardings))
  # The eval job on the same checkpoint, sharded over 8 devices and on one.
  for name, mesh in (("eval_eight", [("data", -1)]), ("eval_one", [("data", 1)])):
    r = job.evaluate(config(mesh), {tmp!r} + "/one")
    s = np.load({tmp!r} + "/one/eval/scores_5.npz")
    out[name] = dict(auroc=r["image_AUROC"], scores=s["score"][np.argsort(s["index"])].tolist())
  c = config([("data", -1)])
  c.batch_size = 12
  try:
    trainer.train_and_evaluate(c, {tmp!r} + "/bad")
  except ValueError as e:
    out["error"] = str(e)
  print("RESULT" + json.dumps(out))
  """
)


@pytest.mark.multidevice
def test_eight_devices_match_one_device(tmp_path):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT,
  )
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT.format(root=ROOT, tmp=str(tmp_path))],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.split("RESULT", 1)[1])
  one = res["one"]
  assert "'data': 8" in res["eight"]["sharding"] and "'data': 1" in one["sharding"]
  assert 0 < res["fsdp"]["split"] < res["fsdp"]["leaves"]  # big arrays split, small replicated
  for name in ("eight", "fsdp"):
    run = res[name]
    # The first step sees the same batch and parameters: BatchNorm statistics and VQ usage are
    # computed over the global batch, so the sharded loss, code-usage perplexity and BatchNorm
    # running statistics equal the single-device ones (the warmup's first learning rate is 0).
    assert run["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)
    assert run["perplexity"][0] == pytest.approx(one["perplexity"][0], rel=1e-6)
    for a, b in zip(run["state1"], one["state1"], strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Later steps differ by float summation order only (the cross-device reductions add in
    # another order). The loss barely moves (measured: 1e-7..6e-7 relative for steps 2-4, up to
    # 1.8e-5 at step 5), but Adam's normalised update g / (|g| + eps) turns roundoff-level
    # gradients of some weights into lr-sized steps: after 5 steps parameters differ by up to
    # 2.6e-4 (measured), at a learning rate of 1e-4..4e-4 per step (warmup).
    np.testing.assert_allclose(run["losses"][:4], one["losses"][:4], rtol=1e-5)
    np.testing.assert_allclose(run["losses"], one["losses"], rtol=5e-5)
    diffs = [
      np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0)
      for a, b in zip(run["state5"], one["state5"], strict=True)
    ]
    assert max(diffs) < 1e-3, max(diffs)
  # Eval: the same checkpoint scored on 8 devices and on 1 gives the same scores and AUROC.
  np.testing.assert_allclose(res["eval_eight"]["scores"], res["eval_one"]["scores"], rtol=1e-5)
  assert res["eval_eight"]["auroc"] == res["eval_one"]["auroc"]
  assert "batch_size 12 is not divisible by the number of devices 8" in res["error"]
