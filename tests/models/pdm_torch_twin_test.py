"""experiments/torch_pdm.py computes what dmad_jax's PDM computes, from the same weights.

bench_train.py compares the JAX train step with this PyTorch twin's in the same run; these tests
are what make that a comparison of the same work: outputs in training and eval mode, the Ped2
loss, and the gradients of every parameter agree to float32 rounding.
"""

import copy
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from dmad_jax.models.pdm import PDM, LossWeights, pdm_loss

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "torch_pdm.py")
_spec = importlib.util.spec_from_file_location("torch_pdm", _PATH)
torch_pdm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_pdm)

SIZE, CIN = 32, 12
# Every layer of the Ped2 model at a quarter of its widths (the code paths do not depend on them).
SETTINGS = dict(
  image_size=SIZE,
  in_channels=CIN,
  channels=(8, 16, 32, 64),
  skip_channels=(8, 8),
  num_codes=50,
  gen_features=8,
  offset_features=16,
  coord_blocks=4,
)


@pytest.fixture(scope="module")
def twins():
  """(torch model, Flax module, Flax variables converted from it, frames NHWC)."""
  torch.manual_seed(0)
  tmodel = torch_pdm.TorchPDM(**SETTINGS)
  rng = np.random.default_rng(0)
  with torch.no_grad():  # non-trivial BatchNorm statistics and template, so eval mode is tested
    for mod in tmodel.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        mod.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.1, mod.num_features)))
        mod.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, mod.num_features)))
        mod.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, mod.num_features)))
        mod.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, mod.num_features)))
    tmodel.template.copy_(torch.from_numpy(rng.uniform(-1, 1, tmodel.template.shape)))
  module = PDM(**SETTINGS)
  frames = rng.uniform(-1, 1, (2, SIZE, SIZE, CIN + 3)).astype(np.float32)
  shapes = jax.eval_shape(
    lambda: module.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, CIN)), train=False)
  )
  variables = torch_pdm.flax_variables(tmodel, shapes)
  return tmodel, module, variables, frames


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("train", [True, False])
def test_outputs_match(twins, train):
  tmodel, module, variables, frames = twins
  tmodel = copy.deepcopy(tmodel)  # a train-mode forward updates the running statistics
  x = frames[..., :CIN]
  tmodel.train(train)
  with torch.no_grad():
    tout = tmodel(_nchw(x))
  apply = jax.jit(
    lambda v, x: module.apply(v, x, train=train, mutable=["batch_stats"] if train else False)
  )
  out = apply(variables, jnp.asarray(x))
  out = out[0] if train else out
  np.testing.assert_allclose(out["reference"], _nhwc(tout["reference"]), atol=1e-4)
  np.testing.assert_allclose(out["mask"], _nhwc(tout["mask"]), atol=1e-4)
  for o, to in zip(out["offsets"], tout["offsets"], strict=True):
    # Offsets are at most 3 px = 0.19 normalised units; 1e-6 is ~1e-5 px.
    np.testing.assert_allclose(o, _nhwc(to), atol=1e-6)
  for s, ts in zip(out["stages"], tout["stages"], strict=True):
    np.testing.assert_allclose(s, _nhwc(ts), atol=1e-4)
  assert float(jnp.max(jnp.abs(out["stages"][-1] - out["stages"][0]))) > 1e-3  # warps did act


# Conv biases followed by a train-mode BatchNorm: the normalisation removes them, so their true
# gradient is exactly zero and both frameworks return rounding noise there.
_BIASES_BEFORE_BN = {
  "offset_net.Conv_0.Conv_0.bias",
  "offset_net.Conv_1.Conv_0.bias",
  "offset_net.Conv_3.Conv_0.bias",
  "offset_net.ResBlock_0.Conv_0.Conv_0.bias",
  "offset_net.ResBlock_0.Conv_1.Conv_0.bias",
}


@pytest.mark.slow
def test_in_float64_loss_and_every_gradient_match(twins):
  """Same weights, same batch, float64 in both: the loss and all 150 parameter gradients agree
  to float64 rounding, so the two programs compute the same function (float32 adds only the
  rounding of different summation orders, which BatchNorm over small batches amplifies)."""
  tmodel, module, variables, frames = twins
  tmodel = copy.deepcopy(tmodel).double()  # also keeps the fixture's statistics
  x, target = frames[..., :CIN].astype(np.float64), frames[..., CIN:].astype(np.float64)
  tmodel.train()
  tloss = torch_pdm.pdm_loss(tmodel(_nchw(x)), _nchw(target))
  tloss.backward()
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)

    def loss_fn(params):
      out, _ = module.apply(
        {"params": params, "batch_stats": v64["batch_stats"]},
        jnp.asarray(x),
        train=True,
        mutable=["batch_stats"],
      )
      return pdm_loss(out, jnp.asarray(target), LossWeights())[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(v64["params"])
    grads = {".".join(k): np.asarray(g) for k, g in traverse_util.flatten_dict(grads).items()}
  np.testing.assert_allclose(float(loss), float(tloss.detach()), rtol=1e-13)
  tparams = dict(tmodel.named_parameters())
  assert len(grads) == len(tparams)
  largest = max(float(p.grad.abs().max()) for p in tparams.values())
  for key, g in grads.items():
    if key == "template":
      tg = _nhwc(tmodel.template.grad)
    elif key == "vq.codebook":
      tg = tmodel.vq.codebook.grad.numpy()
    else:
      name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[key.rsplit(".", 1)[1]]
      tg = tparams[key.rsplit(".", 1)[0] + "." + name].grad.numpy()
      tg = np.transpose(tg, (2, 3, 1, 0)) if g.ndim == 4 else tg
    assert g.shape == tg.shape, key
    if key in _BIASES_BEFORE_BN:
      assert max(np.abs(g).max(), np.abs(tg).max()) < 1e-12 * largest, key
    else:
      err = np.abs(g - tg).max() / np.abs(tg).max()
      assert err < 1e-10, (key, err)


@pytest.mark.slow
def test_eval_scores_match(twins):
  """The twin's eval step computes the scores of ``PDMDetector.predict`` (Ped2 config)."""
  tmodel, module, variables, frames = twins
  from dmad_jax.models.pdm import anomaly_maps, frame_errors, image_scores

  out = module.apply(variables, jnp.asarray(frames[..., :CIN]), train=False)
  target = jnp.asarray(frames[..., CIN:])
  scores = image_scores(anomaly_maps(out, target, "dis"), kernel_size=(3, 3), alpha=1.0)
  scores.update({f"ped2_{k}": v for k, v in frame_errors(out, target).items()})
  tscores = torch_pdm.eval_step(copy.deepcopy(tmodel), _nchw(frames))
  assert sorted(tscores) == sorted(scores)
  for k, v in scores.items():
    # Two frameworks' float32 convolutions differ by rounding relative to the magnitude of the
    # computation, not of each result: a score near zero gets an absolute floor at the scale of
    # that score's largest value.
    ref = tscores[k].numpy()
    np.testing.assert_allclose(v, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=k)
