"""End-to-end (paper Fig. 2a): keys from the current batch, encoded by the query encoder itself.

Gradients flow into both paths, and each query's negatives are the other keys of the batch, so the
dictionary is the batch (K = batch - 1) and grows only with memory.
"""


import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import Method, check_temperature, register


@register("end_to_end")
class EndToEnd(Method):
    """Keys from the current batch through the same encoder, with gradients; logits (B, B), positive first."""

    def __init__(self, encoder_q: nn.Module, T: float = 0.07, shuffle_bn: bool = True) -> None:
        super().__init__(encoder_q)
        check_temperature(T)
        self.T, self.shuffle_bn = T, shuffle_bn
        self.register_buffer("last_keys", torch.zeros(0), persistent=False)

    @classmethod
    def build(cls, cfg: ModelConfig, encoder: nn.Module, num_images: int) -> "EndToEnd":
        return cls(encoder, cfg.temperature, cfg.shuffle_bn)

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

    def chance(self, batch_size: int) -> tuple[int, int]:
        return batch_size, 0

    def key_sample(self) -> torch.Tensor:
        return self.last_keys
