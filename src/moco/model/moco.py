"""Momentum Contrast: a query encoder, a momentum key encoder and a queue of negative keys.

    q = normalize(encoder_q(x_q))                       (B, D)
    theta_k <- m * theta_k + (1 - m) * theta_q          before the keys are computed
    k = unshuffle(normalize(encoder_k(shuffle(x_k))))   (B, D), no gradient
    logits = [q . k, q . queue^T] / T                   (B, 1 + K), the positive at index 0
    enqueue k, dequeue the oldest

The loss is `Method.loss`: cross-entropy(logits, labels) with labels all 0 is InfoNCE.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..config import ModelConfig, PretrainConfig
from ..errors import ConfigError
from .base import Method, check_temperature, register
from .momentum import momentum_copy, momentum_update
from .queue import KeyQueue


@register("moco")
class MoCo(Method):
    """MoCo v1/v2 around a user's `encoder_q` (backbone + head, output `dim` wide).

    Args:
        encoder_q: the query encoder; the key encoder is a deep copy of it, never trained by SGD.
        dim: width of the encoder's output (the embedding).
        K: number of negative keys in the queue.
        m: momentum of the key encoder, in [0, 1).
        T: softmax temperature, > 0.
        symmetric: also use the second view as queries against the first view's keys (doubles the
            encoder work; the queue is fed once per step, with the keys of both views).
        shuffle_bn: shuffle the keys' batch before the key encoder and unshuffle after, so that
            split/per-device BN statistics cannot reveal the positive.
    """

    def __init__(
        self,
        encoder_q: nn.Module,
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        symmetric: bool = False,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__(encoder_q)
        if not 0.0 <= m < 1.0:
            raise ConfigError(f"key momentum m must be in [0, 1), got {m}")
        check_temperature(T)
        self.m, self.T = m, T
        self.symmetric = symmetric
        self.shuffle_bn = shuffle_bn
        self.encoder_k = momentum_copy(encoder_q)
        self.queue = KeyQueue(K, dim)

    @classmethod
    def build(cls, cfg: ModelConfig, encoder: nn.Module, num_images: int) -> "MoCo":
        return cls(encoder, cfg.dim, cfg.queue_size, cfg.key_momentum, cfg.temperature, cfg.symmetric,
                   cfg.shuffle_bn)

    @classmethod
    def check(cls, cfg: PretrainConfig, world: int) -> None:
        """MoCo runs every config: the symmetric loss, torchrun, and any K (see KeyQueue.push)."""

    @property
    def K(self) -> int:
        return len(self.queue)

    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q."""
        momentum_update(self.encoder_k, self.encoder_q, self.m)

    @torch.no_grad()
    def keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys (B, D) of the key encoder, computed on a shuffled batch when shuffle_bn.

        Shuffling BN across processes, as in the paper: every process's images are gathered, permuted
        with one permutation shared by all processes, and each process encodes its slice of the
        permuted batch, so its BN statistics mix images of every process; the keys are then gathered
        and unshuffled. BN groups are "virtual devices": the encoders' split BN normalises G blocks
        of each process's batch, so one process with G groups computes what G processes with one group
        each compute.
        """
        if not self.shuffle_bn:
            return F.normalize(self.encoder_k(x_k).float(), dim=1)
        b, r = x_k.shape[0], dist.rank()
        gathered = dist.all_gather(x_k)  # (W*B, C, H, W), process-major: the global batch
        perm = dist.broadcast_(torch.randperm(gathered.shape[0], device=x_k.device))  # (W*B,) one for all
        k = F.normalize(self.encoder_k(gathered[perm[r * b : (r + 1) * b]]).float(), dim=1)  # (B, D) this slice
        k = dist.all_gather(k)[torch.argsort(perm)]  # (W*B, D), global batch order
        return k[r * b : (r + 1) * b]  # (B, D), this process's images

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[q . k+, q . queue] / T, shape (B, 1 + K); the positive is column 0."""
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        # A copy: autograd keeps the queue for q's gradient, and push() overwrites it in place before backward.
        l_neg = q @ self.queue.keys.clone().T  # (B, K); the queue is a buffer: no gradient into it
        return torch.cat([l_pos, l_neg], dim=1) / self.T  # (B, 1 + K)

    def forward(
        self, x_q: torch.Tensor, x_k: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views (B, C, H, W) of the same images -> logits (B', 1 + K) and labels (B',) of zeros.

        B' = B, or 2B with the symmetric loss (both views as queries). `index` is not used by MoCo.
        """
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)  # (B, D)
        self.momentum_update()
        k = self.keys(x_k)  # (B, D)
        if self.symmetric:
            q2 = F.normalize(self.encoder_q(x_k).float(), dim=1)  # (B, D)
            k2 = self.keys(x_q)  # (B, D)
            logits = torch.cat([self.logits(q, k), self.logits(q2, k2)])  # (2B, 1 + K)
            keys = torch.cat([k, k2])  # (2B, D)
        else:
            logits = self.logits(q, k)  # (B, 1 + K)
            keys = k
        self.queue.push(self.global_batch(keys))
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # (B',)
        return logits, labels

    @torch.no_grad()
    def global_batch(self, keys: torch.Tensor) -> torch.Tensor:
        """Every process's keys (V*B, D), V views of B images, in the global batch's order.

        Process r holds block r of the global batch (see the trainer), so with one view the gathered
        [process 0 | process 1 | ...] rows are that order; with two, the views are regrouped.
        """
        w = dist.world_size()
        if w == 1:
            return keys
        views = 2 if self.symmetric else 1
        gathered = dist.all_gather(keys)  # (W*V*B, D)
        return gathered.view(w, views, -1, keys.shape[1]).transpose(0, 1).reshape(-1, keys.shape[1])

    def compile_encoders(self) -> None:
        super().compile_encoders()
        self.encoder_k.compile()

    def chance(self, batch_size: int) -> tuple[int, int]:
        return self.K + 1, math.ceil(self.K / (batch_size * (2 if self.symmetric else 1)))

    def key_sample(self) -> torch.Tensor:
        return self.queue.keys

    def queue_size(self) -> int:
        return self.K

    def keys_per_image(self) -> int:
        return 2 if self.symmetric else 1
