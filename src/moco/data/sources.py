"""Data sources: decode a data set once into an in-memory uint8 tensor.

Training augments whole batches on the device, so every source does its per-image work
(decoding, resizing, mode conversion) here, once, and hands back an `ImageSet`.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..extras import available, require
from .decode import centre_crop
from .folders import IMAGE_EXTENSIONS, evenly_spaced, has_folder_split, list_folder
from .order import process_batches

__all__ = [
    "DATASETS",
    "FOLDER_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "default_root",
    "fetch_fashion_mnist",
    "has_split",
    "load_images",
]

DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100", "folder")
SPLITS = ("train", "test", "val")
FOLDER_IMAGE_SIZE = 64

_STATS_SAMPLE = 10_000
_DECODE_THREADS = 4
_DECODE_CHUNK = 1024
_SYSTEM_DATA_DIR = Path("/usr/share/datasets")
# Where each data set sits below a parent folder (torchvision's download layouts).
_SUBFOLDER = {
    "fashion-mnist": Path("FashionMNIST", "raw"),
    "cifar10": Path("cifar-10-batches-py"),
    "cifar100": Path("cifar-100-python"),
}
_FETCH_HINT = (
    "install it with `apt-get install dataset-fashion-mnist`, or run `bash scripts/setup` "
    "(which downloads it), or point MOCO_DATA at a folder holding fashion-mnist/"
)


@dataclass
class ImageSet:
    """A whole data split decoded in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8, contiguous; C is 1 (grayscale) or 3 (RGB)
    labels: torch.Tensor | None  # (N,) int64, or None when the source has no labels
    classes: list[str] | None  # class names, index = label
    name: str  # e.g. "fashion-mnist/train"
    files: list[str] | None = None  # folders: each image's path relative to the root, in order; else None

    def __post_init__(self) -> None:
        images = self.images
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"ImageSet {self.name}: images must be (N, 1 or 3, H, W) uint8, "
                f"got {tuple(images.shape)} {images.dtype}"
            )
        if images.shape[2] != images.shape[3] or not images.is_contiguous():
            raise ValueError(f"ImageSet {self.name}: images must be square and contiguous")
        if self.labels is not None and (
            self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (images.shape[0],)
        ):
            raise ValueError(
                f"ImageSet {self.name}: labels must be ({images.shape[0]},) int64, "
                f"got {tuple(self.labels.shape)} {self.labels.dtype}"
            )

    precropped = False  # batches hold whole images, which the training device crops

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, epoch: int, first: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training: (images (b, C, H, W) uint8, their indices (b,)) of this process, step `first` of `epoch` on."""
        for _, index in process_batches(len(self), batch_size, seed, epoch, first):
            yield self.images[index], index

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Evaluation: the images (b, C, H, W) uint8, in order."""
        yield from self.images.split(batch_size)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, over at most ~10k evenly spaced images."""
        step = max(1, math.ceil(len(self) / _STATS_SAMPLE))
        sample = self.images[::step]
        per_image = math.prod(sample.shape[1:])
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros(self.channels, dtype=torch.float64)
        for chunk in sample.split(max(1, 2**22 // per_image)):
            values = chunk.to(torch.float64)
            total += values.sum(dim=(0, 2, 3))
            squares += values.square().sum(dim=(0, 2, 3))
        count = sample.shape[0] * sample.shape[2] * sample.shape[3]
        mean = total / count
        std = (squares / count - mean.square()).clamp(min=0).sqrt()
        return (mean / 255).tolist(), (std / 255).tolist()


def load_images(
    dataset: str,
    split: str = "train",
    root: str | Path | None = None,
    image_size: int | None = None,
    strict: bool = False,
    subset: int | None = None,
) -> ImageSet:
    """Decode one split of a data set into memory.

    `image_size=None` keeps the native size (folders: 64); otherwise images come out
    `image_size` x `image_size`. `strict` makes an unreadable image file in a folder an
    error instead of a skipped file. "val" is accepted as another name of "test". `subset`
    keeps N images: the first N, or for a folder an evenly spaced N (every class keeps its
    share), chosen before anything is decoded.
    """
    split = _check_split(dataset, split)
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
    name = f"{dataset}/{_canonical(split)}"
    if dataset == "folder":
        if root is None:
            raise ConfigError("dataset 'folder' needs root=<path to an image folder>")
        return _load_folder(Path(root).expanduser(), split, image_size or FOLDER_IMAGE_SIZE, strict, name, subset)
    if dataset == "fashion-mnist":
        images, labels, classes = _load_fashion_mnist(split, root)
    elif dataset == "digits":
        images, labels, classes = _load_digits(split)
    else:
        images, labels, classes = _load_cifar(dataset, split, root)
    if subset is not None:
        images, labels, name = images[:subset], labels[:subset], f"{name}[:{subset}]"
    if image_size is not None:
        images = _resize_tensor(images, image_size)
    return ImageSet(images=images.contiguous(), labels=labels, classes=classes, name=name)


def has_split(dataset: str, split: str, root: str | Path | None = None) -> bool:
    """Whether `load_images(dataset, split, root)` would find that split, without decoding it."""
    split = _check_split(dataset, split)
    if dataset == "digits":
        return available("sklearn")
    if dataset == "folder":
        if root is None or not has_folder_split(Path(root).expanduser(), split):
            return False
        try:
            list_folder(Path(root).expanduser(), split)  # cached: cheap after the first time
        except DataError:
            return False
        return True
    return _find_data_dir(dataset, split, root) is not None


def default_root(dataset: str) -> Path | None:
    """The folder `load_images(dataset)` reads when no root is given, or None if there is none.

    None also for "digits" (bundled with scikit-learn) and "folder" (needs an explicit root).
    """
    _check_dataset(dataset)
    if dataset in _SUBFOLDER:
        return _find_data_dir(dataset, "train", None)
    return None


def fetch_fashion_mnist(dest: Path) -> Path:
    """Download Fashion-MNIST with torchvision; return the folder holding the idx files.

    Only for the set-up script, when Debian's `dataset-fashion-mnist` is not installed.
    """
    from torchvision.datasets import FashionMNIST

    dest = Path(dest).expanduser()
    try:
        for train in (True, False):
            FashionMNIST(str(dest), train=train, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"could not download Fashion-MNIST into {dest}: {exc}. Check the network, or "
            "install it with `apt-get install dataset-fashion-mnist`"
        ) from exc
    return dest / _SUBFOLDER["fashion-mnist"]


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _check_split(dataset: str, split: str) -> str:
    _check_dataset(dataset)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} (val = test)")
    return split


def _canonical(split: str) -> str:
    return "test" if split == "val" else split


def _search_dirs(dataset: str, root: str | Path | None) -> list[Path]:
    """Folders that may hold the files of `dataset`, in the order they are tried."""
    sub = _SUBFOLDER[dataset]
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / sub]
    env = os.environ.get("MOCO_DATA")
    bases = ([Path(env).expanduser()] if env else []) + [_SYSTEM_DATA_DIR, Path.cwd() / "data"]
    # The data set's own folder may hold the files directly; a parent folder only in its
    # torchvision sub-folder (MNIST's idx files have the same names as Fashion-MNIST's).
    return [path for base in bases for path in (base / dataset, base / dataset / sub, base / sub)]


def _find_data_dir(dataset: str, split: str, root: str | Path | None) -> Path | None:
    for directory in _search_dirs(dataset, root):
        if dataset == "fashion-mnist":
            found = all(_idx_file(directory, stem) for stem in _fashion_stems(split))
        else:
            layout = _CIFAR[dataset]
            found = all(
                (directory / f).is_file() for f in (*layout.files[_canonical(split)], layout.meta_file)
            )
        if found:
            return directory
    return None


def _missing_data_error(
    dataset: str, split: str, root: str | Path | None, expected: str, fix: str
) -> DataError:
    tried = ", ".join(str(path) for path in _search_dirs(dataset, root))
    return DataError(f"{dataset} {_canonical(split)} files not found (looked in {tried}): expected {expected}; {fix}")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IDX_UBYTE = 0x08


def _fashion_stems(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _idx_file(directory: Path, stem: str) -> Path | None:
    """The idx file `stem`, plain or gzipped (plain first: it reads faster)."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte idx file (gzipped or not) with `ndim` dimensions."""
    fix = (
        "the file is damaged; replace it "
        "(`apt-get install --reinstall dataset-fashion-mnist` or `bash scripts/setup`)"
    )
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}; {fix}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than an idx header; {fix}")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path} is not an unsigned-byte idx file with {ndim} dimension(s): "
            f"magic number 0x{magic:08x}, expected 0x{expected_magic:08x}; {fix}"
        )
    dims = [int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)]
    size = math.prod(dims)
    if len(raw) - header != size:
        problem = "truncated" if len(raw) - header < size else "longer than its header says"
        raise DataError(
            f"{path} is {problem}: header says {'x'.join(map(str, dims))} = {size} bytes of data, "
            f"found {len(raw) - header}; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_fashion_mnist(split: str, root: str | Path | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    directory = _find_data_dir("fashion-mnist", split, root)
    image_stem, label_stem = _fashion_stems(split)
    if directory is None:
        raise _missing_data_error(
            "fashion-mnist", split, root, f"{image_stem}[.gz] and {label_stem}[.gz]", _FETCH_HINT
        )
    image_path, label_path = _idx_file(directory, image_stem), _idx_file(directory, label_stem)
    assert image_path is not None and label_path is not None  # _find_data_dir checked both
    images = _read_idx(image_path, ndim=3)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{image_path} holds {images.shape[1]}x{images.shape[2]} images, Fashion-MNIST's are 28x28; "
            f"it is from another data set — replace it ({_FETCH_HINT})"
        )
    labels = _read_idx(label_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
            f"one of them is from another data set or damaged — replace them ({_FETCH_HINT})"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{label_path} has label {labels.max()}, Fashion-MNIST has 10 classes; replace it ({_FETCH_HINT})"
        )
    n, height, width = images.shape
    return (
        torch.from_numpy(images.reshape(n, 1, height, width)),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
    )


