"""Write a pretrained backbone's features of every image of a data set to disk.

Output formats, chosen by the extension of `out`:
    .npy           float32 (N, D) features; sidecars `<stem>.files.txt` (one image per line) and,
                   when the data has labels, `<stem>.labels.npy` (int64 (N,))
    .safetensors   tensors `features` (and `labels`), with the file list, checkpoint, layout, arch
                   and preprocessing in the header's metadata
Row i of the features is the image named on line i of the file list: the path relative to the root
for image folders, `<dataset>/<split>/<index>` for the named data sets.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..checkpoints import LoadedEncoder, load_encoder
from ..config import opt
from ..data.sources import ImageSet
from ..errors import ConfigError
from ..files import atomic_write
from ..runtime import resolve_device
from .data import EvalConfig, eval_images, eval_size, eval_transform
from .features import extract_features

FORMATS = (".npy", ".safetensors")


@dataclass
class EmbedConfig:
    """What `embed` writes."""

    split: str = opt("train", "train | test (named data sets, and folders with train/ and test/)")
    batch_size: int = opt(512, "images per forward pass")
    normalize: bool = opt(True, "L2-normalise the features")


def embed(checkpoint: str | Path, out: str | Path, source: EvalConfig, cfg: EmbedConfig | None = None,
          echo: Callable[[str], None] = print) -> Path:
    """Features of every image of `source`'s data set (split cfg.split), or of its image folder, written to `out`.

    Images are fed at the encoder's training size (the data's own size for foreign checkpoints, unless
    source.image_size says), normalised as in training; L2-normalised features unless cfg.normalize is off.
    Returns `out`.
    """
    out, cfg = Path(out), cfg or EmbedConfig()
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"cannot write features to {out}: the file name must end in {' or '.join(FORMATS)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if source.dataset is None:
        raise ConfigError("embed needs the images: a folder, or a data set name")
    encoder = load_encoder(checkpoint, source.arch)
    # Loading at the trained size reproduces the training pipeline (load_images resizes the same way).
    size = eval_size(encoder, source.image_size, None, echo)
    data = eval_images(encoder, source.dataset, cfg.split, source.data_root, size, source.gray_to_rgb)
    run_on = resolve_device(source.device)
    transform = eval_transform(encoder, data, run_on)
    features = extract_features(encoder.backbone.to(run_on), data, transform, run_on, cfg.batch_size,
                                normalize=cfg.normalize).cpu()
    files = data.files if data.files is not None else [f"{data.name}/{i}" for i in range(len(data))]
    features_np = features.numpy()
    labels = None if data.labels is None else data.labels.numpy()
    if out.suffix.lower() == ".npy":
        _write_npy(out, features_np, labels, files)
    else:
        _write_safetensors(out, features_np, labels, _metadata(checkpoint, encoder, data, files, cfg.normalize))
    echo(
        f"embedded {len(data)} images of {data.name} with the {encoder.layout} {encoder.arch} encoder: "
        f"{features_np.shape[1]}-d features{' (L2-normalised)' if cfg.normalize else ''} -> {out}"
    )
    return out


def sidecar(out: Path, kind: str) -> Path:
    """The sidecar of a .npy output: `feats.npy` -> `feats.files.txt`, `feats.labels.npy`."""
    return out.with_name(f"{out.stem}.{kind}")


def _metadata(
    checkpoint: str | Path, encoder: LoadedEncoder, data: ImageSet, files: list[str], normalize: bool
) -> dict[str, str]:
    """The safetensors header metadata (string values only, as the format requires)."""
    return {
        "format": "moco-embeddings",
        "data": data.name,
        "files": json.dumps(files),
        "classes": json.dumps(data.classes),
        "checkpoint": str(Path(checkpoint).resolve()),
        "layout": encoder.layout,
        "arch": encoder.arch,
        "l2_normalized": json.dumps(normalize),
        "image_size": json.dumps(data.image_size),
        "mean": json.dumps(encoder.mean),
        "std": json.dumps(encoder.std),
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _write_npy(out: Path, features: np.ndarray, labels: np.ndarray | None, files: list[str]) -> None:
    listing = "".join(name + "\n" for name in files)
    atomic_write(sidecar(out, "files.txt"), lambda tmp: tmp.write_text(listing, encoding="utf-8"))
    labels_path = sidecar(out, "labels.npy")
    if labels is not None:
        atomic_write(labels_path, lambda tmp: _save_npy(tmp, labels))
    else:
        labels_path.unlink(missing_ok=True)  # a stale one from an earlier run would not match these rows
    atomic_write(out, lambda tmp: _save_npy(tmp, features))


def _write_safetensors(out: Path, features: np.ndarray, labels: np.ndarray | None, metadata: dict[str, str]) -> None:
    tensors = {"features": features} if labels is None else {"features": features, "labels": labels}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata))
