"""Flax (linen) Transformer models: a GPT-style decoder and a BERT-style encoder."""

from models import hf, pipeline
from models.config import PRESETS, ModelConfig, get_preset
from models.decode import generate
from models.layers import Dense, DotGeneralFactory
from models.structure import Structure, feeds, structure
from models.transformer import (
  Block,
  Decoder,
  Encoder,
  build,
  count_params,
  scan_params,
  unscan_params,
)

__all__ = [
  "hf",
  "pipeline",
  "generate",
  "PRESETS",
  "ModelConfig",
  "get_preset",
  "Dense",
  "DotGeneralFactory",
  "Structure",
  "structure",
  "feeds",
  "Block",
  "Decoder",
  "Encoder",
  "build",
  "count_params",
  "scan_params",
  "unscan_params",
]
