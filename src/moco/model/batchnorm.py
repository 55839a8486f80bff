"""Split batch norm: shuffling BN emulated on one device.

The paper encodes keys with the batch shuffled across GPUs, each GPU normalising its own sub-batch,
so the BN statistics of a query and of its positive key come from different samples and cannot leak
the answer. On one process we get the same effect by normalising each of `splits` sub-batches with
its own statistics (as the official CIFAR demo does) and shuffling the keys' batch before the key
encoder, so a query's sub-batch and its key's sub-batch hold different images.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per sub-batch of `splits` groups.

    Sub-batch j holds samples j, j+G, j+2G, ... (G = splits): the fold below is a free reshape.

    In eval mode it is a plain BatchNorm2d. The running statistics are the mean over the groups,
    so a checkpoint loads into a plain BatchNorm2d unchanged.
    """

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.splits
        if not self.training or g == 1:
            return super().forward(x)
        if n % g:
            raise ValueError(
                f"split BN needs the batch ({n}) to be a multiple of bn_splits ({g}); "
                "choose a batch size divisible by bn_splits"
            )
        # Fold the groups into channels: (N, C, H, W) -> (N/G, G*C, H, W); one BN call normalises
        # every (group, channel) pair with its own statistics.
        running_mean = self.running_mean.repeat(g)  # (G*C,)
        running_var = self.running_var.repeat(g)  # (G*C,)
        y = F.batch_norm(
            x.reshape(n // g, g * c, h, w),
            running_mean,
            running_var,
            self.weight.repeat(g) if self.affine else None,
            self.bias.repeat(g) if self.affine else None,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )  # (N/G, G*C, H, W)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(g, c).mean(0))
            self.running_var.copy_(running_var.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y.view(n, c, h, w)


def convert_split_bn(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm2d of `module` (in place) by a SplitBatchNorm2d with the same state."""
    if splits <= 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(
                child.num_features,
                splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            split.load_state_dict(child.state_dict())
            split.to(device=next(child.buffers()).device)
            setattr(module, name, split)
        else:
            convert_split_bn(child, splits)
    return module
