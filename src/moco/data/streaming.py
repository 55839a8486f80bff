"""Image folders streamed from disk: any number of images, decoded in DataLoader workers, never all in memory.

For training, each image gives two random resized crops of the original (decode.two_crops) at the training
size, as uint8; the rest of the augmentation runs batched on the training device. The crops of image i in
epoch e are drawn from an RNG seeded by (seed, e, i), and the order of an epoch depends only on (seed, e): a
run resumed mid-epoch sees exactly the batches it would have seen. Under torchrun, process r decodes only block
r of each global batch.

For evaluation, each image gives its centre square (decode.centre_crop, the paper's resize 256 / crop 224).

A file that cannot be decoded is skipped: in training its place in the batch goes to the next image of the
data set (batches keep their size, which split BN needs), and the run warns once an epoch with the count; in
evaluation it is a black image (its label kept), counted the same way.
"""

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError, warn
from .decode import EVAL_RATIO, centre_crop, two_crops
from .folders import FolderListing, evenly_spaced, list_folder
from .order import process_batches

_MAX_RETRIES = 10  # further images tried in place of an unreadable one
_STATS_SAMPLE = 256  # images whose centre crops give the mean and std
_STATS_SIZE = 32


def _paths(listing: FolderListing) -> np.ndarray:
    """The files' paths as one numpy array of bytes: no Python object per file for the workers to copy (a list of
    a million strings in each worker would be copied page by page as reference counts change)."""
    return np.array([str(p).encode() for p in listing.paths()])


def _read(paths: np.ndarray, i: int) -> Path:
    return Path(paths[i].decode())


class _TwoCrops(Dataset):
    """Item (epoch, i): two crops (2, C, S, S) uint8 of image i (or of the next readable one), i, and the paths of
    the files that could not be read on the way."""

    def __init__(self, paths: np.ndarray, size: int, channels: int, scale: tuple[float, float], seed: int) -> None:
        self.paths, self.size, self.channels, self.scale, self.seed = paths, size, channels, scale, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, list[str]]:
        epoch, i = key
        skipped = []
        for attempt in range(_MAX_RETRIES):
            j = (i + attempt) % len(self.paths)
            rng = random.Random((self.seed * 1_000_003 + epoch) * 10_000_019 + j)
            try:
                return two_crops(_read(self.paths, j), self.size, self.channels, rng, self.scale), i, skipped
            except Exception:  # PIL's and libjpeg's decoders raise many kinds of error on corrupt files
                skipped.append(str(_read(self.paths, j)))
        raise DataError(f"{_MAX_RETRIES} images in a row could not be decoded, e.g. {skipped[0]}; check the folder")


class _EpochBatches(Sampler):
    """This process's block of each global batch, for every epoch from `epoch` on, from step `first` of it:
    lists of (epoch, index)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, first: int) -> None:
        self.n, self.batch_size, self.seed, self.epoch, self.first = n, batch_size, seed, epoch, first

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, index in process_batches(self.n, self.batch_size, self.seed, self.epoch, self.first):
            yield [(epoch, int(i)) for i in index]


def _collate_views(items: list[tuple[torch.Tensor, int, list[str]]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    views = torch.stack([item[0] for item in items])  # (b, 2, C, S, S)
    return views, torch.tensor([item[1] for item in items]), [p for item in items for p in item[2]]


@dataclass
class FolderStream:
    """A training split streamed from an image folder (or a subset of it): the place of an in-memory ImageSet."""

    listing: FolderListing
    size: int  # the crops' side
    channels: int
    mean: list[float]
    std: list[float]
    scale: tuple[float, float]  # the crops' area, a fraction of the original's
    workers: int
    name: str
    precropped = True  # batches hold two views already cropped: (B, 2, C, S, S)

    def __post_init__(self) -> None:
        self.paths = _paths(self.listing)
        self.labels = None if self.listing.labels is None else torch.tensor(self.listing.labels)

    @classmethod
    def open(cls, root: str | Path, size: int, scale: tuple[float, float], workers: int,
             subset: int | None = None) -> "FolderStream":
        """The train split of folder `root` (its first `subset` files), its channels and statistics from a sample."""
        listing = list_folder(root, "train")
        name = f"folder:{listing.root}/train"
        if subset is not None:
            listing, name = evenly_spaced(listing, subset), f"{name}[{subset} of {len(listing.files)}]"
        channels, mean, std = image_statistics(listing)
        return cls(listing, size, channels, mean, std, scale, workers, name)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> int:
        return self.size

    def mean_std(self) -> tuple[list[float], list[float]]:
        return self.mean, self.std

    def batches(self, epoch: int, first: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(views (b, 2, C, S, S) uint8, their indices (b,)) of this process, step `first` of `epoch` on; the
        global batch is `batch_size`. Warns once an epoch with the files it could not read."""
        sampler = _EpochBatches(len(self), batch_size, seed, epoch, first)
        # Its own generator: creating the loader must not draw from the global RNG, which a resumed run restores
        # and the augmentation on the device draws from (the crops' randomness is each image's own anyway).
        loader = DataLoader(_TwoCrops(self.paths, self.size, self.channels, self.scale, seed), batch_sampler=sampler,
                            num_workers=self.workers, collate_fn=_collate_views, pin_memory=torch.cuda.is_available(),
                            persistent_workers=self.workers > 0, generator=torch.Generator().manual_seed(seed))
        steps, done, skipped = len(self) // batch_size, first, set()
        for views, index, bad in loader:
            skipped.update(bad)
            yield views, index
            done += 1
            if done == steps:
                if skipped:
                    warn(f"skipped {len(skipped)} unreadable image file(s) in an epoch of {self.name}, e.g. "
                         f"{', '.join(sorted(skipped)[:3])}; fix or delete them")
                done, skipped = 0, set()

    def eval_view(self, limit: int | None = None) -> "EvalFolder":
        """The same images (at most `limit`, evenly spaced) as evaluation sees them: centre crops."""
        listing = self.listing if limit is None else evenly_spaced(self.listing, limit)
        return EvalFolder(listing, self.size, self.channels, EVAL_RATIO, self.workers, self.name)


