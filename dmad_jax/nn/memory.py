"""Flax linen wrapper of the block-wise memory in :mod:`dmad_jax.ops.memory`."""

from __future__ import annotations

import flax.linen as nn
import jax

from dmad_jax.ops import memory as memory_ops


class BlockMemory(nn.Module):
  """DAAD block-wise memory with a learned ``(N, D)`` bank.

  The parameter ``"memory"`` has ``D = (H/r_h) * (W/r_w) * (C/r_c)``, inferred from the input
  shape at init, and is initialised ``U(-1/sqrt(D), 1/sqrt(D))`` (MemAE convention). All math
  lives in :func:`dmad_jax.ops.memory.block_memory_read`.

  Attributes:
    num_items: N, the number of memory items.
    rates: ``(r_h, r_w, r_c)`` number of blocks along H, W and C. ``(H, W, 1)`` gives the
      per-pixel MemAE / MNAD read, ``(1, 1, 1)`` an image-level read.
    shrink: apply hard shrinkage (threshold ``1/N`` unless ``shrink_threshold``) and L1
      re-normalisation to the addressing weights.
    shrink_threshold: overrides the ``1/N`` threshold.
  """

  num_items: int
  rates: tuple[int, int, int]
  shrink: bool = True
  shrink_threshold: float | None = None

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
    memory = self.param("memory", memory_ops.memory_init, self.num_items, dim)
    return memory_ops.block_memory_read(
      f,
      memory,
      rates=self.rates,
      shrink=self.shrink,
      shrink_threshold=self.shrink_threshold,
    )
