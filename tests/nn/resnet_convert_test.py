"""Parity of dmad_jax.nn.resnet / nn.rd with torchvision and torch references, and the converter.

torchvision's models are the reference for the teacher; RD's OCBE and decoder have no
torchvision counterpart, so small torch modules written from the spec (seed_systems.md Sec. 2)
stand in for them. BatchNorm running statistics are randomised so that eval-mode BN matters.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from dmad_jax import convert, main
from dmad_jax.nn import rd, resnet

_TORCHVISION_OPS = []  # keeps the op schemas below alive (a torch Library unregisters on del)


def _import_torchvision():
  """Imports torchvision, also next to the CPU-only torch wheel.

  PyPI's torchvision wheels link their C++ ops against the CUDA torch build. Next to the CPU
  wheel (torch==2.13.0+cpu) that library cannot load, and torchvision 0.28's import then fails
  registering fake kernels for ``torchvision::nms`` / ``qnms`` ("operator torchvision::nms does
  not exist"). Only the Python model code is used here, so on exactly that failure the two op
  schemas are declared and the import is retried.
  """
  try:
    import torchvision
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS.append(lib)
    import torchvision
  return torchvision


torchvision = _import_torchvision()
ATOL = 1e-4


def _randomize_bn(model: tnn.Module, seed: int) -> tnn.Module:
  """Random BN affine parameters and running statistics (eval mode), in place."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      n = m.num_features
      m.weight.data = torch.rand(n, generator=g) * 0.5 + 0.5
      m.bias.data = torch.randn(n, generator=g) * 0.1
      m.running_mean.data = torch.randn(n, generator=g) * 0.1
      m.running_var.data = torch.rand(n, generator=g) + 0.5
  return model.eval()


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def _torchvision_stages(model, x: torch.Tensor) -> dict[str, np.ndarray]:
  with torch.no_grad():
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for s in resnet.STAGES:
      h = getattr(model, s)(h)
      out[s] = _nhwc(h)
  return out


@pytest.fixture(scope="module")
def resnet18_torch():
  torch.manual_seed(0)
  return _randomize_bn(torchvision.models.resnet18(), seed=1)


def _input(seed=2, size=64):
  x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
  return x, jnp.asarray(_nhwc(x))


# wide_resnet50_2 and resnet34 (ARD's one-class teacher) stop at layer3 (what RD / PPDM / ARD
# use) to keep the test short; layer4 has the same code path as resnet18's, and the names and
# shapes are checked below.
@pytest.mark.parametrize(
  "arch,stages",
  [
    ("resnet18", resnet.STAGES),
    ("resnet34", ("layer1", "layer2", "layer3")),
    ("wide_resnet50_2", ("layer1", "layer2", "layer3")),
  ],
)
def test_converted_torchvision_resnet_matches_torchvision(arch, stages, resnet18_torch):
  if arch == "resnet18":
    model = resnet18_torch
  else:
    torch.manual_seed(0)
    model = _randomize_bn(getattr(torchvision.models, arch)(), seed=1)
  x, xj = _input()
  want = _torchvision_stages(model, x)
  module, variables = convert.torchvision_resnet(model.state_dict(), arch, stages=stages)
  apply = jax.jit(module.apply)
  got = apply(variables, xj)
  assert tuple(got) == stages
  for s in stages:
    assert got[s].shape == want[s].shape, s
    np.testing.assert_allclose(np.asarray(got[s]), want[s], atol=ATOL, err_msg=s)
  # The randomised running statistics matter at this tolerance: default ones miss by far more.
  default_stats = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  default_stats = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 1.0 if p[-1].key == "var" else v, default_stats
  )
  off = apply({"params": variables["params"], "batch_stats": default_stats}, xj)
  assert min(float(np.abs(np.asarray(off[s]) - want[s]).max()) for s in stages) > 100 * ATOL


def test_stages_stop_early_and_drop_later_weights(resnet18_torch):
  x, xj = _input()
  want = _torchvision_stages(resnet18_torch, x)
  stages = ("layer1", "layer2", "layer3")
  module, variables = convert.torchvision_resnet(resnet18_torch.state_dict(), stages=stages)
  assert "layer4" not in variables["params"] and "layer4" not in variables["batch_stats"]
  got = jax.jit(module.apply)(variables, xj)
  assert tuple(got) == stages
  for s in stages:
    np.testing.assert_allclose(np.asarray(got[s]), want[s], atol=ATOL, err_msg=s)


