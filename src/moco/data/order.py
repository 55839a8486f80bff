"""The order in which a run sees its training images: a function of (seed, epoch) only, so that a resumed run
sees the same batches; under torchrun, process r takes block r of each global batch (as split BN's group r)."""

from collections.abc import Iterator

import torch

from .. import distributed as dist


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (n,) of `n` images in epoch `epoch`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def process_batches(n: int, batch_size: int, seed: int, epoch: int, first: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, this process's indices) of every step from step `first` of `epoch` on, for all later epochs too;
    `batch_size` is the global batch (the last partial one of an epoch is dropped: split BN needs full groups)."""
    rank, world = dist.rank(), dist.world_size()
    while True:
        order = epoch_order(n, seed, epoch)
        for step in range(first, n // batch_size):
            yield epoch, order[step * batch_size : (step + 1) * batch_size].chunk(world)[rank]
        epoch, first = epoch + 1, 0
