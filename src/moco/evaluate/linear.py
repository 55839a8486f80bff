"""Linear classification on a frozen backbone: the evaluation protocol of the MoCo paper.

A fresh fully-connected layer (weights N(0, 0.01), bias 0) is trained with SGD on the backbone's
pooled features (not L2-normalised), while the backbone stays frozen in eval mode: no gradients,
no BatchNorm statistics updates. The paper uses lr 30 (batch 256), momentum 0.9, no weight decay,
100 epochs, lr x0.1 at epochs 60 and 80, random resized crops + flips for training and the whole
image for testing.

MoCo v3's protocol (`protocol="v3"`, chosen by default for v3 checkpoints) is SGD without weight decay, a cosine
schedule over 90 epochs and a batch of 1024, with base lr 0.1 for ResNets and 3 for ViTs (for a batch of 256, scaled
to the batch as everywhere here).

`lr_search` chooses the lr as the paper did, by a grid search, but without looking at the test set: each
candidate trains on the training set less a seeded 10% and is scored on that held-out part after the last epoch; the
best then trains on the whole training set, and only that classifier sees the test set. The paper's lr 30 suits
ResNet-50 features of ImageNet; the best lr of a small encoder's features can be several times lower.

`augment="none"` trains on the features of the whole (resized) images instead, computed once:
100 epochs then take seconds on a CPU and the result does not depend on augmentation noise.
`augment="crop"` is the paper's protocol, each step running fresh crops through the backbone.
Test features are computed once in both modes: the backbone is frozen, so they never change.

As in the official `main_lincls.py`, every backbone tensor is compared with a snapshot after
training, so that a backbone that changed anyway (a leaked gradient, a BatchNorm in train mode,
a forward that writes to its weights) cannot go unnoticed.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoints import LoadedEncoder
from ..config import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, check_fields, every, one_of, opt
from ..data.augment import build_augment
from ..data.sources import ImageSet
from ..errors import ConfigError, DataError, MocoError
from ..model import METHODS
from ..model.backbones import is_vit
from ..train.schedule import lr_at, scaled_lr
from ..train.steps import sgd_steps
from .data import eval_transform, fit_channels
from .features import Images, extract_features

SCHEDULES = ("step", "cosine")
PROTOCOLS = ("auto", "v1", "v3")
AUGMENTS = ("none", "crop")
LR_BATCH_SIZE = 256  # the batch size the lr is given for (linear scaling rule)
CROP_MIN_SCALE = 0.08  # the standard linear protocol's RandomResizedCrop scale (0.08, 1)
FC_INIT_STD = 0.01
HOLDOUT_FRACTION = 0.1  # lr search: the part of the training set that compares learning rates
_EVAL_CHUNK = 8192


@dataclass
class LinearConfig:
    """The linear protocol's classifier training (the MoCo paper's by default; MoCo v3's for v3 checkpoints)."""

    protocol: str = opt("auto", "auto (v3 for MoCo v3 checkpoints, else v1) | v1: the MoCo paper's (the defaults "
                                "shown) | v3: MoCo v3's (90 epochs, cosine, batch 1024, lr 0.1 for ResNets and 3 for "
                                "ViTs); flags given override the protocol's values")
    epochs: int = opt(100, "epochs of the linear classifier")
    lr: float = opt(30.0, "for a batch of 256, scaled linearly with batch_size")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.0, "SGD weight decay")
    schedule: str = opt("step", "step (x0.1 at each of lr_steps) | cosine, applied per iteration")
    lr_steps: list[int] = opt([60, 80], "step schedule: epochs where lr x0.1")
    batch_size: int = opt(256, "images per step")
    augment: str = opt("none", "none: features of whole images computed once (fast) | crop: the paper's random "
                               "resized crop + flip through the frozen backbone at every step")
    seed: int = opt(0, "seed of the classifier's initialisation and the data order")
    lr_search: list[float] = opt([], "learning rates to choose lr from, as the paper chose its lr by grid search: "
                                     "each trains on the training set less a held-out 10%, the one with the best "
                                     "final held-out top-1 then trains on all of it (none: use lr)")


