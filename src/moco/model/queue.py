"""The dictionary of MoCo: a queue of the K most recent keys, first in, first out."""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class KeyQueue(nn.Module):
    """K L2-normalised keys (buffers, so they are saved and moved with the model) and the oldest one's index.

    Starts with random unit vectors; `push(keys)` overwrites the oldest entries, wrapping around the end.
    A batch of more than K keys keeps its last K, as a first-in-first-out queue of K would: this is what
    lets the paper's queue-size study go below the batch size (K=16 with batches of 256).
    """

    def __init__(self, K: int, dim: int) -> None:
        super().__init__()
        if K < 1:
            raise ConfigError(f"queue size K must be >= 1, got {K}")
        self.register_buffer("keys", F.normalize(torch.randn(K, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # index of the oldest key

    def __len__(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Write `keys` (B, D) over the B oldest entries; with B > K, its last K over all of them."""
        K = len(self)
        keys = keys[-K:]  # (min(B, K), D)
        b = keys.shape[0]
        idx = (self.ptr + torch.arange(b, device=keys.device)) % K  # (min(B, K),)
        self.keys.index_copy_(0, idx, keys.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + b) % K)