@pytest.mark.parametrize("arch", list(resnet.ARCHS))
def test_every_arch_has_torchvisions_parameter_names_and_shapes(arch):
  with torch.device("meta"):
    model = getattr(torchvision.models, arch)()
  want = {
    k: tuple(v.shape)
    for k, v in model.state_dict().items()
    if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
  }
  _, template = convert.resnet_template(arch)
  assert convert.expected_torch_shapes(template) == want
  assert convert.infer_arch(model.state_dict()) == arch


# ----------------------------------------------------------------------------------------------
# RD student: torch references written from the spec (RD4AD's de_resnet / BN_layer layout).


class _TorchDeBlock(tnn.Module):
  """A decoder block; ``upsample`` replaces the stride-2 conv by a 2x2 s2 transposed conv."""

  def __init__(self, kind, inplanes, planes, upsample, width_per_group=64):
    super().__init__()
    self.kind, e = kind, 4 if kind == "bottleneck" else 1
    if kind == "basic":
      if upsample:
        self.conv1 = tnn.ConvTranspose2d(inplanes, planes, 2, stride=2, bias=False)
      else:
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, padding=1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
    else:
      width = planes * width_per_group // 64
      self.conv1 = tnn.Conv2d(inplanes, width, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(width)
      if upsample:
        self.conv2 = tnn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
      else:
        self.conv2 = tnn.Conv2d(width, width, 3, padding=1, bias=False)
      self.bn2 = tnn.BatchNorm2d(width)
      self.conv3 = tnn.Conv2d(width, planes * e, 1, bias=False)
      self.bn3 = tnn.BatchNorm2d(planes * e)
    self.upsample = None
    if upsample:
      self.upsample = tnn.Sequential(
        tnn.ConvTranspose2d(inplanes, planes * e, 2, stride=2, bias=False),
        tnn.BatchNorm2d(planes * e),
      )

  def forward(self, x):
    relu = torch.relu
    h = relu(self.bn1(self.conv1(x)))
    if self.kind == "basic":
      h = self.bn2(self.conv2(h))
    else:
      h = self.bn3(self.conv3(relu(self.bn2(self.conv2(h)))))
    return relu(h + (self.upsample(x) if self.upsample is not None else x))


def _torch_de_stage(kind, inplanes, planes, blocks, width_per_group=64):
  e = 4 if kind == "bottleneck" else 1
  return tnn.Sequential(
    _TorchDeBlock(kind, inplanes, planes, True, width_per_group),
    *(_TorchDeBlock(kind, planes * e, planes, False, width_per_group) for _ in range(blocks - 1)),
  )


class _TorchDecoder(tnn.Module):
  def __init__(self, arch):
    super().__init__()
    kind, layers, wpg = resnet.ARCHS[arch]
    e, inplanes = resnet.EXPANSION[kind], 512 * resnet.EXPANSION[kind]
    for name, planes, idx in rd.DECODER_STAGES:
      setattr(self, name, _torch_de_stage(kind, inplanes, planes, layers[idx], wpg))
      inplanes = planes * e

  def forward(self, x):
    a = self.layer1(x)
    b = self.layer2(a)
    return {"layer3": a, "layer2": b, "layer1": self.layer3(b)}


class _TorchOCBE(tnn.Module):
  def __init__(self, arch):
    super().__init__()
    kind, _, wpg = resnet.ARCHS[arch]
    e = resnet.EXPANSION[kind]
    block = {"basic": torchvision.models.resnet.BasicBlock}.get(
      kind, torchvision.models.resnet.Bottleneck
    )
    self.conv1 = tnn.Conv2d(64 * e, 128 * e, 3, 2, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(128 * e)
    self.conv2 = tnn.Conv2d(128 * e, 256 * e, 3, 2, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(256 * e)
    self.conv3 = tnn.Conv2d(128 * e, 256 * e, 3, 2, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(256 * e)
    ds = tnn.Sequential(tnn.Conv2d(768 * e, 512 * e, 1, 2, bias=False), tnn.BatchNorm2d(512 * e))
    n = rd.OCBE_BLOCKS[arch]
    self.bn_layer = tnn.Sequential(
      block(768 * e, 512, stride=2, downsample=ds, base_width=wpg),
      *(block(512 * e, 512, base_width=wpg) for _ in range(n - 1)),
    )
    # RD defines these and never uses them.
    self.conv4 = tnn.Conv2d(1024 * e, 512 * e, 1, bias=False)
    self.bn4 = tnn.BatchNorm2d(512 * e)

  def forward(self, f1, f2, f3):
    l1 = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(f1))))))
    l2 = torch.relu(self.bn3(self.conv3(f2)))
    return self.bn_layer(torch.cat([l1, l2, f3], 1))


