"""The images an evaluation feeds a loaded encoder: which data set, at what size, with how many channels.

Every evaluation (kNN, linear protocol, embeddings, reports) goes through here, so that an encoder sees
its images the way it was trained: the data set it was trained on unless told otherwise, at its training
size, normalised with its own mean and std.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..checkpoints import LoadedEncoder
from ..config import opt
from ..data.augment import EvalTransform
from ..data.decode import EVAL_RATIO
from ..data.folders import list_folder
from ..data.sources import FOLDER_IMAGE_SIZE, ImageSet, has_split, load_images
from ..data.streaming import EvalFolder, image_statistics
from ..data.training import fits_memory
from ..errors import ConfigError, DataError
from ..model.backbones import is_vit


@dataclass
class EvalConfig:
    """Which images an evaluation uses and where it runs."""

    dataset: str | None = opt(None, "data set (fashion-mnist, digits, cifar10, cifar100, folder); default: the one "
                                    "the checkpoint was trained on")
    data_root: str | None = opt(None, "folder of the data set (default: the checkpoint's)")
    image_size: int | None = opt(None, "pixels; default: the size the encoder was trained at (the data's own size "
                                       "when the checkpoint does not record it)")
    arch: str | None = opt(None, "architecture of a checkpoint that does not name it (resnet18, resnet34, resnet50)")
    gray_to_rgb: bool = opt(False, "repeat the gray channel of 1-channel images 3 times, to evaluate an RGB encoder "
                                   "(such as an official ImageNet release) on gray images")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")


def fit_channels(data: ImageSet, encoder: LoadedEncoder, gray_to_rgb: bool = False) -> ImageSet:
    """`data` with the channels the encoder takes: as it is, or gray repeated to RGB when asked."""
    if data.channels == encoder.channels:
        return data
    if gray_to_rgb and data.channels == 1 and encoder.channels == 3:
        return replace(data, images=data.images.expand(-1, 3, -1, -1).contiguous())
    hint = " (pass --gray-to-rgb to repeat the gray channel)" if data.channels == 1 and encoder.channels == 3 else ""
    raise DataError(f"{data.name} has {data.channels}-channel images but the encoder ({encoder.arch}, "
                    f"{encoder.layout}) takes {encoder.channels}{hint}; evaluate on data of the kind it was "
                    "trained on")


def eval_images(encoder: LoadedEncoder, dataset: str, split: str, root: str | None, size: int | None,
                gray_to_rgb: bool = False) -> ImageSet | EvalFolder:
    """A split as evaluation reads it: decoded into memory when it fits (a quarter of RAM), else a folder
    streamed from disk (centre crops of the resized originals, as the paper evaluates)."""
    if dataset == "folder" and root is not None:
        listing = list_folder(root, split)
        side = size or FOLDER_IMAGE_SIZE
        if not fits_memory(len(listing.files), side)[0]:
            channels = image_statistics(listing)[0]
            if channels != encoder.channels and not (gray_to_rgb and channels == 1):
                raise DataError(f"{root}/{split} has {channels}-channel images but the encoder takes "
                                f"{encoder.channels}; evaluate on data of the kind it was trained on")
            return EvalFolder(listing, side, encoder.channels, EVAL_RATIO, 2, f"folder:{listing.root}/{split}")
    return fit_channels(load_images(dataset, split, root, size), encoder, gray_to_rgb)


def eval_size(encoder: LoadedEncoder, requested: int | None, default: int | None,
              echo: Callable[[str], None]) -> int | None:
    """The size the encoder is evaluated at: `requested`, else its training size, else `default` (the
    pretraining config's for its own data set, None for the data's own size), said when not recorded."""
    if requested is not None:
        if is_vit(encoder.backbone) and encoder.size is not None and requested != encoder.size:
            raise ConfigError(f"the {encoder.arch} encoder is a Vision Transformer built for {encoder.size} px images "
                              f"(its position embeddings); drop --image-size {requested}")
        return requested
    if encoder.size is not None:
        return encoder.size
    at = f"{default} px" if default else "the data set's own size (folders: 64 px)"
    echo(f"note: the {encoder.layout} checkpoint does not record its training size; evaluating at {at} (set "
         "--image-size; the official ImageNet releases were trained at 224)")
    return default


def labelled_splits(encoder: LoadedEncoder, cfg: EvalConfig, checkpoint: str,
                    echo: Callable[[str], None] = print) -> tuple[ImageSet | EvalFolder, ImageSet | EvalFolder]:
    """The labelled train and test splits an evaluation of `encoder` uses: the flags of `cfg`, else the
    checkpoint's own data, at the evaluation size, with the encoder's channels."""
    trained = encoder.config
    dataset = cfg.dataset or (trained.data.dataset if trained else None)
    if dataset is None:
        raise ConfigError(f"{checkpoint} does not say what data it was trained on; pass --dataset")
    if dataset == "shards":
        raise ConfigError(f"{checkpoint} was trained on shards, which have no labelled test split; pass --dataset "
                          "and --data-root of a labelled data set or folder")
    same = trained is not None and dataset == trained.data.dataset
    root = cfg.data_root or (trained.data.data_root if same else None)
    if not has_split(dataset, "test", root):  # before anything is decoded
        raise DataError(f"{dataset} at {root} has no test split here; evaluation needs a labelled train and test "
                        "split (folders: train/ and test/ or val/)")
    size = eval_size(encoder, cfg.image_size, trained.data.image_size if same else None, echo)
    train, test = (eval_images(encoder, dataset, split, root, size, cfg.gray_to_rgb) for split in ("train", "test"))
    if train.labels is None or test.labels is None:
        raise DataError(f"{dataset} at {root} has no labels; evaluation needs a labelled train and test split")
    return train, test


def eval_transform(encoder: LoadedEncoder, data: ImageSet | EvalFolder, device: torch.device) -> EvalTransform:
    """The deterministic view of `data`'s images that the encoder's features are computed on."""
    return EvalTransform(data.image_size, encoder.mean, encoder.std).to(device)
