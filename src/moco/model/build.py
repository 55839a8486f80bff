"""Build the MoCo model that a config describes, around a named or user-supplied backbone."""

from torch import nn

from .. import distributed as dist

from ..config import ModelConfig
from .backbones import build_backbone, feature_dim
from .batchnorm import convert_split_bn
from .heads import Encoder, build_head
from .mechanisms import EndToEnd, MemoryBank
from .moco import MoCo

MECHANISMS = ("moco", "end_to_end", "memory_bank")


def build_encoder(cfg: ModelConfig, in_channels: int, image_size: int, backbone: nn.Module | None = None) -> Encoder:
    """backbone + projection head; `backbone` overrides cfg.arch with any module mapping images to (B, D)."""
    if backbone is None:
        backbone = build_backbone(cfg.arch, in_channels, cfg.width, cfg.small_stem)
    width = feature_dim(backbone, in_channels, image_size)
    head = build_head(cfg.head, width, cfg.dim, cfg.hidden_dim or width)
    return Encoder(backbone, head)


def build_moco(
    cfg: ModelConfig, in_channels: int, image_size: int, backbone: nn.Module | None = None, num_images: int = 0
) -> MoCo | EndToEnd | MemoryBank:
    """The contrastive model of cfg.mechanism, with split BN (bn_splits sub-batches) in its encoders,
    as shuffling BN on one process. `num_images` sizes the memory bank."""
    groups = cfg.bn_splits // dist.world_size()  # bn_splits counts the BN groups of all processes
    encoder = convert_split_bn(build_encoder(cfg, in_channels, image_size, backbone), groups)
    if cfg.mechanism == "end_to_end":
        return EndToEnd(encoder, T=cfg.temperature, shuffle_bn=cfg.shuffle_bn)
    if cfg.mechanism == "memory_bank":
        return MemoryBank(encoder, cfg.dim, num_images, K=cfg.queue_size, T=cfg.temperature)
    return MoCo(
        encoder,
        dim=cfg.dim,
        K=cfg.queue_size,
        m=cfg.key_momentum,
        T=cfg.temperature,
        symmetric=cfg.symmetric,
        shuffle_bn=cfg.shuffle_bn,
    )
