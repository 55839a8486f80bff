"""Fine-tune an encoder for object detection: Faster R-CNN or Mask R-CNN with FPN (torchvision).

The protocol (same model and schedule for every initialisation, trained BatchNorm) is `finetune.py`'s.
The backbone is ours (a torchvision ResNet, possibly with the small 3x3 stem and one input channel,
or a SmallCNN): its last three stages feed an FPN (+ a max-pooled level), anchors and RoI level
mapping are scaled to the canvas, and the detector's transform keeps the images at the canvas size
and normalises them with the encoder's mean/std (one value per channel: 1-channel works).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from ..checkpoints import LoadedEncoder
from ..config import opt
from ..errors import ConfigError
from ..runtime import resolve_device
from .finetune import FIXED_NORMS, FinetuneConfig, backbone_for, check_config, check_scenes, finetune_loop
from .scenes import Scenes, match_channels

MODELS = ("faster", "mask")
MAX_DETECTIONS = 50  # per image; scenes hold at most 5 items, COCO images rarely more than 50
FPN_STAGES = 3  # the last three stages feed the FPN: one at full resolution (small stem) costs too much


@dataclass
class DetectionConfig(FinetuneConfig):
    model: str = opt("faster", "faster: Faster R-CNN (box AP) | mask: Mask R-CNN (box and mask AP)")
    fpn_channels: int = opt(64, "FPN width (torchvision's 256 is sized for 800 px images)")
    representation: int = opt(256, "width of the box head's two fc layers (torchvision: 1024)")
    # With BN trained, full-lr steps right after a short warm-up can wreck a pretrained backbone for good: a
    # supervised one fell to 5.6 box AP after 20 warm-up iterations and reached 42.9 after 100 (docs/transfer.md).
    warmup_iters: int = opt(100, "linear warm-up from lr * warmup_factor over these iterations")


def check_detection_config(cfg: DetectionConfig) -> None:
    check_config(cfg)
    if cfg.model not in MODELS:
        raise ConfigError(f"detection model must be one of {', '.join(MODELS)}, got {cfg.model!r}")


def build_detector(encoder: LoadedEncoder | None, arch: str, scenes: Scenes, cfg: DetectionConfig) -> nn.Module:
    """Faster/Mask R-CNN + FPN around the encoder's backbone, sized for the canvas of `scenes`."""
    check_detection_config(cfg)
    stages, channels, mean, std = backbone_for(encoder, arch, scenes, cfg)
    canvas = scenes.canvas
    levels = stages.outputs[-FPN_STAGES:]
    fpn = BackboneWithFPN(stages.body, {name: str(i) for i, name in enumerate(levels)}, stages.channels[-FPN_STAGES:],
                          cfg.fpn_channels, norm_layer=None if cfg.norm in FIXED_NORMS else nn.BatchNorm2d)
    if cfg.norm == "syncbn":
        fpn.fpn = nn.SyncBatchNorm.convert_sync_batchnorm(fpn.fpn)
    with torch.no_grad():
        was_training = fpn.training
        sizes = [f.shape[-1] for f in fpn.eval()(torch.zeros(1, channels, canvas, canvas)).values()]
        fpn.train(was_training)
    # Level k holds stride 2^k; a box of side canvas/2 maps to the coarsest tapped stage, halving per level.
    coarsest = round(math.log2(canvas / sizes[len(levels) - 1]))
    names = [str(i) for i in range(len(levels))]
    anchors = AnchorGenerator(sizes=tuple((max(4, canvas >> (len(sizes) - 1 - i)),) for i in range(len(sizes))),
                              aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    c = cfg.fpn_channels
    common = dict(
        min_size=canvas, max_size=canvas, image_mean=mean, image_std=std,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(c, 3),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=200, rpn_batch_size_per_image=128,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2, canonical_scale=canvas // 2, canonical_level=coarsest),
        box_head=TwoMLPHead(c * 7 * 7, cfg.representation),
        box_predictor=FastRCNNPredictor(cfg.representation, scenes.num_classes + 1),
        box_batch_size_per_image=128, box_detections_per_img=MAX_DETECTIONS,
    )
    if cfg.model == "faster":
        return FasterRCNN(fpn, **common)
    return MaskRCNN(
        fpn, **common,
        mask_roi_pool=MultiScaleRoIAlign(names, 14, 2, canonical_scale=canvas // 2, canonical_level=coarsest),
        mask_head=MaskRCNNHeads(c, (c,) * 4, 1, norm_layer=None if cfg.norm in FIXED_NORMS else nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(c, c, scenes.num_classes + 1),
    )


def detection_inputs(scenes: Scenes, indices: list[int], channels: int, device: torch.device,
                     flips: list[bool] | None = None, masks: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    """Images (C, H, W) in [0, 1] and torchvision targets of the scenes at `indices`, optionally flipped."""
    images, targets = [], []
    for j, i in enumerate(indices):
        image = match_channels(scenes.images[i], channels).float() / 255
        boxes, target_masks = scenes.boxes[i], scenes.masks[i]
        if flips is not None and flips[j]:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            target_masks = target_masks.flip(-1)
        target = {"boxes": boxes.to(device), "labels": scenes.labels[i].to(device)}
        if masks:
            target["masks"] = target_masks.to(device, torch.uint8)
        images.append(image.to(device))
        targets.append(target)
    return images, targets


def finetune_detection(encoder: LoadedEncoder | None, arch: str, train_scenes: Scenes, test_scenes: Scenes,
                       cfg: DetectionConfig, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Fine-tune a detector on `train_scenes`, evaluate on `test_scenes` with COCOeval.

    `encoder` None: `arch` randomly initialised. Returns AP, AP50, AP75 (and mask_AP, mask_AP50,
    mask_AP75 for Mask R-CNN) in percent.
    """
    from .coco import coco_evaluate, coco_ground_truth

    check_scenes(train_scenes, test_scenes, instances=True)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_detector(encoder, arch, train_scenes, cfg).to(device)
    channels = encoder.channels if encoder else train_scenes.channels
    masks = cfg.model == "mask"
    if cfg.norm == "syncbn" and not torch.distributed.is_initialized():
        echo("  note: norm syncbn outside a process group trains like bn")

    def step_loss(indices: list[int], flips: list[bool]) -> torch.Tensor:
        images, targets = detection_inputs(train_scenes, indices, channels, device, flips, masks)
        return sum(model(images, targets).values())

    echo(f"fine-tuning {'Mask' if masks else 'Faster'} R-CNN FPN ({arch}, "
         f"{'random init' if encoder is None else encoder.layout}, norm {cfg.norm}) on {len(train_scenes)} scenes")
    finetune_loop(model, cfg, step_loss, len(train_scenes), echo)
    results = detect(model, test_scenes, channels, device, masks)
    gt = coco_ground_truth(test_scenes)
    metrics = coco_evaluate(gt, results["bbox"], "bbox")
    if masks:
        metrics |= {f"mask_{k}": v for k, v in coco_evaluate(gt, results["segm"], "segm").items()}
    echo("  " + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    return metrics


@torch.no_grad()
def detect(model: nn.Module, scenes: Scenes, channels: int, device: torch.device, masks: bool,
           batch_size: int = 16) -> dict[str, list[dict]]:
    """COCO results (image id = index + 1) of `model` on `scenes`: "bbox", and "segm" when `masks`."""
    from .coco import encode_mask

    model.eval()
    out: dict[str, list[dict]] = {"bbox": [], "segm": []}
    for start in range(0, len(scenes), batch_size):
        indices = list(range(start, min(start + batch_size, len(scenes))))
        images, _ = detection_inputs(scenes, indices, channels, device)
        for i, det in zip(indices, model(images)):
            for k, (box, score, label) in enumerate(zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                        det["labels"].tolist())):
                x1, y1, x2, y2 = box
                common = {"image_id": i + 1, "category_id": label, "score": score}
                out["bbox"].append(common | {"bbox": [x1, y1, x2 - x1, y2 - y1]})
                if masks:
                    out["segm"].append(common | {"segmentation": encode_mask(det["masks"][k, 0].cpu() > 0.5)})
    return out
