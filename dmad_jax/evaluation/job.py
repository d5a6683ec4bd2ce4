"""The eval job: restore a checkpoint, score the test split exactly once, write AUROC and figures.

Stands apart from training (it only shares the checkpoint module and the state structure), so it
can run on another machine, on an old checkpoint, or ``--watch`` a workdir while training runs.

Outputs in ``<workdir>/eval/``: ``metrics.json`` (latest evaluation) and ``metrics_<step>.json``,
``metrics.jsonl`` and TensorBoard events (clu), ``scores_<step>.npz`` (per-sample scores, labels,
indices), ``panel_<step>.png`` (DMAD Fig. 6: input, reference, coarse, fine, anomaly map) and
``histogram_<step>.png`` (normal vs anomalous scores).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from dmad_jax import data as data_lib
from dmad_jax.evaluation import figures, metrics, video
from dmad_jax.models import get_detector
from dmad_jax.train import checkpoint, sharding
from dmad_jax.train.state import variables_of
from dmad_jax.train.trainer import _sample_batch, make_state
from dmad_jax.train.writers import MetricWriter

log = logging.getLogger("dmad_jax")


def _abstract_state(config, detector, sample):
  return jax.eval_shape(lambda: make_state(config, detector, sample, int(config.total_steps)))


def _pick_figure_rows(labels, n_per_class):
  """Indices of the first ``n_per_class`` normal and anomalous samples."""
  normal = np.flatnonzero(labels == 0)[:n_per_class]
  anomalous = np.flatnonzero(labels == 1)[:n_per_class]
  return np.concatenate([normal, anomalous])


def _video_errors(eval_cfg, scores):
  """Per-frame errors for the video recipe: the model's official errors ("ped2_*" scores) for
  the dmad_* recipes, the fused image score for "none"."""
  if eval_cfg.get("recipe", "none") == "none":
    return {"score": scores["score"]}
  return {k[len("ped2_") :]: v for k, v in scores.items() if k.startswith("ped2_")}


def _video_metrics(eval_cfg, scores, labels, indices, video_lengths):
  """Frame AUROC (micro and macro) of the test videos under ``eval.recipe``."""
  order = np.argsort(indices)
  errors = _video_errors(eval_cfg, {k: v[order] for k, v in scores.items()})
  recipe = eval_cfg.get("recipe", "none")
  frame_scores = video.score_frames(errors, video_lengths=video_lengths, recipe=recipe)
  out = video.frame_auroc(frame_scores, labels[order], video_lengths)
  out["recipe"] = recipe
  return out


def evaluate(config, workdir: str, step: int | None = None) -> dict:
  """Evaluates one checkpoint of ``workdir`` on the test split of ``config.data``.

  Args:
    config: the training config (the eval reads ``config.eval``: ``batch_size``,
      ``figure_samples`` per class).
    workdir: the training run directory.
    step: checkpoint step; None = the latest.

  Returns:
    The metrics dict (``image_AUROC`` and per-score AUROCs, ``step``, sample counts).

  Raises:
    FileNotFoundError: when ``workdir`` has no checkpoint (or not ``step``).
  """
  workdir = os.path.abspath(workdir)
  eval_cfg = config.get("eval", {})
  batch_size = int(eval_cfg.get("batch_size", 64))
  n_fig = int(eval_cfg.get("figure_samples", 6))
  mngr = checkpoint.manager(workdir, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}")
  step = max(steps) if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(
      f"no checkpoint for step {step} in {checkpoint.checkpoint_dir(workdir)} (have {steps})"
    )

  sources = data_lib.get_sources(config.data)
  test = sources["test"]
  detector = get_detector(config)
  state = checkpoint.restore(
    mngr, step, _abstract_state(config, detector, _sample_batch(sources["train"]))
  )
  mesh = sharding.make_mesh(config.get("mesh", None))
  sharding.check_batch_size(batch_size, mesh)
  rep, data_sh = sharding.replicated(mesh), sharding.data_sharding(mesh)
  variables = jax.device_put(variables_of(state), rep)
  predict = jax.jit(detector.predict, in_shardings=(rep, data_sh), out_shardings=rep)

  # Score every test record exactly once: padded rows of the last batch are masked out.
  t0 = time.time()
  scores, labels, indices = {}, [], []
  fig_images, fig_maps, fig_labels, fig_scores = {}, {}, [], []
  for batch in data_lib.make_eval_batches(
    test,
    global_batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    mask = batch.pop(data_lib.MASK_KEY)
    out = jax.device_get(predict(variables, sharding.global_batch(batch, data_sh)))
    for k, v in out["scores"].items():
      scores.setdefault(k, []).append(np.asarray(v)[mask])
    labels.append(batch["label"][mask])
    indices.append(batch["index"][mask])
    # Keep pictures only until the figure has its first samples of each class.
    kept = np.concatenate(fig_labels) if fig_labels else np.zeros((0,), np.int32)
    if min((kept == 0).sum(), (kept == 1).sum()) < n_fig:
      fig_labels.append(labels[-1])
      fig_scores.append(scores["score"][-1])
      for k, v in out["images"].items():
        fig_images.setdefault(k, []).append(np.asarray(v)[mask])
      for k, v in out["maps"].items():
        fig_maps.setdefault(k, []).append(np.asarray(v)[mask])
  labels = np.concatenate(labels)
  indices = np.concatenate(indices)
  scores = {k: np.concatenate(v) for k, v in scores.items()}
  seconds = time.time() - t0
  if np.sort(indices).tolist() != list(range(len(test))):
    raise RuntimeError("eval did not score every test sample exactly once")

  result = metrics.auroc_report(
    {k: v for k, v in scores.items() if k in ("score", "rec", "df")}, labels
  )
  video_lengths = getattr(test, "video_lengths", None)
  if video_lengths is not None:
    result.update(_video_metrics(eval_cfg, scores, labels, indices, video_lengths))
  result.update(
    step=int(step),
    num_test=int(len(labels)),
    num_normal=int((labels == 0).sum()),
    num_anomalous=int((labels == 1).sum()),
    eval_seconds=seconds,
  )

  if jax.process_index() == 0:
    outdir = os.path.join(workdir, "eval")
    os.makedirs(outdir, exist_ok=True)
    for name in ("metrics.json", f"metrics_{step}.json"):
      with open(os.path.join(outdir, name), "w") as f:
        json.dump(result, f, indent=2)
    np.savez(os.path.join(outdir, f"scores_{step}.npz"), labels=labels, index=indices, **scores)
    if video_lengths is not None:
      order = np.argsort(indices)
      errors = _video_errors(eval_cfg, {k: v[order] for k, v in scores.items()})
      # The format `dmad video-auc --scores` reads, to try other recipes without the model.
      np.savez(
        os.path.join(outdir, f"video_errors_{step}.npz"), video_lengths=video_lengths, **errors
      )
      result["video_plot"] = video.plot_video_scores(
        os.path.join(outdir, f"videos_{step}.png"),
        video.score_frames(errors, video_lengths=video_lengths, recipe=eval_cfg["recipe"]),
        labels[order],
        video_lengths,
        title=f"step {step}, recipe {eval_cfg['recipe']}: frame AUROC "
        f"{result['frame_AUROC_micro']:.4f}",
      )
    writer = MetricWriter(outdir)
    writer.write_scalars(
      step, {k: v for k, v in result.items() if k != "step" and not isinstance(v, str)}
    )
    writer.close()
    fig_labels = np.concatenate(fig_labels)
    rows = _pick_figure_rows(fig_labels, n_fig)
    # jit returns dicts with sorted keys; show the pictures in the model's own order.
    order = list(getattr(detector, "figure_rows", sorted(fig_images)))
    imgs = {k: np.concatenate(fig_images[k])[rows] for k in order}
    maps_ = {f"anomaly map ({k})": np.concatenate(v)[rows] for k, v in fig_maps.items()}
    result["panel"] = figures.deformation_panel(
      os.path.join(outdir, f"panel_{step}.png"),
      imgs,
      labels=fig_labels[rows],
      scores=np.concatenate(fig_scores)[rows],
      maps=maps_,
      title=f"{config.model_name} step {step}: image AUROC {result['image_AUROC']:.4f}",
    )
    result["histogram"] = figures.score_histogram(
      os.path.join(outdir, f"histogram_{step}.png"),
      scores["score"],
      labels,
      title=f"step {step}",
    )
    log.info("eval step %d: %s", step, json.dumps({k: result[k] for k in sorted(result)}))
  return result


def watch(
  config, workdir: str, *, poll_seconds: float = 30.0, timeout_seconds: float | None = None
):
  """Evaluates every new checkpoint of ``workdir`` until the final step has been evaluated.

  Returns:
    dict step -> metrics of every evaluated checkpoint.
  """
  final = int(config.total_steps)
  done: dict[int, dict] = {}
  t0 = time.time()
  while final not in done:
    mngr = checkpoint.manager(workdir, read_only=True)
    for step in sorted(set(mngr.all_steps()) - set(done)):
      done[step] = evaluate(config, workdir, step)
    if final in done:
      break
    if timeout_seconds is not None and time.time() - t0 > timeout_seconds:
      raise TimeoutError(f"watch: no checkpoint of step {final} after {timeout_seconds} s")
    time.sleep(poll_seconds)
  return done
