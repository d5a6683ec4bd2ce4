"""Vector quantisation (VQ-VAE style) as pure JAX functions.

This is the VQ layer shared by DMAD-PDM and DMAD-PPDM (spec section 0): a codebook of K codes of
width D, squared-L2 nearest-code assignment, a straight-through estimator and the two VQ-VAE
losses. The released DMAD code restarts no dead codes. Two pure functions do, each for one way
the codes learn: :func:`reseed_dead_codes` (random rows, for a codebook parameter trained by the
loss; no model uses it yet) and :func:`ema_codebook_update` (the moving-average codebook, which
restarts dead codes at the worst-quantised rows without a key; PDM's ``vq_update="ema"``).

Shapes: ``z`` is ``(..., D)`` with any leading shape (typically NHWC with D = channels); all
leading axes are flattened into ``N`` rows for the assignment. The codebook is ``(K, D)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Rows per chunk are chosen so that one chunk of the (rows, K) distance matrix holds about this
# many float32 values (2**20 floats = 4 MiB); this keeps peak memory flat in N.
_DEFAULT_CHUNK_FLOATS = 2**20


class VQAux(NamedTuple):
  """Auxiliary outputs of :func:`vector_quantize` (a pytree, being a NamedTuple).

  Attributes:
    indices: ``int32`` array with the leading shape of ``z``: index of the nearest code.
    quantized: ``q = codebook[indices]``, shape of ``z``, WITHOUT straight-through: its
      gradient flows into the codebook only.
    codebook_loss: scalar ``mean((q - sg(z))**2)``, the VQ-VAE "embedding" loss; it trains the
      codebook only.
    commitment_loss: scalar ``beta * mean((sg(q) - z)**2)``. The factor ``beta`` is ALREADY
      applied: the official PDM code returns ``(0.25 * commitment, embedding)`` and PPDM returns
      ``0.25 * commitment + embedding``; both equal this field and ``codebook_loss`` (separately
      or summed), so the total VQ loss is ``codebook_loss + commitment_loss`` with no further
      weight. It trains ``z`` (the encoder) only.
    perplexity: scalar ``exp(-sum_k p_k log p_k)`` of the code-usage histogram ``p = usage / N``
      over all rows (``0 log 0 = 0``). It ranges from 1 (one code used) to K (uniform use).
    usage: ``(K,)`` float32 number of rows assigned to each code.
  """

  indices: jax.Array
  quantized: jax.Array
  codebook_loss: jax.Array
  commitment_loss: jax.Array
  perplexity: jax.Array
  usage: jax.Array


def _check_codebook(codebook: jax.Array, dim: int | None = None) -> tuple[int, int]:
  """Validates a ``(K, D)`` codebook and, if given, its width against ``dim``."""
  if codebook.ndim != 2:
    raise ValueError(f"codebook must have shape (K, D), got shape {codebook.shape}")
  num_codes, code_dim = codebook.shape
  if dim is not None and dim != code_dim:
    raise ValueError(f"last axis of z has size {dim} but the codebook has width D={code_dim}")
  return num_codes, code_dim


def default_chunk_size(num_codes: int) -> int:
  """Rows per chunk so that a ``(rows, num_codes)`` float32 block stays about 4 MiB.

  Args:
    num_codes: codebook size K.

  Returns:
    A positive number of rows.
  """
  return max(1, _DEFAULT_CHUNK_FLOATS // max(1, num_codes))


def _distances(rows: jax.Array, codebook: jax.Array, code_sq: jax.Array) -> jax.Array:
  """(R, K) squared distances of the rows of ``rows`` (R, D) to every code."""
  # Matmul form of ||z - e||^2, as in the official code. The ||z||^2 term does not change the
  # argmin but is kept so that distances (and hence tie-breaking) follow the reference exactly.
  return (
    jnp.sum(rows * rows, axis=-1, keepdims=True)
    + code_sq[None, :]
    - 2.0 * jnp.matmul(rows, codebook.T, precision=jax.lax.Precision.HIGHEST)
  )


def _nearest_code(rows: jax.Array, codebook: jax.Array, code_sq: jax.Array) -> jax.Array:
  """Index of the nearest code for each row of ``rows`` (R, D); returns (R,) int32."""
  return jnp.argmin(_distances(rows, codebook, code_sq), axis=-1).astype(jnp.int32)


def nearest_code_indices(
  z_flat: jax.Array, codebook: jax.Array, *, chunk_size: int | None = None
) -> jax.Array:
  """Nearest-code assignment of ``(N, D)`` rows, chunked over rows to bound memory.

  The ``(N, K)`` distance matrix is never materialised: rows are processed in fixed-size chunks
  (the last one zero-padded, the padding discarded) with ``jax.lax.map``, so peak memory is
  ``chunk_size * K`` floats. Each row's distances are computed by the same expression in every
  chunk, so the result does not depend on ``chunk_size``.

  Args:
    z_flat: ``(N, D)`` rows.
    codebook: ``(K, D)`` codes.
    chunk_size: rows per chunk; ``None`` picks :func:`default_chunk_size`.

  Returns:
    ``(N,)`` int32 indices of the nearest code (first one on ties, like ``argmin``).

  Raises:
    ValueError: if the shapes do not match or ``chunk_size`` is not positive.
  """
  if z_flat.ndim != 2:
    raise ValueError(f"z_flat must have shape (N, D), got shape {z_flat.shape}")
  num_codes, _ = _check_codebook(codebook, z_flat.shape[-1])
  if chunk_size is None:
    chunk_size = default_chunk_size(num_codes)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  # Distances must be computed at float32 or better so that bf16 activations still pick the
  # truly nearest code; argmin does not need gradients, so cut them here.
  dtype = jnp.promote_types(jnp.result_type(z_flat, codebook), jnp.float32)
  z_flat = jax.lax.stop_gradient(z_flat).astype(dtype)
  codebook = jax.lax.stop_gradient(codebook).astype(dtype)
  code_sq = jnp.sum(codebook * codebook, axis=-1)

  num_rows = z_flat.shape[0]
  # A symbolic row count (a program exported with a free batch size) is searched in one piece.
  if not isinstance(num_rows, int) or num_rows <= chunk_size:
    return _nearest_code(z_flat, codebook, code_sq)
  num_chunks = -(-num_rows // chunk_size)
  padded = jnp.pad(z_flat, ((0, num_chunks * chunk_size - num_rows), (0, 0)))
  chunks = padded.reshape(num_chunks, chunk_size, z_flat.shape[1])
  indices = jax.lax.map(lambda rows: _nearest_code(rows, codebook, code_sq), chunks)
  return indices.reshape(-1)[:num_rows]


def _perplexity(usage: jax.Array, num_rows: int) -> jax.Array:
  """``exp(entropy)`` of ``usage / num_rows`` with the convention ``0 log 0 = 0``."""
  p = usage / max(num_rows, 1)
  # The inner where keeps log() away from 0 so no NaN appears (even in unused gradients).
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return jnp.exp(-jnp.sum(plogp))


def ranked_code_indices(z_flat: jax.Array, codebook: jax.Array, rank: int) -> jax.Array:
  """Index of the ``rank``-th nearest code of each ``(N, D)`` row (rank 0: the nearest).

  The whole ``(N, K)`` distance matrix is formed (inference on a few rows, such as one global
  code per image); ties go to the lower index, so rank 0 equals :func:`nearest_code_indices`.

  Args:
    z_flat: ``(N, D)`` rows.
    codebook: ``(K, D)`` codes.
    rank: 0 <= rank < K; an int or a traced int32 scalar (e.g. the index of a loop over
      ranks, compiled once).

  Returns:
    ``(N,)`` int32 indices.

  Raises:
    ValueError: if the shapes do not match or a concrete ``rank`` is outside ``[0, K)``.
  """
  if z_flat.ndim != 2:
    raise ValueError(f"z_flat must have shape (N, D), got shape {z_flat.shape}")
  num_codes, _ = _check_codebook(codebook, z_flat.shape[-1])
  if isinstance(rank, int) and not 0 <= rank < num_codes:
    raise ValueError(f"rank must be in [0, {num_codes}) for a codebook of {num_codes}, got {rank}")
  dtype = jnp.promote_types(jnp.result_type(z_flat, codebook), jnp.float32)
  z_flat = jax.lax.stop_gradient(z_flat).astype(dtype)
  codebook = jax.lax.stop_gradient(codebook).astype(dtype)
  dist = _distances(z_flat, codebook, jnp.sum(codebook * codebook, axis=-1))
  # A stable sort keeps equal distances in index order, as argmin does.
  order = jnp.argsort(dist, axis=-1, stable=True)
  return jax.lax.dynamic_index_in_dim(order, rank, axis=1, keepdims=False).astype(jnp.int32)


def vector_quantize(
  z: jax.Array,
  codebook: jax.Array,
  *,
  beta: float = 0.25,
  chunk_size: int | None = None,
) -> tuple[jax.Array, VQAux]:
  """Quantises ``z`` to its nearest codebook rows with a straight-through estimator.

  Distances are ``||z||^2 + ||e||^2 - 2 z.e`` per row (rows = all leading positions of ``z``),
  the code is the argmin, ``q = codebook[index]`` and ``z_q_st = z + sg(q - z)``: its value is
  ``q`` (up to one float rounding) and its Jacobian with respect to ``z`` is the identity.

  Args:
    z: ``(..., D)`` inputs, e.g. NHWC encoder features with D = channels.
    codebook: ``(K, D)`` codes.
    beta: commitment weight; it is applied inside ``aux.commitment_loss``.
    chunk_size: rows per distance chunk (see :func:`nearest_code_indices`); ``None`` picks a
      chunk of about 4 MiB of distances. The result does not depend on it.

  Returns:
    ``(z_q_st, aux)``: ``z_q_st`` has the shape and dtype of ``z``; ``aux`` is a :class:`VQAux`
    with the indices, the quantised values without straight-through, both losses (``beta``
    already applied to the commitment loss), the perplexity and the per-code usage.

  Raises:
    ValueError: if ``codebook`` is not ``(K, D)`` with D = ``z.shape[-1]``.
  """
  if z.ndim < 1:
    raise ValueError(f"z must have a trailing feature axis, got shape {z.shape}")
  num_codes, dim = _check_codebook(codebook, z.shape[-1])
  lead_shape = z.shape[:-1]
  z_flat = z.reshape(-1, dim)
  num_rows = z_flat.shape[0]

  flat_indices = nearest_code_indices(z_flat, codebook, chunk_size=chunk_size)
  # Gather from the live codebook so the embedding loss can train it.
  q = jnp.take(codebook, flat_indices, axis=0).reshape(z.shape).astype(z.dtype)

  codebook_loss = jnp.mean(jnp.square(q - jax.lax.stop_gradient(z)))
  commitment_loss = beta * jnp.mean(jnp.square(jax.lax.stop_gradient(q) - z))
  z_q_st = z + jax.lax.stop_gradient(q - z)

  usage = jnp.bincount(flat_indices, length=num_codes).astype(jnp.float32)
  aux = VQAux(
    indices=flat_indices.reshape(lead_shape),
    quantized=q,
    codebook_loss=codebook_loss,
    commitment_loss=commitment_loss,
    perplexity=_perplexity(usage, num_rows),
    usage=usage,
  )
  return z_q_st, aux


def ema_codebook_update(
  cluster_size: jax.Array,
  embed_sum: jax.Array,
  z: jax.Array,
  indices: jax.Array,
  *,
  decay: float,
  dead_threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One step of the exponential-moving-average codebook (VQ-VAE's appendix) with restarts.

  Each code is ``embed_sum / cluster_size``: the running average of the inputs assigned to it.
  ``cluster_size <- decay cluster_size + (1 - decay) counts`` and ``embed_sum <- decay embed_sum
  + (1 - decay) sums``. A code whose ``cluster_size`` then falls below ``dead_threshold`` is
  restarted at an input row (its ``cluster_size`` set to 1): the dead codes take, in code order,
  the rows farthest from their current code (the worst-quantised ones), deterministically, so no
  random key is needed and a resumed run restarts the same codes.

  Args:
    cluster_size: ``(K,)`` running counts.
    embed_sum: ``(K, D)`` running sums.
    z: ``(..., D)`` the inputs of this step (no gradient flows through the update).
    indices: the code of each row of ``z`` (``z.shape[:-1]``).
    decay: the moving average's decay in [0, 1).
    dead_threshold: codes with a smaller running count are restarted.

  Returns:
    ``(cluster_size, embed_sum, num_restarted)``.
  """
  num_codes, dim = _check_codebook(embed_sum, z.shape[-1])
  z_flat = jax.lax.stop_gradient(z).reshape(-1, dim).astype(embed_sum.dtype)
  idx = indices.reshape(-1)
  onehot = jax.nn.one_hot(idx, num_codes, dtype=embed_sum.dtype)
  cluster_size = decay * cluster_size + (1.0 - decay) * jnp.sum(onehot, 0)
  embed_sum = decay * embed_sum + (1.0 - decay) * (onehot.T @ z_flat)
  codes = embed_sum / jnp.maximum(cluster_size, 1e-12)[:, None]
  error = jnp.sum(jnp.square(z_flat - codes[idx]), -1)
  order = jnp.argsort(-error)
  dead = cluster_size < dead_threshold
  rank = jnp.cumsum(dead) - 1
  rows = z_flat[order[jnp.mod(rank, z_flat.shape[0])]]
  embed_sum = jnp.where(dead[:, None], rows, embed_sum)
  cluster_size = jnp.where(dead, 1.0, cluster_size)
  return cluster_size, embed_sum, jnp.sum(dead, dtype=jnp.int32)


