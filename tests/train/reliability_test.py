"""Crash safety and determinism of ``dmad train``, on the runlocal digits config in subprocesses.

Every run trains STEPS steps with a checkpoint every EVERY steps; an uninterrupted run is the
reference. One workdir is killed inside a checkpoint write, stopped by SIGTERM and killed at a
random step, each time rerun with the same command: it must end with bit-identical parameters.
The subprocesses share a persistent compilation cache, so only the first one compiles; each
still pays a few seconds of CPU for importing JAX, orbax and grain, and
the first one ~40 s for compiling, hence the ``slow`` marks (about 3 min of CPU for all four
subprocess tests with a cold cache).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.configs import load_module
from dmad_jax.models import base as models_base
from dmad_jax.train import checkpoint, trainer
from dmad_jax.train import state as state_lib

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
digits_pdm = load_module(os.path.join(CONFIGS, "digits_pdm.py"))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The installed console script, run as users run it.
DMAD = os.path.join(os.path.dirname(sys.executable), "dmad")
STEPS, EVERY = 11, 3  # checkpoints at steps 3, 6, 9 and 11
TIMEOUT = 300
# Kill steps are drawn from this seeded generator; the drawn step is in every failure message.
KILL_RNG = random.Random(20240607)
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


def _resumed_at(log):
  found = RESUMED.search(log)
  assert found, log[-3000:]
  return int(found.group(1))


# With this variable set to a step number, the training process SIGKILLs itself while saving
# that step, after every file is written into the temporary directory and before the rename
# that commits it: the worst moment for a crash. The hook lives in a sitecustomize module that
# only these tests put on the subprocess's path; the installed `dmad` script runs unchanged.
CRASH_ENV = "DMAD_TEST_CRASH_IN_CHECKPOINT_STEP"
_CRASH_HOOK = f"""
import os, signal
if os.environ.get({CRASH_ENV!r}):
  from orbax.checkpoint._src.path import atomicity

  _finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == os.environ[{CRASH_ENV!r}]:
      os.kill(os.getpid(), signal.SIGKILL)
    return await _finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


@pytest.fixture(scope="session")
def hook_dir(tmp_path_factory):
  """A folder holding the crash hook's sitecustomize.py."""
  folder = tmp_path_factory.mktemp("crash_hook")
  (folder / "sitecustomize.py").write_text(_CRASH_HOOK)
  return str(folder)


@pytest.fixture(scope="session")
def cache_dir(request, tmp_path_factory):
  """JAX's persistent compilation cache for the subprocesses, kept in pytest's cache directory
  across sessions when there is one (entries are keyed by the program, the JAX version and the
  flags, so a stale entry is never used)."""
  cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
  if cache is None:
    return str(tmp_path_factory.mktemp("jax_cache"))
  return str(cache.mkdir("dmad_reliability_jax_cache"))


def _command(workdir, *overrides):
  return [
    DMAD,
    "train",
    f"--config={ROOT}/configs/digits_pdm.py:runlocal",
    f"--workdir={workdir}",
    f"--config.total_steps={STEPS}",
    f"--config.checkpoint_every_steps={EVERY}",
    "--config.log_every_steps=1",
    "--config.keep_checkpoints=10",
    *overrides,
  ]


