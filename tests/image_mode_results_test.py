"""The stored measurements behind the image-mode acceptance lines: the demo protocol with the
classical detectors of the same run, the one-class digits, the selection on the validation split
and the decision threshold on unseen normal images (experiments/select_digits_defaults.py,
digits_one_class.py, folder_own_data.py, select_folder_defaults.py and `make demo`). The scripts
take minutes to an hour; these check what they stored and that the configs are what was chosen.

Not asserted, because it does not hold yet (README, "Status"): the model's image AUROC at least
the best classical detector's, on the demo (0.9839 against k-NN's 0.9894) and in the one-class
mean (0.9921 against 0.9957)."""

import json
import os
import sys

import numpy as np
import pytest

from dmad_jax.configs import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
# How far above chance (0.5) "clearly above" is, and how many points a threshold's share of
# flagged test normals may stray from its nominal 1% ("a few": with 10 held-out images one
# folder draw flags 6%; README, "Your own folder").
DEFORMATION_ONLY_MIN = 0.75
FPR_TOLERANCE = 0.05


def _load(name):
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def _baselines(result):
  return {k: v for k, v in result.items() if k.startswith("baseline_image_AUROC_")}


def test_demo_reports_the_classical_detectors_and_a_deformation_well_above_chance():
  demo = _load("demo_metrics.json")
  assert demo["split"] == "test" and demo["num_test"] == 540 and demo["step"] == 1200
  assert len(_baselines(demo)) == 5  # kde, knn, pca, ocsvm, iforest, fitted in the same job
  # The acceptance line: at least the best classical detector of the same run.
  assert demo["image_AUROC"] >= max(_baselines(demo).values())
  assert demo["image_AUROC_df"] >= DEFORMATION_ONLY_MIN
  # The default threshold (held-out normals) on the test normals.
  assert demo["threshold_split"] == "validation" and demo["threshold_method"] == "lognormal"
  assert abs(demo["threshold_FPR"] - demo["threshold_nominal_FPR"]) <= FPR_TOLERANCE


def test_one_class_digits_store_every_digit_with_its_baselines():
  result = _load("digits_one_class.json")
  runs = result["runs"]
  assert sorted(r["protocol"] for r in runs) == [f"one_class={k}" for k in range(10)]
  assert all(len(_baselines(r)) == 5 for r in runs)
  mean = np.mean([r["image_AUROC"] for r in runs])
  assert result["mean_image_AUROC_one_class"] == pytest.approx(mean)
  assert np.mean([r["image_AUROC_df"] for r in runs]) >= DEFORMATION_ONLY_MIN
  # The acceptance line: the mean over the ten digits at least every baseline's mean.
  baselines = {k: np.mean([r[k] for r in runs]) for k in _baselines(runs[0])}
  assert len(baselines) == 5 and mean >= max(baselines.values())
  assert result["mean_one_class"]["image_AUROC"] == pytest.approx(mean)
  # Its run length was chosen on the validation splits over the other one tried (300 steps).
  other = _load("digits_one_class_steps300.json")
  assert (result["settings"]["total_steps"], other["settings"]["total_steps"]) == (600, 300)
  for record in (result, other):
    assert all("validation_image_AUROC" in r for r in record["runs"])
  validation = [record["mean_one_class"]["validation_image_AUROC"] for record in (result, other)]
  assert validation[0] > validation[1]
  assert validation[0] == pytest.approx(np.mean([r["validation_image_AUROC"] for r in runs]))
  assert {k: v for k, v in other["settings"].items() if k != "total_steps"} == {
    k: v for k, v in result["settings"].items() if k != "total_steps"
  }
  # The runs used the digits config as it is now (its recipe, at the stated length).
  assert result["settings"]["model"]["global_code"] is True
  config = load(os.path.join(ROOT, "configs", "digits_pdm.py"))
  assert result["settings"]["score"] == json.loads(config.score.to_json())
  assert result["settings"]["model"] == json.loads(config.model.to_json())


