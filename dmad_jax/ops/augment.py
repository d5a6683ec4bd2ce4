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
