"""Block-wise memory read (DAAD) as pure JAX functions.

DAAD (spec section 3) splits a feature map ``f`` of shape ``(H, W, C)`` into a grid of
``r_h * r_w * r_c`` blocks of shape ``(H/r_h, W/r_w, C/r_c)``, flattens each block in row-major
``(h, w, c)`` order into a query of length ``D = (H/r_h) * (W/r_w) * (C/r_c)``, addresses a bank of
N memory items by a softmax over cosine similarities, applies MemAE's hard shrinkage and
re-assembles the read blocks into a map of the input shape.

Special cases: ``rates = (H, W, 1)`` makes every pixel its own block (the per-pixel MemAE / MNAD
read of the C-vector at each pixel); ``rates = (1, 1, 1)`` reads the whole image as one query.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _check_rates(rates: Sequence[int]) -> tuple[int, int, int]:
  """Validates ``rates`` and returns them as a tuple of three Python ints."""
  try:
    # operator.index accepts Python and NumPy ints but rejects floats and traced values, which
    # cannot define a static block grid.
    rates = tuple(operator.index(r) for r in rates)
  except TypeError as err:
    raise ValueError(f"rates must be three positive ints (r_h, r_w, r_c), got {rates}") from err
  if len(rates) != 3 or min(rates) < 1:
    raise ValueError(f"rates must be three positive ints (r_h, r_w, r_c), got {rates}")
  return rates


def block_query_dim(height: int, width: int, channels: int, rates: Sequence[int]) -> int:
  """Length D of one block query for an ``(H, W, C)`` map split with ``rates``.

  Args:
    height: H.
    width: W.
    channels: C.
    rates: ``(r_h, r_w, r_c)`` number of blocks along each axis.

  Returns:
    ``D = (H / r_h) * (W / r_w) * (C / r_c)``.

  Raises:
    ValueError: if a size is not divisible by its rate or the rates are not positive ints.
  """
  r_h, r_w, r_c = _check_rates(rates)
  if height % r_h or width % r_w or channels % r_c:
    raise ValueError(
      f"feature sizes (H, W, C) = ({height}, {width}, {channels}) are not divisible by "
      f"rates (r_h, r_w, r_c) = ({r_h}, {r_w}, {r_c})"
    )
  return (height // r_h) * (width // r_w) * (channels // r_c)


def _to_blocks(f: jax.Array, rates: tuple[int, int, int]) -> jax.Array:
  """``(B, H, W, C)`` -> ``(B, r_h, r_w, r_c, D)``, each block flattened (h, w, c) row-major."""
  b, h, w, c = f.shape
  r_h, r_w, r_c = rates
  x = f.reshape(b, r_h, h // r_h, r_w, w // r_w, r_c, c // r_c)
  # Block-grid axes first, then the within-block (h, w, c) axes in row-major order.
  x = x.transpose(0, 1, 3, 5, 2, 4, 6)
  return x.reshape(b, r_h, r_w, r_c, -1)


def _from_blocks(
  x: jax.Array, shape: tuple[int, int, int, int], rates: tuple[int, int, int]
) -> jax.Array:
  """Inverse of :func:`_to_blocks`: ``(B, r_h, r_w, r_c, D)`` -> ``(B, H, W, C)``."""
  b, h, w, c = shape
  r_h, r_w, r_c = rates
  x = x.reshape(b, r_h, r_w, r_c, h // r_h, w // r_w, c // r_c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6)
  return x.reshape(b, h, w, c)


def _unit(x: jax.Array, eps: float) -> jax.Array:
  """``x / sqrt(||x||^2 + eps)`` along the last axis.

  Adding ``eps`` under the square root (instead of clamping the norm) keeps the map smooth, so a
  zero vector maps to zero with a finite gradient; for any non-negligible vector the relative
  change is ``eps / ||x||^2``.
  """
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def hard_shrink(
  weights: jax.Array, threshold: float, *, eps: float = 1e-12, renormalize: bool = True
) -> jax.Array:
  """MemAE hard shrinkage with L1 re-normalisation along the last axis.

  ``w' = relu(w - lam) * w / (|w - lam| + eps)`` (continuous form of "keep w if w > lam, else 0",
  whose gradient passes through the kept weights), then ``w' / max(sum w', eps)``. Every weight
  ``<= lam`` becomes exactly 0 and the kept ones sum to 1 (unless none is kept: all zeros).

  Args:
    weights: ``(..., N)`` non-negative addressing weights.
    threshold: ``lam``.
    eps: numerical guard of both divisions.
    renormalize: divide by the sum of the kept weights (MemAE); False keeps them as they are
      (they then sum to less than 1).

  Returns:
    Shrunk weights of the same shape.
  """
  # With s = w - lam, relu(s) * w / (|s| + eps) == w * (1 - eps / (relu(s) + eps)): both are
  # exactly 0 (with zero gradient) for s <= 0 and equal, with equal derivatives, for s > 0. The
  # second form reads s once. XLA may recompute w (hence s) in several fusions that differ by an
  # ulp; a ratio relu(s) / |s| of two such copies is then off by ulp(w) / s, which was 3e-5
  # relative under jit(grad) for s ~ 1e-4, whereas this form is insensitive to it.
  kept = weights * (1.0 - eps / (jax.nn.relu(weights - threshold) + eps))
  if not renormalize:
    return kept
  return kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), eps)


def block_memory_read(
  f: jax.Array,
  memory: jax.Array,
  *,
  rates: Sequence[int],
  shrink: bool = True,
  shrink_threshold: float | None = None,
  renormalize: bool = True,
  temperature: float = 1.0,
  eps: float = 1e-12,
) -> tuple[jax.Array, jax.Array]:
  """Reads a memory bank with one query per block of ``f`` (DAAD block-wise memory).

  For each block query ``q`` (length D, flattened in ``(h, w, c)`` row-major order)::

    w_i  = softmax_i(cos(q, m_i) / T)                      # T = temperature (DAAD: 1)
    w'_i = hard_shrink(w, lam)_i     if shrink, else w_i   # lam = 1/N unless overridden
    read = sum_i w'_i m_i                                  # reshaped back into the block

  Cosine similarity normalises with ``sqrt(||x||^2 + eps)`` so a zero block or item gives
  similarity 0 and finite gradients.

  Args:
    f: ``(B, H, W, C)`` feature map.
    memory: ``(N, D)`` memory items with ``D = (H/r_h) * (W/r_w) * (C/r_c)``.
    rates: ``(r_h, r_w, r_c)`` number of blocks along H, W and C (static Python ints).
    shrink: apply hard shrinkage and L1 re-normalisation.
    shrink_threshold: shrinkage threshold; ``None`` means ``1/N``.
    renormalize: L1 re-normalise the weights kept by the shrinkage (MemAE); DAAD does not say.
    temperature: softmax temperature T of the cosine similarities; 1 is DAAD's Eq. 1, a small T
      approaches a hard nearest-item read.
    eps: guard in the cosine norms and in the shrinkage divisions.

  Returns:
    ``(read, weights)``: ``read`` is ``(B, H, W, C)`` in the dtype of ``f``; ``weights`` is
    ``(B, r_h, r_w, r_c, N)`` (after shrinkage when ``shrink``), float32 or wider.

  Raises:
    ValueError: if ``f`` is not 4-D, the sizes are not divisible by the rates, or ``memory`` is
      not ``(N, D)`` with the expected D.
  """
  if f.ndim != 4:
    raise ValueError(f"f must have shape (B, H, W, C), got shape {f.shape}")
  rates = _check_rates(rates)
  _, height, width, channels = f.shape
  dim = block_query_dim(height, width, channels, rates)
  if memory.ndim != 2 or memory.shape[1] != dim:
    raise ValueError(
      f"memory must have shape (N, D) with D = {dim} for f of shape {f.shape} and rates "
      f"{rates}: expected D = {dim}, got memory of shape {memory.shape}"
    )
  num_items = memory.shape[0]

  # Addressing in float32 or better: the softmax over N items and the 1/N threshold are
  # sensitive to low-precision similarities.
  dtype = jnp.promote_types(jnp.result_type(f, memory), jnp.float32)
  queries = _to_blocks(f, rates).astype(dtype)
  items = memory.astype(dtype)
  cos = jnp.einsum(
    "...d,nd->...n",
    _unit(queries, eps),
    _unit(items, eps),
    precision=jax.lax.Precision.HIGHEST,
  )
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  weights = jax.nn.softmax(cos / temperature if temperature != 1.0 else cos, axis=-1)
  if shrink:
    lam = 1.0 / num_items if shrink_threshold is None else shrink_threshold
    weights = hard_shrink(weights, lam, eps=eps, renormalize=renormalize)
  read_blocks = jnp.einsum("...n,nd->...d", weights, items, precision=jax.lax.Precision.HIGHEST)
  read = _from_blocks(read_blocks, f.shape, rates).astype(f.dtype)
  return read, weights


def memory_init(
  key: jax.Array, num_items: int, dim: int, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
  """MemAE memory initialisation ``U(-1/sqrt(D), 1/sqrt(D))``.

  Args:
    key: PRNG key.
    num_items: N.
    dim: D, the query length.
    dtype: dtype of the result.

  Returns:
    ``(N, D)`` memory.
  """
  bound = 1.0 / math.sqrt(dim)
  return jax.random.uniform(key, (num_items, dim), dtype=dtype, minval=-bound, maxval=bound)
