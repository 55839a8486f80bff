"""MoCo v3 (Chen, Xie, He, ICCV 2021): no queue; the keys are the momentum encoder's outputs for the other view
of the same global batch, and a predictor follows the query encoder.

    q1, q2 = predictor(encoder_q(x1)), predictor(encoder_q(x2))     (B, D) each
    m = 1 - (1 - m0) (1 + cos(pi t)) / 2                             t = step / total steps: m0 -> 1
    theta_k <- m theta_k + (1 - m) theta_q                           encoder_k = backbone + projector
    k1, k2 = encoder_k(x1), encoder_k(x2)                            (B, D) each, no gradient
    loss = 2T [InfoNCE(q1, gather(k2)) + InfoNCE(q2, gather(k1))]    positives on the diagonal

Under torchrun every process sees all W*B keys of the global batch; its queries' positives are its own block,
so the labels are arange(B) + B * rank.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..config import ModelConfig, PretrainConfig
from ..errors import ConfigError
from .backbones import is_vit
from .base import Method, check_temperature, register
from .heads import bn_mlp
from .momentum import momentum_copy, momentum_update


def fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or in fp64 if it is (autocast's bf16/fp16 outputs are widened; a float64 check stays exact)."""
    return x if x.dtype == torch.float64 else x.float()


@register("mocov3")
class MoCoV3(Method):
    """MoCo v3 around a query encoder `encoder_q` (backbone + projector, output `dim` wide).

    Args:
        encoder_q: backbone + projector; the momentum encoder is a copy of it, never trained by the optimizer.
        predictor: maps the projector's output (B, dim) to queries (B, dim); on the query side only.
        m0: the momentum coefficient at the first step; it rises to 1 on a half cosine over training.
        T: softmax temperature, > 0 (1.0 for ResNets, 0.2 for ViTs in the paper).
    """

    needs_key_view = True
    zero_init_residual = True  # the release's ResNets start every residual block as the identity
    linear_protocol = "v3"

    def __init__(self, encoder_q: nn.Module, predictor: nn.Module, m0: float = 0.99, T: float = 1.0) -> None:
        super().__init__(encoder_q)
        if not 0.0 <= m0 < 1.0:
            raise ConfigError(f"key momentum m0 must be in [0, 1), got {m0}")
        check_temperature(T)
        self.predictor = predictor
        self.m0, self.m, self.T = m0, m0, T
        self.encoder_k = momentum_copy(encoder_q)
        self.register_buffer("last_keys", torch.zeros(0), persistent=False)

    @classmethod
    def build(cls, cfg: ModelConfig, encoder: nn.Module, num_images: int) -> "MoCoV3":
        backbone_width = next(m for m in encoder.head.modules() if isinstance(m, nn.Linear)).in_features
        hidden = cfg.hidden_dim or backbone_width
        # The release's ResNet predictor ends with its linear layer; the ViT one with a BN without affine parameters.
        predictor = bn_mlp(2, cfg.dim, hidden, cfg.dim, last_bn=is_vit(encoder.backbone))
        return cls(encoder, predictor, cfg.key_momentum, cfg.temperature)

    @classmethod
    def check(cls, cfg: PretrainConfig, world: int) -> None:
        """Runs on any number of processes; its loss is symmetric by construction."""

    def before_step(self, progress: float) -> None:
        """The momentum coefficient of this step: m0 at the start, 1 at the end, on a half cosine."""
        self.m = 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.m0)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views (B, C, H, W) -> logits (2B, W*B), both directions stacked, and labels (2B,)."""
        q1 = self.predictor(self.encoder_q(x1))  # (B, D)
        q2 = self.predictor(self.encoder_q(x2))  # (B, D)
        with torch.no_grad():
            momentum_update(self.encoder_k, self.encoder_q, self.m)
            k1 = F.normalize(fp32(self.encoder_k(x1)), dim=1)  # (B, D)
            k2 = F.normalize(fp32(self.encoder_k(x2)), dim=1)  # (B, D)
        self.last_keys = k1
        logits = torch.cat([self.logits(q1, k2), self.logits(q2, k1)])  # (2B, W*B)
        b = x1.shape[0]
        labels = torch.arange(b, device=logits.device) + b * dist.rank()  # (B,) this process's block
        return logits, labels.repeat(2)  # (2B,)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Queries (B, D) against the keys of every process (W*B, D): (B, W*B) / T, in fp32 under autocast too."""
        with torch.autocast(q.device.type, enabled=False):
            q = F.normalize(fp32(q), dim=1)  # (B, D)
            return q @ dist.all_gather(k).T / self.T  # (B, W*B)

    @property
    def loss_scale(self) -> float:
        """The cross-entropy averages the 2B rows of both directions; the release sums the two directions' means,
        each x 2T: 2T (ctr1 + ctr2) = 4T * mean."""
        return 4 * self.T

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(fp32(logits), labels) * self.loss_scale

    def trainable_parameters(self):
        """The query encoder and the predictor (the frozen patch projection of a ViT left out)."""
        return (p for module in (self.encoder_q, self.predictor) for p in module.parameters() if p.requires_grad)

    def convert_sync_bn(self) -> None:
        """No shuffling here: every BN, of the momentum encoder and the predictor too, sees the global batch."""
        super().convert_sync_bn()
        self.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_k)
        self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor)

    def compile_encoders(self) -> None:
        super().compile_encoders()
        self.encoder_k.compile()
        self.predictor.compile()

    def chance(self, batch_size: int) -> tuple[int, int]:
        return batch_size, 0

    def key_sample(self) -> torch.Tensor:
        return self.last_keys
