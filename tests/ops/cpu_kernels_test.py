"""The C++ CPU kernels: built here, and grid_sample's used by default and equal to XLA's.

The torch parity tests in sampling_test.py run through these kernels too (float32 on CPU);
this file checks what is specific to grid_sample's kernels (the convolution weight-gradient
kernel has conv_test.py): that they really are compiled and called, that
their forward pass is bit-identical to the XLA formulation and their backward pass equal to
rounding (including under vmap, which adds leading batch dimensions), the fallback when they
are switched off, and how a failed build reports itself.
"""

import concurrent.futures
import ctypes
import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.ops import cpu_kernels, sampling

OPTIONS = list(
  itertools.product(["bilinear", "nearest"], ["zeros", "border", "reflection"], [True, False])
)


def _grad_fn(**kw):
  return jax.jit(jax.grad(lambda x, g: jnp.sum(sampling.grid_sample(x, g, **kw) ** 2), (0, 1)))


def _data(shape=(2, 9, 11, 3), out=(7, 5), seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  # Well outside [-1, 1]: zero padding, clipping and repeated reflection all happen.
  grid = jnp.asarray(rng.uniform(-2.5, 2.5, (shape[0], *out, 2)).astype(np.float32))
  g = jnp.asarray(rng.standard_normal((shape[0], *out, shape[-1])).astype(np.float32))
  return x, grid, g


def test_kernels_are_built_and_called_on_this_machine():
  if cpu_kernels._compiler() is None:  # a machine without a C++ compiler falls back, and says why
    assert not cpu_kernels.available()
    assert "compiler" in cpu_kernels.unavailable_reason()
    return
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  x, grid, _ = _data()
  hlo = _grad_fn().lower(x, grid).compile().as_text()
  assert 'custom_call_target="dmad_grid_sample_fwd"' in hlo
  assert 'custom_call_target="dmad_grid_sample_bwd"' in hlo
  # Other dtypes keep the XLA formulation.
  hlo16 = _grad_fn().lower(x.astype(jnp.bfloat16), grid.astype(jnp.bfloat16)).compile().as_text()
  assert "dmad_grid_sample" not in hlo16


def test_a_function_traced_for_the_cpu_devices_computes_the_same_and_traces_one_formulation():
  """``traced_for_devices`` (the trainer's and the eval job's jitted programs): on this CPU host
  it traces only the kernel formulation, not both into a ``platform_dependent``, and the
  program computes bit for bit what the platform-dependent one does."""
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  traced = {"cpu": 0, "default": 0}

  def counting(name, fn):
    def wrapped(*args):
      traced[name] += 1
      return fn(*args)

    return wrapped

  def loss(x, grid):
    sampled = cpu_kernels.by_platform(
      counting("cpu", lambda x, grid: sampling.grid_sample(x, grid)),
      counting("default", lambda x, grid: sampling.grid_sample(x, grid)),
      x,
      grid,
    )
    return jnp.sum(sampled**2)

  x, grid, _ = _data()
  both = jax.jit(jax.value_and_grad(loss, (0, 1)))
  one = jax.jit(cpu_kernels.traced_for_devices(jax.value_and_grad(loss, (0, 1)), jax.devices()))
  expected = both(x, grid)
  assert traced == {"cpu": 1, "default": 1}
  got = one(x, grid)
  assert traced == {"cpu": 2, "default": 1}  # the second program traced the CPU one only
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert 'custom_call_target="dmad_grid_sample_bwd"' in one.lower(x, grid).compile().as_text()


@pytest.mark.parametrize("mode,padding_mode,align_corners", OPTIONS)
@pytest.mark.parametrize("shape", [(2, 9, 11, 3), (2, 16, 12, 64), (1, 5, 4, 7)])
def test_kernels_match_the_xla_formulation(shape, mode, padding_mode, align_corners):
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  x, grid, g = _data(shape)
  args = (mode, padding_mode, align_corners)
  # Forward: the same float32 operations in the same order, so bit-identical.
  np.testing.assert_array_equal(
    sampling._cpu_kernel_fwd(*args, x, grid), sampling._xla_fwd(*args, x, grid)
  )
  # Backward: sums over the sampling points in another order.
  got = sampling._cpu_kernel_bwd(*args, x, grid, g)
  want = sampling._xla_bwd(*args, x, grid, g)
  for name, a, b in zip(["grad_x", "grad_grid"], got, want, strict=True):
    scale = max(1.0, float(jnp.abs(b).max()))
    np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=2e-6, err_msg=name)


