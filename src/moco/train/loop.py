"""The pretraining loop: data -> two augmented views -> MoCo -> InfoNCE -> SGD, with checkpoints."""

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import PretrainConfig, to_yaml, validate
from ..data.augment import EvalTransform, build_augment
from ..data.sources import ImageSet, has_split, load_images
from ..errors import CheckpointError, ConfigError
from ..evaluate.knn import knn_accuracy, knn_eval, pixel_features, reinitialised
from ..model import build_moco
from ..runtime import resolve_device, rng_state, seed_everything, set_rng_state
from .checkpoint import LAST, load_checkpoint, save_checkpoint
from .observe import LossWatch, MetricsLog, check_collapse, check_queue_size, key_spread
from .optim import build_optimizer, lr_at, set_lr


@dataclass
class PretrainResult:
    out_dir: Path
    checkpoint: Path
    epochs: int
    loss: float  # mean loss of the last epoch
    knn: dict[str, float] | None = None  # the trained backbone's kNN accuracy on the test split
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # raw pixels, random encoder


@dataclass
class Data:
    """The training images and, when labels exist, the labelled splits of the kNN monitor."""

    train: ImageSet
    test: ImageSet | None
    size: int  # crop size fed to the encoder
    mean: list[float]
    std: list[float]


def load_data(cfg: PretrainConfig) -> Data:
    d = cfg.data
    train = load_images(d.dataset, "train", d.data_root, d.image_size, strict=d.strict)
    if d.train_subset is not None:
        train = ImageSet(train.images[: d.train_subset], None if train.labels is None else train.labels[: d.train_subset],
                         train.classes, train.name + f"[:{d.train_subset}]")
    if len(train) < d.batch_size:
        raise ConfigError(
            f"batch_size={d.batch_size} is larger than the {len(train)} training images of {train.name}; "
            f"use batch_size <= {len(train)}"
        )
    test = None
    if train.labels is not None and has_split(d.dataset, "test", d.data_root):
        test = load_images(d.dataset, "test", d.data_root, d.image_size, strict=d.strict)
        if test.labels is None:
            test = None
    mean, std = train.mean_std()
    return Data(train, test, d.image_size or train.image_size, mean, std)


class Knn:
    """kNN accuracy of a backbone on the test split, with the training images as the memory bank."""

    def __init__(self, data: Data, cfg: PretrainConfig, device: torch.device) -> None:
        self.data, self.cfg, self.device = data, cfg, device
        self.transform = EvalTransform(data.size, data.mean, data.std).to(device)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        r, train, test = self.cfg.run, self.data.train, self.data.test
        return knn_eval(backbone, (train.images, train.labels), (test.images, test.labels), self.transform,
                        self.device, r.knn_k, r.knn_t, r.channels_last)

    def pixels(self) -> dict[str, float]:
        r = self.cfg.run
        train, test = self.data.train, self.data.test
        return knn_accuracy(pixel_features(train.images), train.labels, pixel_features(test.images), test.labels,
                            r.knn_k, r.knn_t)


