"""The training loop: ``train_and_evaluate(config, workdir)``.

Read top to bottom: setup (data, model, optimizer, resume), the jitted train step, the loop
(log, checkpoint), and the optional evaluation at the end. The entry point (``dmad train``),
the notebooks and the tests all call this same function.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview

from dmad_jax import data as data_lib
from dmad_jax.data import templates
from dmad_jax.evaluation.inference import Runner
from dmad_jax.models import base as models_base
from dmad_jax.models import get_detector
from dmad_jax.ops import cpu_kernels
from dmad_jax.train import checkpoint, distributed, durations, host_memory, preflight, sharding
from dmad_jax.train import state as state_lib
from dmad_jax.train.optim import learning_rate_schedule
from dmad_jax.train.state import TrainState, variables_of
from dmad_jax.train.writers import MetricWriter

log = logging.getLogger("dmad_jax")


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; the state was not updated."""


class TrainingInterrupted(Exception):
  """SIGTERM (or a multi-host preemption notice) stopped training after saving a checkpoint.

  The process may exit: rerunning the same command resumes from ``step`` and ends with the
  parameters an uninterrupted run would have. ``dmad train`` prints the message and exits with
  status 143 (128 + SIGTERM), so that schedulers and ``&&`` chains see an unfinished run.

  Attributes:
    step: the step saved last.
    checkpoint_dir: where it was saved.
    reason: what stopped it ("SIGTERM", or the multi-host preemption notice).
  """

  def __init__(self, step: int, checkpoint_dir: str, reason: str = "SIGTERM"):
    self.step = int(step)
    self.checkpoint_dir = checkpoint_dir
    self.reason = reason
    super().__init__(
      f"stopped by {reason}: saved step {self.step} in {checkpoint_dir}; rerun the same command "
      "to resume"
    )


class _StopOnSigterm:
  """Within the ``with`` block, SIGTERM sets ``received`` instead of killing the process.

  The loop then finishes its step, saves a checkpoint at that step, waits for the write and
  raises :class:`TrainingInterrupted`. The handler is installed only from the main thread (the
  only one Python lets set handlers; a loop run from another thread keeps the default) and only
  in a single-process run: with several processes, JAX's preemption service owns SIGTERM and
  the loop asks ``CheckpointManager.reached_preemption`` instead, so that every process stops
  at the same step. The previous handler is restored on exit.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self._installed = False

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True  # Only a flag: the loop logs and saves between steps.

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc_info):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
    if self.received:
      log.warning("SIGTERM received: the last step was saved before stopping")
    return False


# ---------------------------------------------------------------------------------------------
# Setup helpers.
# ---------------------------------------------------------------------------------------------
def data_init_value(detector, source):
  """The value the detector's ``data_init`` asks for, estimated from the training ``source``
  (None when it asks for none)."""
  request = detector.data_init()
  if request is None:
    return None
  if isinstance(request, models_base.MedianImage):
    return data_lib.dataset_median(source, max_items=request.max_items)
  if isinstance(request, models_base.TemplateBank):
    return templates.template_bank(source, method=request.method, max_frames=request.max_frames)
  if isinstance(request, models_base.ImageFile):
    return templates.image_template(request.path, source)
  raise TypeError(f"{detector.name}: data_init() returned an unknown request {request!r}")


def _write_config(config, workdir):
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write(
      config.to_json_best_effort(indent=2)
      if hasattr(config, "to_json_best_effort")
      else json.dumps(dict(config), indent=2, default=str)
    )


# ---------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------
def train_step(state: TrainState, batch: dict, *, detector, lr_schedule):
  """One optimizer step. Returns (new state, metrics).

  The per-step key is the run key folded with the step, so a resumed run draws the same keys.
  A non-finite loss or gradient leaves params, BatchNorm statistics and optimizer state
  untouched (only the step advances); the host then stops or skips, per the config.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, (terms, batch_stats)), grads = detector.value_and_grad(
    state.params, state.batch_stats, batch, rng
  )
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), updated, state)
  new_state = new_state.replace(step=state.step + 1)
  metrics = dict(terms)
  metrics.update(
    loss=loss,
    grad_norm=grad_norm,
    param_norm=optax.tree.norm(state.params),
    lr=lr_schedule(state.step),
    finite=finite,
  )
  return new_state, metrics


