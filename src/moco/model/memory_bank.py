"""Memory bank (paper Fig. 2b; Wu et al. 2018): one stored feature per training image.

The positive is the stored feature of the query's own image, K negatives are sampled from the bank at
random, and the image's entry is updated with momentum 0.5 after it is seen. One view per image.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, PretrainConfig
from ..errors import ConfigError
from .base import Method, check_temperature, register


@register("memory_bank")
class MemoryBank(Method):
    """A bank of one L2-normalised feature per training image; negatives are sampled from it."""

    needs_key_view = False

    def __init__(self, encoder_q: nn.Module, dim: int, num_images: int, K: int = 4096, T: float = 0.07,
                 bank_momentum: float = 0.5) -> None:
        super().__init__(encoder_q)
        check_temperature(T)
        if not 1 <= K <= num_images:
            raise ConfigError(f"memory bank: K={K} negatives must be in [1, number of images={num_images}]")
        self.K, self.T, self.bank_momentum = K, T, bank_momentum
        self.register_buffer("bank", F.normalize(torch.randn(num_images, dim), dim=1))  # (N, D)

    @classmethod
    def build(cls, cfg: ModelConfig, encoder: nn.Module, num_images: int) -> "MemoryBank":
        return cls(encoder, cfg.dim, num_images, cfg.queue_size, cfg.temperature)

    @classmethod
    def check(cls, cfg: PretrainConfig, world: int) -> None:
        super().check(cfg, world)
        if cfg.data.dataset == "shards":
            raise ConfigError("the memory bank needs in-memory data (one entry per image), not shards")

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """bank[i] <- normalize(m bank[i] + (1 - m) f_i) for the images just seen."""
        mixed = self.bank_momentum * self.bank[index] + (1 - self.bank_momentum) * features  # (B, D)
        self.bank.index_copy_(0, index, F.normalize(mixed, dim=1))

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor | None, index: torch.Tensor):
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)  # (B, D)
        positives = self.bank[index]  # (B, D), stored before this step
        negatives = self.bank[torch.randint(0, self.bank.shape[0], (self.K,), device=q.device)]  # (K, D)
        l_pos = (q * positives).sum(dim=1, keepdim=True)  # (B, 1)
        l_neg = q @ negatives.T  # (B, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # (B, 1 + K)
        self.update(index, q.detach())
        return logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)

    def chance(self, batch_size: int) -> tuple[int, int]:
        return self.K + 1, math.ceil(self.bank.shape[0] / batch_size)  # every image seen once

    def key_sample(self) -> torch.Tensor:
        return self.bank
