"""PyTorch -> Flax weight conversion: torchvision ResNets and modules named like their torch twin.

Nothing here downloads anything. To use ImageNet weights, fetch torchvision's file yourself on a
machine with internet access, e.g.

  * the raw file: https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth (also
    resnet18-f37072fd.pth, resnet34-b627a593.pth, resnet50-0676ba61.pth (V1) under the same
    folder), or
  * with torchvision installed::

      import torch, torchvision
      m = torchvision.models.wide_resnet50_2(weights="IMAGENET1K_V1")
      torch.save(m.state_dict(), "wide_resnet50_2.pth")
      # or, without a torch dependency at load time:
      # safetensors.torch.save_file(m.state_dict(), "wide_resnet50_2.safetensors")

then convert once and point configs at the result::

  dmad convert-weights wide_resnet50_2.pth wrn50_2.npz [--arch=wide_resnet50_2]

or in Python ``module, variables = load_backbone("wrn50_2.npz", stages=("layer1", "layer2",
"layer3"))``. ``load_backbone`` also reads the torch file directly (.pth/.pt needs torch,
.safetensors needs the safetensors package).

Layout: torch conv weights (O, I, kh, kw) become Flax kernels (kh, kw, I, O); transposed-conv
weights (I, O, kh, kw) become (kh, kw, O, I) (``ConvTranspose(transpose_kernel=True)``), the same
transpose; BatchNorm weight / bias / running_mean / running_var become params scale / bias and
batch_stats mean / var. ``num_batches_tracked`` and torchvision's ``fc`` are ignored.

The converted file (``save_variables``) is a plain ``.npz`` (no pickle): one float32 array per
leaf under "<collection>/<module path>/<leaf>" plus ``__arch__`` and ``__format__`` strings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dmad_jax.nn import resnet

FORMAT = "dmad_jax.variables/1"
# Flax leaf name -> torch parameter / buffer name.
_LEAF_TO_TORCH = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
# Flax axis order of a kernel, as axes of the torch weight (Conv2d / ConvTranspose2d / Linear).
_KERNEL_PERM = {4: (2, 3, 1, 0), 2: (1, 0)}
_ALWAYS_IGNORED_SUFFIX = "num_batches_tracked"
_MAX_LISTED = 12


# ----------------------------------------------------------------------------------------------
# Reading torch files.


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A torch tensor or array-like as a numpy array (floating types as float32)."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError):
    arr = None
  if arr is None or arr.dtype.kind not in "biuf":
    raise ValueError(f"state dict entry {key!r} is not a numeric array ({type(value).__name__})")
  if arr.dtype.kind == "f":
    arr = arr.astype(np.float32, copy=False)
  return arr


def as_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A torch state dict (tensors or arrays) as {key: numpy array}, without a DataParallel prefix.

  A checkpoint dict that wraps the weights under "state_dict" (or "model") is unwrapped first.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(
      f"expected a state dict (a mapping of names to tensors), got {type(state_dict)}"
    )
  for wrapper in ("state_dict", "model"):
    inner = state_dict.get(wrapper)
    if isinstance(inner, Mapping) and all(isinstance(k, str) for k in inner):
      state_dict = inner
      break
  out = {str(k): _to_numpy(v, str(k)) for k, v in state_dict.items()}
  if out and all(k.startswith("module.") for k in out):
    out = {k[len("module.") :]: v for k, v in out.items()}
  return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch state dict from ``.pth``/``.pt``/``.bin`` (needs torch) or ``.safetensors``.

  ``.pth`` files are read with ``torch.load(path, weights_only=True, map_location="cpu")``, so
  only plain state dicts (``torch.save(model.state_dict(), path)``) load, never pickled code.

  Raises:
    FileNotFoundError: no such file.
    ImportError: the reader this suffix needs (torch or safetensors) is not installed.
    ValueError: the file holds something other than a state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file at {path!r}")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(
        f"reading {path!r} needs the 'safetensors' package (pip install safetensors)"
      ) from e
    return as_numpy_state_dict(load_file(path))
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"reading {path!r} (a torch pickle) needs PyTorch (pip install torch); or save the "
      "state dict as .safetensors and install the 'safetensors' package instead"
    ) from e
  try:
    obj = torch.load(path, weights_only=True, map_location="cpu")
  except Exception as e:  # noqa: BLE001 - torch raises several types for non-weights pickles
    raise ValueError(
      f"{path!r} could not be read as a state dict with torch.load(weights_only=True): {e}. "
      "Save model.state_dict(), not the model object."
    ) from e
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  return as_numpy_state_dict(obj)


# ----------------------------------------------------------------------------------------------
# Generic conversion by name.


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  """Torch key of the Flax leaf ``collection/<module path>/<leaf>``."""
  name = _LEAF_TO_TORCH.get((collection, path[-1]))
  if name is None:
    raise ValueError(f"no torch equivalent for Flax variable {collection}/{'/'.join(path)}")
  return ".".join((*path[:-1], name))


def _torch_layout(template: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple, Any]]:
  """{torch key: (Flax path, torch shape, axis permutation torch -> Flax or None)}."""
  layout = {}
  for full_path, leaf in traverse_util.flatten_dict(dict(template)).items():
    collection, path = full_path[0], full_path[1:]
    shape = tuple(leaf.shape)
    perm = _KERNEL_PERM.get(len(shape)) if path[-1] == "kernel" else None
    torch_shape = tuple(shape[perm.index(i)] for i in range(len(shape))) if perm else shape
    layout[_torch_key(collection, path)] = (full_path, torch_shape, perm)
  return layout


def expected_torch_shapes(template: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The torch state dict entries (name -> shape) that ``torch_to_flax`` reads for ``template``."""
  return {k: shape for k, (_, shape, _) in _torch_layout(template).items()}


