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
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview

from dmad_jax import data as data_lib
from dmad_jax.data import images as images_lib
from dmad_jax.models import get_detector
from dmad_jax.train import checkpoint, sharding
from dmad_jax.train.optim import learning_rate_schedule, make_optimizer
from dmad_jax.train.state import TrainState, base_rng, create_train_state
from dmad_jax.train.writers import MetricWriter

log = logging.getLogger("dmad_jax")


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; the state was not updated."""


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
  ``template_median_items``) training images; anything else is an image file path.
  """
  how = config.get("template_init", "zeros")
  if how in ("zeros", "", None):
    return None
  if how == "median":
    return data_lib.dataset_median(
      train_source, max_items=config.get("template_median_items", 2000)
    )
  h, w, c = train_source.image_shape
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
  tx = make_optimizer(config.optimizer, total_steps, params_shape)
  return create_train_state(detector, tx, init_rng, train_rng, sample_batch)


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


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains ``config.model_name`` on ``config.data`` and checkpoints into ``workdir``.

  Resumes from the latest checkpoint in ``<workdir>/checkpoints`` when there is one (model,
  optimizer, step and the data iterator position). Scalars go to TensorBoard (when available)
  and ``<workdir>/metrics.jsonl``. With ``config.eval_at_end`` the eval job runs on the final
  checkpoint.

  Args:
    config: an ml_collections ConfigDict (see configs/).
    workdir: run directory.

  Returns:
    The final TrainState.

  Raises:
    NonFiniteLossError: when the loss becomes non-finite and ``config.nonfinite == "stop"``.
    ValueError: on inconsistent configs (e.g. a batch size not divisible by the device count).
  """
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
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
  state = make_state(config, detector, sample, total_steps)
  mngr = checkpoint.manager(workdir, max_to_keep=config.get("keep_checkpoints", 3))
  latest = mngr.latest_step()
  if latest is not None and latest > total_steps:
    raise ValueError(
      f"{checkpoint.checkpoint_dir(workdir)} holds step {latest}, beyond total_steps "
      f"{total_steps} of this config: use a new workdir or a larger total_steps"
    )
  if latest is not None:
    state = checkpoint.restore(mngr, latest, checkpoint.abstract(state), it)
    log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), latest)
  else:
    template = _initial_template(config, train_source)
    if template is not None and "template" in state.params:
      from dmad_jax.models.pdm import set_template

      state = state.replace(params=set_template(state.params, template))
  # Parameters and optimizer state live on every device; batches are split over "data".
  state = jax.device_put(state, rep)
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
    in_shardings=(rep, data_sh),
    out_shardings=(rep, rep),
    donate_argnums=0,
  )

  start = int(state.step)
  log_every = max(1, int(config.log_every_steps))
  ckpt_every = max(1, int(config.checkpoint_every_steps))
  skip_nonfinite = config.get("nonfinite", "stop") == "skip"
  skipped = 0
  losses = []
  t_last, step_last = time.time(), start
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
          f"config.nonfinite='skip' to skip such updates, then rerun the same command to resume."
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
    if step % ckpt_every == 0 or step == total_steps:
      checkpoint.save(mngr, step, state, it)

  mngr.wait_until_finished()
  writer.close()
  if config.get("eval_at_end", False):
    from dmad_jax.evaluation.job import evaluate

    evaluate(config, workdir)
  return state
