"""Training-time augmentation: random translations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.ops import augment


def _translated(image, dy, dx):
  """``image`` (H, W, C) moved by (dy, dx) pixels, edges repeated: the reference in numpy."""
  h, w, _ = image.shape
  rows = np.clip(np.arange(h) - dy, 0, h - 1)
  cols = np.clip(np.arange(w) - dx, 0, w - 1)
  return image[rows][:, cols]


def test_random_shifts_translate_each_image_within_the_range_with_edges_repeated():
  x = np.asarray(jax.random.uniform(jax.random.key(0), (16, 9, 7, 2)))
  out = np.asarray(augment.random_shifts(jax.random.key(1), jnp.asarray(x), 2))
  shifts = []
  for image, moved in zip(x, out, strict=True):
    found = [
      (dy, dx)
      for dy in range(-2, 3)
      for dx in range(-2, 3)
      if np.array_equal(_translated(image, dy, dx), moved)
    ]
    assert len(found) == 1, found  # exactly one translation in range explains the output
    shifts.append(found[0])
  # Each image draws its own offset, and both signs on both axes occur.
  assert len(set(shifts)) > 4
  assert min(s[0] for s in shifts) < 0 < max(s[0] for s in shifts)
  assert min(s[1] for s in shifts) < 0 < max(s[1] for s in shifts)


def test_random_shifts_zero_is_the_identity_and_negative_is_refused():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  assert augment.random_shifts(jax.random.key(0), x, 0) is x
  # Deterministic for a key, different for another, jit-safe.
  f = jax.jit(augment.random_shifts, static_argnums=2)
  y = jax.random.normal(jax.random.key(3), (8, 6, 6, 1))
  np.testing.assert_array_equal(f(jax.random.key(4), y, 1), f(jax.random.key(4), y, 1))
  assert not np.array_equal(f(jax.random.key(4), y, 1), f(jax.random.key(5), y, 1))
  with pytest.raises(ValueError, match="max_shift must be >= 0, got -1"):
    augment.random_shifts(jax.random.key(0), x, -1)
