"""Flax linen wrapper of the VQ layer in :mod:`dmad_jax.ops.quantize`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.ops import quantize as quantize_ops

UPDATES = ("loss", "ema")


class VectorQuantizer(nn.Module):
  """VQ-VAE vector quantiser with a learned ``(K, D)`` codebook (DMAD-PDM / PPDM).

  The codebook parameter ``"codebook"`` is initialised ``U(-1/K, 1/K)`` as in the official code.
  All math lives in :func:`dmad_jax.ops.quantize.vector_quantize`.

  Attributes:
    num_codes: K, the codebook size.
    dim: D, the code width; must equal the last axis of the input.
    beta: commitment weight, already applied in ``aux.commitment_loss``.
    chunk_size: rows per distance chunk; ``None`` picks about 4 MiB of distances.
    update: how the codes learn: "loss" (the ``codebook`` parameter, trained by the codebook
      loss; the released code) or "ema" (no parameter: ``batch_stats`` keep a moving average
      of the inputs assigned to each code, :func:`dmad_jax.ops.quantize.ema_codebook_update`,
      and codes that fall out of use restart at the worst-quantised inputs; updated when
      ``train`` and the collection is mutable, as BatchNorm's statistics).
    decay: the moving average's decay ("ema").
    dead_threshold: a code whose running count falls below it restarts ("ema").
  """

  num_codes: int
  dim: int
  beta: float = 0.25
  chunk_size: int | None = None
  update: str = "loss"
  decay: float = 0.99
  dead_threshold: float = 0.01

  @nn.compact
  def __call__(
    self, z: jax.Array, train: bool = False, rank: int | jax.Array | None = None
  ) -> tuple[jax.Array, quantize_ops.VQAux]:
    """Quantises ``z``.

    Args:
      z: ``(..., D)`` inputs, e.g. NHWC features with ``D = dim`` channels.
      train: update the "ema" codebook (when ``batch_stats`` is mutable).
      rank: None quantises to the nearest code; an int or traced int32 ``r`` returns the r-th
        nearest instead (0: the nearest; no gradient; inference only, e.g. to decode more than
        one prototype per image), with ``aux.indices`` and ``aux.quantized`` those of that code.

    Returns:
      ``(z_q_st, aux)`` as returned by :func:`dmad_jax.ops.quantize.vector_quantize`:
      straight-through quantised values of the shape of ``z`` and a ``VQAux``.

    Raises:
      ValueError: if the last axis of ``z`` is not ``dim``.
    """
    if self.update not in UPDATES:
      raise ValueError(f"VectorQuantizer: update must be one of {UPDATES}, got {self.update!r}")
    if rank is not None and train:
      raise ValueError(f"VectorQuantizer: rank {rank} is for inference, not with train=True")
    if self.update == "ema":
      z_q, aux, codebook = self._ema(z, train)
    else:
      codebook = self.param(
        "codebook", quantize_ops.uniform_codebook_init, self.num_codes, self.dim
      )
      z_q, aux = quantize_ops.vector_quantize(
        z, codebook, beta=self.beta, chunk_size=self.chunk_size
      )
    if rank is None:
      return z_q, aux
    index = quantize_ops.ranked_code_indices(z.reshape(-1, self.dim), codebook, rank)
    q = jax.lax.stop_gradient(jnp.take(codebook, index, axis=0).reshape(z.shape).astype(z.dtype))
    return q, aux._replace(indices=index.reshape(z.shape[:-1]), quantized=q)

  def _ema(self, z, train):
    # Zero counts: every code is dead at the first training step and restarts at an input row,
    # so the codebook starts on the data.
    cluster = self.variable(
      "batch_stats", "cluster_size", lambda: jnp.zeros((self.num_codes,), jnp.float32)
    )
    embed = self.variable(
      "batch_stats",
      "embed_sum",
      lambda: quantize_ops.uniform_codebook_init(self.make_rng("params"), self.num_codes, self.dim),
    )
    codebook = embed.value / jnp.maximum(cluster.value, 1e-12)[:, None]
    codebook = jnp.where((cluster.value > 0)[:, None], codebook, embed.value)
    z_q, aux = quantize_ops.vector_quantize(
      z, jax.lax.stop_gradient(codebook), beta=self.beta, chunk_size=self.chunk_size
    )
    if train and not self.is_initializing():
      cluster.value, embed.value, _ = quantize_ops.ema_codebook_update(
        cluster.value,
        embed.value,
        z,
        aux.indices,
        decay=self.decay,
        dead_threshold=self.dead_threshold,
      )
    return z_q, aux, codebook
