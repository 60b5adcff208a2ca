"""The fixed quantization grid that GPTQ and SparseGPT (joint) round onto: one row of scales per
group of inputs, scale_GxO [n_groups, out], and each input's group, group_of_I [in] (None: one
group, per-channel). `check_grid` validates them against a kernel [in, out] before tracing."""

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x) -> np.ndarray | None:
  """x as a host array, or None while tracing (value checks are then skipped)."""
  return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_grid(fn: str, n_in: int, n_out: int, scale_GxO, group_of_I) -> None:
  """Shapes always; values (group ids in range, positive finite scales) when concrete."""
  if group_of_I is None:
    n_groups = 1
  else:
    if np.shape(group_of_I) != (n_in,):
      raise ValueError(
        f"{fn}: group_of_I has shape {np.shape(group_of_I)} but the kernel has {n_in} inputs: "
        f"give one group id per input row, shape ({n_in},)."
      )
    if not jnp.issubdtype(jnp.result_type(group_of_I), jnp.integer):
      raise ValueError(
        f"{fn}: group_of_I must hold integer group ids; got dtype {jnp.result_type(group_of_I)}."
      )
    n_groups = np.shape(scale_GxO)[0] if np.ndim(scale_GxO) == 2 else None
  if np.shape(scale_GxO) != (n_groups, n_out):
    want = f"(1, {n_out})" if group_of_I is None else f"(n_groups, {n_out})"
    raise ValueError(
      f"{fn}: scale_GxO has shape {np.shape(scale_GxO)}; the kernel {n_in}x{n_out} needs "
      f"{want}: one row of scales per group of inputs (one row, per-channel, without "
      "group_of_I)."
    )
  if group_of_I is not None and (g := concrete(group_of_I)) is not None:
    if g.size and (g.min() < 0 or g.max() >= n_groups):
      raise ValueError(
        f"{fn}: group_of_I holds ids in [{g.min()}, {g.max()}] but scale_GxO has {n_groups} "
        f"rows: ids must lie in [0, {n_groups - 1}]; give one scale row per group."
      )
  if (s := concrete(scale_GxO)) is not None and not np.all((s > 0) & np.isfinite(s)):
    bad = np.argwhere(~((s > 0) & np.isfinite(s)))[0]
    raise ValueError(
      f"{fn}: scale_GxO[{bad[0]}, {bad[1]}] = {s[tuple(bad)]}: scales must be positive and "
      "finite; for an all-zero group or channel use any positive scale (e.g. 1.0)."
    )
