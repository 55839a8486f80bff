"""The optimizer of a pretraining run and its learning rate at every iteration."""

from collections.abc import Iterable

import torch

from ..config import OptimConfig
from .lars import LARS
from .schedule import lr_at, scaled_lr


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    """cfg.optimizer at the batch-scaled learning rate: SGD with momentum and weight decay (MoCo v1/v2), LARS (MoCo
    v3's ResNets), or AdamW with decoupled weight decay of every parameter (MoCo v3's ViTs, torch's default betas)."""
    lr = scaled_lr(cfg.lr, batch_size, cfg.lr_batch_size)
    if cfg.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.sgd_momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)


def pretrain_lr(step: int, steps_per_epoch: int, cfg: OptimConfig, batch_size: int) -> float:
    """The learning rate of iteration `step` of a run of cfg.epochs epochs (warm-up and milestones in epochs)."""
    return lr_at(step, cfg.epochs * steps_per_epoch, scaled_lr(cfg.lr, batch_size, cfg.lr_batch_size), cfg.schedule,
                 [m * steps_per_epoch for m in cfg.lr_steps], cfg.warmup_epochs * steps_per_epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
