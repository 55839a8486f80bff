"""Decoding an image file (or its bytes) into the uint8 tensors training and evaluation take.

Two crops for training, as the paper takes them: random resized crops of the ORIGINAL image (torchvision's
RandomResizedCrop: 20-100% of its area, aspect ratio 3/4-4/3, integer boxes), resized to the training size
with antialiasing. The rest of a view's augmentation (flip, jitter, grayscale, blur) runs batched on the
training device. One view for evaluation: the centre square of the image, resized, as the paper evaluates
(`ratio` 256/224: the shorter side resized to 256, the centre 224x224 kept).

How a JPEG is decoded, measured on ImageNet-sized JPEGs on one core (docs/benchmarks.md): torchvision's
libjpeg-turbo decoder is about 1.6x faster than PIL's at full size, but PIL can decode at 1/2, 1/4 or 1/8
scale in the DCT (`draft`), which is faster for photos much larger than the crops. So: at a reduced scale with
PIL when both crops allow it (see _DCT_MARGIN), else with torchvision; other formats with PIL. Full-size images
are resampled by torchvision on uint8 tensors (antialiased bilinear, as RandomResizedCrop does), reduced ones by
PIL (their boxes are not whole pixels at the reduced scale).
"""

import io
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

Source = Path | bytes  # a file, or a file's bytes (from a shard)
Box = tuple[int, int, int, int]  # top, left, height, width, in the original image's pixels

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_GRAY_MODES = {"1", "L", "LA", "La", "F"} | _SIXTEEN_BIT_MODES
_CROP_ATTEMPTS = 10  # as torchvision, before falling back to a central crop
# A JPEG is decoded at a reduced DCT scale only where every crop keeps at least twice the output's side: the
# resampling after it then still averages, and the crops stay within about 1 grey level of full-size decoding
# (with a margin of 1 they differed by up to 4-7 levels on detailed photos). It pays for large photos.
_DCT_MARGIN = 2
EVAL_RATIO = 256 / 224  # the paper's evaluation: resize to 256, centre crop 224


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.2, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A random resized crop's box, drawn as torchvision's RandomResizedCrop.get_params draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # the fallback: the central crop of the largest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def centre_box(width: int, height: int, ratio: float = 1.0) -> Box:
    """The centre square kept when the shorter side is resized to `ratio` x the output and the output cropped."""
    side = min(width, height) / ratio
    top, left = (height - side) / 2, (width - side) / 2
    return round(top), round(left), max(1, round(side)), max(1, round(side))


def to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as "L" (grayscale-ish modes) or "RGB" (everything else); 16-bit values scaled, not clipped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8))
    if image.mode in _GRAY_MODES:
        return image.convert("L")
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _as_channels(image: Image.Image, channels: int | None) -> Image.Image:
    """A PIL image as "L" or "RGB": `channels` 1 or 3, or None for its own (1 for gray, else 3)."""
    image = to_gray_or_rgb(image)
    if channels is not None and (image.mode == "L") != (channels == 1):
        image = image.convert("L" if channels == 1 else "RGB")
    return image


def _tensor(image: Image.Image) -> torch.Tensor:
    array = np.array(image)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]


def decode(source: Source, channels: int | None, size: int | None = None,
           boxes_for: Callable[[int, int], list[Box]] | None = None
           ) -> tuple[torch.Tensor | Image.Image, tuple[int, int], list[Box]]:
    """The decoded image, its original (width, height), and the boxes `boxes_for(width, height)` chose.

    With `size`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) at which every box still covers at
    least twice `size` pixels each way: then as a PIL image a fraction of the original's size, else as a
    (C, H, W) uint8 tensor. The file is read once.
    """
    data = source.read_bytes() if isinstance(source, Path) else source
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        boxes = boxes_for(width, height) if boxes_for else []
        scale = max(_DCT_MARGIN * size / min(h, w) for _, _, h, w in boxes) if boxes and size else 1.0
        if image.format == "JPEG" and scale <= 0.5:
            image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            return _as_channels(image, channels), (width, height), boxes
        if image.format == "JPEG" and channels is not None:  # full size: the faster decoder
            try:
                mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
                pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
                return pixels, (width, height), boxes
            except RuntimeError:
                pass  # what libjpeg-turbo refuses (e.g. some CMYK files), PIL may still read
        image.load()
        return _tensor(_as_channels(image, channels)), (width, height), boxes


def _resized(image: torch.Tensor | Image.Image, original: tuple[int, int], box: Box, size: int) -> torch.Tensor:
    """The `box` (in the original's pixels) of a decoded image, resized to (C, size, size) uint8, antialiased.

    A tensor is the image at full size: torchvision's resampling of the integer box, as RandomResizedCrop does.
    A PIL image was decoded at a reduced scale: the box is scaled to it without rounding and resampled by PIL.
    """
    top, left, h, w = box
    if isinstance(image, torch.Tensor):
        return TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)  # (C, size, size)
    fx, fy = image.width / original[0], image.height / original[1]
    region = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
    return _tensor(image.resize((size, size), Image.Resampling.BILINEAR, box=region))  # (C, size, size)


def two_crops(source: Source, size: int, channels: int, rng: random.Random,
              scale: tuple[float, float] = (0.2, 1.0)) -> torch.Tensor:
    """Two random resized crops (2, C, size, size) uint8 of the original image, independently drawn from `rng`."""
    image, original, boxes = decode(source, channels, size, lambda w, h: [crop_box(w, h, rng, scale) for _ in "qk"])
    return torch.stack([_resized(image, original, box, size) for box in boxes])


def centre_crop(source: Source, size: int, channels: int | None, ratio: float = 1.0) -> torch.Tensor:
    """The centre square (C, size, size) uint8: the shorter side resized to `ratio` x size, the centre kept."""
    image, original, (box,) = decode(source, channels, size, lambda w, h: [centre_box(w, h, ratio)])
    return _resized(image, original, box, size)
