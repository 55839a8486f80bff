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

    Sub-batch j holds samples j, j+G, j+2G, ... (G = splits), so that grouping is a free view in
    both memory formats: contiguous inputs fold the groups into channels for one native BN call;
    channels_last inputs, where that fold would copy the activations, use `_GroupedBatchNorm`.

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
        momentum = self.momentum if self.momentum is not None else 0.1
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return self._forward_channels_last(x, momentum)
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
            momentum,
            self.eps,
        )  # (N/G, G*C, H, W)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(g, c).mean(0))
            self.running_var.copy_(running_var.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y.view(n, c, h, w)

    def _forward_channels_last(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        c = x.shape[1]
        ones = torch.ones(c, device=x.device)
        weight = self.weight if self.affine else ones
        bias = self.bias if self.affine else torch.zeros_like(ones)
        y, mean, var = _GroupedBatchNorm.apply(x, weight, bias, self.eps, self.splits)  # (N, C, H, W), (G, C) x2
        with torch.no_grad():
            count = x.numel() // (self.splits * c)
            self.running_mean.lerp_(mean.mean(0), momentum)
            self.running_var.lerp_(var.mean(0) * count / max(count - 1, 1), momentum)
            self.num_batches_tracked.add_(1)
        return y


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) channels_last -> (N/G, G, H*W, C), sample n*G + j in group j: a view, no copy."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n // groups, groups, h * w, c)


def _group_sum(t: torch.Tensor) -> torch.Tensor:
    """Sums over dims 0 and 2 of a contiguous (M1, G, M2, C) tensor, shape (1, G, 1, C).

    The outer dimension first (a fast, vectorised sweep), then the small remainder: one
    `sum(dim=(0, 2))` is several times slower on CPUs for narrow C.
    """
    m1, g, m2, c = t.shape
    return t.reshape(m1, -1).sum(0).view(1, g, m2, c).sum(2, keepdim=True)


class _GroupedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels_last x (N, C, H, W), with statistics per (group, channel).

    Returns (y, mean, biased variance), the statistics (G, C); gradients flow to x, weight and bias
    only. Written out so that nothing is copied between memory formats: y and dx are channels_last
    like x, two sweeps over the activations forward and three backward. Statistics are computed in
    fp32 (two-pass variance) whatever the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, groups: int):
        xg = _grouped(x, groups)  # (M1, G, M2, C)
        count = xg.shape[0] * xg.shape[2]
        xf = xg.to(torch.promote_types(x.dtype, torch.float32))  # (M1, G, M2, C)
        mean = _group_sum(xf) / count  # (1, G, 1, C)
        centred = xf - mean  # (M1, G, M2, C)
        var = _group_sum(centred.square()) / count  # (1, G, 1, C), biased
        rstd = torch.rsqrt(var + eps)  # (1, G, 1, C)
        y = torch.empty_like(x, memory_format=torch.channels_last)  # (N, C, H, W)
        torch.addcmul(bias, centred, rstd * weight, out=_grouped(y, groups))  # written in place: y's own memory
        ctx.save_for_backward(centred, rstd, weight)
        ctx.groups = groups
        mean, var = mean.view(groups, -1), var.view(groups, -1)  # (G, C)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dmean: torch.Tensor, _dvar: torch.Tensor):
        centred, rstd, weight = ctx.saved_tensors
        count = centred.shape[0] * centred.shape[2]
        dx = torch.empty_like(dy, memory_format=torch.channels_last)  # (N, C, H, W)
        dy = _grouped(dy.contiguous(memory_format=torch.channels_last), ctx.groups).to(centred.dtype)  # (M1, G, M2, C)
        sum_dy = _group_sum(dy)  # (1, G, 1, C)
        sum_dy_xhat = _group_sum(dy * centred) * rstd  # (1, G, 1, C)
        # dx = a * dy + b * (x - mean) + c, with a, b, c per (group, channel)
        a = rstd * weight
        b = -a * rstd * sum_dy_xhat / count
        c = -a * sum_dy / count
        torch.addcmul(torch.addcmul(c, centred, b), dy, a, out=_grouped(dx, ctx.groups))
        return dx, sum_dy_xhat.sum(dim=(0, 1, 2)), sum_dy.sum(dim=(0, 1, 2)), None, None


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
