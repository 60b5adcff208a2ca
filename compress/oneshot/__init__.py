"""Post-training compression with calibration: GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda.

Pure functions of a layer's weights ([in, out]: input axis first) and statistics of its
inputs over calibration data (stats.py: the Hessian H = sum x x^T, per-channel maxima and
mean magnitudes), gathered layer by layer by the caller.
"""

from compress.oneshot.hessian import check_hessian, dampen, dead_inputs, inverse_cholesky
