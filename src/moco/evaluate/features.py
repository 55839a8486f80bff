"""Features of a frozen backbone for a whole uint8 image set, batch by batch."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    normalize: bool = True,
    channels_last: bool = False,
    desc: str | None = None,
) -> torch.Tensor:
    """Features (N, D) float32 on `device` of uint8 `images` (N, C, H, W), the backbone in eval mode.

    L2-normalised when `normalize` (kNN, retrieval); raw for the linear protocol. `desc` shows a bar.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=desc is None, leave=False):
            x = transform(images[start : start + batch_size].to(device, non_blocking=True))  # (b, C, S, S)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(backbone(x).float().flatten(1))  # (b, D)
    finally:
        backbone.train(was_training)
    features = torch.cat(out)  # (N, D)
    return F.normalize(features, dim=1) if normalize else features