def pretrain(
    cfg: PretrainConfig,
    resume: str | Path | None = None,
    backbone: nn.Module | None = None,
    baselines: bool = True,
    echo: Callable[[str], None] = print,
) -> PretrainResult:
    """Pretrain with MoCo as `cfg` says; resume from a checkpoint path if given.

    `backbone` replaces cfg.model.arch with any module mapping (B, C, H, W) images to (B, D) features.
    With `baselines`, the end also measures kNN on raw pixels and on a randomly initialised encoder.
    """
    validate(cfg)
    state = load_checkpoint(resume) if resume is not None else None
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    device = resolve_device(r.device)
    if r.threads is not None:
        torch.set_num_threads(r.threads)
    seed_everything(r.seed)
    out_dir = Path(r.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    echo(f"# moco pretrain: config (also in {out_dir / 'config.yaml'})\n{to_yaml(cfg)}")

    data = load_data(cfg)
    train = data.train
    echo(f"data: {train.name}, {len(train)} images {tuple(train.images.shape[1:])}, crop {data.size}px; "
         f"kNN monitor: {'on ' + data.test.name if data.test is not None else 'off (no labelled test split)'}; "
         f"device: {device}")
    steps_per_epoch = len(train) // d.batch_size  # the last partial batch is dropped (split BN needs full groups)
    if m.mechanism == "moco":
        check_queue_size(m.queue_size, steps_per_epoch * d.batch_size * (2 if m.symmetric else 1))

    model = build_moco(m, train.channels, data.size, backbone, num_images=len(train)).to(device)
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    augment = build_augment(d.augment, data.size, data.mean, data.std, d.crop_min_scale).to(device)
    optimizer = build_optimizer(model.encoder_q.parameters(), o, d.batch_size)
    knn = Knn(data, cfg, device) if data.test is not None else None

    start_epoch, step = 0, 0
    if state is not None:
        start_epoch, step = restore(state, model, optimizer)
        echo(f"resumed from {resume}: epoch {start_epoch}, step {step}")

    metrics = MetricsLog(out_dir, r.tensorboard)
    watch = LossWatch(*model.chance(d.batch_size))
    checkpoint = out_dir / LAST
    epoch_loss, knn_result = math.nan, None
    try:
        for epoch in range(start_epoch, o.epochs):
            model.train()
            # The data order depends only on (seed, epoch): a resumed run sees the same batches.
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(r.seed * 100_003 + epoch))
            loss_sum = torch.zeros((), device=device)
            acc_sum = torch.zeros((), device=device)
            seen = 0
            tic = time.perf_counter()
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{o.epochs}", disable=not r.progress,
                       dynamic_ncols=True, leave=True)
            for i in bar:
                lr = lr_at(step, steps_per_epoch, o, d.batch_size)
                set_lr(optimizer, lr)
                idx = order[i * d.batch_size : (i + 1) * d.batch_size]
                images = train.images[idx].to(device, non_blocking=True)  # (B, C, H, W) uint8
                x_q = augment(images).contiguous(memory_format=memory_format)  # (B, C, S, S)
                x_k = augment(images).contiguous(memory_format=memory_format) if model.uses_key_view else None
                logits, labels = model(x_q, x_k, idx.to(device))  # (B, 1 + K), (B,)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_sum += loss.detach()
                acc_sum += (logits.detach().argmax(dim=1) == labels).float().mean()
                seen += 1
                if not watch.checked and step > watch.first_full_step:
                    watch.step(step, loss.item())
                if seen % 20 == 0 or i == steps_per_epoch - 1:
                    mean_loss = (loss_sum / seen).item()
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"the loss became {mean_loss} by step {step}: lower the lr or raise the temperature T"
                        )
                    img_s = seen * d.batch_size / (time.perf_counter() - tic)
                    values = {"loss": mean_loss, "acc": 100 * (acc_sum / seen).item(), "lr": lr, "img_s": img_s}
                    bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['acc']:.1f}%", lr=f"{lr:.4f}",
                                    img_s=f"{img_s:.0f}", refresh=False)
                    metrics.log(step, "train", values)
            bar.close()
            epoch_loss = (loss_sum / seen).item()
            spread = key_spread(model.key_sample())
            values = {"epoch": epoch + 1, "loss": epoch_loss, "acc": 100 * (acc_sum / seen).item(),
                      "key_spread": spread, "seconds": time.perf_counter() - tic}
            last = epoch + 1 == o.epochs
            if knn is not None and r.knn_every >= 0 and (last or (r.knn_every > 0 and (epoch + 1) % r.knn_every == 0)):
                knn_result = knn(model.encoder_q.backbone)
                values.update(knn_top1=knn_result["top1"], knn_top5=knn_result["top5"])
            metrics.log(step, "epoch", values)
            echo("epoch {epoch}: loss {loss:.4f}, contrastive acc {acc:.1f}%, key spread {key_spread:.2f}, "
                 "{seconds:.0f} s".format(**values)
                 + (f", kNN top-1 {values['knn_top1']:.2f}%" if "knn_top1" in values else ""))
            if epoch == start_epoch:
                watch.epoch_end(epoch_loss)
            check_collapse(spread)
            save_checkpoint(
                {"config": asdict(cfg), "epoch": epoch + 1, "step": step, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "rng": rng_state(), "metrics": values,
                 "data": {"channels": train.channels, "size": data.size, "mean": data.mean, "std": data.std}},
                checkpoint,
            )
    finally:
        metrics.close()

    result = PretrainResult(out_dir, checkpoint, o.epochs, epoch_loss, knn_result)
    if knn is not None and baselines:
        if result.knn is None:
            result.knn = knn(model.encoder_q.backbone)
        result.baselines = {"raw pixels": knn.pixels(), "random encoder": knn(reinitialised(model.encoder_q.backbone))}
        echo(summary(result, cfg, data))
    return result


def restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Load a checkpoint's model, optimizer and RNG state; returns (completed epochs, steps)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not fit this model/config: {e}") from None
    set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["step"])


def summary(result: PretrainResult, cfg: PretrainConfig, data: Data) -> str:
    r = cfg.run
    rows = [("this run's encoder", result.knn), *result.baselines.items()]
    lines = [f"kNN on {data.test.name} ({len(data.test)} images; weighted, k={r.knn_k}, t={r.knn_t}; "
             f"memory bank: {len(data.train)} training images)"]
    lines += [f"  {name:<24} top-1 {acc['top1']:6.2f}%   top-5 {acc['top5']:6.2f}%" for name, acc in rows]
    lines.append(f"checkpoint: {result.checkpoint}")
    return "\n".join(lines)
