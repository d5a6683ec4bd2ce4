"""``config.compute_dtype = "bfloat16"`` for every model: the train step an accelerator runs
computes its convolutions and matmuls in bfloat16, while parameters, optimizer state, BatchNorm
statistics and the loss stay float32 (``dmad_jax.nn.precision``)."""

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax import data as data_lib
from dmad_jax.models import get_detector
from dmad_jax.train import export_train_step
from dmad_jax.train import state as state_lib
from dmad_jax.train.optim import learning_rate_schedule
from dmad_jax.train.trainer import train_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
from export_test import SMALLEST, _config  # noqa: E402  (every model with its smallest config)

# stablehlo.convolution / dot_general with their operand and result types.
_OP = re.compile(
  r"stablehlo\.(convolution|dot_general)\b.*:\s*\((tensor<[^>]*>), (tensor<[^>]*>)\)\s*->\s*"
  r"(tensor<[^>]*>)"
)


def _shape_and_type(tensor: str):
  *dims, kind = tensor[len("tensor<") : -1].split("x")
  return tuple(int(d) if d.isdigit() else -1 for d in dims), kind


def _ops(name, dtype):
  """[(op, (lhs, rhs, result) shapes, (lhs, rhs, result) types)] of the exported tpu train
  step of the model's smallest config computing in ``dtype``."""
  config = _config(name)
  config.compute_dtype = dtype
  text = export_train_step(config, platforms=("tpu",)).mlir_module()
  out = []
  for line in text.splitlines():
    m = _OP.search(line)
    if m:
      shapes, kinds = zip(*(_shape_and_type(t) for t in m.groups()[1:]), strict=True)
      out.append((m.group(1), shapes, kinds))
  return out


def _layer(op) -> bool:
  """A convolution with a multi-channel kernel: a model layer (its forward pass or one of its
  two gradients), not one of the single-channel filters of a loss or score."""
  kind, (_, rhs, _), _ = op
  return kind == "convolution" and rhs[-1] * rhs[-2] > 1


def _touches_an_image(op) -> bool:
  """One of the convolution's tensors has at most 3 channels: it outputs an image (or takes
  the gradient of one)."""
  return any(shape[-1] <= 3 for shape in op[1] if len(shape) == 4)


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_exported_tpu_train_step_runs_its_layers_in_bfloat16(name):
  f32 = _ops(name, "float32")
  bf16 = _ops(name, "bfloat16")
  assert not any("bf16" in op[2] for op in f32), name  # float32 programs hold no bfloat16
  layers32 = [op for op in f32 if _layer(op)]
  layers16 = [op for op in bf16 if _layer(op)]
  assert len(layers32) > 10 and len(layers16) == len(layers32), name
  in_bf16 = [op for op in layers16 if op[2] == ("bf16",) * 3]
  in_f32 = [op for op in layers16 if op[2] == ("f32",) * 3]
  assert len(in_bf16) + len(in_f32) == len(layers16), name  # no mixed-type convolution
  assert len(in_bf16) >= 0.85 * len(layers16), (name, len(in_bf16), len(layers16))
  # What stays float32: the layers that output an image (nn.precision) and, among the other
  # operations, the precision-sensitive ones (VQ distances, the block memory, coordinate
  # interpolation, loss filters, SSIM), none of them a layer of the model.
  assert all(_touches_an_image(op) for op in in_f32), [op for op in in_f32]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pdm", "ppdm", "daad_plus", "igd", "mnad"])
def test_bfloat16_train_step_keeps_float32_state_and_the_float32_loss(name):
  """One CPU train step from the same state in both precisions: every stored floating value is
  float32 after the bfloat16 step, the update is finite, and the loss agrees to bfloat16's
  precision (measured: at most 0.18% apart, IGD)."""
  losses, states = {}, {}
  for dtype in ("float32", "bfloat16"):
    config = _config(name)
    config.compute_dtype = dtype
    detector = get_detector(config)
    spec = data_lib.element_spec(config.data)
    state = state_lib.initial(config, detector, spec, 10)
    rng = np.random.default_rng(0)
    batch = {
      k: rng.uniform(-1, 1, (config.batch_size, *s.shape)).astype(s.dtype)
      if np.issubdtype(s.dtype, np.floating)
      else np.zeros((config.batch_size, *s.shape), s.dtype)
      for k, s in spec.items()
    }
    schedule = learning_rate_schedule(config.optimizer, 10)
    step = jax.jit(functools.partial(train_step, detector=detector, lr_schedule=schedule))
    new_state, metrics = step(state, batch)
    assert bool(metrics["finite"]), (name, dtype)
    losses[dtype], states[dtype] = float(metrics["loss"]), new_state
  stored = (states["bfloat16"].params, states["bfloat16"].opt_state, states["bfloat16"].batch_stats)
  kinds = {a.dtype for a in jax.tree.leaves(stored) if jnp.issubdtype(a.dtype, jnp.floating)}
  assert kinds == {jnp.dtype(jnp.float32)}
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-2)
  # The precision did change the gradients (Adam's first step moves each parameter by about
  # the learning rate whatever the gradient, so compare its first moments).
  moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), states["bfloat16"].opt_state,
                       states["float32"].opt_state)  # fmt: skip
  assert max(float(v) for v in jax.tree.leaves(moved)) > 0
