"""grid_sample and ops.conv with the batch sharded over 8 CPU devices: no batch all-gather.

XLA's partitioner gathers the whole batch onto every device in front of an op it cannot see
into (a custom call, or a gather whose indices span the flattened batch). grid_sample avoids
that in both formulations: its C++ kernels are declared batch-parallel and the XLA formulation
gathers and scatters per image; its gradients then equal the single-device ones (bit for bit
with the kernels). The convolution weight-gradient kernel is declared a sum over the batch: each
device sums its own rows and one all-reduce adds the partial sums.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
  """
  import json
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from dmad_jax.ops import cpu_kernels, sampling

  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 12, 10, 5)).astype(np.float32)
  grid = rng.uniform(-1.3, 1.3, (16, 9, 7, 2)).astype(np.float32)
  out = {"kernels": cpu_kernels.available()}
  for padding in ("zeros", "reflection"):
    f = lambda a, b: jnp.sum(sampling.grid_sample(a, b, padding_mode=padding) ** 2)
    fn = jax.jit(jax.value_and_grad(f, (0, 1)))
    xs, gs = jax.device_put(x, batch), jax.device_put(grid, batch)
    hlo = fn.lower(xs, gs).compile().as_text()
    sharded, single = fn(xs, gs), fn(x, grid)
    # Gradients are per image; the loss sums over devices in another order.
    diff = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
      for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1]))
    )
    loss_rel = abs(float(sharded[0]) - float(single[0])) / abs(float(single[0]))
    out[padding] = {
      "all_gathers": hlo.count("all-gather("),
      "kernel_calls": hlo.count("dmad_grid_sample"),
      "grad_max_rel_diff": diff,
      "loss_rel": loss_rel,
      "grad_sharding": str(sharded[1][0].sharding.spec),
    }
  from dmad_jax.ops import conv
  w = rng.standard_normal((3, 3, 5, 6)).astype(np.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  def f(a, b):
    return jnp.sum(jnp.sin(conv.conv_general_dilated(a, b, (2, 2), "SAME", dimension_numbers=dn)))
  fn = jax.jit(jax.grad(f, (0, 1)))
  xs = jax.device_put(x, batch)
  hlo = fn.lower(xs, w).compile().as_text()
  sharded, single = fn(xs, w), fn(x, w)
  out["conv"] = {
    "all_gathers": hlo.count("all-gather("),
    "kernel_calls": hlo.count("dmad_conv_weight_grad"),
    "dx_max_abs_diff": float(np.max(np.abs(np.asarray(sharded[0]) - np.asarray(single[0])))),
    "dw_max_rel_diff": float(
      np.max(np.abs(np.asarray(sharded[1]) - np.asarray(single[1]))) / np.max(np.abs(single[1]))
    ),
  }
  print("RESULT" + json.dumps(out))
  """
)


@pytest.mark.multidevice
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_sharded_kernels_stay_local_and_match_one_device(kernels):
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    DMAD_JAX_CPU_KERNELS=kernels,
  )
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert res["kernels"] is (kernels == "1")
  for padding in ("zeros", "reflection"):
    r = res[padding]
    assert r["all_gathers"] == 0, r
    assert (r["kernel_calls"] > 0) is (kernels == "1"), r
    assert r["loss_rel"] < 1e-6, r
    # The kernels compute each image the same way on any device count: bit-identical. XLA
    # compiles a 2-image and a 16-image program, which may order their sums differently.
    assert r["grad_max_rel_diff"] <= (0.0 if kernels == "1" else 1e-5), r
    assert "data" in r["grad_sharding"], r
  c = res["conv"]
  assert c["all_gathers"] == 0, c
  assert (c["kernel_calls"] > 0) is (kernels == "1"), c
  assert c["dx_max_abs_diff"] < 1e-6 and c["dw_max_rel_diff"] < 1e-5, c
