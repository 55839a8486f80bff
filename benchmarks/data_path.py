"""`python -m benchmarks data`: how fast the full-resolution data path feeds training, on an ImageNet-like folder.

On a folder of real photographs at ImageNet's sizes (benchmarks.photos), with the same files and cores:
- ours: images/s of a streamed folder, each image decoded and cut into two random resized crops of 224 px in
  DataLoader workers (the rest of the augmentation runs batched on the training device);
- torchvision: ImageFolder with the official MoCo v2 per-image two-crop transform (crop, jitter, grayscale,
  blur, flip, to tensor, normalise, twice) in DataLoader workers, as the official code trains;
- the limit: decoding the same JPEGs alone, one process on one core;
- peak RSS of one streamed pass over a small and a ten times larger folder: it must not grow with the data set;
- from those, how many CPU cores keep a GPU busy at an assumed ResNet-50 MoCo step rate.
Results go to `<out>/data-<machine>.json` and the "Data path" section of `<out>.md`.
"""

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg

from moco.checkpoints.encoders import IMAGENET_MEAN, IMAGENET_STD
from moco.config import opt
from moco.data.streaming import FolderStream
from moco.errors import ConfigError

from .photos import write_photo_folder
from .provenance import ROOT, commit, machine_info
from .reference import TwoCropsTransform, reference_transform


@dataclass
class DataPathSettings:
    """What `python -m benchmarks data` measures; stored with the result."""

    files: int = opt(2000, "JPEGs of the folder the loaders are timed on")
    large: int = opt(20000, "JPEGs of the larger folder of the memory comparison")
    size: int = opt(224, "the crops' side, px")
    workers: int = opt(os.cpu_count() or 1, "DataLoader workers of both loaders (the cores they share)")
    batch_size: int = opt(64, "images per batch")
    images: int = opt(1500, "images timed per loader, after a warm-up batch")
    gpu_rate: float = opt(1850.0, "assumed images/s of a MoCo v2 ResNet-50 step on one GPU (an A100 with AMP: the "
                                  "2,470 img/s of supervised training with DALI, x3/4 for the key encoder's forward)")
    folders: str = opt("runs/bench-photos", "where the photo folders are made, relative to the repository (kept for "
                                            "the next run)")


def photo_folder(s: DataPathSettings, count: int) -> Path:
    root = ROOT / s.folders / f"{count}"
    if len(list((root / "train").rglob("*.jpg"))) != count if root.is_dir() else True:
        write_photo_folder(root, count, seed=0)
    return root


def _rate(batches, batch_size: int, images: int) -> float:
    """Images/s over `images` images of `batches` (or as many as follow), after one warm-up batch (workers
    starting)."""
    next(batches)
    tic, seen = time.perf_counter(), 0
    for _ in batches:
        seen += batch_size
        if seen >= images:
            break
    if not seen:
        raise ConfigError(f"the folder holds one batch of {batch_size} at most: time more files (--files)")
    return seen / (time.perf_counter() - tic)


def ours(s: DataPathSettings, root: Path) -> float:
    stream = FolderStream.open(root, s.size, (0.2, 1.0), s.workers)
    return _rate(stream.batches(0, 0, s.batch_size, seed=0), s.batch_size, s.images)


def official(s: DataPathSettings, root: Path) -> float:
    transform = TwoCropsTransform(reference_transform("v2", s.size, IMAGENET_MEAN, IMAGENET_STD))
    loader = DataLoader(ImageFolder(str(root / "train"), transform), batch_size=s.batch_size, shuffle=True,
                        num_workers=s.workers, drop_last=True, persistent_workers=True)
    return _rate(iter(loader), s.batch_size, s.images)


