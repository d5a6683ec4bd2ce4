"""dmad_jax.nn.layers.max_pool2 against torch.nn.MaxPool2d(2): values and gradients, ties too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dmad_jax.nn.layers import max_pool2


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 10, 5), (3, 5, 5, 1)])
def test_max_pool2_matches_torch_values_and_gradients(shape):
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  x[0, :2, :2, 0] = 0.0  # a window of ties: torch gives the gradient to its first entry
  x[-1, 2:4, 2:4, -1] = [[-1.0, 0.5], [0.5, 0.5]]  # ties after the first entry
  out, vjp = jax.vjp(max_pool2, jnp.asarray(x))
  g = rng.standard_normal(out.shape).astype(np.float32)
  (dx,) = vjp(jnp.asarray(g))

  tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  tout = torch.nn.MaxPool2d(2)(tx)
  tout.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(out, tout.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_array_equal(dx, tx.grad.permute(0, 2, 3, 1).numpy())
  assert dx[0, 0, 0, 0] == g[0, 0, 0, 0] and not np.asarray(dx)[0, :2, :2, 0].ravel()[1:].any()
  if shape[1] % 2:  # the dropped last row gets no gradient
    assert not np.asarray(dx)[:, -1].any()
