"""Pixel metrics: pooled AUPRO and the RD4AD per-image variant against references written from
their definitions, and pixel AUROC against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

from dmad_jax.evaluation import metrics as metrics_lib
from dmad_jax.evaluation.metrics import aupro, aupro_rd4ad, pixel_auroc, pro_curve, region_labels

_EIGHT = np.ones((3, 3), dtype=bool)


def _regions(masks):
  """(image, flat pixel indices) of every 8-connected region of every image."""
  out = []
  for i, mask in enumerate(masks):
    lab, n = ndimage.label(mask, structure=_EIGHT)
    out.extend((i, np.flatnonzero(lab.reshape(-1) == r)) for r in range(1, n + 1))
  return out


def _reference_aupro(maps, masks, limit):
  """Straight from the definition: one point per distinct score, trapezoids cut at ``limit``."""
  maps = np.asarray(maps, np.float64)
  masks = np.asarray(masks, bool)
  regions = _regions(masks)
  normal = ~masks
  xs, ys = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    xs.append((pred & normal).sum() / normal.sum())
    flat = pred.reshape(len(maps), -1)
    ys.append(np.mean([flat[i][idx].mean() for i, idx in regions]))
  area = 0.0
  for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
    if x1 <= limit:
      area += (x1 - x0) * (y0 + y1) / 2
    else:  # The segment crosses the limit: integrate up to the interpolated point and stop.
      y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
      area += (limit - x0) * (y0 + y_lim) / 2
      break
  return area / limit


def _reference_rd4ad(maps, masks, limit=0.3, num_th=200):
  """RD4AD's compute_pro, called per anomalous image and averaged, as a literal loop."""
  results = []
  for amap, mask in zip(np.asarray(maps, np.float64), np.asarray(masks, bool), strict=True):
    if not mask.any():
      continue
    lab, n = ndimage.label(mask, structure=_EIGHT)
    rows = []
    lo, hi = amap.min(), amap.max()
    for th in np.arange(lo, hi, (hi - lo) / num_th):
      binary = amap > th
      pros = [binary[lab == r].sum() / (lab == r).sum() for r in range(1, n + 1)]
      fpr = np.logical_and(~mask, binary).sum() / (~mask).sum()
      rows.append((np.mean(pros), fpr))
    pro, fpr = np.array([r for r in rows if r[1] < limit]).T
    results.append(auc(fpr / fpr.max(), pro))
  return float(np.mean(results))


