"""Supervised pre-training with the same backbone, data and budget: the baseline that MoCo's transfer
results are compared with (paper Tables 2-5: "IN-1M supervised")."""

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import PretrainConfig, to_yaml, validate
from ..data.augment import build_augment
from ..errors import ConfigError
from ..evaluate.features import extract_features
from ..evaluate.knn import knn_accuracy
from ..model.backbones import build_backbone
from ..runtime import resolve_device, rng_state, seed_everything
from .checkpoint import SUPERVISED, save_checkpoint
from .loop import load_data
from .optim import build_optimizer, lr_at, set_lr

CHECKPOINT = "supervised.pt"


def supervised(cfg: PretrainConfig, echo: Callable[[str], None] = print) -> Path:
    """Train backbone + linear classifier with cross-entropy on the labels; returns the checkpoint path.

    Same backbone (cfg.model.arch/width/small_stem), data, epochs, batch and SGD schedule as pretraining;
    the augmentation is random resized crop + flip (the standard supervised recipe).
    """
    validate(cfg)
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    device = resolve_device(r.device)
    if r.threads is not None:
        torch.set_num_threads(r.threads)
    seed_everything(r.seed)
    data = load_data(cfg)
    train = data.train
    if train.labels is None:
        raise ConfigError(f"{train.name} has no labels: supervised pre-training needs a labelled data set")
    classes = int(train.labels.max()) + 1
    backbone = build_backbone(m.arch, train.channels, m.width, m.small_stem)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, classes)).to(device)
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    augment = build_augment("crop", data.size, data.mean, data.std, min_scale=0.08).to(device)
    optimizer = build_optimizer(model.parameters(), o, d.batch_size)
    out_dir = Path(r.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    echo(f"# moco supervised: {m.arch} on {train.name} ({len(train)} labelled images), {o.epochs} epochs")
    steps = len(train) // d.batch_size
    step = 0
    for epoch in range(o.epochs):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(r.seed * 100_003 + epoch))
        loss_sum, correct, tic = 0.0, 0, time.perf_counter()
        for i in tqdm(range(steps), desc=f"epoch {epoch + 1}/{o.epochs}", disable=not r.progress, leave=False):
            set_lr(optimizer, lr_at(step, steps, o, d.batch_size))
            idx = order[i * d.batch_size : (i + 1) * d.batch_size]
            x = augment(train.images[idx].to(device)).contiguous(memory_format=memory_format)  # (B, C, S, S)
            y = train.labels[idx].to(device)  # (B,)
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"supervised loss became {loss.item()} at step {step + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == y).sum())
        echo(f"epoch {epoch + 1}: loss {loss_sum / steps:.4f}, train top-1 {100 * correct / (steps * d.batch_size):.1f}%, "
             f"{time.perf_counter() - tic:.0f} s")
    metrics = {}
    if data.test is not None:
        from ..data.augment import EvalTransform

        transform = EvalTransform(data.size, data.mean, data.std).to(device)
        bank = extract_features(backbone, train.images, transform, device)
        queries = extract_features(backbone, data.test.images, transform, device)
        metrics = {f"knn_{k}": v for k, v in knn_accuracy(bank, train.labels.to(device), queries,
                                                           data.test.labels.to(device), r.knn_k, r.knn_t).items()}
        echo(f"supervised backbone: kNN top-1 {metrics['knn_top1']:.2f}% on {data.test.name}")
    path = save_checkpoint(
        {"config": asdict(cfg), "epoch": o.epochs, "step": step, "model": model.state_dict(), "rng": [rng_state()],
         "metrics": metrics, "data": {"channels": train.channels, "size": data.size, "mean": data.mean,
                                      "std": data.std}},
        out_dir / CHECKPOINT, kind=SUPERVISED,
    )
    echo(f"checkpoint: {path}")
    return path
