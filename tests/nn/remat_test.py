"""config.remat: the same loss and gradients, and far less saved for the backward pass."""

import contextlib
import io
import os

import jax
import numpy as np
import pytest

from dmad_jax import configs
from dmad_jax import data as data_lib
from dmad_jax.models import get_detector
from dmad_jax.nn import remat
from dmad_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup(policy):
  config = configs.load(os.path.join(ROOT, "configs", "digits_pdm.py"), "runlocal")
  config.remat = policy
  detector = get_detector(config)
  spec = data_lib.element_spec(config.data)
  state = state_lib.initial(config, detector, spec, 10)
  image = np.random.default_rng(0).uniform(-1, 1, (8, *spec["image"].shape)).astype(np.float32)
  return detector, state, {"image": image}


def _saved(detector, state, batch) -> int:
  """Bytes the backward pass of the loss keeps from its forward pass (JAX's own account)."""
  out = io.StringIO()

  def loss(params):
    return detector.loss(params, state.batch_stats, batch, None)[0]

  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, state.params)
  total = 0
  for line in out.getvalue().splitlines():
    shape = line.split()[0]  # e.g. f32[8,32,32,16]
    dims = shape[shape.index("[") + 1 : shape.index("]")]
    total += 4 * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def test_conv_outputs_policy_keeps_the_loss_and_gradients_and_saves_less():
  results = {}
  for policy in ("none", "conv_outputs"):
    detector, state, batch = _setup(policy)
    (loss, _), grads = jax.jit(detector.value_and_grad)(
      state.params, state.batch_stats, batch, jax.random.key(0)
    )
    results[policy] = (float(loss), grads, _saved(detector, state, batch))
  (loss0, grads0, saved0), (loss1, grads1, saved1) = results["none"], results["conv_outputs"]
  assert loss1 == pytest.approx(loss0, rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  assert saved1 < 0.6 * saved0, (saved0, saved1)


def test_unknown_policy_is_refused_with_the_known_ones():
  with pytest.raises(ValueError, match="config.remat must be one of none, conv_outputs, got 'all'"):
    remat.policy({"remat": "all"})
