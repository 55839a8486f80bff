"""Checkpoints and encoder formats: one home for every file layout moco reads or writes.

`runs` holds this project's training checkpoints (save, load, resume); `encoders` reads a pretrained
backbone from every layout we support (ours, supervised, the official v1/v2/v3 releases, torchvision,
safetensors exports) and writes our safetensors format; `reading` is the one safe load they share.
"""

from .encoders import LoadedEncoder, load_encoder, read_safetensors, write_safetensors
from .reading import read_state
from .runs import BEST, LAST, PRETRAIN, SUPERVISED, Resume, find_resume, load_checkpoint, save_checkpoint, set_aside

__all__ = ["BEST", "LAST", "LoadedEncoder", "PRETRAIN", "Resume", "SUPERVISED", "find_resume", "load_checkpoint",
           "load_encoder", "read_safetensors", "read_state", "save_checkpoint", "set_aside", "write_safetensors"]
