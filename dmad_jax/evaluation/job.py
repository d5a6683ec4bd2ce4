"""The eval job: restore a checkpoint, score the test split exactly once, write AUROC and figures.

Stands apart from training (it only shares the checkpoint module and the state structure), so it
can run on another machine, on an old checkpoint, or ``--watch`` a workdir while training runs.

Outputs in ``<workdir>/eval/``: ``metrics.json`` (latest evaluation) and ``metrics_<step>.json``,
``metrics.jsonl`` and TensorBoard events (clu), ``scores_<step>.npz`` (per-sample scores, labels,
indices), ``panel_<step>.png`` (DMAD Fig. 6: input, reference, coarse, fine, anomaly map) and
``histogram_<step>.png`` (normal vs anomalous scores).

When the test records carry ground-truth masks (key ``"mask"``, MVTec layout with
``ground_truth/``), the detector's pixel map ``out["maps"][detector.pixel_map]`` (default
``"rec"``) is also scored: ``pixel_AUROC`` (all pixels pooled), ``pixel_AUPRO`` (pooled MVTec AD
definition, FPR limit ``eval.aupro_fpr_limit`` = 0.3) and ``pixel_AUPRO_rd4ad`` (RD4AD's per-image
variant, see `metrics.aupro_rd4ad`), with ``pixel_map`` naming the map; ``heatmaps_<step>.png``
overlays the maps on the images with the ground-truth contours, and with ``eval.save_pixel_maps``
the maps, masks and indices are saved to ``pixel_maps_<step>.npz`` (float32, ~4 bytes per pixel).

Decision threshold (:mod:`dmad_jax.evaluation.calibration`): with a ``calibration`` section in the
config, the step's threshold is fitted on the named split and stored in its checkpoint directory
when it is missing or was made with other settings; with a stored threshold the metrics add
``threshold``, ``threshold_method``, ``threshold_split`` and ``threshold_precision`` / ``_recall``
/ ``_F1`` / ``_FPR`` on the test labels (reported, never used to fit).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from dmad_jax import data as data_lib
from dmad_jax.evaluation import calibration, figures, metrics, video
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


def _rows_still_needed(kept_labels, batch_labels, n_per_class):
  """Rows of a batch that the figure still needs, given the labels of the rows kept so far:
  in order, while their class has fewer than ``n_per_class`` kept rows."""
  have = {c: int((kept_labels == c).sum()) for c in (0, 1)}
  rows = []
  for i, c in enumerate(np.asarray(batch_labels).tolist()):
    if c in have and have[c] < n_per_class:
      have[c] += 1
      rows.append(i)
  return np.asarray(rows, np.int64)


def _video_errors(eval_cfg, scores):
  """Per-frame errors for the video recipe: the model's official errors for the dmad_* recipes
  (scores named with ``video.ERROR_PREFIX``, e.g. "ped2_*"), the fused image score for "none"."""
  recipe = eval_cfg.get("recipe", "none")
  if recipe == "none":
    return {"score": scores["score"]}
  prefix = video.ERROR_PREFIX[recipe]
  return {k[len(prefix) :]: v for k, v in scores.items() if k.startswith(prefix)}


def _video_metrics(eval_cfg, scores, labels, indices, video_lengths):
  """Frame AUROC (micro and macro) of the test videos under ``eval.recipe``."""
  order = np.argsort(indices)
  errors = _video_errors(eval_cfg, {k: v[order] for k, v in scores.items()})
  recipe = eval_cfg.get("recipe", "none")
  frame_scores = video.score_frames(errors, video_lengths=video_lengths, recipe=recipe)
  out = video.frame_auroc(frame_scores, labels[order], video_lengths)
  out["recipe"] = recipe
  return out


def _pixel_metrics(maps, masks, fpr_limit):
  """Pixel AUROC / AUPRO of the collected maps; a metric that is undefined on these inputs (no
  anomalous pixel, or the RD4AD variant on a degenerate image) is left out with a warning."""
  out = {}
  for key, fn in (
    ("pixel_AUROC", lambda: metrics.pixel_auroc(maps, masks)),
    ("pixel_AUPRO", lambda: metrics.aupro(maps, masks, fpr_limit)),
    ("pixel_AUPRO_rd4ad", lambda: metrics.aupro_rd4ad(maps, masks, fpr_limit)),
  ):
    try:
      out[key] = fn()
    except ValueError as err:
      log.warning("%s not computed: %s", key, err)
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
  mesh = sharding.make_mesh(config.get("mesh", None))
  sharding.check_batch_size(batch_size, mesh)
  rep, data_sh = sharding.replicated(mesh), sharding.data_sharding(mesh)
  abstract = _abstract_state(config, detector, _sample_batch(sources["train"]))
  state_sh = sharding.state_shardings(
    abstract, mesh, fsdp_min_size=config.get("fsdp_min_size", 2**18)
  )
  state = checkpoint.restore(mngr, step, sharding.with_shardings(abstract, state_sh), config=config)
  variables = variables_of(state)

  def predict_global(variables, batch):
    # The outputs come back replicated, with the batch's labels, indices and padding mask, so
    # every process holds the whole global batch (gathered over hosts) and drops padded rows.
    keep = {k: v for k, v in batch.items() if k in ("label", "index", "mask", data_lib.MASK_KEY)}
    if "mask" in batch:
      keep["image"] = batch["image"]  # For the heatmap overlays.
    return detector.predict(variables, batch), keep

  predict = jax.jit(
    predict_global, in_shardings=(variables_of(state_sh), data_sh), out_shardings=rep
  )

  # Score every test record exactly once: padded rows of the last batch are masked out.
  t0 = time.time()
  scores, labels, indices = {}, [], []
  fig_images, fig_maps, fig_labels, fig_scores = {}, {}, [], []
  # Pixel maps and ground truth, when the test records carry masks.
  pixel_key = getattr(detector, "pixel_map", "rec")
  pixel_maps, gt_masks, fig_inputs, fig_masks = [], [], [], []
  # Errors that need the previous frames or connected components (Avenue, ShanghaiTech).
  host_errors = video.HostFrameErrors(eval_cfg.get("recipe", "none"))
  for batch in data_lib.make_eval_batches(
    test,
    global_batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    out, kept_rows = jax.device_get(predict(variables, sharding.global_batch(batch, data_sh)))
    mask = np.asarray(kept_rows[data_lib.MASK_KEY], bool)
    batch = {k: np.asarray(v) for k, v in kept_rows.items()}
    for k, v in out["scores"].items():
      scores.setdefault(k, []).append(np.asarray(v)[mask])
    labels.append(batch["label"][mask])
    indices.append(batch["index"][mask])
    if "host_maps" in out:
      host_errors.add(indices[-1], {k: np.asarray(v)[mask] for k, v in out["host_maps"].items()})
    if "mask" in batch:
      if pixel_key not in out["maps"]:
        raise ValueError(
          f"detector pixel map {pixel_key!r} not among its maps {sorted(out['maps'])}"
        )
      pixel_maps.append(np.asarray(out["maps"][pixel_key], np.float32)[mask])
      gt_masks.append(batch["mask"][mask] > 0.5)
      if pixel_maps[-1].shape != gt_masks[-1].shape:
        raise ValueError(
          f"detector pixel map {pixel_key!r} has shape {pixel_maps[-1].shape[1:]} but the "
          f"ground-truth masks have {gt_masks[-1].shape[1:]}"
        )
    # Keep pictures only of the rows the figure shows (the first samples of each class), so
    # memory stays flat however long the test set runs before its first anomalies.
    kept = np.concatenate(fig_labels) if fig_labels else np.zeros((0,), np.int32)
    rows = _rows_still_needed(kept, labels[-1], n_fig)
    if rows.size:
      fig_labels.append(labels[-1][rows])
      fig_scores.append(scores["score"][-1][rows])
      for k, v in out["images"].items():
        fig_images.setdefault(k, []).append(np.asarray(v)[mask][rows])
      for k, v in out["maps"].items():
        fig_maps.setdefault(k, []).append(np.asarray(v)[mask][rows])
      if "mask" in batch:
        fig_inputs.append(batch["image"][mask][rows])
        fig_masks.append(batch["mask"][mask][rows])
  labels = np.concatenate(labels)
  indices = np.concatenate(indices)
  scores = {k: np.concatenate(v) for k, v in scores.items()}
  scores.update(host_errors.errors())
  seconds = time.time() - t0
  if np.sort(indices).tolist() != list(range(len(test))):
    raise RuntimeError("eval did not score every test sample exactly once")

  # The fused score and its parts ("ali": DAAD+'s discriminator-feature score).
  result = metrics.auroc_report(
    {k: v for k, v in scores.items() if k in ("score", "rec", "df", "ali")}, labels
  )
  video_lengths = getattr(test, "video_lengths", None)
  if video_lengths is not None:
    result.update(_video_metrics(eval_cfg, scores, labels, indices, video_lengths))
  if gt_masks:
    pixel_maps, gt_masks = np.concatenate(pixel_maps), np.concatenate(gt_masks)
    result.update(
      _pixel_metrics(pixel_maps, gt_masks, float(eval_cfg.get("aupro_fpr_limit", 0.3))),
      pixel_map=pixel_key,
    )
  result.update(
    step=int(step),
    num_test=int(len(labels)),
    num_normal=int((labels == 0).sum()),
    num_anomalous=int((labels == 1).sum()),
    eval_seconds=seconds,
  )
  # The step's decision threshold (fitted first on its named split when the config has a
  # calibration section) and its precision / recall / F1 on the test labels, for information.
  result.update(
    calibration.for_eval(
      config,
      workdir,
      step,
      scores["score"],
      labels,
      predict=predict,
      variables=variables,
      data_sh=data_sh,
      batch_size=batch_size,
      pixel_key=pixel_key,
      sources=sources,
    )
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
    if fig_masks:
      if eval_cfg.get("save_pixel_maps", False):
        np.savez_compressed(
          os.path.join(outdir, f"pixel_maps_{step}.npz"),
          maps=pixel_maps,
          masks=gt_masks,
          index=indices,
        )
      pixel_metric = f", pixel AUROC {result['pixel_AUROC']:.4f}" if "pixel_AUROC" in result else ""
      result["heatmaps"] = figures.heatmap_overlays(
        os.path.join(outdir, f"heatmaps_{step}.png"),
        np.concatenate(fig_inputs)[rows],
        np.concatenate(fig_maps[pixel_key])[rows],
        np.concatenate(fig_masks)[rows],
        labels=fig_labels[rows],
        scores=np.concatenate(fig_scores)[rows],
        title=f"{config.model_name} step {step}: map {pixel_key!r}{pixel_metric}",
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
