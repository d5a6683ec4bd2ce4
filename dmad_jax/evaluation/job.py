"""The eval job: restore a checkpoint, score the test split exactly once, write AUROC and figures.

Stands apart from training (it shares only the state and checkpoint modules), so it can run on
another machine, on an old checkpoint, or ``--watch`` a workdir while training runs. It reads the
test split only (shapes come from its ``element_spec``; ``eval.baselines`` also reads the
training split, to fit the classical detectors it reports), and restores only the variables that
inference needs, never the optimizer state. An :class:`Evaluator` is built once and evaluates
any number of checkpoints with one compiled predict program.

Outputs in ``<workdir>/eval/``: ``metrics.json`` (latest evaluation) and ``metrics_<step>.json``,
``metrics.jsonl`` and TensorBoard events (clu), ``scores_<step>.npz`` (per-sample scores, labels,
indices), ``panel_<step>.png`` (DMAD Fig. 6: the detector's pictures and anomaly maps) and
``histogram_<step>.png`` (normal vs anomalous scores).

Metrics: ``image_AUROC`` of the main score and ``image_AUROC_<name>`` of every other score the
detector names (``Detector.score_names``). Video sources add the frame AUROC of
``eval.recipe`` (:mod:`dmad_jax.evaluation.video`). When the test records carry ground-truth
masks (key ``"mask"``, MVTec layout with ``ground_truth/``), the detector's pixel map
(``Detector.pixel_map``) is also scored: ``pixel_AUROC`` (all pixels pooled),
``pixel_AUROC_per_image`` (each anomalous image's own, averaged: IGD's protocol), ``pixel_AUPRO``
(pooled MVTec AD definition, FPR limit ``eval.aupro_fpr_limit`` = 0.3) and ``pixel_AUPRO_rd4ad``
(RD4AD's per-image variant, see `metrics.aupro_rd4ad`); ``heatmaps_<step>.png`` overlays the
maps on the images with the ground-truth contours, and with ``eval.save_pixel_maps`` the maps,
masks and indices are saved to ``pixel_maps_<step>.npz`` (float32, ~4 bytes per pixel).

With ``eval.test_selected`` the authors' test-informed protocols are reported too, each metric
named ``..._test_selected``: ``image_AUROC_<score>_test_selected`` of the detector's
``test_selected_scores`` (PPDM, DAAD+: min-max ranges from the test split), the best of the
scores the authors report (``image_AUROC_reported_test_selected``; PPDM: max of the test-scaled
fused score and the reconstruction score) and the best evaluated checkpoint on the test split
(``<frame or image AUROC>_best_checkpoint_test_selected``, ``best_checkpoint_step_test_selected``;
DMAD-PDM's selection). They are never the default metrics.

Decision threshold (:mod:`dmad_jax.evaluation.calibration`): with a ``calibration`` section in the
config, the step's threshold is fitted on the named split and stored in its checkpoint directory
when it is missing or was made with other settings; with a stored threshold the metrics add
``threshold``, ``threshold_method``, ``threshold_split`` and ``threshold_precision`` / ``_recall``
/ ``_F1`` / ``_FPR`` on the test labels (reported, never used to fit).

Choosing settings: ``eval.split="validation"`` scores the validation split instead (images held
out of training, see :func:`dmad_jax.data.get_source`) into ``<workdir>/eval_validation/``, with
the same metrics and baselines and no threshold, so that settings are compared there and the
test split is only reported (``experiments/select_digits_defaults.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from dmad_jax import data as data_lib
from dmad_jax.configs import common, schema
from dmad_jax.evaluation import baselines, calibration, figures, metrics, video
from dmad_jax.evaluation.inference import Runner
from dmad_jax.models import base as models_base
from dmad_jax.models import get_detector
from dmad_jax.train import checkpoint, durations, sharding
from dmad_jax.train import state as state_lib
from dmad_jax.train.writers import MetricWriter

log = logging.getLogger("dmad_jax")

# Every key of config.eval with its default; the configs' eval sections hold all of them
# (dmad_jax.configs.common.eval_section), so that any one can be set on the command line.
EVAL_DEFAULTS = common.EVAL_DEFAULTS
TEST_SELECTED = "_test_selected"
EVAL_SPLITS = ("test", "validation")


def settings(config) -> dict:
  """``config.eval`` checked and merged into :data:`EVAL_DEFAULTS`.

  Raises:
    ConfigError: for an unknown key or split, or ``test_selected`` with a split other than test.
  """
  out = schema.section(config, "eval", EVAL_DEFAULTS)
  if out["split"] not in EVAL_SPLITS:
    raise schema.ConfigError(
      f"config.eval.split must be one of {EVAL_SPLITS}, got {out['split']!r}"
    )
  if out["test_selected"] and out["split"] != "test":
    raise schema.ConfigError(
      "config.eval.test_selected reports the authors' test-informed protocols, which need "
      f"config.eval.split='test' (got {out['split']!r})"
    )
  if int(out["figure_samples"]) < 0:
    raise schema.ConfigError(
      f"config.eval.figure_samples is the number of records per class drawn in the panel "
      f"(0: no panel or heatmaps), got {out['figure_samples']!r}"
    )
  return out


def output_dir(workdir: str, split: str = "test") -> str:
  """Where the eval job writes: ``<workdir>/eval`` (test split) or ``<workdir>/eval_<split>``."""
  return os.path.join(os.path.abspath(workdir), "eval" if split == "test" else f"eval_{split}")


# ---------------------------------------------------------------------------------------------
# Scoring the test split.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scored:
  """Everything the metrics and figures need from one pass over the test split."""

  scores: dict[str, np.ndarray]
  frame_errors: dict[str, np.ndarray]
  labels: np.ndarray
  indices: np.ndarray
  pixel_maps: np.ndarray | None
  masks: np.ndarray | None
  rows: figures.FigureRows
  seconds: float


def _pixel_metrics(maps, masks, fpr_limit):
  """Pixel AUROC / AUPRO of the collected maps; a metric that is undefined on these inputs (no
  anomalous pixel, or the RD4AD variant on a degenerate image) is left out with a warning."""
  out = {}
  for key, fn in (
    ("pixel_AUROC", lambda: metrics.pixel_auroc(maps, masks)),
    ("pixel_AUROC_per_image", lambda: metrics.pixel_auroc_per_image(maps, masks)),
    ("pixel_AUPRO", lambda: metrics.aupro(maps, masks, fpr_limit)),
    ("pixel_AUPRO_rd4ad", lambda: metrics.aupro_rd4ad(maps, masks, fpr_limit)),
  ):
    try:
      out[key] = fn()
    except ValueError as err:
      log.warning("%s not computed: %s", key, err)
  return out


def _video_errors(recipe: str, scored: Scored) -> dict[str, np.ndarray]:
  """Per-frame errors in frame order for the video recipe: the detector's official errors for
  the dmad_* recipes (named with ``video.ERROR_PREFIX``), the main image score for "none"."""
  order = np.argsort(scored.indices)
  if recipe == "none":
    return {"score": scored.scores["score"][order]}
  prefix = video.ERROR_PREFIX[recipe]
  return {
    k[len(prefix) :]: v[order] for k, v in scored.frame_errors.items() if k.startswith(prefix)
  }


class Evaluator:
  """The eval job of one run: built once, then :meth:`evaluate` any checkpoint step.

  Attributes:
    runner: the inference runner of the detector's ``predict`` on the test split (compiled once
      for every step evaluated).
  """

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.settings = settings(config)
    self.detector = get_detector(config)
    self.split = self.settings["split"]
    # The scored split: the test split unless config.eval.split names another.
    self.test = data_lib.get_source(config.data, self.split)
    self.spec = self.test.element_spec
    self.has_masks = "mask" in self.spec
    self.mesh = sharding.make_mesh(config.get("mesh", None))
    self.shapes = state_lib.abstract_variables(config, self.detector, self.spec)
    self.variables_sharding = state_lib.shardings(self.shapes, self.mesh, config)
    # Pictures of the inputs travel back only when the heatmaps need them.
    keep = ("label", "index", *(("mask", "image") if self.has_masks else ()))
    # A detector with a sequential predict (e.g. MNAD's test-time memory update) is run with
    # its state carried through the batches, in the split's order.
    sequential = self.detector.sequential
    self.runner = Runner(
      self.detector.predict_sequential if sequential else self.detector.predict,
      mesh=self.mesh,
      variables_sharding=self.variables_sharding,
      batch_size=self.settings["batch_size"],
      keep=keep,
      stateful=sequential,
    )

  def restore(self, step: int):
    """The variables of checkpoint ``step``."""
    variables, _ = state_lib.restore_variables(
      self.config, self.detector, self.spec, self.workdir, step, self.mesh, self.shapes
    )
    return variables

  # -- the pass over the test split ----------------------------------------------------------
  def score(self, variables) -> Scored:
    """Runs ``predict`` over every test record once; keeps scores, errors, the pixel maps the
    metrics need and the pictures the figures show."""
    t0 = time.time()
    pixel_key = self.detector.pixel_map
    scores, errors, labels, indices, pixel_maps, masks = {}, {}, [], [], [], []
    rows = figures.FigureRows(self.settings["figure_samples"])
    # Errors that need the previous frames or connected components (Avenue, ShanghaiTech).
    host_errors = video.HostFrameErrors(self.settings["recipe"])
    state = self.detector.predict_state(variables) if self.runner.stateful else None
    for pred, kept in self.runner.over(variables, self.test, state):
      for k in self.detector.score_names:
        scores.setdefault(k, []).append(pred.scores[k])
      for k, v in pred.frame_errors.items():
        errors.setdefault(k, []).append(v)
      labels.append(kept["label"])
      indices.append(kept["index"])
      if pred.host_maps:
        host_errors.add(kept["index"], pred.host_maps)
      groups = {"images": pred.images, "maps": pred.maps}
      if self.has_masks and pixel_key is not None:
        if pixel_key not in pred.maps:
          raise ValueError(
            f"detector pixel map {pixel_key!r} not among its maps {sorted(pred.maps)}"
          )
        pixel_maps.append(np.asarray(pred.maps[pixel_key], np.float32))
        masks.append(kept["mask"] > 0.5)
        if pixel_maps[-1].shape != masks[-1].shape:
          raise ValueError(
            f"detector pixel map {pixel_key!r} has shape {pixel_maps[-1].shape[1:]} but the "
            f"ground-truth masks have {masks[-1].shape[1:]}"
          )
        groups.update(inputs={"image": kept["image"]}, masks={"mask": kept["mask"]})
      rows.add(kept["label"], pred.scores["score"], groups)
    indices = np.concatenate(indices)
    if np.sort(indices).tolist() != list(range(len(self.test))):
      raise RuntimeError("eval did not score every test sample exactly once")
    errors = {k: np.concatenate(v) for k, v in errors.items()}
    errors.update(host_errors.errors())
    return Scored(
      scores={k: np.concatenate(v) for k, v in scores.items()},
      frame_errors=errors,
      labels=np.concatenate(labels),
      indices=indices,
      pixel_maps=np.concatenate(pixel_maps) if pixel_maps else None,
      masks=np.concatenate(masks) if masks else None,
      rows=rows,
      seconds=time.time() - t0,
    )

  # -- metrics -------------------------------------------------------------------------------
  def metrics(self, scored: Scored) -> dict:
    """Image AUROC of every score, frame AUROC (video sources), pixel metrics (masks)."""
    result = metrics.auroc_report(scored.scores, scored.labels)
    lengths = getattr(self.test, "video_lengths", None)
    if lengths is not None:
      recipe = self.settings["recipe"]
      order = np.argsort(scored.indices)
      frames = video.score_frames(
        _video_errors(recipe, scored), video_lengths=lengths, recipe=recipe
      )
      result.update(video.frame_auroc(frames, scored.labels[order], lengths), recipe=recipe)
    if scored.masks is not None:
      result.update(
        _pixel_metrics(scored.pixel_maps, scored.masks, float(self.settings["aupro_fpr_limit"])),
        pixel_map=self.detector.pixel_map,
      )
    if self.settings["test_selected"]:
      result.update(self._test_selected(scored))
    if self.settings["baselines"] and jax.process_index() == 0:
      result.update(self._baselines(scored))
    labels = scored.labels
    result.update(
      num_test=int(len(labels)),
      num_normal=int((labels == 0).sum()),
      num_anomalous=int((labels == 1).sum()),
      eval_seconds=scored.seconds,
    )
    return result

  def _test_selected(self, scored: Scored) -> dict:
    """The ``eval.test_selected`` image AUROCs (see :data:`EVAL_DEFAULTS`)."""
    extra = self.detector.test_selected_scores(scored.scores)
    out = {
      f"image_AUROC_{k}{TEST_SELECTED}": metrics.image_auroc(v, scored.labels)
      for k, v in extra.items()
    }
    names = tuple(self.detector.reported_best_of)
    if names:
      every = {**scored.scores, **extra}
      out[f"image_AUROC_reported{TEST_SELECTED}"] = max(
        metrics.image_auroc(every[k], scored.labels) for k in names
      )
      out[f"image_AUROC_reported_of{TEST_SELECTED}"] = " or ".join(names)
    return out

  def _baselines(self, scored: Scored) -> dict:
    """``baseline_image_AUROC_<name>`` of the classical detectors on the same split."""
    t0 = time.time()
    train = baselines.split_images(data_lib.get_source(self.config.data, "train"))
    test = baselines.split_images(self.test)
    labels = scored.labels[np.argsort(scored.indices)]
    out = {
      f"baseline_image_AUROC_{k}": metrics.image_auroc(v, labels)
      for k, v in baselines.scores(train, test).items()
    }
    log.info("classical baselines on %d training images: %.1f s", len(train), time.time() - t0)
    return out

  def _best_checkpoint(self, outdir: str, step: int, result: dict) -> dict:
    """The best checkpoint on the test split among those evaluated into ``outdir`` (this one
    included): DMAD-PDM's released selection, labelled ``_test_selected``."""
    key = "frame_AUROC_micro" if "frame_AUROC_micro" in result else "image_AUROC"
    values = {step: result[key]}
    for name in os.listdir(outdir):
      stem = name[len("metrics_") : -len(".json")]
      if name.startswith("metrics_") and name.endswith(".json") and stem.isdigit():
        if int(stem) != step:
          with open(os.path.join(outdir, name)) as f:
            old = json.load(f)
          if key in old:
            values[int(stem)] = old[key]
    best = max(values, key=lambda s: (values[s], -s))
    return {
      f"{key}_best_checkpoint{TEST_SELECTED}": values[best],
      f"best_checkpoint_step{TEST_SELECTED}": int(best),
      f"checkpoints_compared{TEST_SELECTED}": len(values),
    }

  # -- outputs -------------------------------------------------------------------------------
  def write(self, step: int, result: dict, scored: Scored) -> dict:
    """Writes the metrics, scores and figures of ``step`` (process 0); returns the result with
    the figures' paths."""
    outdir = output_dir(self.workdir, self.split)
    os.makedirs(outdir, exist_ok=True)
    if self.settings["test_selected"]:
      result.update(self._best_checkpoint(outdir, step, result))
    for name in ("metrics.json", f"metrics_{step}.json"):
      with open(os.path.join(outdir, name), "w") as f:
        json.dump(result, f, indent=2)
    np.savez(
      os.path.join(outdir, f"scores_{step}.npz"),
      labels=scored.labels,
      index=scored.indices,
      **scored.scores,
      **scored.frame_errors,
    )
    lengths = getattr(self.test, "video_lengths", None)
    if lengths is not None:
      recipe = self.settings["recipe"]
      errors = _video_errors(recipe, scored)
      # The format `dmad video-auc --scores` reads, to try other recipes without the model.
      np.savez(os.path.join(outdir, f"video_errors_{step}.npz"), video_lengths=lengths, **errors)
      result["video_plot"] = video.plot_video_scores(
        os.path.join(outdir, f"videos_{step}.png"),
        video.score_frames(errors, video_lengths=lengths, recipe=recipe),
        scored.labels[np.argsort(scored.indices)],
        lengths,
        title=f"step {step}, recipe {recipe}: frame AUROC {result['frame_AUROC_micro']:.4f}",
      )
    writer = MetricWriter(outdir)
    writer.write_scalars(
      step, {k: v for k, v in result.items() if k != "step" and not isinstance(v, str)}
    )
    writer.close()
    result["histogram"] = figures.score_histogram(
      os.path.join(outdir, f"histogram_{step}.png"),
      scored.scores["score"],
      scored.labels,
      title=f"step {step}",
    )
    if scored.masks is not None and self.settings["save_pixel_maps"]:
      np.savez_compressed(
        os.path.join(outdir, f"pixel_maps_{step}.npz"),
        maps=scored.pixel_maps,
        masks=scored.masks,
        index=scored.indices,
      )
    labels, scores, groups = scored.rows.picked()
    if not len(labels):
      return result  # config.eval.figure_samples = 0: no per-record pictures
    name = self.config.model_name
    images = {k: groups["images"][k] for k in self.detector.figure_rows if k in groups["images"]}
    maps_ = {f"anomaly map ({k})": v for k, v in groups.get("maps", {}).items()}
    result["panel"] = figures.deformation_panel(
      os.path.join(outdir, f"panel_{step}.png"),
      images,
      labels=labels,
      scores=scores,
      maps=maps_,
      title=f"{name} step {step}: image AUROC {result['image_AUROC']:.4f}",
    )
    if scored.masks is not None:
      pixel_key = self.detector.pixel_map
      pixel = f", pixel AUROC {result['pixel_AUROC']:.4f}" if "pixel_AUROC" in result else ""
      result["heatmaps"] = figures.heatmap_overlays(
        os.path.join(outdir, f"heatmaps_{step}.png"),
        groups["inputs"]["image"],
        groups["maps"][pixel_key],
        groups["masks"]["mask"],
        labels=labels,
        scores=scores,
        title=f"{name} step {step}: map {pixel_key!r}{pixel}",
      )
    return result

  def evaluate(self, step: int | None = None) -> dict:
    """Evaluates checkpoint ``step`` (None: the latest); see the module docstring.

    Raises:
      FileNotFoundError: when the workdir has no checkpoint (or not ``step``).
    """
    step = checkpoint.latest_step(self.workdir, step)
    variables = self.restore(step)
    if self.detector.fits_statistics:
      fitted = variables["batch_stats"].get(models_base.STATISTICS, {}).get("calibrated")
      if fitted is not None and not float(fitted):
        log.warning(
          "step %d was saved without the training split's statistics (a save on SIGTERM or "
          "preemption): %s's scores that use them are unscaled; evaluate a scheduled "
          "checkpoint, or resume training to the next one",
          step,
          self.config.model_name,
        )
    scored = self.score(variables)
    result = {**self.metrics(scored), "step": int(step), "split": self.split}
    # The step's decision threshold (fitted first on its named split when the config has a
    # calibration section) and its precision / recall / F1 on the test labels, for information.
    # A validation pass leaves it alone: that split may be the one it is fitted on.
    if self.split == "test":
      result.update(self._threshold(step, scored, variables))
    if jax.process_index() == 0:
      result = self.write(step, result, scored)
      log.info("eval step %d: %s", step, json.dumps({k: result[k] for k in sorted(result)}))
    return result

  def _threshold(self, step: int, scored: Scored, variables) -> dict:
    """The step's threshold and its precision / recall / F1 / FPR on the test labels."""
    return calibration.for_eval(
      self.config,
      self.workdir,
      step,
      scored.scores["score"],
      scored.labels,
      runner=self.runner,
      variables=variables,
      pixel_key=self.detector.pixel_map,
    )


