"""Statistics of each dense layer's inputs over calibration data, through the models' dot_general.

    model = models.Block(cfg, dot_general_cls=StatsDot)
    _, new = model.apply({"params": p, **stats}, x, ..., mutable=["calib"])  # adds this batch

Every dense layer that runs with `StatsDot` keeps, in the "calib" collection under its own
path (`attn/query/StatsDot_0/...`), sums over the tokens of its input x (contracting axes
flattened in order, so a [H, D, E] kernel's inputs are h * D + d):

  h        sum_t x_t x_t^T [in, in]   the layer Hessian (GPTQ, SparseGPT; Wanda's ||X_i||^2 is
                                      its diagonal; AWQ's output error is trace(D^T h D))
  absmax   max_t |x_ti|  [in]         SmoothQuant's activation range
  abssum   sum_t |x_ti|  [in]         AWQ's mean activation magnitude (abssum / tokens)
  tokens   the number of tokens summed

Sums, not means, so batches (and devices: the batch axis sharded over `data`, XLA reduces the
sums across it) add up exactly. The layer's own output is the float dot, unchanged.
"""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

COLLECTION = "calib"


class StatsDot(nn.Module):
  """A float dot_general that adds its input's statistics to the "calib" collection."""

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    (lc, _), (lb, _) = dimension_numbers
    if lb:
      raise ValueError("StatsDot records dense layers' inputs; this dot has batch axes.")
    free = [a for a in range(lhs.ndim) if a not in lc]
    n_in = 1
    for a in lc:
      n_in *= lhs.shape[a]
    x_NxI = jnp.transpose(lhs, free + list(lc)).reshape(-1, n_in).astype(jnp.float32)
    zeros = lambda *shape: (lambda: jnp.zeros(shape, jnp.float32))  # noqa: E731
    h = self.variable(COLLECTION, "h", zeros(n_in, n_in))
    absmax = self.variable(COLLECTION, "absmax", zeros(n_in))
    abssum = self.variable(COLLECTION, "abssum", zeros(n_in))
    tokens = self.variable(COLLECTION, "tokens", zeros())
    if not self.is_initializing():
      h.value += lax.dot_general(x_NxI, x_NxI, (((0,), (0,)), ((), ())), precision="highest")
      absmax.value = jnp.maximum(absmax.value, jnp.max(jnp.abs(x_NxI), axis=0))
      abssum.value += jnp.sum(jnp.abs(x_NxI), axis=0)
      tokens.value += x_NxI.shape[0]
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