def test_split_seeds_record_is_consistent_with_its_runs_and_the_demo():
  result = _load("digits_split_seeds.json")
  runs = result["runs"]
  assert [r["data_seed"] for r in runs] == [0, 1, 2, 3, 4]
  assert all(len(_baselines(r)) == 5 for r in runs)
  summary = result["summary"]
  model = np.array([r["image_AUROC"] for r in runs])
  knn = np.array([r["baseline_image_AUROC_knn"] for r in runs])
  assert summary["mean_image_AUROC"] == pytest.approx(model.mean())
  assert summary["model_minus_knn"] == pytest.approx((model - knn).tolist())
  assert summary["splits_model_at_least_knn"] == int((model >= knn).sum())
  # Split 0 is the demo's split with the demo's config: the same numbers.
  demo = _load("demo_metrics.json")
  for key in ("image_AUROC", "image_AUROC_df", "baseline_image_AUROC_knn"):
    assert runs[0][key] == pytest.approx(demo[key], abs=1e-9)
  # The demo's score is one of the variants scored on every validation split: the same numbers.
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  try:
    import select_digits_defaults as select
  finally:
    sys.path.pop(0)
  config = load(os.path.join(ROOT, "configs", "digits_pdm.py"))
  demo_score = [
    n
    for n, v in select.FIVE_SPLIT_SCORES.items()
    if all(config.score[k.split(".")[1]] == val for k, val in v.items())
  ]
  assert len(demo_score) == 1 and config.score.alpha == 0
  for r in runs:
    assert set(r["validation_scores"]) == set(select.FIVE_SPLIT_SCORES)
    on_demo_score = r["validation_scores"][demo_score[0]]["image_AUROC"]
    assert r["validation_image_AUROC"] == pytest.approx(on_demo_score, abs=1e-12)
  # Every anomalous (even) digit is scored against the normals by the model and by k-NN.
  for r in runs:
    assert sorted(r["per_digit_AUROC"]) == ["0", "2", "4", "6", "8"]
    assert all(0.5 < v[name] <= 1.0 for v in r["per_digit_AUROC"].values() for name in v)


def test_digits_defaults_are_the_candidate_chosen_on_validation():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  try:
    import select_digits_defaults as select
  finally:
    sys.path.pop(0)
  stored = _load("digits_selection.json")
  chosen, one_split = stored["chosen"], stored["chosen_on_one_split"]
  bound = stored["min_deformation_AUROC"]
  # One split: the best validation AUROC among the candidates whose deformation alone reaches
  # the bound.
  eligible = {
    name: run
    for name, run in stored["candidates"].items()
    if run["validation"]["image_AUROC_df"] >= bound
  }
  scored = [v for run in eligible.values() for k, v in run["validation"].items() if "_alpha_" in k]
  assert stored["min_deformation_AUROC"] == select.MIN_DEFORMATION >= DEFORMATION_ONLY_MIN
  assert one_split["candidate"] in eligible and one_split["validation_image_AUROC"] == max(scored)
  # Then the best mean validation AUROC over five split seeds among candidates x score variants,
  # recomputed from their records.
  five = stored["five_splits"]
  assert len(five) >= 2
  means = {}
  for name, entry in five.items():
    record = _load(os.path.basename(entry["record"]))
    runs = record["runs"]
    assert [r["data_seed"] for r in runs] == [0, 1, 2, 3, 4]
    for score in select.FIVE_SPLIT_SCORES:
      if not all(score in r["validation_scores"] for r in runs):
        continue
      mean = np.mean([r["validation_scores"][score]["image_AUROC"] for r in runs])
      assert entry["mean_validation_image_AUROC"][score] == pytest.approx(mean)
      if np.mean([r["validation_scores"][score]["image_AUROC_df"] for r in runs]) >= bound:
        means[name, score] = mean
  assert len(means) >= 2 * len(select.FIVE_SPLIT_SCORES)
  name, score = max(means, key=means.get)
  assert chosen["candidate"] == name and chosen["score_name"] == score
  assert chosen["score"] == select.FIVE_SPLIT_SCORES[score] and chosen["score.alpha"] == 0
  assert len(stored["candidates"]) >= 10 and stored["test"]["step"] == 1200
  want = select._config(
    select.CANDIDATES[chosen["candidate"]],
    **{"score.alpha": chosen["score.alpha"], **chosen["score"]},
  )
  have = load(os.path.join(ROOT, "configs", "digits_pdm.py"))
  for key in (*select.PREVIOUS, *chosen["score"], "score.alpha"):
    section, _, name = key.rpartition(".")
    if section:
      assert have[section][name] == want[section][name], key
    else:
      assert have[name] == want[name], key
  # The previous defaults are in the search, and the choice beat them on validation.
  assert stored["candidates"]["previous_defaults"]["overrides"] == {}


