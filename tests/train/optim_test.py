"""The optimizers of the configs against torch's: Adam with L2 weight decay (IGD) and the poly
learning-rate decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dmad_jax.train import optim


def _cfg(**kw):
  base = dict(
    name="adam", lr=1e-2, b1=0.0, b2=0.9, eps=1e-8, weight_decay=1e-2, schedule="constant"
  )
  return ml_collections.ConfigDict({**base, **kw})


def test_poly_schedule_is_the_code_s_per_iteration_decay():
  sched = optim.learning_rate_schedule(_cfg(schedule="poly", power=0.9, lr=1e-4), 100)
  for t in (0, 1, 50, 99, 100):
    assert float(sched(t)) == pytest.approx(1e-4 * (1 - t / 100) ** 0.9, rel=1e-6, abs=1e-12)
  with pytest.raises(ValueError, match="no warm-up"):
    optim.learning_rate_schedule(_cfg(schedule="poly", warmup_steps=5), 100)


def test_adam_weight_decay_is_torch_adam_l2_not_adamw():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal((5, 3))
  grads = [rng.standard_normal((5, 3)) for _ in range(4)]
  cfg = _cfg()

  def run(tx):
    params, state = {"w": jnp.asarray(w0)}, tx.init({"w": jnp.asarray(w0)})
    for g in grads:
      updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
      params = optax.apply_updates(params, updates)
    return np.asarray(params["w"])

  with jax.enable_x64(True):
    ours = run(optim.make_optimizer(cfg, 4, {"w": w0}))
    decoupled = run(optax.adamw(cfg.lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=0.01))

  wt = torch.tensor(w0, requires_grad=True)
  opt = torch.optim.Adam([wt], lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=0.01)
  for g in grads:
    wt.grad = torch.tensor(g)
    opt.step()
  np.testing.assert_allclose(ours, wt.detach().numpy(), rtol=1e-10, atol=1e-12)
  assert np.max(np.abs(decoupled - ours)) > 1e-4  # AdamW's decoupled decay is another method
