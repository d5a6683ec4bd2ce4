"""``FastConv``: Flax's ``nn.Conv`` with dmad_jax's CPU weight gradient (``ops.conv``).

Same parameters, names and forward pass as ``nn.Conv``; on CPU its weight gradient is a C++
kernel (several times faster than XLA:CPU's; see ``dmad_jax/ops/conv.py``), everywhere else it
is exactly ``nn.Conv``. Every convolution in ``dmad_jax.nn`` and ``dmad_jax.models`` uses it.
"""

import functools

import flax.linen as nn

from dmad_jax.ops import conv

FastConv = functools.partial(nn.Conv, conv_general_dilated=conv.conv_general_dilated)