def decode_alone(root: Path, images: int) -> float:
    """JPEG decoding alone (torchvision's libjpeg-turbo, the faster here), one process, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    files = sorted((root / "train").rglob("*.jpg"))[:images]
    data = [f.read_bytes() for f in files]
    try:
        tic = time.perf_counter()
        for d in data:
            decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return len(data) / (time.perf_counter() - tic)
    finally:
        torch.set_num_threads(threads)


PASS = """
import resource, sys
from moco.data.streaming import FolderStream
stream = FolderStream.open(sys.argv[1], int(sys.argv[2]), (0.2, 1.0), int(sys.argv[3]))
batches = stream.batches(0, 0, 64, 0)
for _ in range(len(stream) // 64):
    next(batches)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss(s: DataPathSettings, root: Path) -> dict[str, int]:
    """Peak RSS (MiB) of one streamed pass over the folder, in a fresh process: the process and its largest worker."""
    out = subprocess.run([sys.executable, "-c", PASS, str(root), str(s.size), str(s.workers)], capture_output=True,
                         text=True, check=True).stdout
    process, worker = map(int, out.split())
    return {"process_mib": round(process / 1024), "worker_mib": round(worker / 1024)}


def data_path(s: DataPathSettings, echo=print) -> dict[str, Any]:
    small, large = photo_folder(s, s.files), photo_folder(s, s.large)
    cores = s.workers
    result: dict[str, Any] = {}
    result["ours_img_s"] = round(ours(s, small), 1)
    echo(f"ours: {result['ours_img_s']:.0f} img/s with {cores} workers (decode + two crops of {s.size} px)")
    result["official_img_s"] = round(official(s, small), 1)
    echo(f"torchvision ImageFolder + the official v2 two-crop transform: {result['official_img_s']:.0f} img/s")
    result["decode_img_s_per_core"] = round(decode_alone(small, s.images), 1)
    echo(f"JPEG decode alone: {result['decode_img_s_per_core']:.0f} img/s on one core")
    result["peak_rss"] = {str(s.files): peak_rss(s, small), str(s.large): peak_rss(s, large)}
    echo(f"peak RSS of a streamed pass: {result['peak_rss']}")
    per_core = {k: result[f"{k}_img_s"] / cores for k in ("ours", "official")}
    result["per_core"] = {k: round(v, 1) for k, v in per_core.items()}
    result["cores_per_gpu"] = {k: round(s.gpu_rate / v, 1) for k, v in per_core.items()}
    result["ours_vs_official"] = round(per_core["ours"] / per_core["official"], 2)
    result["decode_vs_ours"] = round(result["decode_img_s_per_core"] / per_core["ours"], 2)
    echo(f"per core: ours {per_core['ours']:.0f}, torchvision {per_core['official']:.0f} img/s "
         f"({result['ours_vs_official']}x); decode alone {result['decode_vs_ours']}x ours; cores per GPU at "
         f"{s.gpu_rate:g} img/s: ours {result['cores_per_gpu']['ours']}, torchvision "
         f"{result['cores_per_gpu']['official']}")
    return result


def run(s: DataPathSettings, out: str | Path = "docs/benchmarks", echo=print) -> Path:
    """Measure, save the entry in its machine's results file, regenerate the Markdown page."""
    from .bench import save_result, write_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    tic = time.perf_counter()
    result = data_path(s, echo)
    command = " ".join(["python -m benchmarks", *sys.argv[1:]]) if sys.argv[1:] else "python -m benchmarks data"
    entry = {"mode": "data", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
             "command": command, "machine": machine_info(torch.device("cpu")),
             "load_1min": [round(load[0], 2), round(os.getloadavg()[0], 2)],
             "seconds": round(time.perf_counter() - tic, 1), "setup": {k: v for k, v in asdict(s).items()
                                                                     if k != "folders"},
             "settings": asdict(s), "result": result}
    path = save_result(out, entry)
    echo(f"wrote {path} and {write_table(out)}")
    return path


def table(entries: list[dict[str, Any]], machine_name) -> list[str]:
    """The "Data path" section of the benchmarks page."""
    if not entries:
        return []
    lines = ["", "## Data path", "",
             "A streamed ImageNet-like folder (`benchmarks/photos.py`: real photographs cut and rescaled to ImageNet's "
             "sizes, JPEG quality 90): *ours* decodes each image and cuts two random resized crops of the original in "
             "DataLoader workers (flip, jitter, grayscale and blur then run batched on the training device); "
             "*torchvision* is `ImageFolder` with the official MoCo v2 two-crop transform, all of it per image in the "
             "workers, as the official code trains. Both with the same workers on the same files. The limit: JPEG "
             "decoding alone on one core. Peak RSS: one streamed pass over each folder, the process and its largest "
             "worker. Cores per GPU: the assumed GPU step rate divided by the images/s of one core. Ours stays about 2x "
             "from decoding alone because each image is also resampled twice to 224 px with antialiasing (about 0.6 "
             "ms a crop on these CPUs, as long as decoding it), and the batches cross from the workers to the "
             "training process.", "",
             "| machine | workers | crops | ours img/s (per core) | torchvision img/s (per core) | ours / torchvision | "
             "decode alone, one core | decode / ours | peak RSS MiB (process / worker) | cores per GPU at the assumed "
             "rate: ours / torchvision | commit | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        st, r = e["settings"], e["result"]
        rss = "; ".join(f"{n} files: {v['process_mib']} / {v['worker_mib']}" for n, v in r["peak_rss"].items())
        lines.append(f"| {machine_name(e['machine'])}, {e['machine']['cores']} cores | {st['workers']} | {st['size']} px "
                     f"| {r['ours_img_s']:.0f} ({r['per_core']['ours']:.0f}) | {r['official_img_s']:.0f} "
                     f"({r['per_core']['official']:.0f}) | {r['ours_vs_official']}x | {r['decode_img_s_per_core']:.0f} "
                     f"| {r['decode_vs_ours']}x | {rss} | {r['cores_per_gpu']['ours']} / "
                     f"{r['cores_per_gpu']['official']} at {st['gpu_rate']:g} img/s | `{e['commit']}` | "
                     f"{e['date'][:10]} |")
    return lines
