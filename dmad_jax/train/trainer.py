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
from dmad_jax.data import images as images_lib
from dmad_jax.models import get_detector
from dmad_jax.train import checkpoint, preflight, sharding
from dmad_jax.train.optim import learning_rate_schedule, make_optimizer
from dmad_jax.train.state import TrainState, base_rng, create_train_state, variables_of
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
  """

  def __init__(self, step: int, checkpoint_dir: str):
    self.step = int(step)
    self.checkpoint_dir = checkpoint_dir
    super().__init__(
      f"stopped by SIGTERM: saved step {self.step} in {checkpoint_dir}; rerun the same command "
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
def _sample_batch(source, batch_size: int = 1) -> dict:
  """A batch of the first records, for shape inference at init."""
  recs = [source[i % len(source)] for i in range(batch_size)]
  return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


def _initial_template(config, train_source):
  """The background template's initial value from ``config.template_init``, or None.

  "zeros" keeps the model's zeros; "median" is the per-pixel median of (up to
  ``template_median_items``) training images; "bank" estimates one template per template index
  of a video source (``dmad_jax.data.video.template_bank`` with ``template_method`` and
  ``template_max_frames``); anything else is an image file path (read as gray and repeated to
  3 channels when the source reads gray frames, as DMAD reads bkg_avenue.jpg).
  """
  how = config.get("template_init", "zeros")
  if how in ("zeros", "", None):
    return None
  if how == "median":
    return data_lib.dataset_median(
      train_source, max_items=config.get("template_median_items", 2000)
    )
  if how == "bank":
    from dmad_jax.data.video import template_bank

    return template_bank(
      train_source,
      method=config.get("template_method", "hist_mode"),
      max_frames=config.get("template_max_frames", None),
    )
  h, w, c = train_source.image_shape
  if getattr(train_source, "gray", False) and c == 3:
    img = np.repeat(images_lib.load_image(how, image_size=h, channels=1), 3, axis=-1)
  else:
    img = images_lib.load_image(how, image_size=h, channels=c)
  return images_lib.to_unit_range(img)


def _write_config(config, workdir):
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write(
      config.to_json_best_effort(indent=2)
      if hasattr(config, "to_json_best_effort")
      else json.dumps(dict(config), indent=2, default=str)
    )


def make_state(config, detector, sample_batch, total_steps):
  """Initial TrainState (params, BatchNorm statistics, optimizer) for ``config``."""
  init_rng, train_rng = base_rng(config.seed)
  params_shape = jax.eval_shape(detector.init, init_rng, sample_batch)["params"]
  # A detector may bring its own optimizer (e.g. one optax state per player of a GAN).
  make_tx = getattr(detector, "make_optimizer", make_optimizer)
  tx = make_tx(config.optimizer, total_steps, params_shape)
  return create_train_state(
    detector, tx, init_rng, train_rng, sample_batch, param_dtype=config.get("param_dtype", None)
  )


def initial_state(config, detector, sample_batch, total_steps, template=None):
  """The state of step 0: ``make_state`` plus the background template when there is one.

  Pure (the template is a constant), so ``jax.jit(..., out_shardings=...)`` creates it sharded.
  """
  state = make_state(config, detector, sample_batch, total_steps)
  if template is not None and "template" in state.params:
    from dmad_jax.models.pdm import set_template

    state = state.replace(params=set_template(state.params, jnp.asarray(template)))
  return state


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
  if hasattr(detector, "value_and_grad"):
    # Gradients that are not those of one loss (a GAN: each player's of its own loss).
    (loss, (terms, batch_stats)), grads = detector.value_and_grad(
      state.params, state.batch_stats, batch, rng
    )
  else:

    def loss_fn(params):
      return detector.loss(params, state.batch_stats, batch, rng)

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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


def calibrate_state(state: TrainState, detector, source, *, batch_size: int, data_sh):
  """``state`` with ``detector.calibrate``'s statistics of the training split (e.g. DAAD+'s
  score scaling), so they are saved with the checkpoint; detectors without it pass through.
  The new statistics keep the shardings of the old ones."""
  calibrate = getattr(detector, "calibrate", None)
  if calibrate is None:
    return state
  batches = data_lib.make_eval_batches(
    source,
    global_batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  stats = calibrate(variables_of(state), (sharding.global_batch(b, data_sh) for b in batches))
  stats = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), stats, state.batch_stats)
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
  Scalars go to TensorBoard (when available) and ``<workdir>/metrics.jsonl``. With
  ``config.eval_at_end`` the eval job runs on the final checkpoint.

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
  preflight.check_config(config)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  total_steps = int(config.total_steps)
  mesh = sharding.make_mesh(config.get("mesh", None))
  sharding.check_batch_size(config.batch_size, mesh)
  rep, data_sh = sharding.replicated(mesh), sharding.data_sharding(mesh)

  # Data.
  sources = data_lib.get_sources(config.data)
  train_source = sources["train"]
  log.info("train data: %s", train_source.describe())
  it = data_lib.make_train_iterator(
    train_source,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  # Model, optimizer, state.
  detector = get_detector(config)
  sample = _sample_batch(train_source)
  mngr = checkpoint.manager(workdir, max_to_keep=config.get("keep_checkpoints", 3))
  latest = mngr.latest_step()
  if latest is not None and latest > total_steps:
    raise ValueError(
      f"{checkpoint.checkpoint_dir(workdir)} holds step {latest}, beyond total_steps "
      f"{total_steps} of this config: use a new workdir or a larger total_steps"
    )
  # The state's shardings come from its abstract shape; it is created (or restored) directly
  # in them, never first on one device.
  template = None if latest is not None else _initial_template(config, train_source)
  init_fn = functools.partial(initial_state, config, detector, sample, total_steps, template)
  abstract = jax.eval_shape(init_fn)
  state_sh = sharding.state_shardings(
    abstract, mesh, fsdp_min_size=config.get("fsdp_min_size", 2**18)
  )
  if latest is not None:
    state = checkpoint.restore(
      mngr, latest, sharding.with_shardings(abstract, state_sh), it, config=config
    )
    log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), latest)
  else:
    state = jax.jit(init_fn, out_shardings=state_sh)()
  if is_main:
    _write_config(config, workdir)
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
    functools.partial(train_step, detector=detector, lr_schedule=lr_schedule),
    in_shardings=(state_sh, data_sh),
    out_shardings=(state_sh, rep),
    donate_argnums=0,
  )

  start = int(state.step)
  log_every = max(1, int(config.log_every_steps))
  ckpt_every = max(1, int(config.checkpoint_every_steps))
  eval_bs = int(config.get("eval", {}).get("batch_size", 64))
  skip_nonfinite = config.get("nonfinite", "stop") == "skip"
  skipped = 0
  losses = []
  t_last, step_last = time.time(), start
  with _StopOnSigterm() as sigterm:
    for step in range(start + 1, total_steps + 1):
      batch = sharding.global_batch(next(it), data_sh)
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
        writer.write_scalars(step, scalars)
        log.info(
          "step %d/%d | loss %.4f | %.2f steps/s | ETA %s",
          step,
          total_steps,
          scalars["loss_mean"],
          rate,
          _format_eta((total_steps - step) / rate),
        )
        losses = []
        t_last, step_last = now, step
      # Preemption: SIGTERM on one process; on several, orbax's preemption sync point, which
      # every process reaches at the same step, so that they all save that step.
      stop = sigterm.received or (jax.process_count() > 1 and mngr.reached_preemption(step))
      if step % ckpt_every == 0 or step == total_steps:
        # Not for a preemption-only save: its grace period is short and the resumed run
        # calibrates at its next checkpoint.
        state = calibrate_state(state, detector, train_source, batch_size=eval_bs, data_sh=data_sh)
      if step % ckpt_every == 0 or step == total_steps or stop:
        checkpoint.save(mngr, step, state, it)
      if stop:
        mngr.wait_until_finished()
        writer.close()
        raise TrainingInterrupted(step, checkpoint.checkpoint_dir(workdir))

  mngr.wait_until_finished()
  writer.close()
  if config.get("eval_at_end", False):
    from dmad_jax.evaluation.job import evaluate

    evaluate(config, workdir)
  return state