def test_kernels_under_vmap_match_a_loop():
  """vmap adds a leading batch dimension, which the kernels fold into their images."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 5)).astype(np.float32))
  grid = jnp.asarray(rng.uniform(-1.3, 1.3, (3, 2, 6, 7, 2)).astype(np.float32))
  f = lambda a, b: jnp.sum(sampling.grid_sample(a, b, padding_mode="border") ** 3)  # noqa: E731
  vmapped = jax.jit(jax.vmap(jax.value_and_grad(f, (0, 1))))(x, grid)
  hlo = jax.jit(jax.vmap(jax.grad(f, (0, 1)))).lower(x, grid).compile().as_text()
  assert "dmad_grid_sample_bwd" in hlo
  for i in range(3):
    value, (gx, gg) = jax.value_and_grad(f, (0, 1))(x[i], grid[i])
    np.testing.assert_allclose(vmapped[0][i], value, rtol=1e-6)
    np.testing.assert_allclose(vmapped[1][0][i], gx, atol=1e-5)
    np.testing.assert_allclose(vmapped[1][1][i], gg, atol=1e-5)


def test_switched_off_kernels_fall_back_to_xla_with_the_same_results(tmp_path):
  x, grid, _ = _data(seed=7)
  np.savez(tmp_path / "in.npz", x=x, grid=grid)
  gx, gg = _grad_fn(padding_mode="reflection")(x, grid)
  script = textwrap.dedent(
    f"""
    import jax, jax.numpy as jnp, numpy as np
    from dmad_jax.ops import cpu_kernels, sampling
    assert not cpu_kernels.available()
    assert "DMAD_JAX_CPU_KERNELS" in cpu_kernels.unavailable_reason()
    d = np.load({str(tmp_path / "in.npz")!r})
    f = jax.jit(jax.grad(
      lambda x, g: jnp.sum(sampling.grid_sample(x, g, padding_mode="reflection") ** 2), (0, 1)))
    assert "dmad_grid_sample" not in f.lower(d["x"], d["grid"]).compile().as_text()
    gx, gg = f(d["x"], d["grid"])
    np.savez({str(tmp_path / "out.npz")!r}, gx=gx, gg=gg)
    """
  )
  env = dict(os.environ, DMAD_JAX_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
  out = np.load(tmp_path / "out.npz")
  np.testing.assert_allclose(out["gx"], gx, atol=1e-5)
  np.testing.assert_allclose(out["gg"] / np.abs(gg).max(), gg / np.abs(gg).max(), atol=1e-6)


def test_a_failing_compiler_is_reported_with_its_command(tmp_path, monkeypatch):
  monkeypatch.setenv("DMAD_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # /bin/false: a "compiler" that always fails
  with pytest.raises(RuntimeError, match=r"compiling .*grid_sample\.cc.* failed:\n\$ .*false"):
    cpu_kernels.build()
  assert not list(tmp_path.iterdir())  # no half-written library left behind


@pytest.mark.slow
def test_concurrent_first_builds_share_one_library(tmp_path, monkeypatch):
  """pytest-xdist workers or the processes of one job may all build at once."""
  if cpu_kernels._compiler() is None:
    pytest.fail("this machine has no C++ compiler; the kernels cannot be tested here")
  monkeypatch.setenv("DMAD_JAX_CACHE_DIR", str(tmp_path))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    paths = list(pool.map(lambda _: cpu_kernels.build(), range(2)))
  assert paths[0] == paths[1] and paths[0].parent == tmp_path
  assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]
  lib = ctypes.cdll.LoadLibrary(str(paths[0]))
  assert lib.DmadGridSampleFwd and lib.DmadGridSampleBwd and lib.DmadConvWeightGrad
