"""Flax linen wrapper of the VQ layer in :mod:`dmad_jax.ops.quantize`."""

from __future__ import annotations

import flax.linen as nn
import jax

from dmad_jax.ops import quantize as quantize_ops


class VectorQuantizer(nn.Module):
  """VQ-VAE vector quantiser with a learned ``(K, D)`` codebook (DMAD-PDM / PPDM).

  The codebook parameter ``"codebook"`` is initialised ``U(-1/K, 1/K)`` as in the official code.
  All math lives in :func:`dmad_jax.ops.quantize.vector_quantize`.

  Attributes:
    num_codes: K, the codebook size.
    dim: D, the code width; must equal the last axis of the input.
    beta: commitment weight, already applied in ``aux.commitment_loss``.
    chunk_size: rows per distance chunk; ``None`` picks about 4 MiB of distances.
  """

  num_codes: int
  dim: int
  beta: float = 0.25
  chunk_size: int | None = None

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, quantize_ops.VQAux]:
    """Quantises ``z``.

    Args:
      z: ``(..., D)`` inputs, e.g. NHWC features with ``D = dim`` channels.

    Returns:
      ``(z_q_st, aux)`` as returned by :func:`dmad_jax.ops.quantize.vector_quantize`:
      straight-through quantised values of the shape of ``z`` and a ``VQAux``.

    Raises:
      ValueError: if the last axis of ``z`` is not ``dim``.
    """
    codebook = self.param("codebook", quantize_ops.uniform_codebook_init, self.num_codes, self.dim)
    return quantize_ops.vector_quantize(z, codebook, beta=self.beta, chunk_size=self.chunk_size)
