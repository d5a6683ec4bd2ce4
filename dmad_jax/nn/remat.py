"""Rematerialisation policies: what a training step keeps from its forward pass.

``config.remat`` names one; :meth:`dmad_jax.models.base.Detector.apply` wraps every module
application in ``jax.checkpoint`` with it, so the backward pass recomputes what the policy does
not save instead of holding it in memory from the forward pass:

* ``"none"`` (default): no ``jax.checkpoint``; XLA keeps what the backward pass needs.
* ``"conv_outputs"``: only the outputs of convolutions (``dmad_jax.ops.conv.CONV_OUTPUT``) are
  saved; the BatchNorm normalisations, activations, concatenations, poolings and warps between
  them are recomputed from those in the backward pass: elementwise work, a small share of a
  convolutional network's step.

Measured for DMAD-PDM's Ped2 train step at batch 4 on CPU (``experiments/bench_train.py``, case
``train_b4_remat``): XLA's temporary buffers of the compiled step fall from 2.02 to 1.57 GiB with
the CPU compiler's memory-minimising scheduler (``dmad_jax.train.host_memory``, what ``dmad``
uses); with its default concurrency-favouring scheduler they did not fall at all (2.60 GiB
either way: it runs the recomputations early). The default stays ``"none"``: at Ped2 size
the memory-minimising scheduler alone already brings the step below its PyTorch twin's peak
(``experiments/bench_train.py``); ``"conv_outputs"`` is for larger batches or images.
"""

from __future__ import annotations

import jax

from dmad_jax.ops.conv import CONV_OUTPUT

__all__ = ["POLICIES", "policy"]

POLICIES = {
  "none": None,
  "conv_outputs": jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT),
}


def policy(config):
  """The ``jax.checkpoint`` policy named by ``config.remat`` (None: no rematerialisation).

  Raises:
    ValueError: for a name that is not one of :data:`POLICIES`.
  """
  name = config.get("remat", "none") if hasattr(config, "get") else "none"
  if name not in POLICIES:
    raise ValueError(f"config.remat must be one of {', '.join(POLICIES)}, got {name!r}")
  return POLICIES[name]
