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
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

from ..data.augment import EvalTransform
from ..data.sources import ImageSet, load_images
from ..errors import ConfigError, DataError
from ..runtime import resolve_device
from .features import extract_features
from .load import LoadedEncoder, load_encoder

FORMATS = (".npy", ".safetensors")


def embed(
    checkpoint: str | Path,
    dataset: str,
    root: str | None,
    split: str,
    out: str | Path,
    arch: str | None = None,
    batch_size: int = 512,
    device: str = "auto",
    normalize: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Features of every image of `dataset`'s `split` (or of the image folder `root`) written to `out`.

    Images are fed at the encoder's training size (the data's own size for foreign checkpoints),
    normalised as in training; features are L2-normalised unless `normalize=False`. Returns `out`.
    """
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"cannot write features to {out}: the file name must end in {' or '.join(FORMATS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    encoder = load_encoder(checkpoint, arch)
    # Loading at the trained size reproduces the training pipeline (load_images resizes the same way).
    data = load_images(dataset, split, root, encoder.size)
    if data.channels != encoder.channels:
        raise DataError(
            f"{data.name} has {data.channels}-channel images but the encoder in {checkpoint} takes "
            f"{encoder.channels} channels; embed data of the kind it was trained on"
        )
    run_on = resolve_device(device)
    transform = EvalTransform(encoder.size or data.image_size, encoder.mean, encoder.std).to(run_on)
    features = extract_features(encoder.backbone.to(run_on), data.images, transform, run_on, batch_size,
                                normalize=normalize).cpu()
    files = data.files if data.files is not None else [f"{data.name}/{i}" for i in range(len(data))]
    features_np = features.numpy()
    labels = None if data.labels is None else data.labels.numpy()
    if out.suffix.lower() == ".npy":
        _write_npy(out, features_np, labels, files)
    else:
        _write_safetensors(out, features_np, labels, _metadata(checkpoint, encoder, data, files, normalize))
    echo(
        f"embedded {len(data)} images of {data.name} with the {encoder.layout} {encoder.arch} encoder: "
        f"{features_np.shape[1]}-d features{' (L2-normalised)' if normalize else ''} -> {out}"
    )
    return out


@torch.no_grad()
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
        "image_size": json.dumps(encoder.size or data.image_size),
        "mean": json.dumps(encoder.mean),
        "std": json.dumps(encoder.std),
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _write_npy(out: Path, features: np.ndarray, labels: np.ndarray | None, files: list[str]) -> None:
    listing = "".join(name + "\n" for name in files)
    _atomic(sidecar(out, "files.txt"), lambda tmp: tmp.write_text(listing, encoding="utf-8"))
    labels_path = sidecar(out, "labels.npy")
    if labels is not None:
        _atomic(labels_path, lambda tmp: _save_npy(tmp, labels))
    else:
        labels_path.unlink(missing_ok=True)  # a stale one from an earlier run would not match these rows
    _atomic(out, lambda tmp: _save_npy(tmp, features))


def _write_safetensors(out: Path, features: np.ndarray, labels: np.ndarray | None, metadata: dict[str, str]) -> None:
    tensors = {"features": features} if labels is None else {"features": features, "labels": labels}
    _atomic(out, lambda tmp: save_file(tensors, tmp, metadata))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through a temporary file in its folder, renamed into place: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
