"""Flax linen wrapper of the block-wise memory in :mod:`dmad_jax.ops.memory`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.ops import memory as memory_ops

MEMORY_INITS = ("uniform", "normal", "unit_positive")


def _init_memory(key: jax.Array, num_items: int, dim: int, how: str) -> jax.Array:
  """An ``(N, D)`` bank initialised as ``how`` (see :class:`BlockMemory`)."""
  if how == "uniform":
    return memory_ops.memory_init(key, num_items, dim)
  if how == "normal":
    return jax.random.normal(key, (num_items, dim)) / jnp.sqrt(dim)
  if how == "unit_positive":
    m = jax.random.uniform(key, (num_items, dim))
    return m / jnp.linalg.norm(m, axis=-1, keepdims=True)
  raise ValueError(f"BlockMemory.memory_init must be one of {MEMORY_INITS}, got {how!r}")


class BlockMemory(nn.Module):
  """DAAD block-wise memory with a learned ``(N, D)`` bank.

  The parameter ``"memory"`` has ``D = (H/r_h) * (W/r_w) * (C/r_c)``, inferred from the input
  shape at init. All math lives in :func:`dmad_jax.ops.memory.block_memory_read`.

  Initialisations (DAAD does not state one): ``"uniform"`` is MemAE's ``U(-1/sqrt(D),
  1/sqrt(D))``; ``"normal"`` is ``N(0, 1/D)``; ``"unit_positive"`` is MNAD's rows of ``U[0, 1)``
  scaled to unit L2 norm.

  Attributes:
    num_items: N, the number of memory items.
    rates: ``(r_h, r_w, r_c)`` number of blocks along H, W and C. ``(H, W, 1)`` gives the
      per-pixel MemAE / MNAD read, ``(1, 1, 1)`` an image-level read.
    shrink: apply hard shrinkage (threshold ``1/N`` unless ``shrink_threshold``) and L1
      re-normalisation to the addressing weights.
    shrink_threshold: overrides the ``1/N`` threshold.
    renormalize: L1 re-normalise the weights kept by the shrinkage.
    temperature: softmax temperature of the cosine similarities (1 = DAAD's Eq. 1).
    memory_init: memory initialisation, one of ``MEMORY_INITS``.
  """

  num_items: int
  rates: tuple[int, int, int]
  shrink: bool = True
  shrink_threshold: float | None = None
  renormalize: bool = True
  temperature: float = 1.0
  memory_init: str = "uniform"

  @nn.compact
  def __call__(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reads the memory for every block of ``f``.

    Args:
      f: ``(B, H, W, C)`` feature map.

    Returns:
      ``(read, weights)``: the ``(B, H, W, C)`` read and the ``(B, r_h, r_w, r_c, N)``
      addressing weights.

    Raises:
      ValueError: if ``f`` is not 4-D or its sizes are not divisible by ``rates``.
    """
    if f.ndim != 4:
      raise ValueError(f"f must have shape (B, H, W, C), got shape {f.shape}")
    dim = memory_ops.block_query_dim(*f.shape[1:], self.rates)
    memory = self.param("memory", _init_memory, self.num_items, dim, self.memory_init)
    return memory_ops.block_memory_read(
      f,
      memory,
      rates=self.rates,
      shrink=self.shrink,
      shrink_threshold=self.shrink_threshold,
      renormalize=self.renormalize,
      temperature=self.temperature,
    )
