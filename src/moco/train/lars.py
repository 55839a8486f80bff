"""LARS (You, Gitman, Ginsburg 2017), as MoCo v3 trains ResNets: SGD with momentum whose update of each weight
matrix or kernel is rescaled to a fixed fraction of the weight's norm.

    u = g + wd * w                                   weight decay folded into the update
    u <- u * trust * ||w|| / ||u||                   (when both norms are > 0)
    v <- momentum * v + u;   w <- w - lr * v

Biases and normalisation parameters (tensors of one dimension or none) get neither the weight decay nor the
rescaling: plain SGD with momentum.
"""

from collections.abc import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling over SGD with momentum (`trust_coefficient` 0.001 in MoCo v3)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # a weight matrix or kernel: not a bias, not a norm's scale or shift
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * w_norm / u_norm
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), trust, 1.0)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                velocity = state["momentum_buffer"]
                velocity.mul_(group["momentum"]).add_(update)
                p.add_(velocity, alpha=-group["lr"])
        return loss
