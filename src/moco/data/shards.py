"""WebDataset tar shards of an image folder's original files: data sets that don't fit on one disk, or are read
over a network.

`write_shards(folder, out)` packs each file's encoded bytes as they are (a JPEG stays that JPEG), or, with
`max_side`, downscaled once so that its longer side is at most that (the aspect ratio kept, re-encoded in its
own format; large-scale loaders store ImageNet at 256-512 px), into tar shards of shuffled files, with an index
`shards.json` (shard names or URLs, image count, channels, classes, mean and std). `ShardStream` reads them back
the way a streamed folder is read: two random resized crops of each original, decoded in DataLoader workers.
"""

import io
import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .. import distributed as dist
from ..config import opt
from ..errors import ConfigError, DataError, warn
from ..extras import require
from ..files import write_text
from .decode import two_crops
from .folders import list_folder
from .streaming import image_statistics

INDEX = "shards.json"
VERSION = 2  # 1: PNGs of centre crops at a fixed size (no longer read)
_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".webp": "webp", ".gif": "gif",
               ".tif": "tif", ".tiff": "tif", ".ppm": "ppm", ".pgm": "pgm"}


@dataclass
class ShardConfig:
    """How `write_shards` packs a folder."""

    max_side: int | None = opt(None, "downscale images whose longer side is above this, once, keeping the aspect "
                                     "ratio (none: every file's bytes as they are)")
    shard_size: int = opt(2000, "images per shard")
    seed: int = opt(0, "seed of the shuffle before packing")


