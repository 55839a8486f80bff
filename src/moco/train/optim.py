"""SGD and the per-iteration learning-rate schedule (linear warm-up, then cosine, step or constant)."""

import math

import torch

from ..config import OptimConfig


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The linear scaling rule: lr is given for lr_batch_size images and scales with the batch."""
    return cfg.lr * batch_size / cfg.lr_batch_size


def build_optimizer(params, cfg: OptimConfig, batch_size: int) -> torch.optim.SGD:
    return torch.optim.SGD(
        params, lr=scaled_lr(cfg, batch_size), momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay
    )


def lr_at(step: int, steps_per_epoch: int, cfg: OptimConfig, batch_size: int) -> float:
    """The learning rate of iteration `step` (0-based) of a run of cfg.epochs epochs."""
    base = scaled_lr(cfg, batch_size)
    epoch = step / steps_per_epoch  # fractional epoch
    if epoch < cfg.warmup_epochs:
        return base * epoch / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        progress = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "step":
        return base * 0.1 ** sum(epoch >= milestone for milestone in cfg.lr_steps)
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

