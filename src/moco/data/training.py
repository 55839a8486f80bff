"""What a pretraining run reads: its training images and, when labels exist, the labelled test split."""

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..config import DataConfig
from ..errors import ConfigError
from .augment import AUGMENT_PRESETS
from .shards import ShardStream
from .sources import DATASETS as IMAGE_DATASETS
from .sources import ImageSet, has_split, load_images

DATASETS = (*IMAGE_DATASETS, "shards")


def check_data_config(d: DataConfig) -> None:
    """Raise ConfigError if `d` names an unknown data set or augmentation, or lacks a folder it needs."""
    if d.dataset not in DATASETS:
        raise ConfigError(f"dataset={d.dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
    if d.augment not in AUGMENT_PRESETS:
        raise ConfigError(f"augment={d.augment!r} is unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
    if d.dataset in ("folder", "shards") and d.data_root is None:
        raise ConfigError(f"dataset={d.dataset} needs data_root=PATH (the image folder, or the shards' shards.json)")


@dataclass
class TrainingData:
    """The training images (in memory or streamed) and the labelled test split of the kNN monitor."""

    train: ImageSet | ShardStream
    test: ImageSet | None  # None: no labelled test split
    size: int  # crop size fed to the encoder
    mean: list[float]
    std: list[float]

    def input_spec(self) -> dict[str, Any]:
        """What evaluation must feed an encoder trained on this data: channels, crop size, normalisation."""
        return {"channels": self.train.channels, "size": self.size, "mean": self.mean, "std": self.std}


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of `n` images in epoch `epoch`: a function of (seed, epoch) only, so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def load_training_data(d: DataConfig) -> TrainingData:
    """The data `d` names: in memory (decoded once) or, for shards, streamed."""
    if d.dataset == "shards":
        train = ShardStream.open(d.data_root, d.workers)
        if d.train_subset is not None:
            train = replace(train, count=min(train.count, d.train_subset))
        mean, std = train.mean_std()
        return TrainingData(train, None, d.image_size or train.image_size, mean, std)
    train = load_images(d.dataset, "train", d.data_root, d.image_size, strict=d.strict)
    if d.train_subset is not None:
        n = d.train_subset
        train = ImageSet(train.images[:n], None if train.labels is None else train.labels[:n], train.classes,
                         train.name + f"[:{n}]")
    if len(train) < d.batch_size:
        raise ConfigError(f"batch_size={d.batch_size} is larger than the {len(train)} training images of "
                          f"{train.name}; use batch_size <= {len(train)}")
    test = None
    if train.labels is not None and has_split(d.dataset, "test", d.data_root):
        test = load_images(d.dataset, "test", d.data_root, d.image_size, strict=d.strict)
        if test.labels is None:
            test = None
    mean, std = train.mean_std()
    return TrainingData(train, test, d.image_size or train.image_size, mean, std)
