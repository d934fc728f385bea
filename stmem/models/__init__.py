"""ST-MEM and its baselines (MTAE, MLAE) in Flax NNX. Pure: no files, no configs beyond the model's own dataclass."""
from __future__ import annotations

from flax import nnx

from stmem.models.classifier import Classifier
from stmem.models.baselines import BaselineEncoder, LeadSetRefused, MaskedAutoencoder
from stmem.models.config import METHODS, VARIANTS, ModelConfig, model_config
from stmem.models.encoder import Encoder
from stmem.models.stmem import StMem


def pretraining_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> StMem | MaskedAutoencoder:
  """The pretraining model (encoder + decoder + loss) of `cfg.method`."""
  return StMem(cfg, rngs=rngs) if cfg.method == "stmem" else MaskedAutoencoder(cfg, rngs=rngs)


def encoder_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Encoder | BaselineEncoder:
  """The encoder alone of `cfg.method` (all share `features(signal, lead_ids, lead_mask, blocks=...)`)."""
  return Encoder(cfg, rngs=rngs) if cfg.method == "stmem" else BaselineEncoder(cfg, rngs=rngs)


__all__ = ["METHODS", "VARIANTS", "ModelConfig", "model_config", "Encoder", "StMem", "BaselineEncoder", "Classifier",
           "MaskedAutoencoder", "LeadSetRefused", "pretraining_model", "encoder_model"]