def on_split(config, split: str):
  """A copy of ``config`` whose eval job scores ``split`` instead (``"validation"``: where
  settings are compared), without the per-record pictures; ``config`` is left as it is."""
  out = config.copy_and_resolve_references()
  out.eval.split = split
  out.eval.figure_samples = 0
  return out


def evaluate(config, workdir: str, step: int | None = None) -> dict:
  """Evaluates one checkpoint of ``workdir`` on the test split of ``config.data``.

  Args:
    config: the training config (the eval reads ``config.eval``, see :data:`EVAL_DEFAULTS`).
    workdir: the training run directory.
    step: checkpoint step; None = the latest.

  Returns:
    The metrics dict (``image_AUROC`` and per-score AUROCs, ``step``, sample counts, figure
    paths).

  Raises:
    FileNotFoundError: when ``workdir`` has no checkpoint (or not ``step``).
  """
  return Evaluator(config, workdir).evaluate(step)


def watch(
  config,
  workdir: str,
  *,
  poll_seconds: float = 30.0,
  timeout_seconds: float | None = None,
  evaluator: Evaluator | None = None,
):
  """Evaluates every new checkpoint of ``workdir`` until the final step has been evaluated,
  with one :class:`Evaluator` (one compiled predict program for every checkpoint).

  The final step is ``config.total_steps``, or, for a config in epochs, the one the trainer
  planned (``<workdir>/plan.json``).

  Returns:
    dict step -> metrics of every evaluated checkpoint.
  """
  evaluator = evaluator or Evaluator(config, workdir)
  done: dict[int, dict] = {}
  t0 = time.time()
  while True:
    final = durations.final_step(config, evaluator.workdir)
    steps = checkpoint.manager(evaluator.workdir, read_only=True).all_steps()
    for step in sorted(set(steps) - set(done)):
      done[step] = evaluator.evaluate(step)
    if final is not None and final in done:
      return done
    if timeout_seconds is not None and time.time() - t0 > timeout_seconds:
      raise TimeoutError(
        f"watch: no checkpoint of the final step {final} after {timeout_seconds} s"
      )
    time.sleep(poll_seconds)