def _sample_bytes(path: Path, max_side: int | None) -> bytes:
    """The file's bytes; when its longer side exceeds `max_side`, the image downscaled to it in its own format."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if max_side is None or max(image.size) <= max_side:
            image.verify()  # a file that is not an image is refused now, not in training
            return data
        scale = max_side / max(image.size)
        kind = image.format
        small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    small.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()


def write_shards(folder: str | Path, out: str | Path, cfg: ShardConfig | None = None, echo=print) -> Path:
    """Pack the training split of an image folder into `out/shard-NNNNNN.tar` files and `out/shards.json`.

    Files are shuffled (with cfg.seed) before packing so that every shard mixes classes; unreadable files are
    skipped and counted. The index is written last: a folder without it holds no finished shards.
    """
    wds = require("webdataset", "moco shard")
    cfg = cfg or ShardConfig()
    if cfg.shard_size < 1 or (cfg.max_side is not None and cfg.max_side < 8):
        raise ConfigError(f"shard_size must be >= 1 and max_side >= 8 or none, got {cfg.shard_size} and "
                          f"{cfg.max_side}")
    out = Path(out)
    listing = list_folder(folder, "train")
    paths = listing.paths()
    order = list(range(len(paths)))
    random.Random(cfg.seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    count, bad = 0, []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=cfg.shard_size, verbose=0) as sink:
        for i in order:
            try:
                data = _sample_bytes(paths[i], cfg.max_side)
            except Exception:  # PIL raises many kinds of error on corrupt files
                bad.append(paths[i])
                continue
            sample = {"__key__": f"{count:09d}", _EXTENSIONS.get(paths[i].suffix.lower(), "jpg"): data}
            if listing.labels is not None:
                sample["cls"] = listing.labels[i]
            sink.write(sample)
            count += 1
    if bad:
        warn(f"skipped {len(bad)} unreadable image file(s), e.g. {', '.join(map(str, bad[:3]))}")
    if count == 0:
        raise DataError(f"none of the images under {folder} could be read")
    channels, mean, std = image_statistics(listing)
    index = {"format": "moco-shards", "version": VERSION, "shards": sorted(p.name for p in out.glob("shard-*.tar")),
             "count": count, "channels": channels, "classes": listing.classes, "mean": mean, "std": std,
             "max_side": cfg.max_side}
    write_text(out / INDEX, json.dumps(index, indent=1))
    echo(f"wrote {count} images ({channels} channel{'s' if channels > 1 else ''}, "
         f"{'original files' if cfg.max_side is None else f'longer side at most {cfg.max_side} px'}) in "
         f"{len(index['shards'])} shards to {out}" + (f"; skipped {len(bad)} unreadable" if bad else ""))
    return out / INDEX


@dataclass
class ShardStream:
    """Training images streamed from shards: the place of an in-memory ImageSet in the training loop."""

    urls: list[str]
    count: int
    channels: int
    classes: list[str] | None
    mean: list[float]
    std: list[float]
    name: str
    size: int  # the crops' side
    scale: tuple[float, float]  # the crops' area, a fraction of the original's
    workers: int = 2
    buffer: int = 2000  # shuffle buffer, samples
    labels = None  # the kNN monitor needs a labelled test split, which shards do not have
    precropped = True  # batches hold two views already cropped: (B, 2, C, S, S)

    @classmethod
    def open(cls, path: str | Path, size: int, scale: tuple[float, float], workers: int = 2) -> "ShardStream":
        """Shards described by a `shards.json` (from `moco shard`); its shard entries may be paths
        relative to it, absolute paths, or URLs (anything WebDataset opens: http://, pipe:, ...)."""
        require("webdataset", "--dataset shards")  # before any work, not at the first batch
        path = Path(path)
        if path.is_dir():
            path = path / INDEX
        if not path.is_file():
            raise DataError(f"no shard index at {path}; write shards with `moco shard FOLDER OUT`, "
                            f"then pass --data-root OUT/{INDEX}")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not a shard index (invalid JSON: {e})") from None
        if index.get("format") != "moco-shards":
            raise DataError(f"{path} is not a shard index written by `moco shard`")
        if index.get("version") != VERSION:
            raise DataError(f"{path} is a version {index.get('version')} shard index (centre crops at a fixed size), "
                            "which this moco no longer reads: write the shards again from the image folder with "
                            "`moco shard FOLDER OUT` (they now keep the original files)")
        urls = [u if "://" in u or u.startswith(("/", "pipe:")) else str(path.parent / u) for u in index["shards"]]
        return cls(urls, index["count"], index["channels"], index["classes"], index["mean"], index["std"],
                   f"shards:{path}", size, scale, workers)

    def __len__(self) -> int:
        return self.count

    @property
    def image_size(self) -> int:
        return self.size

    def mean_std(self) -> tuple[list[float], list[float]]:
        return self.mean, self.std

    def batches(self, epoch: int, first: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, None]]:
        """(views (b, 2, C, S, S) uint8, None) of this process, step `first` of `epoch` on, for every epoch after.

        Each epoch reshuffles the shards and the samples with seeds of (seed, epoch, process); a run resumed at
        step `first` of an epoch skips that epoch's first batches unread, so it continues with exactly the
        batches it would have seen (with the same number of workers).
        """
        steps = self.count // batch_size
        while True:
            for i, views in enumerate(self._epoch(epoch, first, batch_size // dist.world_size(), seed)):
                yield views, None
                if first + i + 1 == steps:
                    break
            epoch, first = epoch + 1, 0

    def _epoch(self, epoch: int, first: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
        wds = require("webdataset", "--dataset shards")
        rank, world = dist.rank(), dist.world_size()
        share = self.urls[rank::world] if len(self.urls) >= world else self.urls
        workers = max(0, min(self.workers, len(share)))
        decode = _DecodeBatch(self.size, self.channels, self.scale, seed, epoch)
        dataset = (wds.WebDataset(share, shardshuffle=len(share), seed=(seed * 1000 + epoch) * 10 + rank,
                                  nodesplitter=None, workersplitter=wds.split_by_worker, empty_check=False,
                                  repeat=True)
                   .shuffle(self.buffer, rng=random.Random((seed * 1000 + epoch) * 10 + rank))
                   .batched(batch, collation_fn=list, partial=False)
                   .compose(_SkipBatches(first, workers))
                   .map(decode))
        yield from wds.WebLoader(dataset, batch_size=None, num_workers=workers, generator=torch.Generator())


class _SkipBatches:
    """In each DataLoader worker, the batches the first `first` steps took from it, dropped unread (the loader
    takes batches from its workers in turn)."""

    def __init__(self, first: int, workers: int) -> None:
        self.first, self.workers = first, workers

    def __call__(self, batches: Iterator[list[dict]]) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = len(range(worker, self.first, workers))
        for batch in batches:
            if skip:
                skip -= 1
                continue
            yield batch


class _DecodeBatch:
    """Raw samples -> their two crops (b, 2, C, S, S) uint8; an image's crops are drawn from an RNG seeded by
    (seed, epoch, its key). An unreadable sample is replaced by another of the batch, with a warning."""

    def __init__(self, size: int, channels: int, scale: tuple[float, float], seed: int, epoch: int) -> None:
        self.size, self.channels, self.scale, self.seed, self.epoch = size, channels, scale, seed, epoch

    def __call__(self, samples: list[dict]) -> torch.Tensor:
        views, bad = [], []
        for sample in samples:
            key = sample["__key__"]
            data = next((v for k, v in sample.items() if k in _EXTENSIONS.values()), None)
            rng = random.Random((self.seed * 1_000_003 + self.epoch) * 10_000_019 + zlib.crc32(key.encode()))
            try:
                views.append(two_crops(data, self.size, self.channels, rng, self.scale))
            except Exception:  # a corrupt sample
                bad.append(key)
        if not views:
            raise DataError(f"no sample of a batch could be decoded, e.g. {bad[0]}; check the shards")
        if bad:
            warn(f"skipped {len(bad)} unreadable shard sample(s), e.g. {bad[0]}")
        views += [views[i % len(views)] for i in range(len(bad))]
        return torch.stack(views)  # (b, 2, C, S, S)