class _Centre(Dataset):
    """Item i: the centre crop (C, S, S) uint8 of image i (black if unreadable), and the path if it was not."""

    def __init__(self, paths: np.ndarray, size: int, channels: int, ratio: float) -> None:
        self.paths, self.size, self.channels, self.ratio = paths, size, channels, ratio

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str | None]:
        try:
            return centre_crop(_read(self.paths, i), self.size, self.channels, self.ratio), None
        except Exception:  # a corrupt file: counted, and black, so that every label keeps its image
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), str(_read(self.paths, i))


@dataclass
class EvalFolder:
    """A split of an image folder as evaluation reads it: centre crops, streamed in order, with labels."""

    listing: FolderListing
    size: int
    channels: int
    ratio: float
    workers: int
    name: str

    def __post_init__(self) -> None:
        self.paths = _paths(self.listing)
        self.labels = None if self.listing.labels is None else torch.tensor(self.listing.labels)
        self.classes = self.listing.classes
        self.files = self.listing.files

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> int:
        return self.size

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 (b, C, S, S) in the listing's order; warns at the end with the files it could not read."""
        loader = DataLoader(_Centre(self.paths, self.size, self.channels, self.ratio), batch_size=batch_size,
                            num_workers=self.workers, collate_fn=_collate_centre, generator=torch.Generator())
        skipped = []
        for images, bad in loader:
            skipped += bad
            yield images
        if skipped:
            warn(f"{len(skipped)} unreadable image file(s) of {self.name} were evaluated as black images, e.g. "
                 f"{', '.join(skipped[:3])}")


def _collate_centre(items: list[tuple[torch.Tensor, str | None]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([item[0] for item in items]), [item[1] for item in items if item[1] is not None]


def open_eval_folder(root: str | Path, split: str, size: int, channels: int, workers: int) -> EvalFolder:
    listing = list_folder(root, split)
    return EvalFolder(listing, size, channels, EVAL_RATIO, workers, f"folder:{listing.root}/{split}")


def image_statistics(listing: FolderListing) -> tuple[int, list[float], list[float]]:
    """Channels (3 if any sampled image has colour, else 1), and per-channel mean and std in [0, 1] units, from
    the centre crops of an evenly spaced sample of at most 256 images."""
    paths = listing.paths()
    sample = [paths[i] for i in np.linspace(0, len(paths) - 1, min(len(paths), _STATS_SAMPLE)).round().astype(int)]
    crops = []
    for path in sample:
        try:
            crops.append(centre_crop(path, _STATS_SIZE, None))
        except Exception:  # counted when training reads it
            continue
    if not crops:
        raise DataError(f"none of {len(sample)} sampled images under {listing.root} could be decoded")
    channels = 3 if any(c.shape[0] == 3 for c in crops) else 1
    pixels = torch.stack([c.expand(channels, -1, -1) for c in crops]).double() / 255  # (n, C, s, s)
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return channels, mean.tolist(), std.tolist()

