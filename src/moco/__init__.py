"""momentum-contrast: Momentum Contrast (MoCo v1/v2) self-supervised pretraining."""

from .config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, RunConfig, apply_overrides, preset
from .errors import CheckpointError, ConfigError, DataError, MocoError
from .model import MoCo, build_encoder, build_moco
from .train.loop import PretrainResult, pretrain

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataConfig", "DataError", "MoCo", "MocoError", "ModelConfig", "OptimConfig",
    "PretrainConfig", "PretrainResult", "RunConfig", "apply_overrides", "build_encoder", "build_moco", "pretrain", "preset",
]

