"""Flax linen layers over dmad_jax.ops (NHWC, torch-default initialisation)."""

from dmad_jax.nn.coordconv import CoordConv
from dmad_jax.nn.fast_conv import FastConv, FastConvTranspose
from dmad_jax.nn.layers import Basic, Conv, Head, ResBlock, Upsample
from dmad_jax.nn.memory import BlockMemory
from dmad_jax.nn.quantize import VectorQuantizer

__all__ = [
  "Basic",
  "BlockMemory",
  "Conv",
  "CoordConv",
  "FastConv",
  "FastConvTranspose",
  "Head",
  "ResBlock",
  "Upsample",
  "VectorQuantizer",
]
