"""Fine-tune an encoder for object detection: Faster R-CNN or Mask R-CNN with FPN (torchvision).

The MoCo paper's transfer protocol (Sec. 4.2), at the scale of a CPU:
  * every initialisation (MoCo, supervised, random) runs the same detector, the same schedule (SGD,
    linear warm-up, step decay, fixed iterations) and the same hyper-parameters;
  * "feature normalization": MoCo's features have other statistics than supervised ones, so the paper
    fine-tunes with BatchNorm trained (SyncBN across GPUs), also in the new FPN layers, and with every
    backbone stage trainable (detectron2's FREEZE_AT 0). That is the default here: norm="bn",
    trainable_layers=5. norm="frozen" is torchvision's default instead (FrozenBatchNorm2d: the
    pretrained statistics and affine kept fixed); norm="syncbn" converts to SyncBatchNorm, which
    synchronises statistics only inside a DDP process group (torchrun); a single process, as
    `moco finetune` runs, computes exactly what "bn" does.
  * stages left out of training (trainable_layers < 5) always get FrozenBatchNorm2d, as in detectron2.

The backbone is ours (a torchvision ResNet, possibly with the small 3x3 stem and one input channel,
or a SmallCNN): its last three stages feed an FPN (+ a max-pooled level), anchors and RoI level
mapping are scaled to the canvas, and the detector's transform keeps the images at the canvas size
and normalises them with the encoder's mean/std (one value per channel: 1-channel works).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import ConfigError, DataError
from ..evaluate.load import LoadedEncoder
from ..model.backbones import SmallCNN, build_backbone
from ..runtime import resolve_device
from .scenes import Scenes, match_channels

NORMS = ("frozen", "bn", "syncbn")
MODELS = ("faster", "mask")
MAX_DETECTIONS = 50  # per image; scenes hold at most 5 items, COCO images rarely more than 50
FPN_STAGES = 3  # the last three stages feed the FPN: one at full resolution (small stem) costs too much


@dataclass
class FinetuneConfig:
    """The schedule and backbone options that every initialisation shares."""

    # Detection needs iterations more than images (docs/transfer.md, "Choosing the schedule"): 360 x 2 images
    # is what a ResNet-18 on 96 px scenes affords in ~6 minutes on 2 busy CPU cores.
    iterations: int = 360
    batch_size: int = 2
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 20  # linear warm-up from lr * warmup_factor
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [240, 315])  # iterations at which lr is x0.1
    norm: str = "bn"  # frozen | bn | syncbn (see the module docstring)
    trainable_layers: int = 5  # units trained, from the last: ResNet stem + layer1..4, SmallCNN 4 stages; 5 = all
    flip: bool = True  # random horizontal flips of the training images
    small_stem: bool = True  # random initialisation only: which ResNet to build (our encoders' default)
    width: int = 32  # random initialisation of small_cnn only
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; None: torch's default. 1 is faster on a busy machine
    seed: int = 0
    log_every: int = 40


@dataclass
class DetectionConfig(FinetuneConfig):
    model: str = "faster"  # faster: Faster R-CNN | mask: Mask R-CNN
    fpn_channels: int = 64  # torchvision: 256, sized for 800 px images
    representation: int = 256  # width of the box head's two fc layers (torchvision: 1024)


def check_config(cfg: FinetuneConfig) -> None:
    """Raise ConfigError naming the first field that cannot work."""

    def positive_int(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"fine-tuning {name} must be an integer >= 1, got {value!r}")

    positive_int("iterations", cfg.iterations)
    positive_int("batch_size", cfg.batch_size)
    if isinstance(cfg.trainable_layers, bool) or not isinstance(cfg.trainable_layers, int) \
            or not 0 <= cfg.trainable_layers <= 5:
        raise ConfigError(f"fine-tuning trainable_layers must be 0..5, got {cfg.trainable_layers!r}")
    if cfg.threads is not None and (isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int)
                                    or cfg.threads < 1):
        raise ConfigError(f"fine-tuning threads must be an integer >= 1 or None, got {cfg.threads!r}")
    if cfg.norm not in NORMS:
        raise ConfigError(f"fine-tuning norm must be one of {', '.join(NORMS)}, got {cfg.norm!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"fine-tuning lr must be a finite number > 0, got {cfg.lr!r}")
    if not 0 <= cfg.warmup_iters <= cfg.iterations or not 0 < cfg.warmup_factor <= 1:
        raise ConfigError(f"fine-tuning warm-up must be 0..iterations iterations from a factor in (0, 1], got "
                          f"{cfg.warmup_iters!r} iterations from {cfg.warmup_factor!r}")
    if sorted(cfg.lr_steps) != list(cfg.lr_steps) or any(not 0 < s < cfg.iterations for s in cfg.lr_steps):
        raise ConfigError(f"fine-tuning lr_steps must be increasing iterations within (0, {cfg.iterations}), "
                          f"got {cfg.lr_steps!r}")
    if isinstance(cfg, DetectionConfig) and cfg.model not in MODELS:
        raise ConfigError(f"detection model must be one of {', '.join(MODELS)}, got {cfg.model!r}")


def lr_at(cfg: FinetuneConfig, iteration: int) -> float:
    """The learning rate of 0-based `iteration`: linear warm-up, then x0.1 at each of lr_steps."""
    decay = 0.1 ** sum(iteration >= s for s in cfg.lr_steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        return cfg.lr * decay * (cfg.warmup_factor * (1 - alpha) + alpha)
    return cfg.lr * decay


# --------------------------------------------------------------------------------------------------------
# Backbones


@dataclass
class Stages:
    """How to cut a backbone into stages: what an FPN or a segmentation head taps, and what trains."""

    body: nn.Module  # its children run in order (IntermediateLayerGetter's contract)
    outputs: list[str]  # the child closing each stage, input to output (4 stages)
    channels: list[int]  # channels of each stage's output
    units: list[list[str]]  # the children of each freezable unit, input to output


def backbone_stages(backbone: nn.Module) -> Stages:
    """The stages of a torchvision ResNet (stem = unit 0, then layer1..4) or of our SmallCNN (4 stages)."""
    if isinstance(backbone, SmallCNN):
        convs = [i for i, m in enumerate(backbone.features) if isinstance(m, nn.Conv2d)]  # conv, bn, relu each
        return Stages(backbone.features, [str(i + 2) for i in convs],
                      [backbone.features[i].out_channels for i in convs], [[str(i), str(i + 1)] for i in convs])
    if all(hasattr(backbone, f"layer{k}") for k in range(1, 5)) and hasattr(backbone, "conv1"):
        layers = [f"layer{k}" for k in range(1, 5)]
        channels = [[m for m in getattr(backbone, n).modules() if isinstance(m, nn.Conv2d)][-1].out_channels
                    for n in layers]
        return Stages(backbone, layers, channels, [["conv1", "bn1"]] + [[n] for n in layers])
    raise ConfigError(f"dense transfer supports torchvision ResNets and SmallCNN backbones, not "
                      f"{type(backbone).__name__}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by a FrozenBatchNorm2d of the same statistics and affine."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def apply_norm(module: nn.Module, norm: str) -> nn.Module:
    """`module`'s BatchNorms as `norm` asks: frozen, trained (bn) or synchronised (syncbn)."""
    if norm == "frozen":
        return freeze_batchnorm(module)
    if norm == "syncbn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def prepare_backbone(encoder: LoadedEncoder | None, arch: str, channels: int, cfg: FinetuneConfig,
                     data_mean_std: tuple[list[float], list[float]]) -> tuple[Stages, int, list[float], list[float]]:
    """A copy of the encoder's backbone, or a randomly initialised `arch`, ready to fine-tune.

    Returns its stages (norm layers converted, the units below `trainable_layers` frozen), its input
    channels and its input normalisation: the encoder's, or for a random backbone the data's own.
    The caller's encoder is left untouched.
    """
    if encoder is not None:
        if arch != encoder.arch:
            raise ConfigError(f"arch {arch!r} differs from the encoder's {encoder.arch!r}")
        backbone = copy.deepcopy(encoder.backbone)
        channels, mean, std = encoder.channels, list(encoder.mean), list(encoder.std)
    else:
        backbone = build_backbone(arch, channels, cfg.width, cfg.small_stem)
        mean, std = data_mean_std
    stages = backbone_stages(backbone)
    n_frozen = max(0, len(stages.units) - cfg.trainable_layers)
    children = dict(stages.body.named_children())
    frozen = {n for unit in stages.units[:n_frozen] for n in unit}
    for name in [n for unit in stages.units for n in unit]:
        child = children[name]
        if name in frozen:
            child.requires_grad_(False)
            setattr(stages.body, name, freeze_batchnorm(child))
        else:
            setattr(stages.body, name, apply_norm(child, cfg.norm))
    return stages, channels, mean, std


