"""The supervised loop that supervised pre-training, the linear protocol and fine-tuning share.

Each iteration sets the scheduled learning rate, computes the caller's loss for that iteration's batch,
refuses a non-finite loss (one `NonFiniteLoss` for every command), and steps the optimizer.
"""

from collections.abc import Callable, Iterable, Iterator

import torch

from ..errors import NonFiniteLoss
from .optim import set_lr


def sgd_steps(optimizer: torch.optim.Optimizer, lr: Callable[[int], float], steps: Iterable[int],
              batch_loss: Callable[[int], torch.Tensor], advice: str,
              clip_norm: float | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Run one optimizer step per iteration of `steps` (0-based); yields (iteration, its detached loss).

    `lr(step)` is the learning rate of an iteration, `batch_loss(step)` the loss of its batch, `advice`
    what the NonFiniteLoss error suggests (e.g. "lower --lr"). `clip_norm`: the gradients of all the
    optimizer's parameters are scaled down together to this global L2 norm when it is exceeded.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in steps:
        set_lr(optimizer, lr(step))
        loss = batch_loss(step)
        if not torch.isfinite(loss):
            raise NonFiniteLoss("loss", step + 1, advice)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        yield step, loss.detach()
