"""Supervised pre-training with the same backbone, data and budget: the baseline that MoCo's transfer
results are compared with (paper Tables 2-5: "IN-1M supervised")."""

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoints import SUPERVISED, save_checkpoint
from ..config import PretrainConfig, to_yaml, validate
from ..data.augment import build_augment
from ..data.order import epoch_order
from ..data.training import check_data_config, load_training_data
from ..errors import ConfigError
from ..files import write_text
from ..model.backbones import BACKBONES, build_backbone
from ..runtime import resolve_device, rng_state, seed_everything
from .optim import build_optimizer, pretrain_lr
from .steps import sgd_steps

CHECKPOINT = "supervised.pt"


def check_supervised_config(cfg: PretrainConfig) -> PretrainConfig:
    """What supervised pre-training uses of a pretraining config: the values, the data, the backbone's name (the
    method's fields, and split BN, do not apply)."""
    validate(cfg)
    check_data_config(cfg.data)
    if cfg.model.arch not in BACKBONES:
        raise ConfigError(f"arch={cfg.model.arch!r} is unknown; choose one of {', '.join(BACKBONES)}")
    return cfg


def supervised(cfg: PretrainConfig, echo: Callable[[str], None] = print) -> Path:
    """Train backbone + linear classifier with cross-entropy on the labels; returns the checkpoint path.

    Same backbone (cfg.model.arch/width/small_stem), data, epochs, batch and SGD schedule as pretraining;
    the augmentation is random resized crop + flip (the standard supervised recipe).
    """
    check_supervised_config(cfg)
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    device = resolve_device(r.device)
    if r.threads is not None:
        torch.set_num_threads(r.threads)
    seed_everything(r.seed)
    data = load_training_data(d)
    train = data.train
    if train.labels is None:
        raise ConfigError(f"{train.name} has no labels: supervised pre-training needs a labelled data set")
    if train.precropped:
        raise ConfigError(f"supervised pre-training reads its images in memory, and {train.name} is {data.how}; "
                          "use a --train-subset that fits, or raise --memory-budget")
    backbone = build_backbone(m.arch, train.channels, m.width, m.small_stem, data.size, m.patch_size,
                              last_width=m.last_width, depths=m.depths)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, int(train.labels.max()) + 1)).to(device)
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    augment = build_augment("crop", data.size, data.mean, data.std, min_scale=0.08).to(device)
    optimizer = build_optimizer(model.parameters(), o, d.batch_size)
    out_dir = Path(r.out_dir)
    write_text(out_dir / "config.yaml", to_yaml(cfg))
    echo(f"# moco supervised: {m.arch} on {train.name} ({len(train)} labelled images), {o.epochs} epochs")
    steps = len(train) // d.batch_size
    model.train()
    for epoch in range(o.epochs):
        order = epoch_order(len(train), r.seed, epoch)
        correct = torch.zeros((), device=device)

        def batch_loss(step: int) -> torch.Tensor:
            nonlocal correct
            i = step - epoch * steps
            idx = order[i * d.batch_size : (i + 1) * d.batch_size]
            x = augment(train.images[idx].to(device)).contiguous(memory_format=memory_format)  # (B, C, S, S)
            y = train.labels[idx].to(device)  # (B,)
            logits = model(x)  # (B, classes)
            correct += (logits.detach().argmax(1) == y).sum()
            return F.cross_entropy(logits, y)

        tic, loss_sum = time.perf_counter(), 0.0
        bar = tqdm(range(epoch * steps, (epoch + 1) * steps), desc=f"epoch {epoch + 1}/{o.epochs}",
                   disable=not r.progress, leave=False)
        for _, loss in sgd_steps(optimizer, lambda s: pretrain_lr(s, steps, o, d.batch_size), bar, batch_loss,
                                 "lower --lr"):
            loss_sum += loss.item()
        echo(f"epoch {epoch + 1}: loss {loss_sum / steps:.4f}, train top-1 "
             f"{100 * correct.item() / (steps * d.batch_size):.1f}%, {time.perf_counter() - tic:.0f} s")
    path = save_checkpoint(
        {"config": asdict(cfg), "epoch": o.epochs, "step": o.epochs * steps, "model": model.state_dict(),
         "rng": [rng_state()], "data": data.input_spec()},
        out_dir / CHECKPOINT, kind=SUPERVISED,
    )
    echo(f"checkpoint: {path}")
    return path
