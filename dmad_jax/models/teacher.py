"""The frozen ImageNet teacher of reverse distillation (RD4AD) and DMAD-PPDM.

A torchvision ResNet / WideResNet trunk (stages layer1-3, BatchNorm on running statistics) whose
weights come from a converted torchvision file (``dmad convert-weights``, see
``dmad_jax/convert.py``), or, for tests only, from torchvision's initial distribution. The
weights are constants of the model: a detector keeps them outside ``params`` (in
``batch_stats``), so no gradient, optimizer state or weight decay touches them, and checkpoints
carry them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmad_jax.nn import resnet

log = logging.getLogger("dmad_jax")

# The teacher stages RD / PPDM distil (layer4 is never computed).
STAGES = ("layer1", "layer2", "layer3")
WEIGHTS_HELP = (
  "ImageNet weights: download and convert as in dmad_jax/convert.py's docstring, e.g. "
  "`dmad convert-weights wide_resnet50_2-95faca4d.pth wrn50_2.npz`, then set "
  "model.backbone_weights=wrn50_2.npz"
)


def make_teacher(arch: str, dtype: Any = jnp.float32, stages=STAGES) -> resnet.ResNet:
  """The frozen teacher trunk (by default stages layer1-3), as a detached module.

  ``parent=None`` keeps it out of any enclosing module's variables even when it is built inside
  one: it is only ever used through ``teacher.apply(teacher_variables, x, train=False)``.
  """
  resnet.check_arch(arch)
  return resnet.ResNet(arch=arch, stages=tuple(stages), dtype=dtype, parent=None)


def teacher_features(
  arch: str, variables: dict, x: jax.Array, dtype: Any = jnp.float32
) -> dict[str, jax.Array]:
  """Frozen-teacher features of ImageNet-normalised ``x``: {"layer1", "layer2", "layer3"}.

  BatchNorm uses the running statistics (``train=False``). The variables are stop-gradient'ed
  (they are constants of the model); gradients still flow to ``x``.
  """
  return make_teacher(arch, dtype).apply(jax.lax.stop_gradient(variables), x, train=False)


def teacher_shapes(arch: str, stages=STAGES) -> dict:
  """``jax.ShapeDtypeStruct`` tree of the teacher's {"params", "batch_stats"} (nothing runs)."""
  dummy = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)  # shapes do not depend on it
  shapes = jax.eval_shape(make_teacher(arch, stages=stages).init, jax.random.PRNGKey(0), dummy)
  return {c: shapes[c] for c in ("params", "batch_stats")}


def random_teacher_variables(arch: str, rng: jax.Array, stages=STAGES) -> dict:
  """Teacher variables drawn from torchvision's initial distribution (tests only).

  Convolutions N(0, 2 / fan_out) (kaiming normal, fan_out mode, ReLU gain), BatchNorm scale 1,
  bias 0, running mean 0 and variance 1. All kernels come from ONE normal draw (sliced per
  kernel): the same distribution as ``make_teacher(arch).init``, with a single random-number
  kernel to compile instead of one per convolution.

  Args:
    arch: teacher arch.
    rng: PRNG key (raw uint32 data or a typed key).
    stages: the stages the teacher computes (default layer1-3).
  """
  shapes = teacher_shapes(arch, stages)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  sizes = [int(np.prod(s.shape)) for path, s in flat if path[-1].key == "kernel"]
  noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  leaves, offset = [], 0
  for path, s in flat:
    name = path[-1].key
    if name == "kernel":
      n = int(np.prod(s.shape))
      fan_out = int(np.prod(s.shape[:-2])) * s.shape[-1]
      leaves.append(noise[offset : offset + n].reshape(s.shape) * np.sqrt(2.0 / fan_out))
      offset += n
    elif name in ("scale", "var"):
      leaves.append(jnp.ones(s.shape, s.dtype))
    else:  # BatchNorm bias and running mean
      leaves.append(jnp.zeros(s.shape, s.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def read_teacher(path: str, arch: str, shapes, stages=STAGES) -> dict:
  """Host side of the teacher loading: the converted weights as float32 numpy arrays."""
  stages = tuple(stages)
  from dmad_jax import convert

  if not os.path.isfile(path):
    raise FileNotFoundError(f"model.backbone_weights: no file at {path!r}. {WEIGHTS_HELP}")
  _, variables = convert.load_backbone(path, arch, stages)
  variables = {c: variables[c] for c in ("params", "batch_stats")}
  want = jax.tree.map(lambda s: tuple(s.shape), shapes)
  got = jax.tree.map(lambda a: tuple(a.shape), variables)
  if want != got:
    raise ValueError(f"model.backbone_weights {path!r} does not hold {arch} stages {stages}")
  return jax.tree.map(lambda a: np.asarray(a, np.float32), variables)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """Where a detector's frozen teacher comes from.

  Attributes:
    arch: resnet18, resnet34, resnet50 or wide_resnet50_2.
    weights: the converted weights file (``model.backbone_weights``).
    random: torchvision's random initialisation instead (``model.random_teacher``; tests only).
    owner: the detector's name, for messages.
    stages: the stages it computes (RD / PPDM: layer1-3; IGD's global encoder: layer1-4).
  """

  arch: str
  weights: str = ""
  random: bool = False
  owner: str = "ppdm"
  stages: tuple[str, ...] = STAGES

  def __post_init__(self):
    resnet.check_arch(self.arch)
    if self.random and self.weights:
      raise ValueError(
        "config.model.random_teacher=True and config.model.backbone_weights="
        f"{self.weights!r} contradict each other: set one of them"
      )
    if self.random:
      log.warning(
        "%s: the frozen %s teacher has RANDOM weights (model.random_teacher=True); scores are "
        "meaningless. %s",
        self.owner,
        self.arch,
        WEIGHTS_HELP,
      )
    elif not self.weights:
      raise ValueError(
        f"{self.owner} needs a pretrained teacher: set config.model.backbone_weights. "
        f"{WEIGHTS_HELP}. (model.random_teacher=True allows random weights, for tests only.)"
      )
    elif not os.path.isfile(self.weights):
      # Evaluation restores the teacher from the checkpoint, so only training needs the file.
      log.warning("model.backbone_weights %r does not exist: training cannot start", self.weights)

  def variables(self, rng) -> dict:
    """The teacher's {"params", "batch_stats"}: read from the weights file (on the host,
    through a callback, so that a jitted init neither embeds them as constants nor reads the
    file when only shapes are traced), or a draw from torchvision's initial distribution."""
    if self.random:
      return random_teacher_variables(self.arch, rng, self.stages)
    shapes = teacher_shapes(self.arch, self.stages)
    read = functools.partial(read_teacher, self.weights, self.arch, shapes, self.stages)
    return jax.pure_callback(read, shapes)
