"""WebDataset tar shards: data sets that don't fit in memory or on one disk.

`write_shards(folder, out)` decodes an image folder once (shorter side to `image_size`, centre crop,
exactly as the in-memory folder loader does) into PNGs packed in tar shards, with an index
`shards.json` (shard names or URLs, image count, size, channels, classes, mean/std). `ShardStream`
reads them back as uint8 batches for the same on-device augmentation as in-memory data: shards are
split across processes and DataLoader workers and shuffled, then samples through a buffer.
"""

import io
import json
import random
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import opt
from ..errors import ConfigError, DataError
from ..extras import require
from ..files import write_text
from .sources import list_folder, try_decode

INDEX = "shards.json"


@dataclass
class ShardConfig:
    """How `write_shards` packs a folder."""

    image_size: int = opt(64, "pixels: shorter side resized to it, then centre-cropped")
    shard_size: int = opt(2000, "images per shard")
    seed: int = opt(0, "seed of the shuffle before packing")


def write_shards(folder: str | Path, out: str | Path, cfg: ShardConfig | None = None, echo=print) -> Path:
    """Pack the training split of an image folder into `out/shard-NNNNNN.tar` files and `out/shards.json`.

    Files are shuffled (with `seed`) before packing so that every shard mixes classes; unreadable files
    are skipped and counted.
    """
    wds = require("webdataset", "moco shard")
    cfg = cfg or ShardConfig()
    image_size, shard_size, seed = cfg.image_size, cfg.shard_size, cfg.seed
    if min(image_size, shard_size) < 1:
        raise ConfigError(f"image_size and shard_size must be >= 1, got {image_size} and {shard_size}")
    folder, out = Path(folder), Path(out)
    files, listing = list_folder(folder, "train")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    total = np.zeros(3)
    squares = np.zeros(3)
    pixels, count, color, bad = 0, 0, False, []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink, \
            ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(order), 1024):
            chunk = order[start : start + 1024]
            for i, image in zip(chunk, pool.map(try_decode, [files[i] for i in chunk], [image_size] * len(chunk))):
                if isinstance(image, Exception):
                    bad.append(files[i])
                    continue
                rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
                color = color or image.ndim == 3
                total += rgb.reshape(-1, 3).sum(0)
                squares += (rgb.reshape(-1, 3).astype(np.float64) ** 2).sum(0)
                pixels += rgb.shape[0] * rgb.shape[1]
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                sample = {"__key__": f"{count:09d}", "png": buffer.getvalue()}
                if listing.labels is not None:
                    sample["cls"] = listing.labels[i]
                sink.write(sample)
                count += 1
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s), e.g. {', '.join(map(str, bad[:3]))}",
                      stacklevel=2)
    if count == 0:
        raise DataError(f"none of the images under {folder} could be decoded")
    channels = 3 if color else 1
    mean = total / pixels / 255
    std = np.sqrt(np.maximum(squares / pixels / 255**2 - mean**2, 0))
    index = {"format": "moco-shards", "version": 1, "shards": sorted(p.name for p in out.glob("shard-*.tar")),
             "count": count, "image_size": image_size, "channels": channels,
             "classes": listing.classes, "mean": mean[:channels].tolist(), "std": std[:channels].tolist()}
    write_text(out / INDEX, json.dumps(index, indent=1))
    echo(f"wrote {count} images ({channels} channel{'s' if channels > 1 else ''}, {image_size}px) in "
         f"{len(index['shards'])} shards to {out}" + (f"; skipped {len(bad)} unreadable" if bad else ""))
    return out / INDEX


@dataclass
class ShardStream:
    """Training images streamed from shards; the in-memory `ImageSet`'s place in the training loop."""

    urls: list[str]
    count: int
    image_size: int
    channels: int
    classes: list[str] | None
    mean: list[float]
    std: list[float]
    name: str
    workers: int = 2
    buffer: int = 2000  # shuffle buffer, samples
    labels = None  # the kNN monitor needs in-memory labelled data

    @classmethod
    def open(cls, path: str | Path, workers: int = 2) -> "ShardStream":
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
        urls = [u if "://" in u or u.startswith(("/", "pipe:")) else str(path.parent / u) for u in index["shards"]]
        return cls(urls, index["count"], index["image_size"], index["channels"], index["classes"], index["mean"],
                   index["std"], f"shards:{path}", workers)

    def __len__(self) -> int:
        return self.count

    def mean_std(self) -> tuple[list[float], list[float]]:
        return self.mean, self.std

    def batches(self, epoch: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """Endless uint8 batches (b, C, S, S) of this process's share of the shards, reshuffled each epoch."""
        from .. import distributed as dist

        wds = require("webdataset", "--dataset shards")

        rank, world = dist.rank(), dist.world_size()
        share = self.urls[rank::world] if len(self.urls) >= world else self.urls
        workers = max(0, min(self.workers, len(share)))
        dataset = (wds.WebDataset(share, shardshuffle=len(share), seed=seed * 1000 + epoch * 10 + rank,
                                  nodesplitter=None, workersplitter=wds.split_by_worker, empty_check=False)
                   .shuffle(self.buffer, rng=random.Random(seed + epoch + rank))
                   .decode("pil").to_tuple("png").map(self._tensor).batched(batch_size, collation_fn=torch.stack, partial=False))
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)
        while True:  # shards of unequal length: loop, so that every process runs the same number of steps
            for batch in loader:
                yield batch

    def _tensor(self, sample: tuple[Image.Image]) -> torch.Tensor:
        image = sample[0].convert("RGB" if self.channels == 3 else "L")
        array = np.asarray(image)
        return torch.from_numpy(array.copy()).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array.copy())[None]

