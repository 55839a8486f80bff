"""The two other contrastive mechanisms of the paper (Fig. 2), with MoCo's interface.

    end-to-end    keys from the current batch, encoded by the query encoder itself, with gradients;
                  each query's negatives are the other keys of the batch (K = batch - 1)
    memory bank   one stored feature per training image (Wu et al. 2018); the positive is the stored
                  feature of the query's image, K negatives are sampled from the bank at random, and the
                  image's entry is updated with momentum 0.5 after it is seen

Both return (logits (B, 1 + K), labels (B,) of zeros) like `MoCo`, so the training loop never
branches on the mechanism.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class EndToEnd(nn.Module):
    """Keys from the current batch through the same encoder; gradients flow into both paths."""

    uses_key_view = True

    def __init__(self, encoder_q: nn.Module, T: float = 0.07, shuffle_bn: bool = True) -> None:
        super().__init__()
        if T <= 0:
            raise ConfigError(f"temperature T must be > 0, got {T}")
        self.encoder_q, self.T, self.shuffle_bn = encoder_q, T, shuffle_bn
        self.register_buffer("last_keys", torch.zeros(0), persistent=False)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, index: torch.Tensor | None = None):
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)  # (B, D)
        if self.shuffle_bn:  # as for MoCo: a key's BN sub-batch holds other images than its query's
            perm = torch.randperm(x_k.shape[0], device=x_k.device)  # (B,)
            k = F.normalize(self.encoder_q(x_k[perm]).float(), dim=1)[torch.argsort(perm)]  # (B, D)
        else:
            k = F.normalize(self.encoder_q(x_k).float(), dim=1)  # (B, D)
        self.last_keys = k.detach()
        sim = q @ k.T / self.T  # (B, B); the diagonal holds the positives
        b = sim.shape[0]
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=sim.device)  # (B, B)
        logits = torch.cat([sim.diagonal()[:, None], sim[off_diagonal].view(b, b - 1)], dim=1)  # (B, B)
        return logits, torch.zeros(b, dtype=torch.long, device=logits.device)

    def key_sample(self) -> torch.Tensor:
        return self.last_keys

    def chance(self, batch_size: int) -> tuple[int, int]:
        return batch_size, 0


class MemoryBank(nn.Module):
    """A bank of one L2-normalised feature per training image; negatives are sampled from it."""

    uses_key_view = False

    def __init__(self, encoder_q: nn.Module, dim: int, num_images: int, K: int = 4096, T: float = 0.07,
                 bank_momentum: float = 0.5) -> None:
        super().__init__()
        if T <= 0:
            raise ConfigError(f"temperature T must be > 0, got {T}")
        if not 1 <= K <= num_images:
            raise ConfigError(f"memory bank: K={K} negatives must be in [1, number of images={num_images}]")
        self.encoder_q, self.K, self.T, self.bank_momentum = encoder_q, K, T, bank_momentum
        self.register_buffer("bank", F.normalize(torch.randn(num_images, dim), dim=1))  # (N, D)

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

    def key_sample(self) -> torch.Tensor:
        return self.bank

    def chance(self, batch_size: int) -> tuple[int, int]:
        return self.K + 1, math.ceil(self.bank.shape[0] / batch_size)  # every image seen once
