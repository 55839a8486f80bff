"""The pretraining methods and their parts: encoders, heads, split BN, the momentum encoder, the queue."""

from .backbones import BACKBONES, SmallCNN, build_backbone, resnet
from .base import METHODS, Method, method_class, register
from .batchnorm import SplitBatchNorm1d, SplitBatchNorm2d, convert_split_bn
from .build import build_encoder, build_method, check_model_config
from .end_to_end import EndToEnd
from .heads import HEADS, Encoder, bn_mlp, build_head
from .memory_bank import MemoryBank
from .moco import MoCo
from .mocov3 import MoCoV3
from .momentum import momentum_copy, momentum_update
from .queue import KeyQueue

__all__ = [
    "BACKBONES", "HEADS", "METHODS", "EndToEnd", "Encoder", "KeyQueue", "MemoryBank", "Method", "MoCo", "MoCoV3", "SmallCNN",
    "SplitBatchNorm1d", "SplitBatchNorm2d", "bn_mlp", "build_backbone", "build_encoder", "build_head", "build_method", "check_model_config",
    "convert_split_bn", "method_class", "momentum_copy", "momentum_update", "register", "resnet",
]
