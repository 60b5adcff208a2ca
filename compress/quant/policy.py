"""Which layers are quantized and how: a QuantConfig per layer, chosen by a regex Policy."""

import dataclasses
import re

import jax

from compress.quant import quantizers as qz
from compress.tree import path_name

FORMATS = ("int", "fp8")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How one layer is quantized. `bits`/`act_bits` None: that operand stays float.

  format: "int" (integer grids, below) or "fp8" (float8_e4m3fn weights and activations,
  float8_e5m2 output gradients, one scale per tensor: fp8.py).
  granularity: "tensor", "channel" (one scale per output channel) or an int: sub-channel
  tiles of that many elements along the last contracting axis, per output channel (a layer
  contracting several axes, like the attention output's heads x head_dim, groups
  tile x the other contracting axes: 4 heads x 32 for tile 32). Default: "channel" for
  "int", "tensor" for "fp8" (its only choice).
  act_granularity: "tensor" or "token" (one scale per row; dynamic only).
  act_static: activation ranges calibrated once (`calibrate` mode) instead of per call.
  lsq: learned step sizes (LSQ) for weights and activations, on the signed grid.
  amax_history: fp8 only: 0 or 1 scales each tensor by its own amax in this call (current
  scaling); L > 1 by the largest of the last L calls' amaxes (delayed scaling, fp8.py).
  """

  bits: int | None = 8
  act_bits: int | None = 8
  granularity: str | int | None = None  # None: "channel" for format "int", "tensor" for "fp8"
  act_granularity: str = "tensor"
  symmetric: bool = True
  act_symmetric: bool = True
  act_static: bool = False
  calibrator: str = "absmax"  # weights; "stored": the w_scale already in "quant" (GPTQ's)
  act_calibrator: str = "absmax"
  lsq: bool = False
  format: str = "int"
  amax_history: int = 0

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"format={self.format!r}: choose one of {FORMATS}.")
    if self.granularity is None:
      object.__setattr__(self, "granularity", "tensor" if self.format == "fp8" else "channel")
    h = self.amax_history
    if isinstance(h, bool) or not isinstance(h, int) or h < 0:
      raise ValueError(f"amax_history={h!r}: a history length is an integer >= 0.")
    if self.format == "fp8":
      self._check_fp8()
    elif h:
      raise ValueError(
        f"amax_history={h} is fp8's delayed scaling: set format='fp8', or amax_history=0."
      )
    for name in ("bits", "act_bits"):
      if getattr(self, name) is not None:
        qz.check_bits(getattr(self, name), name)
    g = self.granularity
    if not (g in ("tensor", "channel") or (isinstance(g, int) and not isinstance(g, bool))):
      raise ValueError(f"granularity={g!r}: choose 'tensor', 'channel' or an int tile size.")
    if isinstance(g, int) and g <= 0:
      raise ValueError(f"granularity={g}: a tile size must be a positive integer.")
    if self.act_granularity not in ("tensor", "token"):
      raise ValueError(f"act_granularity={self.act_granularity!r}: choose 'tensor' or 'token'.")
    if self.act_granularity == "token" and (self.act_static or self.lsq):
      raise ValueError(
        "act_granularity='token' is dynamic: static or learned activation ranges are per "
        "tensor. Set act_granularity='tensor'."
      )
    if self.act_calibrator not in qz.CALIBRATORS:
      raise ValueError(f"act_calibrator={self.act_calibrator!r}: choose one of {qz.CALIBRATORS}.")
    if self.calibrator not in qz.CALIBRATORS + ("stored",):
      raise ValueError(
        f"calibrator={self.calibrator!r}: choose one of {qz.CALIBRATORS + ('stored',)}."
      )
    if self.calibrator == "stored" and (self.lsq or not self.symmetric):
      raise ValueError(
        "calibrator='stored' keeps the symmetric weight scales a post-training method set "
        "(GPTQ): leave lsq=False and symmetric=True."
      )
    if self.lsq and not (self.symmetric and self.act_symmetric):
      raise ValueError("lsq=True learns steps on the signed grid: leave symmetric=True.")

  def _check_fp8(self):
    """What format='fp8' supports: both operands in 8 bits, one amax-derived scale per tensor."""
    fixes = {
      "bits": (self.bits == 8, "both operands are float8_e4m3fn: set bits=8"),
      "act_bits": (self.act_bits == 8, "both operands are float8_e4m3fn: set act_bits=8"),
      "granularity": (
        self.granularity == "tensor",
        "fp8 scales are per tensor (a per-channel or per-tile weight scale would sit inside "
        "the backward dots' contraction, out of reach of an FP8 GEMM): set "
        "granularity='tensor'",
      ),
      "act_granularity": (
        self.act_granularity == "tensor",
        "fp8 scales are per tensor (a per-token scale would sit inside the weight gradient's "
        "contraction): set act_granularity='tensor'",
      ),
      "lsq": (not self.lsq, "fp8 scales come from amaxes, not learned steps: set lsq=False"),
      "act_static": (
        not self.act_static,
        "for scales from past amaxes set amax_history (delayed scaling) and act_static=False",
      ),
      "symmetric": (self.symmetric, "fp8 has no zero point: set symmetric=True"),
      "act_symmetric": (self.act_symmetric, "fp8 has no zero point: set act_symmetric=True"),
      "calibrator": (
        self.calibrator == "absmax",
        "fp8 scales are amax / max: set calibrator='absmax'",
      ),
      "act_calibrator": (
        self.act_calibrator == "absmax",
        "fp8 scales are amax / max: set act_calibrator='absmax'",
      ),
    }
    for name, (ok, fix) in fixes.items():
      if not ok:
        raise ValueError(f"format='fp8' with {name}={getattr(self, name)!r}: {fix}.")


@dataclasses.dataclass(frozen=True)
class Policy:
  """Ordered (regex, QuantConfig | None) rules over layer paths; the first match wins."""

  rules: tuple[tuple[str, QuantConfig | None], ...]

  @classmethod
  def of(cls, *rules) -> "Policy":
    for pattern, cfg in rules:
      re.compile(pattern)
      if cfg is not None and not isinstance(cfg, QuantConfig):
        raise TypeError(f"rule {pattern!r}: expected a QuantConfig or None, got {cfg!r}")
    return cls(tuple((p, c) for p, c in rules))

  def match(self, layer: str) -> tuple[int | None, QuantConfig | None]:
    for i, (pattern, cfg) in enumerate(self.rules):
      if re.search(pattern, layer):
        return i, cfg
    return None, None


def report(policy: Policy, quant_vars: dict) -> tuple[list[tuple[str, str]], list[str]]:
  """([(layer, rule pattern)], [patterns that matched nothing]) from a model's "quant"
  collection, concrete or abstract (each QuantDot records its rule there at init)."""
  matched, used = [], set()
  for path, _ in jax.tree_util.tree_flatten_with_path(quant_vars)[0]:
    keys = path_name(path).split("/")
    if keys[-1] == "rule":
      layer = "/".join(keys[:-2])
      index, _ = policy.match(layer)
      used.add(index)
      matched.append((layer, policy.rules[index][0]))
  unused = [p for i, (p, _) in enumerate(policy.rules) if i not in used]
  return matched, unused
