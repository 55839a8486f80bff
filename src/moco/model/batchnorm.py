"""Split batch norm: shuffling BN emulated on one device.

The paper encodes keys with the batch shuffled across GPUs, each GPU normalising its own sub-batch,
so the BN statistics of a query and of its positive key come from different samples and cannot leak
the answer. On one process we get the same effect by normalising each of `splits` sub-batches with
its own statistics (as the official CIFAR demo does) and shuffling the keys' batch before the key
encoder, so a query's sub-batch and its key's sub-batch hold different images.

The official demo folds sub-batch j = samples j, j+G, ... into channels, (N, C, H, W) -> (N/G, G*C,
H, W), for one BN call; that view exists only in the contiguous memory format, and copies the
activations under channels_last. Contiguous blocks are slices in every format.
"""

import torch
import torch.nn.functional as F
from torch import nn


class _SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are computed per sub-batch: `splits` equal blocks of the batch.

    Sub-batch j is samples [j*N/G, (j+1)*N/G) (G = splits): a slice, contiguous in both memory formats,
    so each is one call of the native kernels (with their vectorised channels_last paths), writing into
    its slice of one output (`_BlockBatchNorm`). Under torchrun, process r holds block r of the global
    batch, so one process with G groups computes what G processes with one group each compute.

    In eval mode it is a plain batch norm. The running statistics are the mean over the groups,
    so a checkpoint loads into a plain BatchNorm1d/2d unchanged.
    """

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.splits
        if not self.training or g == 1:
            return super().forward(x)
        if x.shape[0] % g:
            raise ValueError(
                f"split BN needs the batch ({x.shape[0]}) to be a multiple of bn_splits ({g}); "
                "choose a batch size divisible by bn_splits"
            )
        momentum = self.momentum if self.momentum is not None else 0.1
        tracked = self.running_mean is not None
        # One row of running statistics per group, each updated by its group's call, then averaged.
        running_mean = self.running_mean.repeat(g, 1) if tracked else None  # (G, C)
        running_var = self.running_var.repeat(g, 1) if tracked else None  # (G, C)
        if torch.compiler.is_compiling():  # a graph of per-block calls and a concatenation, for the compiler
            y = torch.cat([
                F.batch_norm(block, None if running_mean is None else running_mean[j],
                             None if running_var is None else running_var[j], self.weight, self.bias, True,
                             momentum, self.eps)
                for j, block in enumerate(x.chunk(g))
            ])  # (N, C, ...)
        else:
            ones = torch.ones(x.shape[1], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
            weight = self.weight if self.affine else ones
            bias = self.bias if self.affine else torch.zeros_like(ones)
            y = _BlockBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, self.eps, g)
        if tracked:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.mean(0))
                self.running_var.copy_(running_var.mean(0))
                self.num_batches_tracked.add_(1)
        return y


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    """Split batch norm of images (N, C, H, W): the encoders' convolutional layers."""


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    """Split batch norm of features (N, C): the BN layers of MoCo v3's projector and predictor."""


SPLIT_KINDS: dict[type[nn.Module], type[_SplitBatchNorm]] = {nn.BatchNorm2d: SplitBatchNorm2d,
                                                             nn.BatchNorm1d: SplitBatchNorm1d}


class _BlockBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of each of `groups` blocks of x, written straight into one output.

    The native kernels do the work, one call per block. Forward, the `out=` form writes each block
    into its slice of y: concatenating per-block outputs instead cost 9% of a step on a 2-core CPU.
    Backward has no such form; each block's input gradient is copied into its slice of dx.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, groups: int):
        y = torch.empty_like(x)  # (N, C, ...), the memory format of x
        dtype = torch.promote_types(x.dtype, torch.float32)
        stats = torch.empty(2, groups, x.shape[1], device=x.device, dtype=dtype)  # (2, G, C): mean, 1/std
        for j, (xb, yb) in enumerate(zip(x.chunk(groups), y.chunk(groups))):
            torch.ops.aten.native_batch_norm.out(
                xb, weight, bias, None if running_mean is None else running_mean[j],
                None if running_var is None else running_var[j], True, momentum, eps,
                out=yb, save_mean=stats[0, j], save_invstd=stats[1, j])
        ctx.save_for_backward(x, weight, stats)
        ctx.eps, ctx.groups = eps, groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        dx = torch.empty_like(x)  # (N, C, ...)
        dw, db = torch.zeros_like(weight), torch.zeros_like(weight)  # (C,) each
        for j, (xb, dyb, dxb) in enumerate(zip(x.chunk(ctx.groups), dy.chunk(ctx.groups), dx.chunk(ctx.groups))):
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                dyb, xb, weight, None, None, stats[0, j], stats[1, j], True, ctx.eps, [True, True, True])
            dxb.copy_(gx)
            dw += gw
            db += gb
        return dx, dw, db, None, None, None, None, None


def convert_split_bn(module: nn.Module, splits: int,
                     kinds: dict[type[nn.Module], type[_SplitBatchNorm]] = SPLIT_KINDS) -> nn.Module:
    """Replace every BatchNorm1d/2d of `module` (in place) by its split kind (`kinds`) with the same state."""
    if splits <= 1:
        return module
    for name, child in module.named_children():
        kind = kinds.get(type(child))
        if kind is not None:
            split = kind(
                child.num_features,
                splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            split.load_state_dict(child.state_dict())
            split.to(device=next(iter([*child.buffers(), *child.parameters()])).device)
            setattr(module, name, split)
        else:
            convert_split_bn(child, splits, kinds)
    return module