def torch_to_flax(
  state_dict: Mapping[str, Any],
  template: Mapping[str, Any],
  ignore: Iterable[str] = (),
  what: str = "model",
) -> dict[str, Any]:
  """Fills a Flax variable tree from a torch state dict whose keys follow the module names.

  The Flax leaf ``params/layer1/0/conv1/kernel`` is read from ``layer1.0.conv1.weight``
  (transposed to HWIO), ``params/.../scale`` from ``weight``, ``bias`` from ``bias``,
  ``batch_stats/.../mean`` and ``var`` from ``running_mean`` and ``running_var``.

  Args:
    state_dict: torch names -> tensors or arrays.
    template: the Flax variables (arrays or ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``)
      that fix the expected names and shapes.
    ignore: key prefixes of the state dict that are expected to be unused (e.g. "fc.").
      Keys ending in ``num_batches_tracked`` are always ignored.
    what: the model's name, for error messages.

  Returns:
    Variables with the template's structure (numpy float32 leaves).

  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch.
  """
  sd = as_numpy_state_dict(state_dict)
  ignore = tuple(ignore)
  out, missing, mismatched, used = {}, [], [], set()
  for key, (full_path, torch_shape, perm) in sorted(_torch_layout(template).items()):
    if key not in sd:
      missing.append(f"{key} {torch_shape}")
      continue
    used.add(key)
    value = sd[key]
    if tuple(value.shape) != torch_shape:
      mismatched.append(f"{key}: file has {tuple(value.shape)}, {what} expects {torch_shape}")
      continue
    value = np.transpose(value, perm) if perm else value
    out[full_path] = np.ascontiguousarray(value, dtype=np.float32)
  unexpected = sorted(
    k
    for k in sd
    if k not in used and not k.endswith(_ALWAYS_IGNORED_SUFFIX) and not k.startswith(ignore)
  )
  if missing or unexpected or mismatched:
    parts = []
    for label, items in (
      ("missing keys", missing),
      ("unexpected keys", unexpected),
      ("shape mismatches", mismatched),
    ):
      if items:
        shown = "; ".join(items[:_MAX_LISTED])
        more = f"; ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
        parts.append(f"{len(items)} {label}: {shown}{more}")
    raise ValueError(f"state dict does not match {what}: " + " | ".join(parts))
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------------------------
# torchvision ResNets.


def _num_blocks(sd: Mapping[str, Any], stage: str) -> int:
  idx = {
    int(k.split(".")[1]) for k in sd if k.startswith(stage + ".") and k.split(".")[1].isdigit()
  }
  return max(idx) + 1 if idx else 0


def infer_arch(state_dict: Mapping[str, Any]) -> str:
  """The torchvision arch (one of ``resnet.ARCHS``) whose state dict this is.

  Raises:
    ValueError: the keys or shapes match none of the supported architectures.
  """
  sd = state_dict
  if "layer1.0.conv1.weight" not in sd:
    raise ValueError(
      "cannot infer the ResNet arch: no 'layer1.0.conv1.weight' key (is this a torchvision "
      f"ResNet state dict? first keys: {list(sd)[:5]}); pass the arch explicitly"
    )
  blocks = tuple(_num_blocks(sd, s) for s in resnet.STAGES)
  if "layer1.0.conv3.weight" in sd:
    width = int(tuple(sd["layer1.0.conv1.weight"].shape)[0])
    candidates = [a for a, (k, n, w) in resnet.ARCHS.items() if k == "bottleneck" and w == width]
  else:
    candidates = [a for a, (k, _, _) in resnet.ARCHS.items() if k == "basic"]
  for arch in candidates:
    if resnet.ARCHS[arch][1] == blocks:
      return arch
  raise ValueError(
    f"cannot infer the ResNet arch: blocks per stage {blocks} match none of "
    f"{', '.join(resnet.ARCHS)}; pass the arch explicitly"
  )


def resnet_template(arch: str, stages: Sequence[str] = resnet.STAGES) -> tuple[nn.Module, Any]:
  """The module and its variable shapes (``jax.ShapeDtypeStruct``), without allocating weights."""
  module = resnet.get_backbone(arch, stages)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return module, jax.eval_shape(module.init, jax.random.key(0), x)