def _random_set(seed, n=8, size=32, n_normal=2, quantize=None):
  """Maps and masks with several blobs per anomalous image and some all-normal images."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((n, size, size), bool)
  for i in range(n_normal, n):
    for _ in range(rng.integers(1, 5)):
      cy, cx = rng.uniform(0, size, 2)
      ry, rx = rng.uniform(1, 5, 2)
      masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    # A few isolated pixels: tiny regions weigh as much as large ones in the PRO.
    masks[i, rng.integers(0, size, 2), rng.integers(0, size, 2)] = True
  maps = 1.2 * ndimage.gaussian_filter(masks.astype(float), (0, 1, 1)) + rng.normal(
    0, 0.3, masks.shape
  )
  if quantize:
    maps = np.round(maps * quantize) / quantize  # Heavy ties within and across classes.
  return maps.astype(np.float32), masks


@pytest.mark.parametrize(
  "seed,quantize,limit",
  [(0, None, 0.3), (1, None, 0.3), (2, 8, 0.3), (3, 3, 0.3), (4, 8, 0.05), (5, None, 1.0)],
)
def test_aupro_matches_reference(seed, quantize, limit):
  maps, masks = _random_set(seed, quantize=quantize)
  assert region_labels(masks)[1] >= 10
  got = aupro(maps, masks, fpr_limit=limit)
  want = _reference_aupro(maps, masks, limit)
  assert 0.05 < want < 0.99  # An informative case, not a saturated one.
  assert got == pytest.approx(want, abs=1e-6)
  # Masks given as 0/1 floats and maps as float64 give the same number.
  assert aupro(maps.astype(np.float64), masks.astype(np.float32), limit) == pytest.approx(got)


def test_aupro_hand_computed_interpolation_at_the_limit():
  # Two pixels in one region, two normal pixels; the 0.5 tie moves FPR 0 -> 1/2 and PRO 1/2 -> 1
  # together, so the PRO at FPR 0.3 is interpolated on that diagonal: 0.5 + 0.5 * 0.3 / 0.5 = 0.8.
  maps = np.array([[[0.9, 0.5], [0.5, 0.1]]])
  masks = np.array([[[1, 1], [0, 0]]])
  fpr, pro, thr = pro_curve(maps, masks)
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
  np.testing.assert_allclose(pro, [0, 0.5, 1, 1])
  np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.1])
  assert aupro(maps, masks) == pytest.approx(0.3 * (0.5 + 0.8) / 2 / 0.3)


def test_regions_never_span_images_and_are_8_connected():
  masks = np.zeros((2, 4, 4), bool)
  masks[0, 0, 0] = masks[0, 1, 1] = True  # Diagonal neighbours: one region.
  masks[0, 3, 3] = True
  masks[1, 0, 0] = True  # Same place in the next image: a region of its own.
  labels, n = region_labels(masks)
  assert n == 3 and labels[0, 0, 0] == labels[0, 1, 1] != labels[1, 0, 0]


def test_perfect_and_inverted_detectors():
  _, masks = _random_set(7)
  assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
  assert aupro(1.0 - masks, masks) == pytest.approx(0.0, abs=1e-12)
  # Strictly inverted but not binary: anomalous pixels below every normal one.
  rng = np.random.default_rng(0)
  maps = np.where(masks, rng.uniform(0, 1, masks.shape), rng.uniform(2, 3, masks.shape))
  assert aupro(maps, masks) == pytest.approx(0.0, abs=1e-12)
  assert pixel_auroc(maps, masks) == 0.0


def test_aupro_ignores_monotone_rescaling_and_counts_regions_equally():
  maps, masks = _random_set(8)
  assert aupro(np.exp(3 * maps.astype(np.float64)), masks) == pytest.approx(aupro(maps, masks))
  # One huge region found and one tiny region missed give PRO 1/2, whatever the sizes.
  masks = np.zeros((1, 16, 16), bool)
  masks[0, :8, :8] = True
  masks[0, 15, 15] = True
  maps = np.where(masks, 1.0, 0.5)
  maps[0, 15, 15] = 0.0
  fpr, pro, _ = pro_curve(maps, masks)
  assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_aupro_rd4ad_matches_the_rd4ad_loop(seed):
  maps, masks = _random_set(seed, quantize=None if seed == 0 else 8)
  got = aupro_rd4ad(maps, masks)
  assert got == pytest.approx(_reference_rd4ad(maps, masks), abs=1e-9)
  # A different definition, and visibly different numbers on the same inputs.
  assert abs(got - aupro(maps, masks)) > 1e-3


def test_aupro_rd4ad_ignores_normal_images():
  maps, masks = _random_set(9, n_normal=3)
  noisy = maps.copy()
  noisy[:3] = np.random.default_rng(1).uniform(10, 20, noisy[:3].shape)  # Huge normal scores.
  assert aupro_rd4ad(noisy, masks) == aupro_rd4ad(maps, masks)
  assert aupro(noisy, masks) < aupro(maps, masks) - 0.1  # The pooled FPR sees them.


def test_aupro_rd4ad_undefined_cases_name_the_image():
  _, masks = _random_set(7)
  with pytest.raises(ValueError, match="image 2 .*FPR 0"):
    aupro_rd4ad(masks.astype(np.float32), masks)  # Perfect detector: RD4AD divides 0 by 0.
  maps = np.random.default_rng(0).normal(size=masks.shape)
  maps[3] = 1.0
  with pytest.raises(ValueError, match="image 3 has a constant anomaly map"):
    aupro_rd4ad(maps, masks)


@pytest.mark.parametrize("seed", [0, 3])
def test_pixel_auroc_is_sklearn_on_pooled_pixels(seed):
  maps, masks = _random_set(seed, quantize=4 if seed else None)
  want = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
  assert pixel_auroc(maps, masks) == pytest.approx(want, abs=1e-12)
  assert pixel_auroc(maps.astype(np.float16), masks.astype(np.uint8)) == pytest.approx(want, 1e-3)


@pytest.mark.parametrize("metric", [pixel_auroc, aupro, aupro_rd4ad])
def test_bad_inputs_are_named(metric):
  maps, masks = _random_set(0)
  with pytest.raises(ValueError, match=r"shape of anomaly_maps \(8, 32, 32\).*\(8, 32, 31\)"):
    metric(maps, masks[..., :31])
  with pytest.raises(ValueError, match=r"\(N, H, W\)"):
    metric(maps[0], masks[0])
  soft = masks.astype(np.float32)
  soft[0, 0, 0] = 0.5
  with pytest.raises(ValueError, match=r"binary .*\[0\.5\].*mask > 0\.5"):
    metric(maps, soft)
  with pytest.raises(ValueError, match="no anomalous pixel"):
    metric(maps, np.zeros_like(masks))
  bad = maps.copy()
  bad[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match="1 NaN"):
    metric(bad, masks)


def test_no_normal_pixel_and_bad_limit():
  maps, masks = _random_set(0)
  for metric in (pixel_auroc, aupro):
    with pytest.raises(ValueError, match="no normal pixel"):
      metric(maps, np.ones_like(masks))
  for limit in (0.0, 1.5):
    with pytest.raises(ValueError, match="fpr_limit"):
      aupro(maps, masks, fpr_limit=limit)


@pytest.mark.parametrize("chunk", [1, 97, 4096])
def test_chunked_cumulative_sums_give_the_same_curve(monkeypatch, chunk):
  maps, masks = _random_set(2, quantize=8)
  full_fpr, full_pro, full_thr = pro_curve(maps, masks)
  want = aupro(maps, masks)
  monkeypatch.setattr(metrics_lib, "_PRO_CHUNK", chunk)
  assert aupro(maps, masks) == pytest.approx(want, abs=1e-12)
  fpr, pro, thr = pro_curve(maps, masks)
  np.testing.assert_array_equal(fpr, full_fpr)
  np.testing.assert_allclose(pro, full_pro, atol=1e-12)
  np.testing.assert_array_equal(thr, full_thr)
  # With max_fpr the curve stops at the first point beyond it.
  fpr, _, _ = pro_curve(maps, masks, max_fpr=0.3)
  assert fpr[-2] <= 0.3 < fpr[-1] and fpr.size < full_fpr.size
  np.testing.assert_array_equal(fpr, full_fpr[: fpr.size])


def test_per_image_pixel_auroc_is_the_mean_over_anomalous_images():
  """IGD's localisation number: each anomalous image's own pixel AUROC, averaged; all-normal
  (and all-anomalous) masks have none and are left out; it differs from the pooled AUROC."""
  rng = np.random.default_rng(0)
  masks = np.zeros((4, 16, 16), bool)
  masks[0, 2:6, 2:6] = True
  masks[2, 8:14, 1:5] = True
  masks[3] = True  # no normal pixel: no AUROC of its own
  maps = rng.normal(0, 1, masks.shape) + 1.5 * masks
  maps[2] += 3.0  # a brighter image: changes the pooled AUROC, not its own
  want = np.mean([roc_auc_score(masks[i].ravel(), maps[i].ravel()) for i in (0, 2)])
  assert metrics_lib.pixel_auroc_per_image(maps, masks) == pytest.approx(want, abs=1e-12)
  assert abs(metrics_lib.pixel_auroc_per_image(maps, masks) - pixel_auroc(maps, masks)) > 1e-3
  with pytest.raises(ValueError, match="no image has both"):
    metrics_lib.pixel_auroc_per_image(maps[:2], np.stack([masks[1], masks[3]]))
