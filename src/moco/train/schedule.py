"""The learning-rate schedule, per iteration: one function for pretraining, supervised training, the linear
protocol and fine-tuning.

    lr(step) = base * warm-up(step) * decay(step)
    warm-up: linear from base * warmup_factor to base over the first `warmup` steps (then 1)
    decay:   cosine from 1 to 0 over the steps after the warm-up | x0.1 at each milestone | constant
"""

import math
from collections.abc import Sequence

from ..config import SCHEDULES


def lr_at(step: int, total: int, base: float, schedule: str = "cosine", milestones: Sequence[int] = (),
          warmup: float = 0, warmup_factor: float = 0.0) -> float:
    """The learning rate of 0-based iteration `step` of `total`; `milestones` and `warmup` in iterations."""
    scale = warmup_factor + (1 - warmup_factor) * step / warmup if step < warmup else 1.0
    if schedule == "cosine":
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return base * scale * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return base * scale * 0.1 ** sum(step >= m for m in milestones)
    if schedule == "constant":
        return base * scale
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def scaled_lr(lr: float, batch_size: int, lr_batch_size: int = 256) -> float:
    """The linear scaling rule: `lr` is given for `lr_batch_size` images and scales with the batch."""
    return lr * batch_size / lr_batch_size
