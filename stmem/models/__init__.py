"""ST-MEM in Flax NNX. Pure: no files, no configs beyond the model's own dataclass."""
from stmem.models.config import VARIANTS, ModelConfig, model_config
from stmem.models.encoder import Encoder
from stmem.models.stmem import StMem

__all__ = ["VARIANTS", "ModelConfig", "model_config", "Encoder", "StMem"]