def _teacher_feats(arch, size, seed):
  g = torch.Generator().manual_seed(seed)
  ch = resnet.stage_channels(arch)
  return [
    torch.randn(1, ch[s], size // 2**i, size // 2**i, generator=g)
    for i, s in enumerate(("layer1", "layer2", "layer3"))
  ]


def test_ocbe_and_decoder_match_torch_reference():
  arch = "resnet18"
  torch.manual_seed(3)
  t_bn, t_dec = _randomize_bn(_TorchOCBE(arch), 4), _randomize_bn(_TorchDecoder(arch), 5)
  feats = _teacher_feats(arch, 16, seed=6)
  with torch.no_grad():
    emb = t_bn(*feats)
    want = {k: _nhwc(v) for k, v in t_dec(emb).items()}
  fj = {
    s: jnp.asarray(_nhwc(f)) for s, f in zip(("layer1", "layer2", "layer3"), feats, strict=True)
  }
  ocbe, dec = rd.OCBE(arch), rd.ResNetDecoder(arch)
  tmpl_bn = jax.eval_shape(ocbe.init, jax.random.key(0), fj)
  v_bn = convert.torch_to_flax(t_bn.state_dict(), tmpl_bn, ignore=("conv4.", "bn4."))
  emb_j = jax.jit(ocbe.apply)(v_bn, fj)
  np.testing.assert_allclose(np.asarray(emb_j), _nhwc(emb), atol=ATOL)
  v_dec = convert.torch_to_flax(
    t_dec.state_dict(), jax.eval_shape(dec.init, jax.random.key(0), emb_j)
  )
  got = jax.jit(dec.apply)(v_dec, emb_j)
  assert set(got) == set(want)
  for k in want:
    assert got[k].shape == want[k].shape, k
    np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=ATOL, err_msg=k)


def test_wide_bottleneck_decoder_stage_matches_torch_reference():
  torch.manual_seed(7)
  ref = _randomize_bn(_torch_de_stage("bottleneck", 32, 8, 2, width_per_group=128), 8)
  x = torch.randn(2, 32, 3, 3, generator=torch.Generator().manual_seed(9))
  with torch.no_grad():
    want = _nhwc(ref(x))
  stage = rd.DeResStage("bottleneck", 8, 2, width_per_group=128)
  xj = jnp.asarray(_nhwc(x))
  variables = convert.torch_to_flax(
    ref.state_dict(), jax.eval_shape(stage.init, jax.random.key(0), xj)
  )
  got = stage.apply(variables, xj)
  assert got.shape == (2, 6, 6, 32)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)