@dataclass
class LinearResult:
    best_top1: float  # percent, the highest test top-1 over all epochs
    best_top5: float | None  # percent, test top-5 at the epoch of best_top1 (None for 5 classes or fewer)
    best_epoch: int  # 1-based
    final_top1: float
    final_top5: float | None
    history: list[dict]  # per epoch: epoch, lr, train_loss, train_top1, test_top1, test_top5
    lr: float  # for a batch of 256: the config's, or the one the lr search chose
    search: dict[float, float]  # lr search: final held-out top-1 (percent) of each lr; empty without a search


def protocol_config(protocol: str, encoder: LoadedEncoder) -> LinearConfig:
    """The defaults of `protocol` for `encoder`: the MoCo paper's, or MoCo v3's (auto: for v3 checkpoints)."""
    check_fields(LinearConfig(protocol=protocol), "linear", {"protocol": one_of(PROTOCOLS)})
    if protocol == "auto":
        method = METHODS.get(encoder.config.model.method) if encoder.config is not None else None
        protocol = "v3" if encoder.layout == "moco-v3" or (method and method.linear_protocol == "v3") else "v1"
    if protocol == "v1":
        return LinearConfig(protocol="v1")
    vit = is_vit(encoder.backbone)
    return LinearConfig(protocol="v3", epochs=90, lr=3.0 if vit else 0.1, weight_decay=0.0, schedule="cosine",
                        batch_size=1024)


def check_config(cfg: LinearConfig) -> None:
    """Raise ConfigError naming the first field that cannot work."""
    check_fields(cfg, "linear", {"protocol": one_of(PROTOCOLS), "epochs": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE,
                                 "momentum": FRACTION, "weight_decay": NON_NEGATIVE, "schedule": one_of(SCHEDULES),
                                 "lr_steps": every(POSITIVE_INT), "augment": one_of(AUGMENTS),
                                 "lr_search": every(POSITIVE)})


