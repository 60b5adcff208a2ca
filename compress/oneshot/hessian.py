"""The layer Hessian H = sum_t x_t x_t^T of a linear layer's inputs, as GPTQ and SparseGPT use it.

Both minimise ||W X - W' X||^2 column by column (kernels here are [in, out]: the input axis
first), which needs H's inverse in its upper Cholesky form. Following the reference code
(Frantar et al.): inputs that never fired (H_ii = 0) get H_ii = 1 and their weights are zeroed
(they cannot affect the output); then lambda = damp * mean(diag H) is added to the diagonal.
"""

import jax
import jax.numpy as jnp
import numpy as np


def dead_inputs(h_IxI: jnp.ndarray) -> jnp.ndarray:
  """Inputs that were zero on every calibration token: H_ii = 0."""
  return jnp.diag(h_IxI) == 0


def dampen(h_IxI: jnp.ndarray, damp: float) -> jnp.ndarray:
  """H with dead inputs set to H_ii = 1, plus damp * mean(diag H) on the diagonal."""
  diag = jnp.diag(h_IxI)
  diag = jnp.where(diag == 0, 1.0, diag)
  h_IxI = h_IxI.at[jnp.diag_indices_from(h_IxI)].set(diag)
  return h_IxI + damp * jnp.mean(diag) * jnp.eye(h_IxI.shape[0], dtype=h_IxI.dtype)


def inverse_cholesky(h_IxI: jnp.ndarray, damp: float) -> jnp.ndarray:
  """U upper triangular with U^T U = (dampened H)^-1: row i of U holds, after its diagonal,
  the update that quantizing (or pruning) input i makes to the inputs after it."""
  lower = jnp.linalg.cholesky(dampen(h_IxI, damp))
  eye = jnp.eye(h_IxI.shape[0], dtype=h_IxI.dtype)
  inv_lower = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)  # H^-1 = L^-T L^-1
  h_inv = inv_lower.T @ inv_lower
  return jnp.linalg.cholesky(h_inv).T


def check_hessian(h_IxI, damp: float, layer: str, tokens: int | None = None):
  """Raises a clear error if the dampened H of `layer` is not positive definite (too few
  calibration tokens for its inputs, or too little dampening). Host-side, before any update."""
  h = np.asarray(h_IxI, np.float64)
  if not np.all(np.isfinite(h)):
    raise ValueError(
      f"{layer}: the calibration Hessian has non-finite values (the model's activations "
      "overflow on the calibration data): check the model and calibration batches."
    )
  d = np.diag(h).copy()
  d[d == 0] = 1.0
  h = h.copy()
  np.fill_diagonal(h, d)
  h += damp * d.mean() * np.eye(h.shape[0])
  try:
    np.linalg.cholesky(h)
    if damp <= 0 and tokens is not None and tokens < h.shape[0]:  # singular, rounding aside
      raise np.linalg.LinAlgError
  except np.linalg.LinAlgError:
    seen = f" from {tokens} calibration tokens" if tokens is not None else ""
    raise ValueError(
      f"{layer}: the Hessian of its {h.shape[0]} inputs{seen} is not positive definite after "
      f"dampening oneshot.damp={damp}: give more calibration data (oneshot.calib_batches; at "
      f"least {h.shape[0]} tokens) or raise oneshot.damp (e.g. 0.01 -> 0.1)."
    ) from None
