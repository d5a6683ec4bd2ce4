"""Training-time augmentation of image batches (pure, jit-safe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_flips(rng: jax.Array, x: jax.Array, *, horizontal: bool, vertical: bool) -> jax.Array:
  """Flips each image of ``x`` (B, H, W, C) left-right and/or up-down with probability 1/2."""
  k_h, k_v = jax.random.split(rng)
  shape = (x.shape[0], 1, 1, 1)
  if horizontal:
    x = jnp.where(jax.random.bernoulli(k_h, 0.5, shape), x[:, :, ::-1], x)
  if vertical:
    x = jnp.where(jax.random.bernoulli(k_v, 0.5, shape), x[:, ::-1], x)
  return x


def random_shifts(rng: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image of ``x`` (B, H, W, C) by its own integer offset, drawn uniformly in
  [-max_shift, max_shift] along each axis; pixels shifted in repeat the nearest edge pixel (the
  background of a centred object), nothing wraps around. ``max_shift = 0`` returns ``x``."""
  max_shift = int(max_shift)
  if max_shift < 0:
    raise ValueError(f"random_shifts: max_shift must be >= 0, got {max_shift}")
  if max_shift == 0:
    return x
  b, h, w, _ = x.shape
  start = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(x, pad, mode="edge")

  def crop(image, corner):
    return jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, start)
