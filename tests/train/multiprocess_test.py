"""Two local processes x 2 CPU devices joined by jax.distributed, against one 4-device process.

Each process is a real ``python -m dmad_jax train|eval`` with ``--coordinator_address``; CPU
collectives go through gloo. The processes read disjoint slices of every global batch, so the
global batches, and hence the losses, equal the one-process run's.

The runs compute in float64 (``config.param_dtype``, JAX_ENABLE_X64=1): gloo's all-reduce adds
the processes' partial sums in another order than the in-process one, and in float32 Adam's
normalised update turns that roundoff into visible differences (measured: step-5 losses 1.3e-5
relative apart, parameters up to 2.2e-4; sharding_test.py measures the same effect on 8 devices).
In float64 the roundoff stays far below Adam's eps, so any difference left would be one in the
computation.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dmad_jax.configs import load_module
from dmad_jax.train import checkpoint
from dmad_jax.train import state as state_lib

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
digits_pdm = load_module(os.path.join(CONFIGS, "digits_pdm.py"))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The installed console script, run as users run it.
DMAD = os.path.join(os.path.dirname(sys.executable), "dmad")
STEPS = 3  # at -O0 a float64 step of batch 16 took ~2.7 s per process here
OVERRIDES = (
  "--config.batch_size=8",  # 2 rows per device, 4 per process
  f"--config.total_steps={STEPS}",
  f"--config.checkpoint_every_steps={STEPS}",
  "--config.eval.batch_size=48",
  "--config.param_dtype=float64",
  # 90 test images (not the config's 540): at the test's -O0 compilation the eval of 540 float64
  # images took 30 s per command, four times over. 90 = 48 + 42 leaves a padded last batch.
  "--config.data.test_fraction=0.05",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(command, workdir, devices, process_id=None, port=None, *extra):
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    JAX_ENABLE_X64="1",
  )
  args = [DMAD, command, "--config=configs/digits_pdm.py:runlocal"]
  args += [f"--workdir={workdir}", *OVERRIDES, *extra]
  if process_id is not None:
    args += [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    args += [f"--process_id={process_id}"]
  return subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _run_two_processes(command, workdir, *extra):
  port = _free_port()
  procs = [_launch(command, workdir, 2, p, port, *extra) for p in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-4000:]
  return outs


def _run_one_process(command, workdir):
  proc = _launch(command, workdir, 4)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-4000:]
  return out


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def _restored_params(workdir, config):
  return state_lib.variables_at(config, workdir, STEPS)["params"]


@pytest.mark.multidevice
def test_two_processes_match_one_process(tmp_path):
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  # The two-process run ends with the eval job in the same two processes (``eval_at_end`` calls
  # the function ``dmad eval`` runs, after the same jax.distributed start-up): one launch of two
  # processes fewer than a separate ``dmad eval``, whose second process would recompile.
  outs = _run_two_processes("train", two, "--config.eval_at_end=True")
  assert "process 1 of 2: 2 local devices of 4" in outs[1]
  _run_one_process("train", one)

  # Same global batches and the same 4-device program: the loss curves agree.
  l2, l1 = _losses(two), _losses(one)
  assert len(l2) == len(l1) == STEPS
  np.testing.assert_allclose(l2, l1, rtol=1e-12)
  # Only process 0 wrote logs; orbax wrote one checkpoint with both processes' data positions.
  assert checkpoint.manager(two, read_only=True).all_steps() == [STEPS]
  data_dir = os.path.join(two, "checkpoints", str(STEPS), "data")
  data_files = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], data_files

  # Resuming training needs the process count that saved the data positions; the model alone
  # restores anywhere.
  with pytest.raises(ValueError, match="saved by 2 processes and this run has 1"):
    checkpoint.check_process_count(os.path.join(two, "checkpoints", str(STEPS)), 1)
  checkpoint.check_process_count(os.path.join(two, "checkpoints", str(STEPS)), 2)

  # The two-process checkpoint restores in this single (one-device, 32-bit) process: orbax casts
  # the saved float64 arrays to the float32 of this process's abstract state.
  config = digits_pdm.get_config("runlocal")
  config.batch_size, config.total_steps = 8, STEPS
  p2, p1 = _restored_params(two, config), _restored_params(one, config)
  assert {a.dtype for a in jax.tree.leaves(p2)} == {np.dtype(np.float32)}
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  # The eval job over two processes (at the end of the run above) gathers every row and drops
  # the padding (90 test images in batches of 48): same scores and AUROC as one process on the
  # same checkpoint.
  with open(os.path.join(two, "eval", "metrics.json")) as f:
    m2 = json.load(f)
  with np.load(os.path.join(two, "eval", f"scores_{STEPS}.npz")) as f:
    s2 = dict(f)  # read now: the one-process eval below rewrites the file
  _run_one_process("eval", two)
  with open(os.path.join(two, "eval", "metrics.json")) as f:
    m1 = json.load(f)
  with np.load(os.path.join(two, "eval", f"scores_{STEPS}.npz")) as f:
    s1 = dict(f)
  assert m2["num_test"] == m1["num_test"] == 90
  assert sorted(s2["index"].tolist()) == list(range(90))
  np.testing.assert_allclose(
    s2["score"][np.argsort(s2["index"])], s1["score"][np.argsort(s1["index"])], rtol=1e-12
  )
  assert m2["image_AUROC"] == pytest.approx(m1["image_AUROC"], abs=1e-6)
