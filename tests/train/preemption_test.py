"""Preemption and a lost host, 2 local processes x 2 CPU devices (gloo), as a pod slice sees them.

Each process is the installed ``dmad train`` with ``--coordinator_address``. Every run trains
STEPS float32 steps of the runlocal digits config (checkpoints at EVERY); an uninterrupted
2-process run, computed once per session, is the reference. Same process count, so the same
summation order: an interrupted run that resumes must end bit-identical to it.

One workdir, four launches:

- SIGTERM to one process only: JAX's preemption service picks one step, both processes save it
  as one checkpoint (both data positions) and exit 143 naming it; the rerun resumes there.
- SIGKILL to one process (once a later checkpoint is committed): JAX's coordination service stops
  the other within the heartbeat timeout, naming the lost process; the last complete checkpoint
  is intact and the rerun resumes from it.
- SIGTERM to both processes a step apart: as the first, and the last launch trains to the end.
- While two processes write checkpoints, a step that the eval job's ``--watch`` lists is never
  changed afterwards (orbax commits a step only when every process has written its part).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import filelock
import jax
import numpy as np
import pytest

from dmad_jax.configs import load_module
from dmad_jax.train import checkpoint
from dmad_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
digits_pdm = load_module(os.path.join(ROOT, "configs", "digits_pdm.py"))
# The installed console script, run as users run it.
DMAD = os.path.join(os.path.dirname(sys.executable), "dmad")
STEPS, EVERY = 14, 3  # checkpoints at 3, 6, 9, 12 and 14
STOP_AFTER = 4  # the first signal goes out once step 4 is logged and step 3 is committed
# The heartbeat timeout these runs use (--heartbeat_timeout_seconds; JAX's default is 100 s):
# after a SIGKILL the survivor must be gone within it plus the slack below.
HEARTBEAT = 10
SLACK = 20
TIMEOUT = 300
OVERRIDES = (
  "--config.batch_size=8",  # 2 rows per device, 4 per process
  f"--config.total_steps={STEPS}",
  f"--config.checkpoint_every_steps={EVERY}",
  "--config.log_every_steps=1",
  "--config.keep_checkpoints=10",
)
SAVED = re.compile(r"saved step (\d+) in \S+; rerun the same command to resume")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


def _resumed_at(out):
  found = RESUMED.search(out)
  assert found, out[-3000:]
  return int(found.group(1))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir):
  """Starts the two processes of one run; their output goes to ``<workdir>.<n>.p<i>.log`` for
  the ``n``-th launch in ``workdir``."""
  port = _free_port()
  launch = 0
  while os.path.exists(f"{workdir}.{launch}.p0.log"):
    launch += 1
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
  )
  env.pop("PYTHONPATH", None)
  logged_before = len(_steps(workdir))  # launches append to metrics.jsonl
  procs = []
  for i in range(2):
    log = open(f"{workdir}.{launch}.p{i}.log", "w")  # noqa: SIM115 (closed by _finish)
    args = [DMAD, "train", "--config=configs/digits_pdm.py:runlocal", f"--workdir={workdir}"]
    args += [*OVERRIDES, f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    args += [f"--process_id={i}", f"--heartbeat_timeout_seconds={HEARTBEAT}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_file, proc.logged_before = log, logged_before
    procs.append(proc)
  return procs


def _finish(procs, timeout=TIMEOUT):
  """Waits for both processes; returns their exit codes and outputs."""
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    finally:
      p.log_file.close()
  outs = []
  for p in procs:
    with open(p.log_file.name) as f:
      outs.append(f.read())
  return [p.returncode for p in procs], outs


def _train(workdir):
  codes, outs = _finish(_start(workdir))
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
  return outs


def _steps(workdir):
  """Steps logged so far to metrics.jsonl (process 0 flushes each line)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


