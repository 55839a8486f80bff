"""momentum-contrast: Momentum Contrast (MoCo v1, v2 and v3) self-supervised pretraining.

The public API is imported on first use (`moco.pretrain`, `moco.MoCo`, ...), so that `import moco` and the
`moco` command start without importing torch until they need it.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "pretrain": "pipeline", "PretrainResult": "pipeline",
    "PretrainConfig": "config", "ModelConfig": "config", "DataConfig": "config", "OptimConfig": "config",
    "RunConfig": "config", "apply_overrides": "config", "preset": "config",
    "MocoError": "errors", "ConfigError": "errors", "DataError": "errors", "CheckpointError": "errors",
    "Method": "model", "MoCo": "model", "MoCoV3": "model", "register": "model", "build_encoder": "model", "build_method": "model",
    "load_encoder": "checkpoints",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'moco' has no attribute {name!r}")
