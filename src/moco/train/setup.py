"""From a config to a trainer ready to run: the checks, the process group and device, the data, the method."""

from collections.abc import Callable

import torch
from torch import nn

from .. import distributed as dist
from ..config import PretrainConfig, to_yaml, validate
from ..data.training import check_data_config, load_training_data
from ..errors import ConfigError
from ..model import build_method, check_model_config
from ..runtime import autocast_dtype, keep_freed_memory, resolve_device, seed_everything
from .trainer import Trainer


def check_pretrain_config(cfg: PretrainConfig, world: int = 1) -> PretrainConfig:
    """Reject a config that cannot work on `world` processes before any work starts, naming the field."""
    validate(cfg)
    check_data_config(cfg.data)
    check_model_config(cfg, world)
    m, d = cfg.model, cfg.data
    if world > 1 and (d.batch_size % world or m.bn_splits % world):
        raise ConfigError(f"batch_size={d.batch_size} and bn_splits={m.bn_splits} count all {world} processes "
                          f"together: make both multiples of {world} (e.g. bn_splits={world}: one BN group a process)")
    if world > 1 and m.sync_bn and not torch.cuda.is_available():
        raise ConfigError("sync_bn needs GPUs (NCCL); on CPUs use split BN (bn_splits)")
    return cfg


def check_device(cfg: PretrainConfig, device: torch.device) -> None:
    """What the config asks of the device it got."""
    if cfg.run.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision=fp16 needs a CUDA GPU (its loss scaling is for GPUs); on {device.type} use "
                          "bf16 or fp32 (or auto)")


def build_trainer(cfg: PretrainConfig, backbone: nn.Module | None = None,
                  echo: Callable[[str], None] = print) -> Trainer:
    """Join torchrun's process group (if any), pick the device, load the data and build the method of `cfg`.

    `backbone` replaces cfg.model.arch with any module mapping (B, C, H, W) images to (B, D) features.
    """
    r = cfg.run
    ddp_device = dist.setup(r.device)
    world = dist.world_size()
    check_pretrain_config(cfg, world)
    device = ddp_device if world > 1 else resolve_device(r.device)
    check_device(cfg, device)
    if r.threads is not None:
        torch.set_num_threads(r.threads)
    if device.type == "cpu":
        keep_freed_memory()
    if dist.is_main():
        echo(f"# moco pretrain: config (also in {r.out_dir}/config.yaml)\n{to_yaml(cfg)}")
    seed_everything(r.seed)  # the same initial weights everywhere (DDP also broadcasts them)
    data = load_training_data(cfg.data)
    train = data.train
    method = build_method(cfg.model, train.channels, data.size, backbone, num_images=len(train))
    trainer = Trainer(cfg, method, data, device, echo)
    seed_everything(r.seed + trainer.rank)  # each process draws its own augmentations
    monitor = f"on {data.test.name}" if data.test is not None else "off (no labelled test split)"
    per_process = f", {world} processes, {cfg.data.batch_size // world} images each a step" if world > 1 else ""
    amp = autocast_dtype(r.precision, device)
    trainer.echo(f"data: {train.name}, {len(train)} images, {train.channels} channel(s), crops of {data.size} px, "
                 f"{data.how}; kNN monitor: {monitor}; device: {device}{per_process}")
    trainer.echo(f"method: {cfg.model.method}; precision: "
                 f"{'fp32' if amp is None else str(amp).removeprefix('torch.') + ' autocast'}; "
                 f"channels_last: {r.channels_last}; compile: {r.compile}")
    return trainer