def _env(cache_dir, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.update(
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  env.pop(CRASH_ENV, None)
  env.update(extra)
  return env


def _start(workdir, cache_dir, *overrides, **env):
  """Starts a training subprocess; its output is appended to ``<workdir>.log``."""
  out = open(f"{workdir}.log", "a")  # noqa: SIM115 (closed by _finish)
  log_start = out.tell()
  proc = subprocess.Popen(
    _command(workdir, *overrides),
    cwd=ROOT,
    env=_env(cache_dir, **env),
    stdout=out,
    stderr=subprocess.STDOUT,
    text=True,
  )
  proc.log_file, proc.log_start = out, log_start
  return proc


def _finish(proc):
  try:
    proc.wait(timeout=TIMEOUT)
  finally:
    proc.log_file.close()
  with open(proc.log_file.name) as f:
    f.seek(proc.log_start)
    return proc.returncode, f.read()  # this launch's output


def _train(workdir, cache_dir, *overrides):
  code, log = _finish(_start(workdir, cache_dir, *overrides))
  assert code == 0, log[-4000:]
  return log


def _params(workdir, step=STEPS):
  """The parameters (and BatchNorm statistics, optimizer state) saved at ``step``."""
  config = digits_pdm.get_config("runlocal")
  config.total_steps = STEPS
  state = state_lib.state_at(config, workdir, step)
  return [
    np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
  ]


def _assert_bit_identical(a, b, what):
  assert len(a) == len(b)
  different = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not np.array_equal(x, y)]
  assert not different, f"{what}: {len(different)} of {len(a)} arrays differ"


def _steps(workdir):
  """Steps logged so far to metrics.jsonl (the subprocess flushes each line)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


def _wait_until(proc, condition, what):
  deadline = time.time() + TIMEOUT
  while not condition():
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def _latest(workdir):
  return checkpoint.manager(workdir, read_only=True).latest_step()


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
  """Final state of an uninterrupted run (seed 0), computed once per pytest session: under
  pytest-xdist the workers share it through a file next to their temporary directories, taken
  under a lock by the first worker that needs it (a per-worker, per-module fixture ran the same
  40-s training three times in one `make test`)."""
  shared = tmp_path_factory.getbasetemp().parent  # common to all workers of the session
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    shared = tmp_path_factory.getbasetemp()
  saved = shared / "reliability_reference.npz"
  with filelock.FileLock(str(saved) + ".lock"):
    if not saved.exists():
      workdir = str(shared / "reliability_reference")
      _train(workdir, cache_dir)
      assert checkpoint.manager(workdir, read_only=True).all_steps() == [3, 6, 9, 11]
      params = _params(workdir)
      np.savez(str(saved) + ".tmp.npz", *params)
      os.replace(str(saved) + ".tmp.npz", saved)
  with np.load(saved) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_another_seed_differs(tmp_path, cache_dir, reference):
  _train(str(tmp_path / "again"), cache_dir)
  _assert_bit_identical(reference, _params(str(tmp_path / "again")), "same seed")
  _train(str(tmp_path / "seed1"), cache_dir, "--config.seed=1")
  other = _params(str(tmp_path / "seed1"))
  differ = sum(not np.array_equal(x, y) for x, y in zip(reference, other, strict=True))
  assert differ > len(reference) // 2, f"seed 1 changed only {differ} of {len(reference)} arrays"


def _steps_since(workdir, logged_before):
  """Steps the current launch logged (launches append to metrics.jsonl)."""
  return _steps(workdir)[logged_before:]


@pytest.mark.slow
def test_killed_in_a_write_stopped_and_killed_at_a_random_step_then_rerun_is_bit_identical(
  tmp_path, cache_dir, reference, hook_dir
):
  """One workdir, four launches of the same command: SIGKILL inside the write of step 6 (it is
  never committed and the rerun removes its files), SIGTERM after a drawn step (the run finishes
  that step, saves it and exits 143), SIGKILL at a drawn step after the next checkpoint (the
  rerun resumes from the last complete one), then to the end: bit-identical to the reference."""
  workdir = str(tmp_path / "run")
  ckpt = checkpoint.checkpoint_dir(workdir)

  # 1. The hook kills the process after step 6's files are written, before the rename that
  # commits them.
  hook = {CRASH_ENV: "6", "PYTHONPATH": hook_dir}
  code, log = _finish(_start(workdir, cache_dir, **hook))
  assert code == -signal.SIGKILL, log[-3000:]
  partial = [name for name in os.listdir(ckpt) if name.startswith("6.")]
  assert partial and os.path.isdir(os.path.join(ckpt, partial[0], checkpoint.STATE)), partial
  assert checkpoint.manager(workdir, read_only=True).all_steps() == [3]

  # 2. SIGTERM once the rerun (which resumed at step 3) has logged a drawn step.
  stop_after = KILL_RNG.randint(EVERY + 1, 2 * EVERY - 1)
  before = len(_steps(workdir))
  proc = _start(workdir, cache_dir)
  _wait_until(
    proc,
    lambda: max(_steps_since(workdir, before), default=0) >= stop_after,
    f"step {stop_after} after resuming",
  )
  proc.send_signal(signal.SIGTERM)
  code, log = _finish(proc)
  assert code == 143, log[-3000:]
  assert _resumed_at(log) == 3
  assert not [name for name in os.listdir(ckpt) if name.startswith("6.")]  # removed on start
  saved = re.search(r"saved step (\d+) in \S+; rerun the same command to resume", log)
  assert saved, log[-3000:]
  step = int(saved.group(1))
  assert stop_after <= step < 3 * EVERY and _latest(workdir) == step
  assert _steps(workdir)[-1] == step  # it finished the step it was in, then stopped

  # 3. SIGKILL at a drawn step once the next checkpoint after ``step`` is committed.
  next_save = (step // EVERY + 1) * EVERY
  kill_at = KILL_RNG.randint(next_save + 1, next_save + EVERY - 1)
  before = len(_steps(workdir))
  proc = _start(workdir, cache_dir)
  _wait_until(
    proc,
    lambda: (
      (_latest(workdir) or 0) >= next_save
      and max(_steps_since(workdir, before), default=0) >= kill_at
    ),
    f"checkpoint {next_save} and step {kill_at}",
  )
  proc.send_signal(signal.SIGKILL)
  code, log = _finish(proc)
  assert code == -signal.SIGKILL, log[-3000:]
  assert _resumed_at(log) == step
  killed_after = _steps(workdir)[-1]
  latest = _latest(workdir)
  assert latest is not None and next_save <= latest < STEPS, (kill_at, latest)

  # 4. To the end.
  log = _train(workdir, cache_dir)
  assert _resumed_at(log) == latest
  assert sorted(os.listdir(ckpt)) == sorted(["3", "6", "9", "11"])
  _assert_bit_identical(
    reference,
    _params(workdir),
    f"killed writing step 6, stopped at step {step}, killed after step {killed_after} "
    f"(drawn {stop_after}, {kill_at})",
  )


class _NaNSometimes(models_base.Detector):
  """A one-parameter detector whose loss is NaN on about half of the steps (drawn from the
  step's key), so the test compiles in a second instead of building PDM."""

  score_names = ("score",)
  # It stands in for PDM under the digits PDM config, whose sections it leaves unread.
  config_keys = (
    "model",
    "loss",
    "score",
    "augment",
    "t_length",
    "template_init",
    "template_median_items",
  )

  def __init__(self, config=None):
    super().__init__(config)

  def predict(self, variables, batch):
    return models_base.Prediction(scores={"score": jnp.mean(batch["image"], axis=(1, 2, 3))})

  def init(self, rng, batch):
    del rng, batch
    return {"params": {"w": jnp.ones((1,), jnp.float32)}, "batch_stats": {}}

  def loss(self, params, batch_stats, batch, rng):
    mse = jnp.mean((batch["image"] * params["w"][0] - 0.5) ** 2)
    bad = jax.random.bernoulli(rng, 0.5)
    return jnp.where(bad, jnp.nan, mse), ({"mse": jnp.where(bad, jnp.nan, mse)}, batch_stats)


def test_nonfinite_skip_leaves_the_state_untouched_and_continues(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(trainer, "get_detector", lambda config: _NaNSometimes())
  config = digits_pdm.get_config("runlocal")
  config.total_steps, config.checkpoint_every_steps, config.nonfinite = 6, 1, "skip"
  config.keep_checkpoints = 10
  config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0  # lr > 0 at step 1
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.WARNING, logger="dmad_jax"):
    trainer.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  nan_steps = [r["step"] for r in rows if not np.isfinite(float(r["loss"]))]  # "nan" in JSON
  assert 0 < len(nan_steps) < 6 and rows[-1]["skipped_updates"] == len(nan_steps)
  for step in nan_steps:
    assert f"step {step}: non-finite" in caplog.text and "'mse': nan" in caplog.text

  mngr = checkpoint.manager(workdir, read_only=True)
  spec = trainer.data_lib.element_spec(config.data)
  abstract = state_lib.abstract(config, _NaNSometimes(), spec)
  w = {s: float(checkpoint.restore(mngr, s, abstract).params["w"][0]) for s in range(1, 7)}
  w[0] = 1.0
  for step in range(1, 7):
    if step in nan_steps:
      assert w[step] == w[step - 1], f"step {step} was skipped but changed w"
    else:
      assert w[step] != w[step - 1], f"step {step} was finite but did not change w"