def torchvision_resnet(
  state_dict: Mapping[str, Any],
  arch: str | None = None,
  stages: Sequence[str] = resnet.STAGES,
) -> tuple[resnet.ResNet, dict[str, Any]]:
  """Converts a torchvision ResNet state dict to ``(module, variables)``.

  ``module.apply(variables, x)`` with ImageNet-normalised NHWC float32 ``x`` returns the same stage
  features as torchvision's eval-mode model (transposed to NHWC).

  Args:
    state_dict: ``model.state_dict()`` of ``torchvision.models.<arch>`` (tensors or arrays).
    arch: resnet18, resnet34, resnet50 or wide_resnet50_2; None infers it from the keys.
    stages: stage outputs the module returns; weights of later stages are dropped.

  Raises:
    ValueError: unknown arch, or keys / shapes that do not match it (all listed).
  """
  sd = as_numpy_state_dict(state_dict)
  arch = arch or infer_arch(sd)
  resnet.check_arch(arch)
  module, template = resnet_template(arch, stages)
  last = max(resnet.STAGES.index(s) for s in stages)
  ignore = ("fc.", *(f"{s}." for s in resnet.STAGES[last + 1 :]))
  variables = torch_to_flax(sd, template, ignore=ignore, what=f"torchvision {arch}")
  return module, jax.tree.map(jnp.asarray, variables)


# ----------------------------------------------------------------------------------------------
# Portable saved variables.


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], arch: str) -> str:
  """Writes ``variables`` (any Flax variable tree) and ``arch`` to an uncompressed ``.npz``.

  Returns:
    The path written (".npz" is appended by numpy if missing).
  """
  path = os.fspath(path)
  if not path.endswith(".npz"):
    path += ".npz"
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  arrays = {k: np.asarray(v, dtype=np.float32) for k, v in flat.items()}
  if any(k.startswith("__") for k in arrays):
    raise ValueError("variable names may not start with '__' (reserved for metadata)")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, __format__=np.array(FORMAT), __arch__=np.array(arch), **arrays)
  return path


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
  """Reads a ``save_variables`` file.

  Returns:
    ``(variables, arch)`` with jnp array leaves.

  Raises:
    ValueError: the file is not a dmad_jax variables file.
  """
  path = os.fspath(path)
  with np.load(path, allow_pickle=False) as f:
    if "__format__" not in f.files or str(f["__format__"]) != FORMAT:
      raise ValueError(
        f"{path!r} is not a dmad_jax variables file ({FORMAT}); convert torch weights with "
        "`dmad convert-weights IN OUT`"
      )
    arch = str(f["__arch__"])
    flat = {k: jnp.asarray(f[k]) for k in f.files if not k.startswith("__")}
  return traverse_util.unflatten_dict(flat, sep="/"), arch


def load_backbone(
  path: str | os.PathLike,
  arch: str | None = None,
  stages: Sequence[str] = ("layer1", "layer2", "layer3"),
) -> tuple[resnet.ResNet, dict[str, Any]]:
  """A pretrained ResNet trunk from a converted ``.npz`` or directly from a torch file.

  Args:
    path: a ``save_variables`` ``.npz`` (from ``dmad convert-weights``), or a torchvision
      ``.pth``/``.safetensors`` state dict.
    arch: expected arch; None accepts the file's (``.npz``) or infers it (torch files).
    stages: the stage outputs the returned module computes; unused weights are dropped.

  Returns:
    ``(module, variables)``; call ``module.apply(variables, x)`` (eval-mode BatchNorm).

  Raises:
    ValueError: the file's arch differs from ``arch``, or its weights do not match.
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    variables, file_arch = load_variables(path)
    if arch is not None and arch != file_arch:
      raise ValueError(f"{path!r} holds {file_arch} weights, but arch={arch!r} was requested")
    module, template = resnet_template(file_arch, stages)
    last = max(resnet.STAGES.index(s) for s in stages)
    dropped = set(resnet.STAGES[last + 1 :])
    variables = {
      c: {k: v for k, v in tree.items() if k not in dropped} for c, tree in variables.items()
    }
    shapes = jax.tree.map(lambda a: tuple(a.shape), template)
    got = jax.tree.map(lambda a: tuple(a.shape), variables)
    if shapes != got:
      raise ValueError(f"{path!r}: variables do not match the {file_arch} trunk ({stages})")
    return module, variables
  return torchvision_resnet(load_state_dict(path), arch, stages)


def convert_file(
  src: str | os.PathLike, dst: str | os.PathLike, arch: str | None = None
) -> dict[str, Any]:
  """``dmad convert-weights``: torch ResNet state dict file -> ``.npz`` of all four stages.

  Returns:
    A summary {"arch", "out", "num_params", "stages"}.
  """
  sd = load_state_dict(src)
  arch = arch or infer_arch(sd)
  _, variables = torchvision_resnet(sd, arch)
  out = save_variables(dst, variables, arch)
  num = int(sum(np.prod(v.shape) for v in jax.tree.leaves(variables["params"])))
  return {"arch": arch, "out": out, "num_params": num, "stages": list(resnet.STAGES)}
