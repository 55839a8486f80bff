"""A momentum encoder: a copy of an encoder that follows it slowly, never trained by the optimizer.

    theta_k <- m * theta_k + (1 - m) * theta_q

MoCo v1/v2 keep m fixed (0.999 in the paper); MoCo v3 raises it to 1 on a cosine over training.
"""

import copy

import torch
from torch import nn


def momentum_copy(encoder: nn.Module) -> nn.Module:
    """A deep copy of `encoder` with gradients off: the momentum encoder's starting point."""
    return copy.deepcopy(encoder).requires_grad_(False)


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, m: float) -> None:
    """theta_target <- m theta_target + (1 - m) theta_source for every parameter, as one foreach lerp.

    Buffers (BN running statistics) are the target's own: its forward passes update them.
    """
    params_k = list(target.parameters())
    params_q = [p.detach() for p in source.parameters()]
    torch._foreach_lerp_(params_k, params_q, 1.0 - m)
