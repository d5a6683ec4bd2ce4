"""export_train_step: the program an accelerator runs holds no CPU kernel and does not depend on
whether the kernels are available; on CPU the kernels are in the program."""

import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from dmad_jax import configs, models
from dmad_jax.ops import cpu_kernels
from dmad_jax.train import export_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MVTEC = "root=/nonexistent/mvtec;category=bottle;runlocal"
# Every model name of the package with its smallest config.
SMALLEST = {
  "pdm": ("digits_pdm.py", "runlocal"),
  "daad": ("digits_daad.py", "variant=daad;runlocal"),
  "daad_plus": ("digits_daad.py", "variant=daad_plus;runlocal"),
  "ppdm": ("mvtec_ppdm.py", MVTEC),
  "rd": ("mvtec_rd.py", MVTEC),
  "ard": ("dagm_ard.py", "root=/d;class=1;runlocal"),
  "igd": ("digits_igd.py", "runlocal"),
  "igd_kd": ("mvtec_igd_kd.py", MVTEC),
  "mnad": ("ped2_mnad.py", "root=/d;runlocal"),
}
_DMAD_CALL = re.compile(r"custom_call\s*@dmad_|call_target_name\s*=\s*\"dmad_")


def _config(name):
  file, arg = SMALLEST[name]
  return configs.load(os.path.join(ROOT, "configs", file), arg)


def _without_locations(text: str) -> str:
  """The module text without its debug locations (they name the caller's files and lines)."""
  lines = [line for line in text.splitlines() if not line.startswith("#loc")]
  text, out, i = "\n".join(lines), [], 0
  while True:
    j = text.find(" loc(", i)
    if j < 0:
      out.append(text[i:])
      return "".join(out)
    out.append(text[i:j])
    depth, k = 0, j + 4
    while True:  # skip the balanced parentheses of loc(...)
      depth += {"(": 1, ")": -1}.get(text[k], 0)
      k += 1
      if depth == 0:
        break
    i = k


def _digests(platforms):
  """{model name: (sha256 of the exported module's text without debug locations, whether it
  calls a dmad_ kernel)}."""
  out = {}
  for name in sorted(SMALLEST):
    text = _without_locations(export_train_step(_config(name), platforms=platforms).mlir_module())
    out[name] = (hashlib.sha256(text.encode()).hexdigest(), bool(_DMAD_CALL.search(text)))
  return out


def test_every_package_model_has_a_smallest_config():
  package = {
    n for n in models.names() if models.base._REGISTRY[n].__module__.startswith("dmad_jax.")
  }
  assert package == set(SMALLEST)


@pytest.mark.slow
def test_accelerator_programs_hold_no_cpu_kernel_and_do_not_depend_on_it():
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  with_kernels = _digests(("cuda", "tpu"))
  assert not any(calls for _, calls in with_kernels.values()), with_kernels
  env = dict(os.environ, DMAD_JAX_CPU_KERNELS="0")
  script = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); import export_test as t; "
    "print('RESULT' + json.dumps(t._digests(('cuda', 'tpu'))))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", script, os.path.dirname(os.path.abspath(__file__))],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  without = {k: tuple(v) for k, v in json.loads(proc.stdout.split("RESULT", 1)[1]).items()}
  assert without == with_kernels


@pytest.mark.slow
def test_on_cpu_the_kernels_are_in_the_program():
  """The CPU program of the PDM step calls the C++ kernels (grid_sample's and the convolution
  weight gradient's)."""
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  config = _config("pdm")
  from dmad_jax import data as data_lib
  from dmad_jax.models import get_detector
  from dmad_jax.train import state as state_lib
  from dmad_jax.train.optim import learning_rate_schedule
  from dmad_jax.train.trainer import train_step

  detector = get_detector(config)
  spec = data_lib.element_spec(config.data)
  state = state_lib.abstract(config, detector, spec)
  batch = {k: jax.ShapeDtypeStruct((config.batch_size, *s.shape), s.dtype) for k, s in spec.items()}
  step = jax.jit(
    lambda s, b: train_step(
      s, b, detector=detector, lr_schedule=learning_rate_schedule(config.optimizer, 2)
    )
  )
  text = step.lower(state, batch).as_text()
  for kernel in ("dmad_conv_weight_grad", "dmad_grid_sample_fwd", "dmad_grid_sample_bwd"):
    assert kernel in text, kernel
