"""Build the pretraining method a config describes, around a named or user-supplied backbone."""

from torch import nn

from .. import distributed as dist
from ..config import ModelConfig, PretrainConfig
from ..errors import ConfigError
from .backbones import BACKBONES, build_backbone, feature_dim, is_vit
from .base import Method, method_class
from .batchnorm import convert_split_bn
from .heads import HEADS, Encoder, build_head
from .moco import MoCo  # noqa: F401, I001  (registers the methods, in the order `--help` names them)
from .end_to_end import EndToEnd  # noqa: F401, I001
from .memory_bank import MemoryBank  # noqa: F401, I001
from .mocov3 import MoCoV3  # noqa: F401, I001


def check_model_config(cfg: PretrainConfig, world: int = 1) -> None:
    """Raise ConfigError if the model part of `cfg` names an unknown architecture, head or method, splits the batch
    into BN groups unevenly, or if its method cannot run `cfg` on `world` processes."""
    m, d = cfg.model, cfg.data
    if d.batch_size % m.bn_splits:
        raise ConfigError(f"batch_size={d.batch_size} must be a multiple of bn_splits={m.bn_splits} (split BN); e.g. "
                          f"batch_size={max(m.bn_splits, d.batch_size // m.bn_splits * m.bn_splits)}")
    if m.arch not in BACKBONES:
        raise ConfigError(f"arch={m.arch!r} is unknown; choose one of {', '.join(BACKBONES)}")
    if m.head not in HEADS:
        raise ConfigError(f"head={m.head!r} is unknown; choose one of {', '.join(HEADS)}")
    method_class(m.method).check(cfg, world)


def build_encoder(cfg: ModelConfig, in_channels: int, image_size: int, backbone: nn.Module | None = None) -> Encoder:
    """backbone + projection head; `backbone` overrides cfg.arch with any module mapping images to (B, D)."""
    if backbone is None:
        backbone = build_backbone(cfg.arch, in_channels, cfg.width, cfg.small_stem, image_size, cfg.patch_size,
                                  zero_init_residual=method_class(cfg.method).zero_init_residual,
                                  last_width=cfg.last_width, depths=cfg.depths)
    width = feature_dim(backbone, in_channels, image_size)
    layers = 3 if is_vit(backbone) else 2  # MoCo v3's projector depth; the v1/v2 heads have theirs
    head = build_head(cfg.head, width, cfg.dim, cfg.hidden_dim or width, layers)
    return Encoder(backbone, head)


def build_method(cfg: ModelConfig, in_channels: int, image_size: int, backbone: nn.Module | None = None,
                 num_images: int = 0) -> Method:
    """The method of cfg.method, with split BN (bn_splits sub-batches over all processes) in its encoders and
    heads, as shuffling BN on one process. `num_images` is the training set's size (the memory bank's)."""
    groups = cfg.bn_splits // dist.world_size()  # bn_splits counts the BN groups of all processes
    method = method_class(cfg.method).build(cfg, build_encoder(cfg, in_channels, image_size, backbone), num_images)
    return convert_split_bn(method, groups)