def linear_lr(cfg: LinearConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of iteration `step` (0-based): cfg.lr scaled to the batch, then scheduled."""
    return lr_at(step, cfg.epochs * steps_per_epoch, scaled_lr(cfg.lr, cfg.batch_size, LR_BATCH_SIZE), cfg.schedule,
                 [m * steps_per_epoch for m in cfg.lr_steps])


def new_classifier(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """The linear classifier of the protocol: weight ~ N(0, 0.01), bias 0."""
    fc = nn.Linear(dim, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, FC_INIT_STD, generator=generator)
        fc.bias.zero_()
    return fc


def holdout_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held) of a seeded random split of n training images, HOLDOUT_FRACTION of them held out
    (at least one, and at least one kept): the lr search compares learning rates on `held` without the test set."""
    if n < 2:
        raise DataError(f"the lr search needs at least 2 training images to hold one out, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    held = min(max(1, round(HOLDOUT_FRACTION * n)), n - 1)
    return order[held:], order[:held]


def snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (non-persistent ones included), by name."""
    tensors = [*backbone.named_parameters(), *backbone.named_buffers()]
    return {name: t.detach().clone() for name, t in tensors}


class BackboneChanged(MocoError):
    """A backbone whose weights changed while it was evaluated as frozen (e.g. a forward that writes to them)."""


def check_frozen(before: dict[str, torch.Tensor], backbone: nn.Module) -> None:
    """Raise BackboneChanged if any tensor of `backbone` differs, even by one bit, from `before`."""
    now = dict([*backbone.named_parameters(), *backbone.named_buffers()])
    changed = [
        name for name, old in before.items()
        if name not in now or now[name].shape != old.shape or not torch.equal(now[name].detach(), old)
    ]
    if changed:
        more = f" (also {', '.join(changed[1:6])}{' ...' if len(changed) > 6 else ''})" if len(changed) > 1 else ""
        raise BackboneChanged(
            f"backbone weight {changed[0]} changed during linear evaluation{more}: the protocol requires a "
            "frozen backbone (no gradient to it, BatchNorm in eval mode, no in-place writes in forward)"
        )


@contextmanager
def frozen(backbone: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for `backbone` inside the block; its own settings restored after."""
    modes = [m.training for m in backbone.modules()]
    flags = [p.requires_grad for p in backbone.parameters()]
    backbone.eval().requires_grad_(False)
    try:
        yield
    finally:
        for module, mode in zip(backbone.modules(), modes):
            module.training = mode
        for p, flag in zip(backbone.parameters(), flags):
            p.requires_grad_(flag)


@torch.no_grad()
def accuracy(fc: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float | None]:
    """Top-1 and, with more than 5 classes, top-5 accuracy (percent) of `fc` on features (N, D), labels (N,)."""
    k = min(5, fc.out_features)
    hits1 = hits5 = 0
    for x, y in zip(features.split(_EVAL_CHUNK), labels.split(_EVAL_CHUNK)):
        ranked = fc(x).topk(k, dim=1).indices  # (n, k)
        hits = ranked == y[:, None]  # (n, k)
        hits1 += int(hits[:, 0].sum())
        hits5 += int(hits.any(dim=1).sum())
    return 100.0 * hits1 / len(labels), (100.0 * hits5 / len(labels) if fc.out_features > 5 else None)


def _check_data(encoder: LoadedEncoder, train: ImageSet | Images, test: ImageSet | Images) -> int:
    """The number of classes; DataError for data the protocol cannot use."""
    for split in (train, test):
        if len(split) == 0:
            raise DataError(f"{split.name} holds no images: linear evaluation needs a labelled train and test set")
        if split.labels is None:
            raise DataError(f"{split.name} has no labels: linear evaluation needs labels for train and test")
        if int(split.labels.min()) < 0:
            raise DataError(f"{split.name} has negative labels ({int(split.labels.min())}): labels must be 0..C-1")
        fit_channels(split, encoder)
    seen = max(int(train.labels.max()), int(test.labels.max())) + 1
    return max(seen, len(train.classes or []))


def linear_probe(
    encoder: LoadedEncoder,
    train: ImageSet | Images,
    test: ImageSet | Images,
    cfg: LinearConfig,
    device: torch.device | str = "cpu",
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> LinearResult:
    """Train a linear classifier on the frozen `encoder` and report its test accuracy every epoch; with
    `cfg.lr_search`, first choose its lr on held-out training images (see the module docstring).

    The backbone is moved to `device`; its train/eval mode and requires_grad flags are restored on
    return. Raises BackboneChanged if any backbone tensor changed during training (see `check_frozen`).
    """
    check_config(cfg)
    if cfg.augment == "crop" and not isinstance(train, ImageSet):
        raise ConfigError(f"--augment crop needs the training images in memory, and {train.name} is streamed; use "
                          "--augment none (features of each image computed once)")
    num_classes = _check_data(encoder, train, test)
    device = torch.device(device)
    transform = eval_transform(encoder, train, device)
    backbone = encoder.backbone.to(device)
    n = len(train)
    with frozen(backbone):
        before = snapshot(backbone)
        test_x = extract_features(backbone, test, transform, device, normalize=False,
                                  desc=f"features {test.name}" if progress else None)  # (Nt, D)
        test_y = test.labels.to(device)  # (Nt,)
        if cfg.augment == "none":
            train_x = extract_features(backbone, train, transform, device, normalize=False,
                                       desc=f"features {train.name}" if progress else None)  # (N, D)
            train_y = train.labels.to(device)  # (N,)
        else:
            augment = build_augment("crop", train.image_size, encoder.mean, encoder.std,
                                    min_scale=CROP_MIN_SCALE).to(device)

        def inputs() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
            """Features and labels of training images by index; crops drawn afresh from the seed for each fit."""
            if cfg.augment == "none":
                return lambda idx: (train_x[idx.to(device)], train_y[idx.to(device)])  # (B, D), (B,)
            augment_gen = torch.Generator(device=device).manual_seed(cfg.seed)

            @torch.no_grad()
            def crops(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                images = train.images[idx].to(device, non_blocking=True)  # (B, C, H, W) uint8
                y = train.labels[idx].to(device, non_blocking=True)  # (B,)
                return backbone(augment(images, augment_gen)).float().flatten(1), y  # (B, D), (B,)
            return crops

        search: dict[float, float] = {}
        if cfg.lr_search:
            kept, held = holdout_split(n, cfg.seed)
            if cfg.augment == "none":
                held_x = train_x[held.to(device)]  # (Nh, D)
            else:
                held_x = extract_features(backbone, train.images[held], transform, device, normalize=False)  # (Nh, D)
            held_y = train.labels[held].to(device)  # (Nh,)
            echo(f"lr search: {len(kept)} of the {n} training images, compared on the other {len(held)}")
            for lr in cfg.lr_search:
                history = _fit(replace(cfg, lr=lr), kept, inputs(), (held_x, held_y), num_classes, device,
                               lambda line: None, progress, f"lr search {lr:g}")
                search[lr] = history[-1]["test_top1"]
                echo(f"lr search: lr {lr:g}, held-out top-1 {search[lr]:.2f}% after {cfg.epochs} epochs")
            cfg = replace(cfg, lr=max(search, key=lambda lr: search[lr]))  # the first of the best
            echo(f"lr search: chose lr {cfg.lr:g}")
        echo(f"linear evaluation: {n} train / {len(test)} test images, {test_x.shape[1]}-dim features, "
             f"{num_classes} classes, augment {cfg.augment}, lr {cfg.lr:g} x {cfg.batch_size}/{LR_BATCH_SIZE} "
             f"({cfg.schedule}), {cfg.epochs} epochs on {device}")
        history = _fit(cfg, torch.arange(n), inputs(), (test_x, test_y), num_classes, device, echo, progress, "linear")
        check_frozen(before, backbone)
    best = max(history, key=lambda h: h["test_top1"])  # the first epoch with the highest top-1
    result = LinearResult(best["test_top1"], best["test_top5"], best["epoch"], history[-1]["test_top1"],
                          history[-1]["test_top5"], history, cfg.lr, search)
    echo(f"linear evaluation: best top-1 {result.best_top1:.2f}% at epoch {result.best_epoch}; final top-1 "
         f"{result.final_top1:.2f}%")
    return result


def _fit(cfg: LinearConfig, pool: torch.Tensor,
         inputs: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
         evaluation: tuple[torch.Tensor, torch.Tensor], num_classes: int, device: torch.device,
         echo: Callable[[str], None], progress: bool, desc: str) -> list[dict]:
    """Train a new classifier with `cfg` on the training images `pool` (indices; `inputs` gives their features and
    labels), scoring it on `evaluation` (features, labels) after every epoch; the per-epoch history."""
    eval_x, eval_y = evaluation  # (Ne, D), (Ne,)
    n = len(pool)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    fc = new_classifier(eval_x.shape[1], num_classes, torch.Generator().manual_seed(cfg.seed)).to(device)
    optimizer = torch.optim.SGD(fc.parameters(), lr=linear_lr(cfg, 0, steps_per_epoch), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    history: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        order = pool[torch.randperm(n, generator=order_gen)]  # (n,) on the CPU, where the images are
        correct = torch.zeros((), device=device)
        loss_sum = torch.zeros((), device=device)
        first = (epoch - 1) * steps_per_epoch

        def batch_loss(step: int) -> torch.Tensor:
            nonlocal correct, loss_sum
            x, y = inputs(order[(step - first) * cfg.batch_size : (step - first + 1) * cfg.batch_size])  # (B, D), (B,)
            logits = fc(x)  # (B, num_classes)
            loss = F.cross_entropy(logits, y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            loss_sum += loss.detach() * len(y)
            return loss

        steps = tqdm(range(first, first + steps_per_epoch), desc=f"{desc} {epoch}/{cfg.epochs}",
                     disable=not progress, leave=False, dynamic_ncols=True)
        for _ in sgd_steps(optimizer, lambda s: linear_lr(cfg, s, steps_per_epoch), steps, batch_loss,
                           f"lower the lr (now {cfg.lr:g} for batch {LR_BATCH_SIZE})"):
            pass
        epoch_lr = linear_lr(cfg, first, steps_per_epoch)
        train_loss = (loss_sum / n).item()
        top1, top5 = accuracy(fc, eval_x, eval_y)
        history.append({"epoch": epoch, "lr": epoch_lr, "train_loss": train_loss,
                        "train_top1": 100.0 * correct.item() / n, "test_top1": top1, "test_top5": top5})
        top5_text = f", top-5 {top5:.2f}%" if top5 is not None else ""
        echo(f"epoch {epoch}/{cfg.epochs}: lr {epoch_lr:.4g}, train loss {train_loss:.4f}, "
             f"train top-1 {history[-1]['train_top1']:.2f}%, test top-1 {top1:.2f}%{top5_text}")
    return history