def _committed(workdir):
  """The latest checkpoint step orbax has committed (every process wrote its part), or 0."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return 0
  return checkpoint.manager(workdir, read_only=True).latest_step() or 0


def _logged(procs, workdir):
  """Steps the launch ``procs`` has logged so far."""
  return _steps(workdir)[procs[0].logged_before :]


def _wait_for_step(procs, workdir, step, committed=0):
  """Waits until this launch has logged ``step`` and a checkpoint at ``committed`` or later is
  committed.

  A save runs in the background, and with two processes orbax commits it only after both have
  written their part: a process killed before then leaves the step uncommitted (a CI run killed
  process 1 at step 4 before step 3 was committed, and no checkpoint was left to resume from).
  """
  deadline = time.time() + TIMEOUT
  while max(_logged(procs, workdir), default=0) < step or _committed(workdir) < committed:
    for p in procs:
      assert p.poll() is None, f"a process ended (rc {p.returncode}) before step {step}"
    assert time.time() < deadline, f"timed out waiting for step {step}"
    time.sleep(0.02)


def _state(workdir, step=STEPS):
  """Parameters, BatchNorm statistics and optimizer state saved at ``step``, as numpy arrays."""
  config = digits_pdm.get_config("runlocal")
  config.batch_size, config.total_steps = 8, STEPS
  state = state_lib.state_at(config, workdir, step)
  return [
    np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
  ]


def _assert_bit_identical(a, b, what):
  assert len(a) == len(b)
  different = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not np.array_equal(x, y)]
  assert not different, f"{what}: {len(different)} of {len(a)} arrays differ"


def _data_files(workdir, step):
  folder = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), checkpoint.DATA)
  return sorted(f for f in os.listdir(folder) if f.startswith("process_"))


class _Watcher:
  """Lists the workdir's checkpoints the way ``dmad eval --watch`` does, every 20 ms, and
  records the files each step held when it was first listed."""

  def __init__(self, workdir):
    self.workdir, self.first_seen, self._stop = workdir, {}, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _files(self, step):
    top = os.path.join(checkpoint.checkpoint_dir(self.workdir), str(step))
    return {
      (os.path.relpath(os.path.join(d, f), top), os.path.getsize(os.path.join(d, f)))
      for d, _, files in os.walk(top)
      for f in files
    }

  def _run(self):
    while not self._stop.is_set():
      if os.path.isdir(checkpoint.checkpoint_dir(self.workdir)):
        for step in checkpoint.manager(self.workdir, read_only=True).all_steps():
          if step not in self.first_seen:
            self.first_seen[step] = self._files(step)
      time.sleep(0.02)

  def stop_and_check(self):
    """Every step listed while the processes wrote is the same, file for file and byte for
    byte, as it is now that they are done."""
    self._stop.set()
    self._thread.join()
    for step, seen in self.first_seen.items():
      assert seen == self._files(step), f"step {step} changed after --watch listed it"
    return sorted(self.first_seen)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """Final state of an uninterrupted 2-process run, computed once per pytest session (under
  pytest-xdist, by the first worker that needs it, under a lock)."""
  shared = tmp_path_factory.getbasetemp().parent  # common to all workers of the session
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    shared = tmp_path_factory.getbasetemp()
  saved = shared / "preemption_reference.npz"
  with filelock.FileLock(str(saved) + ".lock"):
    if not saved.exists():
      workdir = str(shared / "preemption_reference")
      _train(workdir)
      assert checkpoint.manager(workdir, read_only=True).all_steps() == [3, 6, 9, 12, 14]
      np.savez(str(saved) + ".tmp.npz", *_state(workdir))
      os.replace(str(saved) + ".tmp.npz", saved)
  with np.load(saved) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


def _preempt(procs, workdir, targets, gap, after, committed=0):
  """SIGTERM to the processes ``targets`` (``gap`` seconds apart) once step ``after`` is logged
  (and step ``committed`` saved); both must exit 143 naming the same saved step, which holds both
  data positions. Returns the step and the outputs."""
  _wait_for_step(procs, workdir, after, committed)
  for i, target in enumerate(targets):
    if i:
      time.sleep(gap)
    procs[target].send_signal(signal.SIGTERM)
  codes, outs = _finish(procs)
  assert codes == [143, 143], "\n".join(o[-3000:] for o in outs)
  saved = [SAVED.search(out) for out in outs]
  assert all(saved), "\n".join(o[-3000:] for o in outs)
  step = int(saved[0].group(1))
  assert int(saved[1].group(1)) == step  # both processes stopped at the same step
  assert "preemption notice" in outs[0] and "preemption notice" in outs[1]
  assert after <= step < STEPS
  assert checkpoint.manager(workdir, read_only=True).latest_step() == step
  assert _logged(procs, workdir)[-1] == step  # the step they agreed on was finished, then saved
  assert _data_files(workdir, step) == ["process_0-of-2.json", "process_1-of-2.json"]
  return step, outs


def _kill_one(procs, workdir, after, committed, resumed):
  """SIGKILL to process 1 once step ``after`` is logged and step ``committed`` saved: process 0
  must stop within the heartbeat timeout, naming task 1; the last complete checkpoint (a step at
  which process 1 died mid-write is not listed) holds both data positions; the launch had resumed
  at step ``resumed``. Returns the last complete step."""
  _wait_for_step(procs, workdir, after, committed)
  procs[1].kill()
  killed_at = time.time()
  codes, outs = _finish(procs, timeout=HEARTBEAT + SLACK)
  waited = time.time() - killed_at
  assert codes[1] == -signal.SIGKILL
  assert codes[0] != 0, outs[0][-3000:]
  assert waited < HEARTBEAT + SLACK, waited
  # JAX's coordination service names the lost process (task 1).
  assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1\b", outs[0]), outs[0][
    -3000:
  ]
  assert _resumed_at(outs[0]) == resumed
  last = checkpoint.manager(workdir, read_only=True).latest_step()
  assert last is not None and last % EVERY == 0 and committed <= last < STEPS, last
  assert _data_files(workdir, last) == ["process_0-of-2.json", "process_1-of-2.json"]
  return last


@pytest.mark.multidevice
def test_sigterm_sigkill_and_sigterm_to_both_each_resume_and_the_end_is_bit_identical(
  tmp_path, reference
):
  """One workdir, four launches: SIGTERM to process 1 only (the one that writes no logs;
  process 0 learns of it from the service alone), resume; SIGKILL to process 1 once the next
  checkpoint is committed, resume from the last complete one; SIGTERM to both a step apart,
  resume to the end: bit-identical to the uninterrupted run; checkpoints listed meanwhile never
  change."""
  workdir = str(tmp_path / "run")
  watcher = _Watcher(workdir)
  first, _ = _preempt(
    _start(workdir), workdir, targets=(1,), gap=0.0, after=STOP_AFTER, committed=EVERY
  )
  # The next checkpoint after ``first`` (4 or 5) is at 6: kill once it is committed.
  next_save = (first // EVERY + 1) * EVERY
  last = _kill_one(
    _start(workdir), workdir, after=next_save + 1, committed=next_save, resumed=first
  )
  procs = _start(workdir)
  second, outs = _preempt(procs, workdir, targets=(0, 1), gap=0.3, after=last + 1)
  assert _resumed_at(outs[0]) == last and second > last
  outs = _train(workdir)
  assert _resumed_at(outs[0]) == second
  listed = watcher.stop_and_check()
  assert {first, last, second, STEPS} <= set(listed), listed
  _assert_bit_identical(
    reference,
    _state(workdir),
    f"preempted at step {first}, killed after {last}, preempted at {second}",
  )
