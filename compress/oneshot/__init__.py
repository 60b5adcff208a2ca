"""Post-training compression with calibration: GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda.

Pure functions of a layer's weights ([in, out]: input axis first) and statistics of its
inputs over calibration data (stats.py: the Hessian H = sum x x^T, per-channel maxima and
mean magnitudes, gathered through the models' dot_general by `StatsDot`), layer by layer by
the caller (experiments/methods/oneshot.py).

    w_hat = gptq(w, h, scale, bits=3)                       # round-to-nearest: rtn(w, scale, 3)
    w_hat, keep = sparsegpt(w, h, prune_n=2, prune_m=4)     # 2:4, OBS-updated weights
    keep = wanda(w, jnp.diag(h), sparsity=0.5)              # |W| x ||X||, per output
    s, errors = awq_scales([w_q, w_k, w_v], h, mean_abs_x, quantize=rtn_fn)
    s = smoothquant_scales(absmax_x, kernel_absmax([w_q, w_k, w_v]), alpha=0.5)
"""

from compress.oneshot.awq import awq_scales, kernel_absmax, output_error, smoothquant_scales
from compress.oneshot.gptq import gptq, rtn
from compress.oneshot.hessian import check_hessian, dampen, dead_inputs, inverse_cholesky
from compress.oneshot.sparsegpt import sparsegpt, wanda
from compress.oneshot.stats import StatsDot

__all__ = [
  "awq_scales",
  "check_hessian",
  "dampen",
  "dead_inputs",
  "gptq",
  "inverse_cholesky",
  "kernel_absmax",
  "output_error",
  "rtn",
  "smoothquant_scales",
  "sparsegpt",
  "StatsDot",
  "wanda",
]
