"""Hand-written CPU kernels, compiled on first use and called through XLA's FFI.

XLA:CPU runs some of dmad_jax's ops far slower than PyTorch's hand-written CPU kernels: the
image gradient of ``grid_sample`` is a scatter-add that XLA runs single-threaded, and a
convolution's weight gradient is a convolution with an image-sized window (``experiments/
bench_ops.py`` and ``experiments/profile_train_step.py`` measure both; README has the numbers).
The C++ sources live in ``dmad_jax/ops/_cpu/``; each is a custom call registered with ``jax.ffi``
for the CPU platform only, so GPU and TPU programs never see it. ``batch_parallel`` and
``batch_summed`` tell XLA's partitioner how a call splits over a sharded batch.

The shared library is built the first time it is needed, with the C++ compiler in ``$CXX``
(else ``c++``/``g++``/``clang++``) and XLA's FFI headers from jaxlib, into
``$DMAD_JAX_CACHE_DIR`` (default ``~/.cache/dmad_jax``) under a name that hashes the sources, the
compiler flags, the jaxlib version and this CPU's model, so a build is never reused where it does
not belong. Concurrent first uses (pytest-xdist workers, several processes of one job) are safe:
each compiles into a temporary file and renames it into place.

Without a compiler, or with ``DMAD_JAX_CPU_KERNELS=0``, ``available()`` is False and the ops use
their pure-XLA formulation (same results to float32 rounding); the reason is logged once.

What a GPU or TPU runs never depends on any of this: the ops choose their CPU formulations with
:func:`by_platform`, so a program lowered for an accelerator holds only the plain ``lax``
formulation, and a process whose default backend is an accelerator never traces the CPU
formulations nor builds the kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from absl import logging
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
  "available",
  "batch_parallel",
  "build",
  "by_platform",
  "lowering_for",
  "traced_for_devices",
  "unavailable_reason",
]

_SOURCES = ("grid_sample.cc", "conv_weight_grad.cc")
_HEADERS = ("parallel.h",)
# Handler symbol in the library -> FFI target name.
_TARGETS = {
  "DmadGridSampleFwd": "dmad_grid_sample_fwd",
  "DmadGridSampleBwd": "dmad_grid_sample_bwd",
  "DmadConvWeightGrad": "dmad_conv_weight_grad",
}
# -ffp-contract=off: no fused multiply-adds, so the arithmetic rounds like the XLA formulation.
# -fno-math-errno and -fno-trapping-math change no value; they let floor/nearbyint and the
# coordinate selects vectorise.
_FLAGS = (
  "-O3",
  "-march=native",
  "-ffp-contract=off",
  "-fno-math-errno",
  "-fno-trapping-math",
  "-fPIC",
  "-shared",
  "-std=c++17",
  "-w",
)
_ENV_SWITCH = "DMAD_JAX_CPU_KERNELS"

_state: dict[str, str | None] = {}


def _source_dir() -> Path:
  return Path(__file__).resolve().parent / "_cpu"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("model name", "flags")):
          return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _library_path(compiler: str) -> Path:
  h = hashlib.sha256()
  for name in _SOURCES + _HEADERS:
    h.update((_source_dir() / name).read_bytes())
  for part in (compiler, " ".join(_FLAGS), jaxlib.__version__, _cpu_model()):
    h.update(part.encode())
  root = Path(os.environ.get("DMAD_JAX_CACHE_DIR", Path.home() / ".cache" / "dmad_jax"))
  return root / f"libdmad_cpu_{h.hexdigest()[:16]}.so"


def build() -> Path:
  """Compiles the kernels (unless already built) and returns the shared library's path.

  Raises:
    RuntimeError: no C++ compiler, or the compiler failed (its output is in the message).
  """
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
  path = _library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [
    compiler,
    *_FLAGS,
    f"-I{jax.ffi.include_dir()}",
    *(str(_source_dir() / name) for name in _SOURCES),
    "-o",
    tmp,
  ]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCES} failed:\n$ {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _load() -> str | None:
  """Builds, loads and registers the kernels once; returns None or why they are unavailable."""
  if "reason" in _state:
    return _state["reason"]
  reason = None
  if os.environ.get(_ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
    reason = f"disabled by {_ENV_SWITCH}"
  else:
    try:
      lib = ctypes.cdll.LoadLibrary(str(build()))
      for symbol, target in _TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
      reason = str(e)
  if reason is not None:
    logging.warning("dmad_jax CPU kernels unavailable, using XLA formulations: %s", reason)
  _state["reason"] = reason
  return reason


# The platforms the program being traced is lowered for, when the tracer knows (see lowering_for).
_LOWERING_FOR: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
  "dmad_jax_lowering_for", default=None
)


@contextlib.contextmanager
def lowering_for(platforms, *, kernels: bool = True):
  """Within the block, programs are traced for ``platforms`` only (e.g. ``("cuda", "tpu")``):
  :func:`by_platform` traces just the formulations those platforms run. Use it around
  ``jax.export`` of a fresh ``jax.jit`` (``dmad_jax.train.export_train_step`` does). With
  ``kernels=False`` the CPU formulations are left out for the CPU too, so the program runs
  where these kernels are not registered (a ``dmad export`` file)."""
  token = _LOWERING_FOR.set(tuple(platforms) if kernels else ("__no_cpu_kernels__",))
  try:
    yield
  finally:
    _LOWERING_FOR.reset(token)


def traced_for_devices(fn, devices):
  """``fn``, traced within :func:`lowering_for` the platforms of ``devices``.

  For a function jitted to run on those devices (a train step over the run's mesh): on a CPU
  host :func:`by_platform` then traces only the CPU formulations instead of both into a
  ``lax.platform_dependent`` that lowering reduces to the CPU one anyway; the compiled program is
  the same, its tracing faster (the runlocal digits PDM train step: 3.3 s -> 1.8 s here).
  """
  platforms = tuple(sorted({d.platform for d in devices}))

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with lowering_for(platforms):
      return fn(*args, **kwargs)

  return traced


def by_platform(cpu, default, *args):
  """``cpu(*args)`` where the computation is lowered for the CPU, ``default(*args)`` elsewhere.

  Inside :func:`lowering_for`, the choice follows its platforms: only ``default`` is traced when
  they exclude the CPU, so the program is exactly the one an accelerator host traces (the CPU
  formulation, its residuals for the backward pass included, never enters it). Otherwise, in a
  process whose default backend is not the CPU (a GPU or TPU host), ``cpu`` is not traced at all:
  nothing is compiled and the program is ``default``'s; on a CPU host both are traced into a
  ``lax.platform_dependent``, which keeps the branch of the platform the program is lowered for.
  """
  platforms = _LOWERING_FOR.get()
  if platforms is None and jax.default_backend() != "cpu":
    return default(*args)
  if platforms is not None:
    if "cpu" not in platforms:
      return default(*args)
    if set(platforms) == {"cpu"}:
      return cpu(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def available() -> bool:
  """True when the CPU kernels are built and registered (building them on the first call)."""
  return _load() is None


def unavailable_reason() -> str | None:
  """Why ``available()`` is False, or None when it is True."""
  return _load()


@functools.cache
def target(symbol: str) -> str:
  """FFI target name of a kernel symbol (after making sure the kernels are registered)."""
  if not available():
    raise RuntimeError(f"dmad_jax CPU kernels unavailable: {unavailable_reason()}")
  return _TARGETS[symbol]


def batch_parallel(fn, sharding_rule: str):
  """Wraps a kernel call whose outputs for image i depend only on image i of its inputs.

  XLA's partitioner cannot see into a custom call, so by default it gathers the whole batch onto
  every device before one. Declaring the call batch-parallel (``custom_partitioning`` with a
  Shardy ``sharding_rule`` whose first factor is the batch) keeps a batch-sharded call local to
  each device. ``custom_partitioning`` has no vmap rule, so ``custom_vmap`` supplies one: mapped
  axes are folded into the batch, which is exact for a per-image kernel.

  Args:
    fn: ``fn(*arrays) -> array or tuple of arrays``, every array with the batch first.
    sharding_rule: e.g. ``"b h w c, b p q t -> b p q c"``; ``b`` must be the first factor of
      every operand and result.

  Returns:
    A function with the signature of ``fn``.
  """

  def batch_sharding(mesh, arg_shapes):
    spec = arg_shapes[0].sharding.spec
    return NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None))

  def like_results(sharding, result_shape):
    if isinstance(result_shape, (tuple, list)):
      return tuple(sharding for _ in result_shape)
    return sharding

  def infer(mesh, arg_shapes, result_shape):
    return like_results(batch_sharding(mesh, arg_shapes), result_shape)

  def partition(mesh, arg_shapes, result_shape):
    sharding = batch_sharding(mesh, arg_shapes)
    args = tuple(sharding for _ in arg_shapes)
    return mesh, fn, like_results(sharding, result_shape), args

  partitioned = custom_partitioning(fn)
  partitioned.def_partition(
    infer_sharding_from_operands=infer, partition=partition, sharding_rule=sharding_rule
  )

  @custom_vmap
  def call(*args):
    return partitioned(*args)

  @call.def_vmap
  def _vmap(axis_size, in_batched, *args):
    args = [
      a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
      for a, batched in zip(args, in_batched, strict=True)
    ]
    out = call(*(a.reshape(-1, *a.shape[2:]) for a in args))

    def unfold(o):
      return o.reshape(axis_size, -1, *o.shape[1:])

    if isinstance(out, tuple):
      return tuple(unfold(o) for o in out), tuple(True for _ in out)
    return unfold(out), True

  return call


def batch_summed(fn, sharding_rule: str):
  """Wraps a kernel call whose result is a sum over the batch (first dimension) of its inputs.

  With a batch-sharded input each device runs the kernel on its own rows and the partial
  results are added with ``psum`` (``custom_partitioning``; the batch is a reduction factor of
  the Shardy ``sharding_rule``), instead of every device gathering the whole batch. Under vmap
  the call is made once per mapped element (``custom_vmap`` with ``lax.map``).

  Args:
    fn: ``fn(*arrays) -> array``, every array with the batch first.
    sharding_rule: e.g. ``"b h w i, b p q o -> k l i o"``, with ``b`` the batch.

  Returns:
    A function with the signature of ``fn``.
  """

  def batch_axes(arg_shapes):
    spec = arg_shapes[0].sharding.spec
    return spec[0] if len(spec) else None

  def infer(mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, PartitionSpec())

  def partition(mesh, arg_shapes, result_shape):
    axes = batch_axes(arg_shapes)
    args = tuple(NamedSharding(mesh, PartitionSpec(axes)) for _ in arg_shapes)

    def lower(*arrays):
      out = fn(*arrays)
      return out if axes is None else jax.lax.psum(out, axes)

    return mesh, lower, NamedSharding(mesh, PartitionSpec()), args

  partitioned = custom_partitioning(fn)
  partitioned.def_partition(
    infer_sharding_from_operands=infer,
    partition=partition,
    sharding_rule=sharding_rule,
    reduction_factors=("b",),
  )

  @custom_vmap
  def call(*args):
    return partitioned(*args)

  @call.def_vmap
  def _vmap(axis_size, in_batched, *args):
    args = tuple(
      a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
      for a, batched in zip(args, in_batched, strict=True)
    )
    return jax.lax.map(lambda xs: call(*xs), args), True

  return call
