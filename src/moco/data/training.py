"""What a pretraining run reads: its training images and, when labels exist, the labelled test split.

Named data sets are decoded into memory. A folder too is, while its decoded images fit the memory budget (a
quarter of the machine's RAM unless `--memory-budget` says): crops are then cut on the training device from
squares decoded once. A larger folder is streamed from disk, each step decoding the originals in DataLoader
workers and cutting the two crops there; shards are always streamed. The run says which path it took and why.
"""

import os
from dataclasses import dataclass, replace
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError
from .augment import AUGMENT_PRESETS
from .folders import list_folder
from .shards import ShardStream
from .sources import DATASETS as IMAGE_DATASETS
from .sources import FOLDER_IMAGE_SIZE, ImageSet, has_split, load_images
from .streaming import EvalFolder, FolderStream, open_eval_folder

DATASETS = (*IMAGE_DATASETS, "shards")
GIB = 2**30


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

    train: ImageSet | FolderStream | ShardStream
    test: ImageSet | EvalFolder | None  # None: no labelled test split
    size: int  # crop size fed to the encoder
    mean: list[float]
    std: list[float]
    how: str  # how the training images are read, and why

    def input_spec(self) -> dict[str, Any]:
        """What evaluation must feed an encoder trained on this data: channels, crop size, normalisation."""
        return {"channels": self.train.channels, "size": self.size, "mean": self.mean, "std": self.std}

    def bank(self, limit: int | None = None) -> ImageSet | EvalFolder | None:
        """The labelled training images as evaluation sees them (at most `limit`, evenly spaced): a kNN memory bank."""
        train = self.train
        if train.labels is None:
            return None
        if isinstance(train, FolderStream):
            return train.eval_view(limit)
        step = max(1, -(-len(train) // limit)) if limit else 1
        return train if step == 1 else ImageSet(train.images[::step].contiguous(), train.labels[::step],
                                                  train.classes, f"{train.name}[::{step}]")


def memory_budget(gib: float | None = None) -> float:
    """Bytes decoded images may take in memory, in each process: `gib`, else a quarter of the machine's RAM shared
    by the processes torchrun started on it (each would hold its own copy)."""
    if gib is not None:
        return gib * GIB
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / local_processes


def fits_memory(count: int, size: int, gib: float | None = None) -> tuple[bool, str]:
    """Whether `count` images decoded at `size` px (3 channels at most) fit the memory budget, and the figures."""
    need, budget = count * 3 * size * size, memory_budget(gib)
    return need <= budget, (f"{count} images decoded at {size} px take {need / GIB:.2f} GiB, the memory budget is "
                            f"{budget / GIB:.2f}")


def load_training_data(d: DataConfig) -> TrainingData:
    """The data `d` names: in memory (decoded once), or streamed (large folders, shards)."""
    scale = (d.crop_min_scale, 1.0)
    if d.dataset == "shards":
        train = ShardStream.open(d.data_root, d.image_size or FOLDER_IMAGE_SIZE, scale, d.workers)
        if d.train_subset is not None:
            train = replace(train, count=min(train.count, d.train_subset))
        return TrainingData(train, None, train.size, train.mean, train.std, "streamed from shards")
    if d.dataset == "folder":
        size = d.image_size or FOLDER_IMAGE_SIZE
        listing = list_folder(d.data_root, "train")
        n = min(len(listing.files), d.train_subset or len(listing.files))
        fits, within = fits_memory(n, size, d.memory_budget)
        if d.loader == "memory" and not fits:
            raise ConfigError(f"loader=memory, but {within} GiB: raise --memory-budget, or stream (--loader auto)")
        if n < d.batch_size:
            raise ConfigError(f"batch_size={d.batch_size} is larger than the {n} training images of {d.data_root}; "
                              f"use batch_size <= {n}")
        if d.loader == "stream" or not fits:
            train = FolderStream.open(d.data_root, size, scale, d.workers, d.train_subset)
            test = (open_eval_folder(d.data_root, "test", size, train.channels, d.workers)
                    if train.labels is not None and has_split("folder", "test", d.data_root) else None)
            why = "asked for (--loader stream)" if d.loader == "stream" else f"{within} GiB (--memory-budget)"
            return TrainingData(train, test, size, train.mean, train.std,
                                f"streamed from disk, two crops of each original decoded by {d.workers} workers: {why}")
        how = f"decoded into memory once, centre squares at {size} px: {within} GiB"
    else:
        how = "decoded into memory"
    train = load_images(d.dataset, "train", d.data_root, d.image_size, strict=d.strict, subset=d.train_subset)
    if len(train) < d.batch_size:
        raise ConfigError(f"batch_size={d.batch_size} is larger than the {len(train)} training images of "
                          f"{train.name}; use batch_size <= {len(train)}")
    test = None
    if train.labels is not None and has_split(d.dataset, "test", d.data_root):
        test = load_images(d.dataset, "test", d.data_root, d.image_size, strict=d.strict)
        if test.labels is None:
            test = None
    mean, std = train.mean_std()
    return TrainingData(train, test, d.image_size or train.image_size, mean, std, how)

