"""Features of a frozen backbone for a whole uint8 image set, batch by batch."""

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


class Images(Protocol):
    """Images evaluation reads in order (an in-memory ImageSet, a streamed EvalFolder)."""

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]: ...

    def __len__(self) -> int: ...


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor | Images,
    transform: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    normalize: bool = True,
    channels_last: bool = False,
    desc: str | None = None,
) -> torch.Tensor:
    """Features (N, D) float32 on `device` of uint8 `images` (N, C, H, W), or of an image collection's batches, the
    backbone in eval mode.

    L2-normalised when `normalize` (kNN, retrieval); raw for the linear protocol. `desc` shows a bar.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        chunks = images.split(batch_size) if isinstance(images, torch.Tensor) else images.eval_batches(batch_size)
        for chunk in tqdm(chunks, desc=desc, disable=desc is None, leave=False, total=-(-len(images) // batch_size)):
            x = transform(chunk.to(device, non_blocking=True))  # (b, C, S, S)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(backbone(x).float().flatten(1))  # (b, D)
    finally:
        backbone.train(was_training)
    features = torch.cat(out)  # (N, D)
    return F.normalize(features, dim=1) if normalize else features
