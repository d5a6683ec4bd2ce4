"""Shared pytest setup: float32 everywhere, fixed hypothesis profile."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and its subprocesses: many tests compile
# the same tiny models (in process, through the CLI, on fake devices).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _partitioning_rules_hash() -> str:
  import hashlib

  with open(os.path.join(_ROOT, "dmad_jax", "ops", "cpu_kernels.py"), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


# Programs with the CPU kernels' custom_partitioning rules carry a per-process callback id in
# their IR, so by default the persistent cache never hits for them (jax-ml/jax#21159): every
# process recompiled its train step (measured: 7.5 s of a 24 s, 4-device `dmad train` of the
# tiny digits config; 12 s with the id left out of the key). Leaving it out is safe as long as
# the partitioning rules do not change under the same IR, so the cache directory is keyed by the
# module that holds them.
os.environ.setdefault("JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY", "1")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(_ROOT, ".pytest_cache", "jax-" + _partitioning_rules_hash()),
)

# The suite compiles several hundred tiny programs, so XLA:CPU's LLVM optimisation dominates its
# time (measured on 2 cores, cold cache: two PDM tests 102 s at the default level, 72 s at -O0;
# CPU time 128 s against 77 s). Tests compile at -O0 unless XLA_FLAGS already chooses a level.
# -O0 changes float rounding, not the computation (4 training steps of the tiny digits config end
# with other parameter bits): every assertion is a property with a tolerance or a comparison of
# two runs under the same flags. The end-to-end test of the installed `dmad` script runs with the
# user's default flags (tests/cli_test.py).
O0_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + O0_FLAG).strip()


from hypothesis import settings  # noqa: E402

settings.register_profile("dmad", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("dmad")


import os as _os  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402

import pytest  # noqa: E402

ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


@pytest.fixture
def dmad_cli():
  """Runs the installed ``dmad ARGS`` script in a subprocess, as a user does: no PYTHONPATH,
  cwd = repo root unless given."""

  def run(*args, cwd=ROOT):
    env = {k: v for k, v in _os.environ.items() if k != "PYTHONPATH"}
    return _subprocess.run(
      [_os.path.join(_os.path.dirname(_sys.executable), "dmad"), *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )

  return run


def pytest_collection_modifyitems(config, items):
  """Long tests first: with `--dist worksteal` (make test) a worker that runs out of tests takes
  the end of the other's queue, so the session ends on short tests rather than one worker running
  a long one alone."""
  del config

  def rank(item):  # multi-device runs are the longest (measured: 105-300 s), then slow ones
    if item.get_closest_marker("multidevice"):
      return 0
    return 1 if item.get_closest_marker("slow") else 2

  items.sort(key=rank)  # stable: the file order is kept within each rank
