"""The MoCo model and its parts."""

from .backbones import BACKBONES, SmallCNN, build_backbone, resnet
from .batchnorm import SplitBatchNorm2d, convert_split_bn
from .build import MECHANISMS, build_encoder, build_moco
from .heads import HEADS, Encoder, build_head
from .mechanisms import EndToEnd, MemoryBank
from .moco import MoCo

__all__ = [
    "BACKBONES", "HEADS", "MECHANISMS", "EndToEnd", "Encoder", "MemoryBank", "MoCo", "SmallCNN", "SplitBatchNorm2d", "build_backbone",
    "build_encoder", "build_head", "build_moco", "convert_split_bn", "resnet",
]