def fit_statistics(state: TrainState, detector, source, runner) -> TrainState:
  """``state`` with the detector's statistics of the training split (``Detector.statistics``,
  e.g. DAAD+'s score ranges) in ``batch_stats["score_stats"]``, so that they are saved with the
  checkpoint. They keep the shardings of the values they replace."""
  rows, _ = runner.collect(variables_of(state), source)
  stats = models_base.reduce_statistics(rows)
  old = state.batch_stats.get(models_base.STATISTICS, {})
  if set(old) != set(stats):
    raise ValueError(
      f"{detector.name}: init() declares batch_stats[{models_base.STATISTICS!r}] with keys "
      f"{sorted(old)}, but statistics() fits {sorted(stats)}: declare every one in init()"
    )
  stats = jax.tree.map(lambda new, o: jax.device_put(new.astype(o.dtype), o.sharding), stats, old)
  return state.replace(batch_stats={**state.batch_stats, models_base.STATISTICS: stats})


class DataFitter:
  """Runs :meth:`Detector.fit_to_data` on the training split: one :class:`Runner` (jitted once)
  per function the detector collects with, the state's shardings for the variables."""

  def __init__(self, detector, source, *, mesh, variables_sharding, batch_size: int):
    self.detector, self.source = detector, source
    self._runner = functools.partial(
      Runner, mesh=mesh, variables_sharding=variables_sharding, batch_size=batch_size, keep=()
    )
    self._runners = {}

  def __call__(self, state: TrainState) -> TrainState:
    """``state`` with the fitted values in place of those ``batch_stats`` held (same shardings
    and dtypes)."""
    variables = variables_of(state)

    def collect(fn):
      if fn not in self._runners:
        self._runners[fn] = self._runner(fn)
      rows, _ = self._runners[fn].collect(variables, self.source)
      return rows

    fitted = self.detector.fit_to_data(variables, collect)
    stats = dict(state.batch_stats)
    for key, values in fitted.items():
      old = stats.get(key)
      want = None if old is None else jax.tree.map(lambda a: tuple(a.shape), old)
      got = jax.tree.map(lambda a: tuple(np.shape(a)), values)
      if want != got:
        raise ValueError(
          f"{self.detector.name}: fit_to_data() returned batch_stats[{key!r}] of shapes {got}, "
          f"but init() declares {want}"
        )
      for name, value in values.items():
        if not np.all(np.isfinite(value)):
          raise ValueError(
            f"{self.detector.name}: {key}/{name} fitted to the training split is not finite: "
            f"{value}"
          )
      stats[key] = jax.tree.map(
        lambda new, o: jax.device_put(np.asarray(new, o.dtype), o.sharding), values, old
      )
    return state.replace(batch_stats=stats)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains ``config.model_name`` on ``config.data`` and checkpoints into ``workdir``.

  Resumes from the latest checkpoint in ``<workdir>/checkpoints`` when there is one (model,
  optimizer, PRNG key, step and the data iterator position, all from the same step), so a run
  killed at any moment and restarted ends with exactly the parameters of an uninterrupted one.
  Durations given in epochs are converted to steps from the training split's size (logged, and
  written to ``<workdir>/plan.json``). Scalars go to TensorBoard (when available) and
  ``<workdir>/metrics.jsonl``. With ``config.eval_at_end`` the eval job runs on the final
  checkpoint.

  Args:
    config: an ml_collections ConfigDict (see configs/).
    workdir: run directory.

  Returns:
    The final TrainState.

  Raises:
    NonFiniteLossError: when the loss becomes non-finite and ``config.nonfinite == "stop"``
      (the checkpoints already saved are kept; the message names the step, the non-finite
      terms and how to continue).
    TrainingInterrupted: on SIGTERM, after saving the current step (rerun to resume).
    ValueError: on inconsistent configs (unknown keys, impossible sizes, a batch size not
      divisible by the device count), bad data files, or a workdir holding a checkpoint of
      another model; raised before anything in ``workdir`` is modified.
  """
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  # Config problems fail before anything is read or written; config.json is (re)written only
  # once the state exists, so a failed start never replaces the config of a run's checkpoints.
  detector = get_detector(config)
  preflight.check_config(config, detector)
  mesh = sharding.make_mesh(config.get("mesh", None))
  sharding.check_batch_size(config.batch_size, mesh)
  rep, data_sh = sharding.replicated(mesh), sharding.data_sharding(mesh)
  eval_bs = int(config.get("eval", {}).get("batch_size", 64))

  # Data, and the run's durations in steps.
  train_source = data_lib.get_source(config.data, "train")
  log.info("train data: %s", train_source.describe())
  # The test split is opened (and, with data.validate, checked) now too, so that a bad test file
  # or label file stops the run at start-up rather than at its first evaluation.
  log.info("test data: %s", data_lib.get_source(config.data, "test").describe())
  plan = durations.plan(config, len(train_source))
  log.info("training plan: %s", plan.describe())
  total_steps = plan.total_steps
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  it = data_lib.make_train_iterator(
    train_source,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  # State: created (or restored) directly in its shardings, which come from its abstract shape.
  spec = train_source.element_spec
  mngr = checkpoint.manager(workdir, max_to_keep=config.get("keep_checkpoints", 3))
  latest = mngr.latest_step()
  if latest is not None and latest > total_steps:
    raise ValueError(
      f"{checkpoint.checkpoint_dir(workdir)} holds step {latest}, beyond the {total_steps} "
      f"steps this config plans ({plan.describe()}): use a new workdir or a longer run"
    )
  # One trace of the detector's init gives the shapes of the optimizer and of the state.
  shapes = state_lib.abstract_variables(config, detector, spec)
  tx = state_lib.optimizer(config, detector, spec, total_steps, shapes["params"])
  abstract = state_lib.abstract(config, detector, spec, tx, variables=shapes)
  state_sh = state_lib.shardings(abstract, mesh, config)
  if latest is not None:
    state = checkpoint.restore(
      mngr, latest, sharding.with_shardings(abstract, state_sh), it, config=config
    )
    log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), latest)
  else:
    init_value = data_init_value(detector, train_source)
    init_fn = functools.partial(state_lib.create, config, detector, spec, tx, init_value)
    init_fn = cpu_kernels.traced_for_devices(init_fn, mesh.devices.flat)
    state = jax.jit(init_fn, out_shardings=state_sh)()
    if config.get("init_from", None):
      state = state_lib.with_values_from_run(state, config.init_from)
      log.info("initial values from %s: %s", config.init_from.workdir, config.init_from.assign)
  if is_main:
    _write_config(config, workdir)
    durations.save(workdir, plan)
  host_memory.release()  # what building the state left behind (init traces, restore buffers)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  log.info("model %s: %s trainable parameters", config.model_name, f"{n_params:,}")
  if is_main and latest is None:
    log.info(
      "parameters:\n%s",
      parameter_overview.get_parameter_overview(state.params, include_stats=False),
    )

  writer = MetricWriter(workdir, enabled=is_main)
  if latest is None:
    writer.write_hparams({"num_params": n_params, "batch_size": config.batch_size})
  lr_schedule = learning_rate_schedule(config.optimizer, total_steps)
  step_fn = jax.jit(
    cpu_kernels.traced_for_devices(
      functools.partial(train_step, detector=detector, lr_schedule=lr_schedule),
      mesh.devices.flat,
    ),
    in_shardings=(state_sh, data_sh),
    out_shardings=(state_sh, rep),
    donate_argnums=0,
  )
  fitter = None
  if detector.fits_data:
    fitter = DataFitter(
      detector,
      train_source,
      mesh=mesh,
      variables_sharding=variables_of(state_sh),
      batch_size=eval_bs,
    )
  statistics = None
  if detector.fits_statistics:
    statistics = Runner(
      detector.statistics,
      mesh=mesh,
      variables_sharding=variables_of(state_sh),
      batch_size=eval_bs,
      keep=(),
    )

  start = int(state.step)
  log_every, ckpt_every = plan.log_every_steps, plan.checkpoint_every_steps
  skip_nonfinite = config.get("nonfinite", "stop") == "skip"
  skipped = 0
  losses = []
  t_last, step_last = time.time(), start
  with _StopOnSigterm() as sigterm:
    for step in range(start + 1, total_steps + 1):
      # The detector's fit to the training split before step 1 and then before every step that
      # follows a multiple of refit_every: a function of the step alone, so a resumed run fits
      # where the uninterrupted one did (the values are saved with the state).
      refit = plan.refit_every_steps
      if fitter is not None and (step == 1 or (refit and (step - 1) % refit == 0)):
        state = fitter(state)
      batch = sharding.global_batch(next(it), data_sh)
      if step == start + 1:
        # Compiled ahead, so that what compiling freed is returned before the first step runs
        # (dmad_jax.train.host_memory).
        step_fn = distributed.compiled_everywhere(
          step_fn, state, batch, name="train_step", always=True
        )
        host_memory.release()
      state, metrics = step_fn(state, batch)
      loss, finite = jax.device_get((metrics["loss"], metrics["finite"]))
      if not finite:
        bad = {k: float(v) for k, v in jax.device_get(metrics).items() if not np.isfinite(v)}
        if not skip_nonfinite:
          last_good = mngr.latest_step()
          mngr.wait_until_finished()
          writer.close()
          raise NonFiniteLossError(
            f"non-finite training loss at step {step}: {bad}. The parameters were not updated "
            f"by this step; the last checkpoint is step {last_good} in "
            f"{checkpoint.checkpoint_dir(workdir)}. Lower optimizer.lr or set "
            f"config.nonfinite='skip' to skip such updates, then rerun the same command to "
            f"resume."
          )
        skipped += 1
        log.warning("step %d: non-finite %s, update skipped (%d so far)", step, bad, skipped)
      else:
        losses.append(float(loss))

      if step % log_every == 0 or step == total_steps:
        now = time.time()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
        scalars["loss_mean"] = float(np.mean(losses)) if losses else float("nan")
        scalars["steps_per_sec"] = rate
        scalars["skipped_updates"] = skipped
        scalars["epoch"] = step * plan.batch_size / plan.train_records
        writer.write_scalars(step, scalars)
        log.info(
          "step %d/%d (epoch %.2f) | loss %.4f | %.2f steps/s | ETA %s",
          step,
          total_steps,
          scalars["epoch"],
          scalars["loss_mean"],
          rate,
          _format_eta((total_steps - step) / rate),
        )
        losses = []
        t_last, step_last = now, step
      # Preemption: SIGTERM on one process; on several, orbax's preemption sync point, which
      # every process reaches at the same step, so that they all save that step.
      stop = sigterm.received or (jax.process_count() > 1 and mngr.reached_preemption(step))
      if statistics is not None and (step % ckpt_every == 0 or step == total_steps):
        # Not for a preemption-only save: its grace period is short and the resumed run fits
        # the statistics at its next checkpoint.
        state = fit_statistics(state, detector, train_source, statistics)
      if step % ckpt_every == 0 or step == total_steps or stop:
        checkpoint.save(mngr, step, state, it)
      if stop:
        mngr.wait_until_finished()
        writer.close()
        reason = "SIGTERM"
        if jax.process_count() > 1:
          reason = f"a preemption notice (SIGTERM to any of the {jax.process_count()} processes)"
        raise TrainingInterrupted(step, checkpoint.checkpoint_dir(workdir), reason)

  mngr.wait_until_finished()
  writer.close()
  if config.get("eval_at_end", False):
    from dmad_jax.evaluation.job import evaluate

    evaluate(config, workdir)
  return state
