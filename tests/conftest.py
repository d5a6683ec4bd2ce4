"""Shared pytest setup: float32 everywhere, fixed hypothesis profile."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and its subprocesses: many tests compile
# the same tiny models (in process, through the CLI, on fake devices).
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"),
)

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
  """Runs ``python -m dmad_jax ARGS`` in a subprocess (cwd = repo root unless given)."""

  def run(*args, cwd=ROOT):
    env = dict(_os.environ, PYTHONPATH=ROOT)
    return _subprocess.run(
      [_sys.executable, "-m", "dmad_jax", *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )

  return run
