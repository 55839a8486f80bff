"""What detection and segmentation fine-tuning share: the schedule and backbone options, cutting a backbone
into stages, its normalisation layers, and the loop.

The MoCo paper's transfer protocol (Sec. 4.2), at the scale of a CPU:
  * every initialisation (MoCo, supervised, random) runs the same model, the same schedule (SGD,
    linear warm-up, step decay, fixed iterations) and the same hyper-parameters;
  * "feature normalization": MoCo's features have other statistics than supervised ones, so the paper
    fine-tunes with BatchNorm trained (SyncBN across GPUs), also in the new layers, and with every
    backbone stage trainable (detectron2's FREEZE_AT 0). That is the default here: norm="bn",
    trainable_layers=5. norm="frozen" is torchvision's default instead (FrozenBatchNorm2d: the
    pretrained statistics and affine kept fixed); norm="recalibrated" freezes it too, after re-estimating the
    statistics on the fine-tuning images (AdaBN); norm="syncbn" converts to SyncBatchNorm, which
    synchronises statistics only inside a DDP process group (torchrun); a single process computes
    exactly what "bn" does.
  * stages left out of training (trainable_layers < 5) always get FrozenBatchNorm2d, as in detectron2.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..checkpoints import LoadedEncoder
from ..config import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, check_fields, one_of, opt, optional
from ..errors import ConfigError, DataError
from ..model.backbones import SmallCNN, build_backbone
from ..train.schedule import lr_at
from ..train.steps import sgd_steps
from .scenes import Scenes, match_channels

NORMS = ("frozen", "recalibrated", "bn", "syncbn")
CALIBRATION_IMAGES = 1000  # "recalibrated" BN: images its statistics are re-estimated on
FIXED_NORMS = ("frozen", "recalibrated")  # statistics and affine fixed in fine-tuning; no BN in detection's new layers


@dataclass
class FinetuneConfig:
    """The schedule and backbone options that every initialisation shares."""

    # Detection needs iterations more than images (docs/transfer.md, "Choosing the schedule"): 360 x 2 images
    # is what a ResNet-18 on 96 px scenes affords in ~6 minutes on 2 busy CPU cores.
    iterations: int = opt(360, "SGD iterations")
    batch_size: int = opt(2, "images per iteration")
    lr: float = opt(0.02, "learning rate after the warm-up")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "SGD weight decay")
    warmup_iters: int = opt(20, "linear warm-up from lr * warmup_factor over these iterations")
    warmup_factor: float = opt(0.001, "the warm-up's starting fraction of lr")
    lr_steps: list[int] = opt([240, 315], "iterations where lr x0.1")
    clip_grad: float | None = opt(None, "clip the gradients' global L2 norm to this before each step (none: no "
                                        "clipping)")
    norm: str = opt("bn", "backbone (and new layers') normalisation: frozen = torchvision's FrozenBatchNorm2d; "
                          "recalibrated = frozen after re-estimating the statistics on the fine-tuning images "
                          "(AdaBN); bn = trained (the paper's); syncbn = SyncBatchNorm, synchronised only under DDP")
    trainable_layers: int = opt(5, "backbone units trained, from the last (ResNet: 5 = stem and layer1-4; "
                                   "SmallCNN: 4 stages)")
    flip: bool = opt(True, "random horizontal flips of the training images")
    small_stem: bool = opt(True, "random initialisation only: build the ResNet with the 3x3 small-image stem")
    width: int = opt(32, "random initialisation of small_cnn only: its width")
    last_width: int | None = opt(None, "random initialisation of small_cnn only: its last stage's width (none: 8x "
                                       "width)")
    depths: list[int] = opt([1, 1, 1, 1], "random initialisation of small_cnn only: layers in each of its 4 stages")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int | None = opt(None, "torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    seed: int = opt(0, "seed of the initialisation of new layers, the batches and flips")
    log_every: int = opt(40, "iterations between loss lines")


def check_config(cfg: FinetuneConfig) -> None:
    """Raise ConfigError naming the first field that cannot work."""
    check_fields(cfg, "fine-tuning", {
        "iterations": POSITIVE_INT, "batch_size": POSITIVE_INT, "log_every": POSITIVE_INT, "lr": POSITIVE,
        "momentum": FRACTION, "weight_decay": NON_NEGATIVE, "norm": one_of(NORMS),
        "trainable_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 5,
                             "an integer in 0..5"),
        "threads": optional(POSITIVE_INT), "clip_grad": optional(POSITIVE),
        "warmup_iters": (lambda v: isinstance(v, int) and 0 <= v <= cfg.iterations, "in 0..iterations"),
        "warmup_factor": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "in (0, 1]"),
        "lr_steps": (lambda v: list(v) == sorted(v) and all(0 < s < cfg.iterations for s in v),
                     f"increasing iterations within (0, {cfg.iterations})")})


def finetune_lr(cfg: FinetuneConfig, iteration: int) -> float:
    """The learning rate of 0-based `iteration`: linear warm-up from lr * warmup_factor, x0.1 at each of lr_steps."""
    return lr_at(iteration, cfg.iterations, cfg.lr, "step", cfg.lr_steps, cfg.warmup_iters, cfg.warmup_factor)


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
        starts = [0] + [end + 1 for end in backbone.stage_ends[:-1]]
        units = [[str(i) for i in range(start, end + 1) if not isinstance(backbone.features[i], nn.ReLU)]
                 for start, end in zip(starts, backbone.stage_ends)]  # conv-BN(-ReLU) layers of each stage
        return Stages(backbone.features, [str(end) for end in backbone.stage_ends], backbone.widths, units)
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
    """`module`'s BatchNorms as `norm` asks: frozen (also after recalibration), trained (bn) or synchronised
    (syncbn)."""
    if norm in FIXED_NORMS:
        return freeze_batchnorm(module)
    if norm == "syncbn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def prepare_backbone(encoder: LoadedEncoder | None, arch: str, channels: int, cfg: FinetuneConfig,
                     data_mean_std: tuple[list[float], list[float]],
                     calibration: Iterable[torch.Tensor] = ()) -> tuple[Stages, int, list[float], list[float]]:
    """A copy of the encoder's backbone, or a randomly initialised `arch`, ready to fine-tune.

    Returns its stages (norm layers converted, the units below `trainable_layers` frozen), its input
    channels and its input normalisation: the encoder's, or for a random backbone the data's own.
    With norm "recalibrated", every BN's statistics are first re-estimated on the `calibration` batches
    (B, C, H, W) in [0, 1]. The caller's encoder is left untouched.
    """
    if encoder is not None:
        if arch != encoder.arch:
            raise ConfigError(f"arch {arch!r} differs from the encoder's {encoder.arch!r}")
        backbone = copy.deepcopy(encoder.backbone)
        channels, mean, std = encoder.channels, list(encoder.mean), list(encoder.std)
    else:
        backbone = build_backbone(arch, channels, cfg.width, cfg.small_stem, last_width=cfg.last_width,
                                  depths=cfg.depths)
        mean, std = data_mean_std
    if cfg.norm == "recalibrated":
        recalibrate_batchnorm(backbone, calibration, mean, std)
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


def recalibrate_batchnorm(backbone: nn.Module, batches: Iterable[torch.Tensor], mean: list[float],
                          std: list[float]) -> None:
    """Set every BN's running statistics of `backbone` to the average of its batch statistics over `batches`
    (B, C, H, W) in [0, 1], normalised with `mean` and `std` (AdaBN; torch's `update_bn`, as after SWA)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    update_bn(((x - m) / s for x in batches), backbone)


def calibration_batches(scenes: Scenes, channels: int, batch_size: int,
                        limit: int = CALIBRATION_IMAGES) -> Iterator[torch.Tensor]:
    """(At most `limit` of) the scenes' images as batches (B, C, H, W) in [0, 1] of at most `batch_size` images of
    one size, in the scenes' order."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i in range(min(len(scenes), limit)):
        by_size.setdefault(tuple(scenes.images[i].shape[1:]), []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            yield torch.stack([match_channels(scenes.images[i], channels).float() / 255 for i in chunk])


def backbone_for(encoder: LoadedEncoder | None, arch: str, scenes: Scenes,
                 cfg: FinetuneConfig) -> tuple[Stages, int, list[float], list[float]]:
    """`prepare_backbone` for fine-tuning on `scenes`: a random backbone is normalised with the scenes' own
    statistics, and "recalibrated" BN is re-estimated on (at most CALIBRATION_IMAGES of) them."""
    channels = encoder.channels if encoder else scenes.channels
    stats = scenes_mean_std(scenes, channels)
    # Batches of at least 8 images: the statistics of the 1-2 image batches detection trains with would be noisy.
    calibration = calibration_batches(scenes, channels, max(cfg.batch_size, 8)) if cfg.norm == "recalibrated" else ()
    return prepare_backbone(encoder, arch, scenes.channels, cfg, stats, calibration)


def scenes_mean_std(scenes: Scenes, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of (at most 500 of) the scenes' images."""
    sample = [match_channels(img, channels).float().flatten(1) / 255 for img in scenes.images[:500]]
    pixels = torch.cat(sample, dim=1)  # (C, pixels)
    return pixels.mean(1).tolist(), pixels.std(1).clamp(min=1e-3).tolist()


# --------------------------------------------------------------------------------------------------------
# The loop


def check_scenes(train: Scenes, test: Scenes, instances: bool) -> None:
    if len(train) == 0 or len(test) == 0:
        raise DataError("fine-tuning needs non-empty train and test scenes")
    if train.classes != test.classes:
        raise DataError(f"train ({train.name}) and test ({test.name}) scenes have different classes")
    if instances and not any(len(b) for b in test.boxes):
        raise DataError(f"{test.name} has no annotated objects to evaluate detection on")


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled batches of indices below `n`, every index once per pass."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start:start + batch_size]


def finetune_loop(model: nn.Module, cfg: FinetuneConfig,
                  step_loss: Callable[[list[int], list[bool]], torch.Tensor], n: int,
                  echo: Callable[[str], None]) -> list[float]:
    """SGD over `cfg.iterations` batches of scene indices (with random flips); `step_loss(indices, flips)` returns
    a batch's loss. Returns the losses."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=finetune_lr(cfg, 0),
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    source = batches(n, cfg.batch_size, generator)

    def batch_loss(iteration: int) -> torch.Tensor:
        indices = next(source)
        flips = ((torch.rand(len(indices), generator=generator) < 0.5).tolist() if cfg.flip
                 else [False] * len(indices))
        return step_loss(indices, flips)

    for iteration, loss in sgd_steps(optimizer, lambda i: finetune_lr(cfg, i), range(cfg.iterations), batch_loss,
                                     "lower --lr, lengthen the warm-up (--warmup-iters) or clip (--clip-grad)",
                                     cfg.clip_grad):
        losses.append(loss.item())
        if (iteration + 1) % cfg.log_every == 0 or iteration + 1 == cfg.iterations:
            recent = losses[-cfg.log_every:]
            echo(f"  iter {iteration + 1}/{cfg.iterations}  loss {sum(recent) / len(recent):.4f}  "
                 f"lr {finetune_lr(cfg, iteration):.4g}  ({time.perf_counter() - start:.0f} s)")
    return losses


# --------------------------------------------------------------------------------------------------------
# What to fine-tune, and on what


@dataclass
class SceneSource:
    """The train and test images of a dense task: the built-in scenes, COCO JSON files, or a folder."""

    data: str = opt("builtin", "'builtin' (Fashion-MNIST test items on canvases), a COCO instances JSON (train "
                               "split), or a folder written by `moco finetune scenes` / in VOC layout")
    test_data: str | None = opt(None, "COCO JSON of the test split (when --data is a JSON file)")
    train_split: str = opt("train", "split of a --data folder to train on")
    test_split: str = opt("test", "split of a --data folder to evaluate on")
    train_scenes: int = opt(1000, "built-in data: fine-tuning scenes")
    test_scenes: int = opt(250, "built-in data: evaluation scenes")
    size: int = opt(96, "built-in data: canvas side in pixels")
    scene_seed: int = opt(0, "built-in data: seed of the composition")


def load_scenes(source: SceneSource, instances: bool) -> tuple[Scenes, Scenes]:
    """The train and test scenes `source` names (`instances`: boxes and masks are needed, not only classes)."""
    from .coco import read_scenes
    from .scenes import make_scenes

    if source.data == "builtin":
        return make_scenes(source.train_scenes, source.test_scenes, source.size, source.scene_seed)
    if source.data.endswith(".json") and not source.test_data:
        raise ConfigError("--data is a COCO JSON file: pass the test split's JSON as --test-data")
    return (read_scenes(source.data, source.train_split, instances),
            read_scenes(source.test_data or source.data, source.test_split, instances))


def initialisation(checkpoint: str, arch: str | None) -> tuple[LoadedEncoder | None, str]:
    """The encoder `checkpoint` holds (None for 'random') and its architecture (for 'random': `arch` or resnet18)."""
    from ..checkpoints import load_encoder

    if checkpoint == "random":
        return None, arch or "resnet18"
    encoder = load_encoder(checkpoint, arch)
    return encoder, encoder.arch