@pytest.mark.parametrize("arch", list(resnet.ARCHS))
def test_rd_student_has_the_reference_parameter_names_and_shapes(arch):
  with torch.device("meta"):
    t_bn, t_dec = _TorchOCBE(arch), _TorchDecoder(arch)
  ch = resnet.stage_channels(arch)
  feats = {
    s: jnp.zeros((1, 64 // 2**i, 64 // 2**i, ch[s])) for i, s in enumerate(resnet.STAGES[:3])
  }
  tmpl_bn = jax.eval_shape(rd.OCBE(arch).init, jax.random.key(0), feats)
  emb = jax.eval_shape(rd.OCBE(arch).apply, tmpl_bn, feats)
  assert emb.shape == (1, 8, 8, 512 * resnet.EXPANSION[resnet.ARCHS[arch][0]])
  tmpl_dec = jax.eval_shape(rd.ResNetDecoder(arch).init, jax.random.key(0), emb)
  out = jax.eval_shape(rd.ResNetDecoder(arch).apply, tmpl_dec, emb)
  assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in feats.items()}

  def want(m, skip=()):
    return {
      k: tuple(v.shape)
      for k, v in m.state_dict().items()
      if not k.endswith("num_batches_tracked") and not k.startswith(skip)
    }

  assert convert.expected_torch_shapes(tmpl_bn) == want(t_bn, skip=("conv4.", "bn4."))
  assert convert.expected_torch_shapes(tmpl_dec) == want(t_dec)


# ----------------------------------------------------------------------------------------------
# Errors, saving and the CLI.


def test_mismatched_state_dict_names_every_problem(resnet18_torch):
  sd = dict(resnet18_torch.state_dict())
  del sd["layer2.0.bn1.running_var"]
  sd["layer5.0.conv1.weight"] = torch.zeros(3)
  sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
  with pytest.raises(ValueError) as e:
    convert.torchvision_resnet(sd, "resnet18")
  msg = str(e.value)
  assert "1 missing keys: layer2.0.bn1.running_var (128,)" in msg
  assert "1 unexpected keys: layer5.0.conv1.weight" in msg
  assert "layer1.0.conv1.weight: file has (64, 64, 1, 1), torchvision resnet18 expects" in msg
  with pytest.raises(ValueError, match=r"80 missing keys: layer1\.2\.bn1\.bias \(64,\)"):
    convert.torchvision_resnet(resnet18_torch.state_dict(), "resnet34")
  with pytest.raises(ValueError, match="cannot infer the ResNet arch"):
    convert.infer_arch({"conv.weight": np.zeros((1,))})
  with pytest.raises(ValueError, match="unknown ResNet arch 'resnet101'"):
    convert.torchvision_resnet(resnet18_torch.state_dict(), "resnet101")


def test_save_load_and_load_backbone(tmp_path, resnet18_torch):
  sd = resnet18_torch.state_dict()
  _, variables = convert.torchvision_resnet(sd)
  path = convert.save_variables(tmp_path / "r18", variables, "resnet18")
  assert path.endswith("r18.npz")
  loaded, arch = convert.load_variables(path)
  assert arch == "resnet18"
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  torch.save(sd, tmp_path / "r18.pth")
  for src in (path, tmp_path / "r18.pth"):
    module, v = convert.load_backbone(src, stages=("layer1", "layer2"))
    assert module.arch == "resnet18" and set(v["params"]) == {"conv1", "bn1", "layer1", "layer2"}
    jax.tree.map(
      np.testing.assert_array_equal, v["params"]["layer2"], variables["params"]["layer2"]
    )
  with pytest.raises(ValueError, match="holds resnet18 weights, but arch='resnet50'"):
    convert.load_backbone(path, arch="resnet50")
  np.savez(tmp_path / "other.npz", a=np.zeros(2))
  with pytest.raises(ValueError, match="not a dmad_jax variables file"):
    convert.load_variables(tmp_path / "other.npz")
  torch.save({"weights": "not an array"}, tmp_path / "bad.pth")
  with pytest.raises(ValueError, match="'weights' is not a numeric array"):
    convert.load_state_dict(tmp_path / "bad.pth")


@pytest.mark.slow
def test_convert_weights_cli_round_trip(tmp_path, dmad_cli, resnet18_torch):
  sd = resnet18_torch.state_dict()
  torch.save(sd, tmp_path / "r18.pth")
  out = tmp_path / "r18.npz"
  r = dmad_cli("convert-weights", str(tmp_path / "r18.pth"), str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads(r.stdout)
  assert summary["arch"] == "resnet18" and summary["num_params"] == 11_176_512
  loaded, arch = convert.load_variables(out)
  _, want = convert.torchvision_resnet(sd, "resnet18")
  assert arch == "resnet18"
  jax.tree.map(np.testing.assert_array_equal, loaded, want)
  # Conversion errors end the command with the converter's message (no traceback).
  with pytest.raises(SystemExit) as e:
    main.convert_weights(str(tmp_path / "r18.pth"), str(out), "resnet50")
  msg = str(e.value.code)
  assert msg.startswith("convert-weights: state dict does not match torchvision resnet50")
  assert "165 missing keys: layer1.0.bn3.bias (256,)" in msg
  with pytest.raises(SystemExit, match="no weights file at"):
    main.convert_weights(str(tmp_path / "missing.pth"), str(out))


def test_imagenet_normalize_maps_minus_one_one_to_torchvision_normalisation():
  x = jnp.stack([-jnp.ones((2, 2, 3)), jnp.zeros((2, 2, 3)), jnp.ones((2, 2, 3))])
  got = np.asarray(resnet.imagenet_normalize(x))
  mean, std = np.array(resnet.IMAGENET_MEAN), np.array(resnet.IMAGENET_STD)
  for i, v01 in enumerate((0.0, 0.5, 1.0)):
    np.testing.assert_allclose(got[i], np.broadcast_to((v01 - mean) / std, (2, 2, 3)), rtol=1e-6)