# ---------------------------------------------------------------------------------------------
# scikit-learn digits

_DIGITS_TEST_FRACTION = 0.2


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    digits = require("sklearn.datasets", "dataset 'digits'").load_digits()
    # Values are 0..16; 16 maps to 255.
    pixels = np.rint(digits.data * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    targets = digits.target.astype(np.int64)
    # Stratified split: a fixed-seed shuffle of each class, its first fifth is test.
    rng = np.random.default_rng(0)
    is_test = np.zeros(len(targets), dtype=bool)
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        is_test[members[: round(len(members) * _DIGITS_TEST_FRACTION)]] = True
    keep = is_test if split != "train" else ~is_test
    return (
        torch.from_numpy(np.ascontiguousarray(pixels[keep])),
        torch.from_numpy(targets[keep]),
        [str(d) for d in range(10)],
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)


@dataclass(frozen=True)
class _CifarLayout:
    files: dict[str, tuple[str, ...]]  # split -> batch files
    meta_file: str
    names_key: str
    labels_key: str
    url: str


_CIFAR = {
    "cifar10": _CifarLayout(
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta_file="batches.meta",
        names_key="label_names",
        labels_key="labels",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": _CifarLayout(
        files={"train": ("train",), "test": ("test",)},
        meta_file="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}

# The only globals a CIFAR pickle needs: numpy's array and dtype reconstructors, under their
# numpy 1 ("numpy.core") and numpy 2 ("numpy._core") module names. Resolved here, not imported
# by name, so that no module is imported on behalf of a pickle.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("numpy.core", "numpy._core")},
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can build dicts, lists, strings, numbers and numpy arrays, nothing else.

    A pickle can call any importable function while it loads; refusing every global outside
    `_PICKLE_GLOBALS` keeps a tampered download from running code.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _unpickle(path: Path, url: str) -> dict[str, object]:
    fix = f"delete the folder and extract a fresh copy of {url}"
    try:
        with path.open("rb") as f:
            # latin1 reads the Python 2 strings of the original files; numpy expects it.
            loaded = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"refused to load {path}: it asks to call {exc}, which a CIFAR file never does, so it "
            f"is damaged or malicious and was not run; {fix}"
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
        raise DataError(f"cannot read {path} as a CIFAR pickle ({exc}); {fix}") from exc
    if not isinstance(loaded, dict):
        raise DataError(f"{path} holds a {type(loaded).__name__}, not a CIFAR dict; {fix}")
    return {_text(key): value for key, value in loaded.items()}


def _text(value: object) -> object:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _load_cifar(
    dataset: str, split: str, root: str | Path | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    layout = _CIFAR[dataset]
    split = _canonical(split)
    directory = _find_data_dir(dataset, split, root)
    if directory is None:
        files = ", ".join((*layout.files[split], layout.meta_file))
        raise _missing_data_error(
            dataset,
            split,
            root,
            f"a {_SUBFOLDER[dataset]}/ folder with {files}",
            f"download {layout.url} and extract it into one of these folders (or pass root=)",
        )
    fix = f"delete {directory} and extract a fresh copy of {layout.url}"
    meta = _unpickle(directory / layout.meta_file, layout.url)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{directory / layout.meta_file} has no {layout.names_key!r} list; {fix}")
    classes = [str(_text(name)) for name in names]
    batches, labels = [], []
    for file_name in layout.files[split]:
        path = directory / file_name
        batch = _unpickle(path, layout.url)
        data, batch_labels = batch.get("data"), batch.get(layout.labels_key)
        if not (
            isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.ndim == 2
            and data.shape[1] == 3072
        ):
            raise DataError(f"{path} has no 'data' array of shape (N, 3072) uint8; {fix}")
        try:
            batch_labels = np.asarray(batch_labels, dtype=np.int64)
        except (TypeError, ValueError):
            batch_labels = np.empty(0, dtype=np.int64)
        in_range = batch_labels.size == 0 or 0 <= batch_labels.min() <= batch_labels.max() < len(classes)
        if batch_labels.shape != (len(data),) or not in_range:
            raise DataError(f"{path} needs {len(data)} {layout.labels_key!r} in 0..{len(classes) - 1}; {fix}")
        batches.append(data)
        labels.append(batch_labels)
    images = np.concatenate(batches).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images), torch.from_numpy(np.concatenate(labels)), classes


def _resize_tensor(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear, antialiased resize of (N, C, H, W) uint8 images to size x size."""
    if images.shape[2] == images.shape[3] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        resized = F.interpolate(
            images[start : start + chunk].float(),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Image folders, decoded into memory (folders.py lists them; streaming.py serves those too large for memory)


def _try_centre_crop(path: Path, size: int) -> torch.Tensor | Exception:
    try:
        return centre_crop(path, size, None)
    except Exception as exc:  # PIL's decoders raise many kinds of error on corrupt files
        return exc


def _load_folder(root: Path, split: str, size: int, strict: bool, name: str, subset: int | None) -> ImageSet:
    listing = list_folder(root, split)
    if subset is not None:
        listing, name = evenly_spaced(listing, subset), f"{name}[{subset} of {len(listing.files)}]"
    if listing.empty_classes:
        warnings.warn(
            f"skipped {len(listing.empty_classes)} class folder(s) with no images: {', '.join(listing.empty_classes)}",
            stacklevel=3,
        )
    if listing.loose_images_dir is not None:
        warnings.warn(
            f"image files directly in {listing.loose_images_dir} are ignored because it has class "
            "folders; move them into a class folder to use them",
            stacklevel=3,
        )
    files = listing.paths()
    try:
        images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    except RuntimeError:  # the allocator's "can't allocate memory"
        raise DataError(f"not enough memory to decode the {len(files)} images of {root} at {size} px; stream them "
                        "(--loader stream) or use fewer (--train-subset)") from None
    good = torch.ones(len(files), dtype=torch.bool)
    bad: list[tuple[Path, Exception]] = []
    any_color = False
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
        for start in range(0, len(files), _DECODE_CHUNK):
            chunk = files[start : start + _DECODE_CHUNK]
            for offset, result in enumerate(pool.map(_try_centre_crop, chunk, [size] * len(chunk))):
                i = start + offset
                if isinstance(result, Exception):
                    if strict:
                        raise DataError(f"cannot decode image {files[i]}: {result}; fix or delete it") from result
                    bad.append((files[i], result))
                    good[i] = False
                else:
                    images[i] = result  # a gray (1, S, S) image is broadcast over the 3 channels
                    any_color = any_color or result.shape[0] == 3
    labels = torch.tensor(listing.labels, dtype=torch.int64) if listing.labels is not None else None
    if bad:
        examples = ", ".join(f"{path} ({error})" for path, error in bad[:3])
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) under {root}, e.g. {examples}; "
            "fix or delete them, or pass strict=True to stop at the first",
            stacklevel=3,
        )
        if not good.any():
            raise DataError(f"none of the {len(files)} image files under {root} could be decoded, e.g. {examples}")
        images = images[good]
        labels = labels[good] if labels is not None else None
    if not any_color:
        images = images[:, :1].contiguous()
    kept = [f for f, ok in zip(listing.files, good.tolist()) if ok]
    return ImageSet(images=images, labels=labels, classes=listing.classes, name=name, files=kept)
