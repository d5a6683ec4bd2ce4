"""Pure JAX functions (no Flax), NHWC: sampling, quantisation, block memory, filters, SSIM,
augmentation.

Every function is jit-, vmap- and grad-safe and matches the PyTorch semantics of the official
DMAD code where one exists (see the tests for the parity checks).
"""

from dmad_jax.ops.augment import random_flips, random_shifts
from dmad_jax.ops.conv import conv_general_dilated, conv_transpose, lhs_dilated_conv
from dmad_jax.ops.filters import (
  add_coords,
  box_filter_max,
  coord_channels,
  gaussian_blur,
  gradient_difference,
  smoothness_1d,
  smoothness_2d,
  smoothness_kernel_1d,
  smoothness_kernel_2d,
)
from dmad_jax.ops.memory import block_memory_read, hard_shrink, memory_init
from dmad_jax.ops.quantize import (
  VQAux,
  reseed_dead_codes,
  uniform_codebook_init,
  vector_quantize,
)
from dmad_jax.ops.sampling import (
  clamp_grid,
  grid_sample,
  identity_grid,
  offsets_to_grid,
  resize_bilinear,
  warp,
)
from dmad_jax.ops.ssim import ms_ssim, ms_ssim_maps, ssim, ssim_maps

__all__ = [
  "VQAux",
  "add_coords",
  "block_memory_read",
  "box_filter_max",
  "clamp_grid",
  "conv_general_dilated",
  "conv_transpose",
  "coord_channels",
  "gaussian_blur",
  "gradient_difference",
  "grid_sample",
  "hard_shrink",
  "identity_grid",
  "lhs_dilated_conv",
  "memory_init",
  "ms_ssim",
  "ms_ssim_maps",
  "offsets_to_grid",
  "random_flips",
  "random_shifts",
  "reseed_dead_codes",
  "resize_bilinear",
  "smoothness_1d",
  "smoothness_2d",
  "smoothness_kernel_1d",
  "smoothness_kernel_2d",
  "ssim",
  "ssim_maps",
  "uniform_codebook_init",
  "vector_quantize",
  "warp",
]