@pytest.mark.parametrize(
  "name", ["folder_own_data.json", "folder_own_data_prototype_bank.json"]
)  # configs/folder_pdm.py's two recipes
def test_held_out_threshold_holds_on_test_built_folders(name):
  result = _load(name)
  for draw, run in result["runs"].items():
    default = run["threshold"]["validation, lognormal bound (default)"]
    assert default["normal_images"] == 10, draw
    if draw.startswith("shuffled"):  # unseen normals drawn like the held-out ones
      assert abs(default["test_normal_FPR"] - default["nominal_FPR"]) <= FPR_TOLERANCE, draw


def _experiment(name):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  try:
    return __import__(name)
  finally:
    sys.path.pop(0)


def test_folder_default_is_the_recipe_chosen_on_validation_folders():
  select = _experiment("select_folder_defaults")
  stored = _load("folder_selection.json")
  runs = {name: c["draws"] for name, c in stored["candidates"].items()}
  assert stored["chosen"] == select.choose(runs)  # the rule, applied to the stored numbers
  assert set(runs) == set(select.CANDIDATES) and all(len(d) >= 2 for d in runs.values())
  for name, c in stored["candidates"].items():
    assert [c["arg"], c["overrides"]] == list(select.CANDIDATES[name]), name
  # configs/folder_pdm.py's default recipe is the chosen candidate's.
  chosen_arg, chosen_overrides = select.CANDIDATES[stored["chosen"]["candidate"]]
  folder_pdm = load(os.path.join(ROOT, "configs", "folder_pdm.py"), "root=/d,image_size=32")
  wanted = load(
    os.path.join(ROOT, "configs", "folder_pdm.py"), f"root=/d,image_size=32,{chosen_arg}"
  )
  assert folder_pdm.to_dict() == wanted.to_dict() and not chosen_overrides


def test_folder_selection_validation_images_are_neither_trained_nor_tested(tmp_path):
  select = _experiment("select_folder_defaults")
  counts = select.write_folder(str(tmp_path), seed=1)
  assert counts == {"train/good": 50, "test/good": 100, "test/other_digit": 100,
                    "validation/good": 32, "validation/other_digit": 32}  # fmt: skip
  files = {
    part: set(os.listdir(tmp_path / part / folder))
    for part, folder in (("train", "good"), ("test", "good"), ("validation", "good"))
  }
  others = {p: set(os.listdir(tmp_path / p / "other_digit")) for p in ("test", "validation")}
  assert not files["validation"] & (files["train"] | files["test"])
  assert not others["validation"] & others["test"]


def test_one_class_reuse_only_takes_a_finished_run_of_the_same_config(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  try:
    import digits_one_class as one_class
  finally:
    sys.path.pop(0)
  config = one_class.get_config("pdm", "one_class=3")
  config.total_steps = 300
  workdir = tmp_path / "one_class_3"
  assert not one_class._trained_as(str(workdir), config)  # nothing there
  (workdir / "checkpoints" / "300").mkdir(parents=True)
  (workdir / "config.json").write_text(config.to_json_best_effort())
  assert one_class._trained_as(str(workdir), config)
  other = config.copy_and_resolve_references()
  other.model.num_codes = 32
  assert not one_class._trained_as(str(workdir), other)  # another model: trained again
  longer = config.copy_and_resolve_references()
  longer.total_steps = 600
  assert not one_class._trained_as(str(workdir), longer)  # its last checkpoint is not there