def uniform_codebook_init(
  key: jax.Array, num_codes: int, dim: int, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
  """Codebook initialisation of the official code: ``U(-1/K, 1/K)``.

  Args:
    key: PRNG key.
    num_codes: K.
    dim: D.
    dtype: dtype of the result.

  Returns:
    ``(K, D)`` codebook.
  """
  bound = 1.0 / num_codes
  return jax.random.uniform(key, (num_codes, dim), dtype=dtype, minval=-bound, maxval=bound)


def reseed_dead_codes(
  codebook: jax.Array,
  usage: jax.Array,
  z: jax.Array,
  key: jax.Array,
  *,
  threshold: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Replaces rarely used codes by randomly chosen input rows.

  A candidate row of ``z`` is drawn for EVERY code and selected with ``jnp.where`` only for the
  dead ones, so shapes are static and the function is jittable. Candidates are drawn without
  replacement when there are at least K rows (so two dead codes never get the same row) and with
  replacement otherwise.

  Args:
    codebook: ``(K, D)`` codes.
    usage: ``(K,)`` usage counts (e.g. ``aux.usage``, or a running average of it).
    z: ``(..., D)`` inputs; all leading axes are flattened into candidate rows.
    key: PRNG key.
    threshold: codes with ``usage < threshold`` are dead.

  Returns:
    ``(new_codebook, num_reseeded)``: the ``(K, D)`` codebook and an int32 scalar count.

  Raises:
    ValueError: if the shapes do not match or ``z`` has no rows.
  """
  num_codes, dim = _check_codebook(codebook, z.shape[-1])
  if usage.shape != (num_codes,):
    raise ValueError(f"usage must have shape ({num_codes},), got {usage.shape}")
  z_flat = jax.lax.stop_gradient(z).reshape(-1, dim)
  num_rows = z_flat.shape[0]
  if num_rows == 0:
    raise ValueError("z has no rows to re-seed codes from")
  if num_rows >= num_codes:
    rows = jax.random.choice(key, num_rows, (num_codes,), replace=False)
  else:
    rows = jax.random.randint(key, (num_codes,), 0, num_rows)
  dead = usage < threshold
  new_codebook = jnp.where(dead[:, None], z_flat[rows].astype(codebook.dtype), codebook)
  return new_codebook, jnp.sum(dead, dtype=jnp.int32)