def scenes_mean_std(scenes: Scenes, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of (at most 500 of) the scenes' images."""
    sample = [match_channels(img, channels).float().flatten(1) / 255 for img in scenes.images[:500]]
    pixels = torch.cat(sample, dim=1)  # (C, pixels)
    return pixels.mean(1).tolist(), pixels.std(1).clamp(min=1e-3).tolist()


# --------------------------------------------------------------------------------------------------------
# The detector


def build_detector(encoder: LoadedEncoder | None, arch: str, scenes: Scenes, cfg: DetectionConfig) -> nn.Module:
    """Faster/Mask R-CNN + FPN around the encoder's backbone, sized for the canvas of `scenes`."""
    check_config(cfg)
    stages, channels, mean, std = prepare_backbone(encoder, arch, scenes.channels, cfg,
                                                   scenes_mean_std(scenes, encoder.channels if encoder else
                                                                   scenes.channels))
    canvas = scenes.canvas
    levels = stages.outputs[-FPN_STAGES:]
    fpn = BackboneWithFPN(stages.body, {name: str(i) for i, name in enumerate(levels)}, stages.channels[-FPN_STAGES:],
                          cfg.fpn_channels, norm_layer=None if cfg.norm == "frozen" else nn.BatchNorm2d)
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
        mask_head=MaskRCNNHeads(c, (c,) * 4, 1, norm_layer=None if cfg.norm == "frozen" else nn.BatchNorm2d),
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


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled batches of indices below `n`, every index once per pass."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start:start + batch_size]


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr_at(cfg, 0), momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_loop(model: nn.Module, cfg: FinetuneConfig, step_loss: Callable[[list[int], list[bool]], torch.Tensor],
               n: int, echo: Callable[[str], None]) -> list[float]:
    """SGD over `cfg.iterations` batches of scene indices; `step_loss` returns a batch's loss. Returns the losses."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    source = batches(n, cfg.batch_size, generator)
    for iteration in range(cfg.iterations):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, iteration)
        indices = next(source)
        flips = (torch.rand(len(indices), generator=generator) < 0.5).tolist() if cfg.flip else [False] * len(indices)
        loss = step_loss(indices, flips)
        if not torch.isfinite(loss):
            raise ConfigError(f"the fine-tuning loss became {loss.item()} at iteration {iteration + 1}; "
                              "lower the lr or lengthen the warm-up")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (iteration + 1) % cfg.log_every == 0 or iteration + 1 == cfg.iterations:
            recent = losses[-cfg.log_every:]
            echo(f"  iter {iteration + 1}/{cfg.iterations}  loss {sum(recent) / len(recent):.4f}  "
                 f"lr {lr_at(cfg, iteration):.4g}  ({time.perf_counter() - start:.0f} s)")
    return losses


def check_scenes(train: Scenes, test: Scenes, instances: bool) -> None:
    if len(train) == 0 or len(test) == 0:
        raise DataError("fine-tuning needs non-empty train and test scenes")
    if train.classes != test.classes:
        raise DataError(f"train ({train.name}) and test ({test.name}) scenes have different classes")
    if instances and not any(len(b) for b in test.boxes):
        raise DataError(f"{test.name} has no annotated objects to evaluate detection on")


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
    train_loop(model, cfg, step_loss, len(train_scenes), echo)
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


# --------------------------------------------------------------------------------------------------------
# Command line


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    """`moco finetune detect|segment|scenes`."""
    from .segmentation import HEADS, SegmentationConfig, cmd_segment

    p = sub.add_parser("finetune", help="transfer an encoder to detection or segmentation (MoCo paper, Sec. 4.2)",
                       description="Fine-tune a pretrained, supervised or random backbone on a dense task with "
                       "the same model and schedule for every initialisation, and report COCO AP or mIoU.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    det, seg = DetectionConfig(), SegmentationConfig()
    for name, defaults, help_ in (("detect", det, "Faster/Mask R-CNN with FPN; COCO box (and mask) AP"),
                                  ("segment", seg, "DeepLabV3/FCN head on the last stage; mIoU, pixel accuracy")):
        t = tasks.add_parser(name, help=help_, description=help_,
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        t.add_argument("checkpoint", help="an encoder checkpoint (this project's, the official MoCo releases, a "
                       "torchvision ResNet state_dict: supervised) or 'random'")
        t.add_argument("--arch", help="architecture: needed for 'random' (default resnet18) and for checkpoints "
                       "that do not name it")
        t.add_argument("--data", default="builtin", help="'builtin' (Fashion-MNIST test items on canvases), a "
                       "COCO instances JSON (train split), or a folder written by `moco finetune scenes` / in "
                       "VOC layout")
        t.add_argument("--test-data", help="COCO JSON of the test split (when --data is a JSON file)")
        t.add_argument("--train-split", default="train", help="split of a --data folder to train on")
        t.add_argument("--test-split", default="test", help="split of a --data folder to evaluate on")
        add_scene_flags(t)
        t.add_argument("--iterations", type=int, default=defaults.iterations)
        t.add_argument("--batch-size", type=int, default=defaults.batch_size)
        t.add_argument("--lr", type=float, default=defaults.lr)
        t.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
        t.add_argument("--warmup-iters", type=int, default=defaults.warmup_iters)
        t.add_argument("--lr-steps", type=int, nargs="*", default=defaults.lr_steps,
                       help="iterations of lr x0.1")
        t.add_argument("--norm", choices=NORMS, default=defaults.norm,
                       help="backbone (and new layers') normalisation: frozen = torchvision's FrozenBatchNorm2d; "
                       "bn = trained (the paper's); syncbn = SyncBatchNorm, synchronised only under DDP (one "
                       "process: same as bn)")
        t.add_argument("--trainable-layers", type=int, default=defaults.trainable_layers,
                       help="backbone units trained, from the last (ResNet: 5 = stem and layer1-4; SmallCNN: 4)")
        t.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
        t.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=True,
                       help="'random': build the ResNet with the 3x3 small-image stem")
        t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
        t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy "
                       "machine)")
        t.add_argument("--seed", type=int, default=0)
        if name == "detect":
            t.add_argument("--model", choices=MODELS, default=det.model,
                           help="faster: Faster R-CNN (box AP); mask: Mask R-CNN (box and mask AP)")
            t.add_argument("--fpn-channels", type=int, default=det.fpn_channels)
            t.set_defaults(func=cmd_detect)
        else:
            t.add_argument("--head", choices=HEADS, default=seg.head)
            t.set_defaults(func=cmd_segment)
    t = tasks.add_parser("scenes", help="write the built-in scenes in COCO and VOC layouts",
                         description="Write the built-in scenes (train and test splits) to OUT: COCO "
                         "annotations/instances_<split>.json, VOC JPEGImages/ + SegmentationClass/ + ImageSets/.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("out", help="output folder")
    add_scene_flags(t)
    t.set_defaults(func=cmd_scenes)


def add_scene_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-scenes", type=int, default=1000, help="built-in data: fine-tuning scenes")
    p.add_argument("--test-scenes", type=int, default=250, help="built-in data: evaluation scenes")
    p.add_argument("--size", type=int, default=96, help="built-in data: canvas side in pixels")
    p.add_argument("--scene-seed", type=int, default=0, help="built-in data: seed of the composition")


def load_task_data(args: argparse.Namespace, instances: bool) -> tuple[Scenes, Scenes]:
    """The train and test scenes the command's --data flags name."""
    from .coco import read_scenes
    from .scenes import make_scenes

    if args.data == "builtin":
        return make_scenes(args.train_scenes, args.test_scenes, args.size, args.scene_seed)
    if args.data.endswith(".json"):
        if not args.test_data:
            raise ConfigError("--data is a COCO JSON file: pass the test split's JSON as --test-data")
        return read_scenes(args.data, args.train_split, instances), read_scenes(args.test_data, args.test_split,
                                                                                instances)
    test = args.test_data or args.data
    return read_scenes(args.data, args.train_split, instances), read_scenes(test, args.test_split, instances)


def load_initialisation(args: argparse.Namespace) -> tuple[LoadedEncoder | None, str]:
    """The encoder the checkpoint argument names (None for 'random') and its architecture."""
    from ..evaluate.load import load_encoder

    if args.checkpoint == "random":
        return None, args.arch or "resnet18"
    encoder = load_encoder(args.checkpoint, args.arch)
    return encoder, encoder.arch


def schedule_kwargs(args: argparse.Namespace) -> dict:
    """The FinetuneConfig fields the flags set."""
    return dict(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                warmup_iters=args.warmup_iters, lr_steps=args.lr_steps, norm=args.norm,
                trainable_layers=args.trainable_layers, flip=args.flip, small_stem=args.small_stem,
                device=args.device, threads=args.threads, seed=args.seed)


def cmd_detect(args: argparse.Namespace) -> int:
    encoder, arch = load_initialisation(args)
    train, test = load_task_data(args, instances=True)
    cfg = DetectionConfig(**schedule_kwargs(args), model=args.model, fpn_channels=args.fpn_channels)
    metrics = finetune_detection(encoder, arch, train, test, cfg)
    print(f"detection on {test.name} ({len(test)} images): " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from .coco import write_scenes
    from .scenes import make_scenes

    train, test = make_scenes(args.train_scenes, args.test_scenes, args.size, args.scene_seed)
    for split, scenes in (("train", train), ("test", test)):
        print(f"wrote {write_scenes(scenes, args.out, split)} ({len(scenes)} scenes)")
    return 0
