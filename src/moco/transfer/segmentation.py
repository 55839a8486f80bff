"""Fine-tune an encoder for semantic segmentation: a DeepLabV3 (ASPP) or FCN head on its last stage.

The protocol of finetune.py: one model, schedule and set of hyper-parameters for every
initialisation; norm frozen | bn | syncbn and trainable_layers apply to the backbone. The head is new,
so its own BatchNorms always train (torchvision's heads are built with them).

The head reads the last stage (ResNet layer4, stride 8 with the small stem; SmallCNN's fourth stage) and
its logits are upsampled bilinearly to the input. Loss: per-pixel cross-entropy, IGNORE pixels left out.
Metrics over the test scenes' pixels: mIoU (mean over the classes, background included, that occur in
the ground truth or the prediction) and pixel accuracy, both from one confusion matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from ..checkpoints import LoadedEncoder
from ..config import opt
from ..errors import ConfigError, DataError
from ..runtime import resolve_device
from .finetune import FinetuneConfig, backbone_for, check_config, check_scenes, finetune_loop
from .scenes import IGNORE, Scenes, match_channels

HEADS = ("deeplab", "fcn")


@dataclass
class SegmentationConfig(FinetuneConfig):
    head: str = opt("deeplab", "deeplab: ASPP (DeepLabV3) | fcn: one 3x3 conv (FCN-32s style)")


class Segmenter(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> class logits (B, K + 1, H, W)."""

    def __init__(self, body: nn.Module, head: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.body((images - self.mean) / self.std)["out"]  # (B, D, H/s, W/s)
        return F.interpolate(self.head(features), size=images.shape[-2:], mode="bilinear", align_corners=False)


def check_segmentation_config(cfg: SegmentationConfig) -> None:
    check_config(cfg)
    if cfg.head not in HEADS:
        raise ConfigError(f"segmentation head must be one of {', '.join(HEADS)}, got {cfg.head!r}")
    if cfg.batch_size < 2:
        raise ConfigError("segmentation needs batch_size >= 2: the heads' BatchNorm (ASPP's pooled branch) "
                          "cannot train on one image")


def build_segmenter(encoder: LoadedEncoder | None, arch: str, scenes: Scenes, cfg: SegmentationConfig) -> Segmenter:
    """A DeepLabV3 or FCN head on the last stage of the encoder's backbone (or of a random `arch`)."""
    check_segmentation_config(cfg)
    stages, channels, mean, std = backbone_for(encoder, arch, scenes, cfg)
    body = IntermediateLayerGetter(stages.body, {stages.outputs[-1]: "out"})
    width = stages.channels[-1]
    classes = scenes.num_classes + 1
    if cfg.head == "fcn":
        head = FCNHead(width, classes)
    else:
        with torch.no_grad():
            was_training = body.training
            side = body.eval()(torch.zeros(1, channels, scenes.canvas, scenes.canvas))["out"].shape[-1]
            body.train(was_training)
        # torchvision's rates (12, 24, 36) suit 65-px feature maps (513 px at stride 8); keep the proportions.
        head = DeepLabHead(width, classes, atrous_rates=tuple(max(1, side // d) for d in (6, 3, 2)))
    if cfg.norm == "syncbn":
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return Segmenter(body, head, mean, std)


def segmentation_batch(scenes: Scenes, indices: list[int], channels: int, device: torch.device,
                       flips: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, C, H, W) in [0, 1] and targets (B, H, W) int64, padded to the batch's largest image
    (images with 0, targets with IGNORE), optionally flipped."""
    height = max(scenes.images[i].shape[1] for i in indices)
    width = max(scenes.images[i].shape[2] for i in indices)
    images = torch.zeros(len(indices), channels, height, width)
    targets = torch.full((len(indices), height, width), IGNORE, dtype=torch.int64)
    for j, i in enumerate(indices):
        image, target = match_channels(scenes.images[i], channels).float() / 255, scenes.semantic[i]
        if flips is not None and flips[j]:
            image, target = image.flip(-1), target.flip(-1)
        h, w = target.shape
        images[j, :, :h, :w] = image
        targets[j, :h, :w] = target
    return images.to(device), targets.to(device)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n_classes: int,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """(K, K) int64 counts, row = true class, column = predicted, of pixels whose target is not ignored."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if (t >= n_classes).any() or (t < 0).any():
        raise DataError(f"segmentation targets hold class ids outside 0..{n_classes - 1} (and {ignore_index})")
    return torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).view(n_classes, n_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU over the classes present in ground truth or prediction, and pixel accuracy, in percent."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    miou = (tp[present] / union[present]).mean().item() if present.any() else 0.0
    total = confusion.sum().item()
    return {"mIoU": 100 * miou, "pixel_acc": 100 * tp.sum().item() / total if total else 0.0}


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, scenes: Scenes, channels: int, device: torch.device,
                       batch_size: int = 32) -> dict[str, float]:
    model.eval()
    n_classes = scenes.num_classes + 1
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    for start in range(0, len(scenes), batch_size):
        images, targets = segmentation_batch(scenes, list(range(start, min(start + batch_size, len(scenes)))),
                                             channels, device)
        confusion += confusion_matrix(model(images).argmax(1).cpu(), targets.cpu(), n_classes)
    return segmentation_metrics(confusion)


def finetune_segmentation(encoder: LoadedEncoder | None, arch: str, train_scenes: Scenes, test_scenes: Scenes,
                          cfg: SegmentationConfig, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Fine-tune a segmenter on `train_scenes`, evaluate on `test_scenes`: {"mIoU", "pixel_acc"} in percent.

    `encoder` None: `arch` randomly initialised.
    """
    check_scenes(train_scenes, test_scenes, instances=False)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_segmenter(encoder, arch, train_scenes, cfg).to(device)
    channels = encoder.channels if encoder else train_scenes.channels
    if cfg.norm == "syncbn" and not torch.distributed.is_initialized():
        echo("  note: norm syncbn outside a process group trains like bn")

    def step_loss(indices: list[int], flips: list[bool]) -> torch.Tensor:
        images, targets = segmentation_batch(train_scenes, indices, channels, device, flips)
        return F.cross_entropy(model(images), targets, ignore_index=IGNORE)

    echo(f"fine-tuning {cfg.head} segmentation ({arch}, {'random init' if encoder is None else encoder.layout}, "
         f"norm {cfg.norm}) on {len(train_scenes)} scenes")
    finetune_loop(model, cfg, step_loss, len(train_scenes), echo)
    metrics = evaluate_segmenter(model, test_scenes, channels, device)
    echo("  " + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    return metrics
