"""Batched random augmentation for MoCo, run on the training device.

MoCo needs two random views of every image. Doing that image by image with PIL in DataLoader
workers costs most of the CPU time for small images, and applying torchvision transforms to a
whole batch draws one set of random parameters for all images, which is wrong for contrastive
learning. `BatchAugment` draws independent parameters per image and applies every operation to
the whole batch at once with tensor ops: no Python loop over images, no host-device syncs.

Pipeline of one view (each step with its own random draw per image):

1. random resized crop + horizontal flip, as one affine resampling (`F.grid_sample`);
2. colour jitter (brightness, contrast, saturation, hue), with probability ``jitter_p``;
3. random grayscale, with probability ``gray_p``;
4. Gaussian blur, with probability ``blur_p``;
5. solarization (pixels at or above half intensity inverted), with probability ``solarize_p``;
6. normalisation with ``mean`` / ``std``.

Differences from torchvision that are deliberate:

* The crop box is continuous (not rounded to whole pixels), which is natural for `grid_sample`
  and gives more distinct crops for tiny images. torchvision's whole-pixel sides and corners move
  large crops of small images further apart; on the 28-px main job they lowered kNN by 0.2-0.4
  points at epochs 2-8 of the per-epoch benchmark (six seeds, docs/speed.md).
* `grid_sample` reads 4 input pixels per output pixel, so shrinking a crop by more than about 2x
  aliases (torchvision's ``antialias=True`` would low-pass first). For the small images this
  library targets, crops are rarely shrunk much; for large images, decode at a size near ``size``.
* Colour jitter applies brightness, contrast, saturation, hue in this fixed order;
  torchvision's ``ColorJitter`` shuffles the order on every call. On the 28-px main job a
  per-image shuffle lowered kNN by about 0.15 points at epochs 5-8 (four seeds, docs/speed.md).
  As in torchvision, each jitter operation clamps to [0, 1]; clamping once after brightness and
  contrast was 0.3 points worse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

AUGMENT_PRESETS = ("v1", "v2", "v3", "crop", "none")

# ITU-R 601 luma weights; they sum to 1, so a gray image stays unchanged.
_LUMA = (0.299, 0.587, 0.114)

# The MoCo v2 blur was tuned for 224-px images: a 23-px kernel and sigma in [0.1, 2.0].
_REFERENCE_SIZE = 224
_REFERENCE_SIGMA = (0.1, 2.0)

# Candidate crops drawn per image before falling back to a central crop, as in torchvision.
_CROP_ATTEMPTS = 10


def default_blur_kernel(size: int) -> int:
    """Odd blur kernel of about 10% of ``size``, at least 3 (23 at 224, as in MoCo v2)."""
    return max(3, 2 * round((0.1 * size - 1) / 2) + 1)


def blur_kernel_for(size: int, sigma: float) -> int:
    """The default kernel for ``size``, widened to an odd size covering +-2 ``sigma`` (5 px for sigma 1)."""
    return max(default_blur_kernel(size), 2 * math.ceil(2 * sigma) + 1)


def default_blur_sigma(size: int) -> tuple[float, float]:
    """MoCo v2's sigma range [0.1, 2.0] for 224 px, scaled by ``size / 224``.

    Scaling keeps the blur the same fraction of the image, so the views of a 28-px image are as
    blurred, relative to their content, as those of a 224-px image. The consequence for tiny images
    is that the blur nearly vanishes: at 28 px sigma lies in [0.0125, 0.25] px and a 3-px kernel
    keeps at least 99.9% of the weight on the centre pixel. That is the faithful equivalent, and it
    agrees with SimCLR, which drops blur for 32-px CIFAR images because it does not help there.
    Pass an explicit ``blur_sigma`` (in output pixels, e.g. ``(0.1, 1.0)`` with a 3-px kernel) for
    a visible blur on small images.
    """
    factor = size / _REFERENCE_SIZE
    return (_REFERENCE_SIGMA[0] * factor, _REFERENCE_SIGMA[1] * factor)


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Float32 uniform samples in [low, high) on ``device``."""
    return torch.rand(shape, device=device, generator=generator).mul_(high - low).add_(low)


def _coin(
    batch: int, p: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """(B,) bool, each True with probability ``p``."""
    return torch.rand(batch, device=device, generator=generator) < p


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1), to broadcast one value per image."""
    return values.view(-1, 1, 1, 1)


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop boxes like torchvision's ``RandomResizedCrop.get_params``, one per image.

    Area fraction uniform in ``scale``, aspect ratio (width / height) log-uniform in ``ratio``.
    Each image draws several candidates at once and keeps the first that fits in the image; if none
    fits, it gets the central crop that torchvision falls back to.

    Returns (B, 4) float32 boxes ``(x0, y0, w, h)`` in pixels, edges of the image at 0 and
    ``width`` / ``height``; boxes are continuous, not rounded to whole pixels.
    """
    shape = (batch, _CROP_ATTEMPTS)
    area = _uniform(shape, scale[0], scale[1], device, generator).mul_(height * width)  # (B, T)
    log_ratio = _uniform(shape, math.log(ratio[0]), math.log(ratio[1]), device, generator)
    aspect = log_ratio.exp_()  # (B, T)
    w = (area * aspect).sqrt_()  # (B, T)
    h = (area / aspect).sqrt_()  # (B, T)
    fits = (w <= width) & (h <= height)  # (B, T)
    # argmax returns the first maximum, i.e. the first candidate that fits (0 if none does).
    first = fits.to(torch.float32).argmax(dim=1, keepdim=True)  # (B, 1)
    found = fits.any(dim=1)  # (B,)
    fallback_w, fallback_h = _central_crop_size(height, width, ratio)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)  # (B,)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)  # (B,)
    position = torch.rand((batch, 2), device=device, generator=generator)  # (B, 2)
    position = torch.where(found.unsqueeze(1), position, 0.5)  # (B, 2) centred when falling back
    x0 = position[:, 0] * (width - w)  # (B,)
    y0 = position[:, 1] * (height - h)  # (B,)
    return torch.stack((x0, y0, w, h), dim=1)  # (B, 4)


def _central_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """(w, h) of the largest central crop whose aspect ratio is clamped into ``ratio``."""
    image_ratio = width / height
    if image_ratio < ratio[0]:
        return float(width), width / ratio[0]
    if image_ratio > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop ``boxes`` out of float ``images`` and resize each to ``size`` x ``size``, bilinear.

    One affine resampling for the whole batch; a horizontal flip is a negative x scale of the same
    affine, so it costs nothing. Sampling outside the image repeats the border, which makes the
    full-image box equal to ``F.interpolate(..., mode="bilinear", align_corners=False)``.
    No antialiasing: see the module docstring.

    images: (B, C, H, W) float; boxes: (B, 4) ``(x0, y0, w, h)`` in pixels; flip: (B,) bool or None.
    """
    batch, channels, height, width = images.shape
    x0, y0, w, h = boxes.unbind(dim=1)  # (B,) each
    # Map output coordinates in [-1, 1] (edges of the output) onto the box in input coordinates.
    scale_x = w / width  # (B,)
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    shift_x = (2 * x0 + w) / width - 1  # (B,) box centre
    scale_y = h / height  # (B,)
    shift_y = (2 * y0 + h) / height - 1  # (B,)
    # The affine has no shear, so x depends on the output column only and y on the row only: the grid
    # is two outer sums. Equal to F.affine_grid(theta, ..., align_corners=False), whose batched matrix
    # product with an inner dimension of 3 cost more than the resampling itself.
    centres = (torch.arange(size, device=images.device, dtype=scale_x.dtype) * 2 + 1) / size - 1  # (S,)
    grid_x = scale_x[:, None] * centres + shift_x[:, None]  # (B, S)
    grid_y = scale_y[:, None] * centres + shift_y[:, None]  # (B, S)
    grid = torch.stack(
        (grid_x[:, None, :].expand(batch, size, size), grid_y[:, :, None].expand(batch, size, size)), dim=-1
    )  # (B, size, size, 2)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (B, C, size, size)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of RGB float images: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = images.unbind(dim=1)  # (B, H, W) each
    luma = r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])  # (B, H, W)
    return luma.unsqueeze(1)  # (B, 1, H, W)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """Gray version of 1- or 3-channel images, (B, 1, H, W)."""
    return images if images.shape[1] == 1 else rgb_to_grayscale(images)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale (B, C, H, W) images in [0, 1] by a per-image (B,) factor, clamped to [0, 1]."""
    return images.mul(_per_image(factor)).clamp_(0, 1)  # (B, C, H, W)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend (B, C, H, W) images with the mean of their gray image, per-image (B,) factor."""
    mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    # lerp returns `images` exactly for factor 1, so unselected images stay untouched.
    return torch.lerp(mean.expand_as(images), images, _per_image(factor)).clamp_(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend (B, 3, H, W) images with their gray image, per-image (B,) factor."""
    gray = rgb_to_grayscale(images).expand_as(images)  # (B, 3, H, W)
    return torch.lerp(gray, images, _per_image(factor)).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (B, 3, H, W) images in [0, 1] by a per-image (B,) shift in turns.

    Exact HSV round trip (as torchvision's ``adjust_hue``) without materialising HSV: value (max)
    and chroma (max - min) do not change, so only the hue is computed, shifted, and turned back
    into the fully saturated colour of that hue, which is scaled by chroma and lifted by min.
    """
    r, g, b = images.unbind(dim=1)  # (B, H, W) each
    high = torch.maximum(torch.maximum(r, g), b)  # (B, H, W)
    low = torch.minimum(torch.minimum(r, g), b)  # (B, H, W)
    chroma = high - low  # (B, H, W)
    # Which channel is the max, as 0/1 floats, ties resolved as torchvision does (red, then green).
    # Multiplying by 0/1 selects exactly, and is several times faster than torch.where on CPU.
    red_max = (high == r).to(images.dtype)  # (B, H, W)
    green_max = (high == g).to(images.dtype).mul_(1 - red_max)  # (B, H, W)
    blue_max = 1 - red_max - green_max  # (B, H, W)
    numerator = (g - b).mul_(red_max).addcmul_(b - r, green_max).addcmul_(r - g, blue_max)
    base = green_max.mul_(2).add_(blue_max, alpha=4)  # (B, H, W) sextant of the max channel
    # Gray pixels have no hue; any value works because their chroma is 0.
    divisor = chroma + (chroma == 0)  # (B, H, W)
    # Hue in sixths of a turn, shifted and wrapped into [0, 6).
    hue = numerator.div_(divisor).add_(base).add_(6 * shift.view(-1, 1, 1)).remainder_(6)
    # Fully saturated colour of each hue: piecewise linear ramps in [0, 1].
    red = (hue - 3).abs_().sub_(1).clamp_(0, 1)  # (B, H, W)
    green = (hue - 2).abs_().neg_().add_(2).clamp_(0, 1)  # (B, H, W)
    blue = (hue - 4).abs_().neg_().add_(2).clamp_(0, 1)  # (B, H, W)
    pure = torch.stack((red, green, blue), dim=1)  # (B, 3, H, W)
    return torch.addcmul(low.unsqueeze(1), chroma.unsqueeze(1), pure)  # (B, 3, H, W)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image (B,) sigma and reflect padding.

    All B * C planes are convolved in one grouped convolution (one group per plane), first along
    x, then along y. images: (B, C, H, W) float; ``kernel_size`` odd, ``kernel_size // 2`` < H, W.
    """
    batch, channels, height, width = images.shape
    radius = kernel_size // 2
    taps = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - radius  # (K,)
    weights = torch.exp(-(taps**2) / (2 * sigma.unsqueeze(1) ** 2))  # (B, K)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (B, K)
    weights = weights.repeat_interleave(channels, dim=0)  # (B * C, K) one kernel per plane
    planes = images.reshape(1, batch * channels, height, width)  # (1, B * C, H, W)
    planes = F.pad(planes, (radius, radius, 0, 0), mode="reflect")  # (1, B * C, H, W + 2r)
    planes = F.conv2d(planes, weights.view(-1, 1, 1, kernel_size), groups=batch * channels)
    planes = F.pad(planes, (0, 0, radius, radius), mode="reflect")  # (1, B * C, H + 2r, W)
    planes = F.conv2d(planes, weights.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)  # (B, C, H, W)


def solarize(images: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert the pixels at or above `threshold` of float images in [0, 1] (PIL's ImageOps.solarize at 128)."""
    return torch.where(images >= threshold, 1.0 - images, images)


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {p}")


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    """Require ``low < bounds[0] <= bounds[1] <= high`` (``low`` exclusive)."""
    if len(bounds) != 2 or not low < bounds[0] <= bounds[1] <= high:
        raise ConfigError(
            f"{name} must be (min, max) with {low} < min <= max <= {high}, got {tuple(bounds)}"
        )


class _Normalising(nn.Module):
    """Shared part of the training and evaluation transforms: output size and normalisation."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"image size must be a positive number of pixels, got {size}")
        if len(mean) not in (1, 3) or len(std) != len(mean):
            raise ConfigError(
                f"mean and std need one value per channel (1 or 3 channels), got mean={list(mean)}"
                f" and std={list(std)}"
            )
        if min(std) <= 0:
            raise ConfigError(f"std values must be positive, got {list(std)}")
        self.size = size
        # Buffers follow `.to(device)`; they are not saved in checkpoints (persistent=False).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), False)

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image batch, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"expected images of shape (B, {self.mean.shape[0]}, H, W) to match the"
                f" {self.mean.shape[0]} normalisation channels, got {tuple(images.shape)}"
            )

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """Whole float images to ``size`` x ``size``, bilinear with antialiasing; no-op if there."""
        if images.shape[-2:] == (self.size, self.size):
            return images
        size = (self.size, self.size)
        return F.interpolate(
            images, size=size, mode="bilinear", align_corners=False, antialias=True
        )  # (B, C, size, size)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise float images in [0, 1], in place (the caller owns ``images``)."""
        mean = self.mean.to(images.device)  # no copy once the module is on the images' device
        std = self.std.to(images.device)
        return images.sub_(mean).div_(std)  # (B, C, size, size)

    def extra_repr(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"size={self.size}, mean={mean}, std={std}"


class BatchAugment(_Normalising):
    """One random view per image of a uint8 batch.

    (B, C, H, W) uint8 -> (B, C, size, size) float32, normalised.

    Every image gets its own random crop, flip, jitter factors, grayscale and blur decisions.
    Random numbers are drawn on the images' device, from ``generator`` if given (it must live on
    that device), else from the global RNG. Operations whose probability or strength is 0 are
    skipped entirely.

    Args:
        size: output height and width in pixels.
        mean: per-channel mean of the normalisation of images scaled to [0, 1]; 1 or 3 channels.
        std: per-channel standard deviation of that normalisation.
        crop_scale: range of the crop's area as a fraction of the image area, as in torchvision's
            ``RandomResizedCrop``; ``None`` disables the crop, and the whole image is resized
            (with antialiasing) to ``size`` x ``size``.
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: brightness, contrast, saturation, hue strengths, as in torchvision's
            ``ColorJitter``: factors uniform in [max(0, 1 - s), 1 + s], hue shift in [-h, h] turns.
            Saturation and hue do nothing on 1-channel images.
        jitter_p: probability that an image is jittered at all.
        gray_p: probability of converting an RGB image to gray (3 equal channels).
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's sigma in output pixels; ``None`` scales MoCo v2's range
            for 224 px to ``size`` (see `default_blur_sigma`).
        blur_kernel: odd kernel size in output pixels; ``None`` is about 10% of ``size``
            (see `default_blur_kernel`).
        solarize_p: probability of solarizing (MoCo v3's second view).
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_scale: tuple[float, float] | None = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] | None = None,
        blur_kernel: int | None = None,
        solarize_p: float = 0.0,
    ) -> None:
        super().__init__(size, mean, std)
        if crop_scale is not None:
            _check_range("crop_scale", crop_scale, 0.0, 1.0)
        _check_range("crop_ratio", crop_ratio, 0.0, math.inf)
        probabilities = {"flip_p": flip_p, "jitter_p": jitter_p, "gray_p": gray_p, "blur_p": blur_p,
                         "solarize_p": solarize_p}
        for name, p in probabilities.items():
            _check_probability(name, p)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ConfigError(
                "jitter must be (brightness, contrast, saturation, hue), all >= 0 and hue <= 0.5,"
                f" got {tuple(jitter)}"
            )
        blur_sigma = default_blur_sigma(size) if blur_sigma is None else tuple(blur_sigma)
        _check_range("blur_sigma", blur_sigma, 0.0, math.inf)
        blur_kernel = default_blur_kernel(size) if blur_kernel is None else blur_kernel
        # Reflect padding needs the kernel radius below the image size.
        if blur_p > 0 and (blur_kernel < 1 or blur_kernel % 2 == 0 or blur_kernel // 2 >= size):
            raise ConfigError(
                f"blur_kernel must be an odd number of pixels below 2 * size = {2 * size},"
                f" got {blur_kernel}"
            )
        self.crop_scale = None if crop_scale is None else tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.flip_p = flip_p
        self.jitter = tuple(jitter)
        self.jitter_p = jitter_p
        self.gray_p = gray_p
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma
        self.blur_kernel = blur_kernel
        self.solarize_p = solarize_p

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, C, size, size) float32, one normalised view per image."""
        self._check(images)
        batch, channels, height, width = images.shape
        device = images.device
        x = images.to(torch.float32)  # (B, C, H, W) in [0, 255]
        flip = _coin(batch, self.flip_p, device, generator) if self.flip_p > 0 else None  # (B,)
        if self.crop_scale is not None:
            scale, ratio = self.crop_scale, self.crop_ratio
            boxes = sample_crop_boxes(
                batch, height, width, scale, ratio, device=device, generator=generator
            )  # (B, 4)
            x = resized_crop(x, boxes, self.size, flip)  # (B, C, size, size)
        else:
            x = self._resize(x)  # (B, C, size, size)
            if flip is not None:
                x = torch.where(_per_image(flip), x.flip(-1), x)
        x = x.div_(255)  # (B, C, size, size) in [0, 1]
        if self.jitter_p > 0:
            x = self._jitter(x, generator)
        if self.gray_p > 0 and channels == 3:
            gray = _coin(batch, self.gray_p, device, generator)  # (B,)
            x = torch.where(_per_image(gray), rgb_to_grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            blur = _coin(batch, self.blur_p, device, generator)  # (B,)
            sigma = _uniform((batch,), *self.blur_sigma, device, generator)  # (B,)
            x = torch.where(_per_image(blur), gaussian_blur(x, sigma, self.blur_kernel), x)
        if self.solarize_p > 0:
            flip_dark = _coin(batch, self.solarize_p, device, generator)  # (B,)
            x = torch.where(_per_image(flip_dark), solarize(x), x)
        return self._normalise(x)  # (B, C, size, size)

    def _jitter(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Colour jitter of a random subset (probability ``jitter_p``) of float images in [0, 1].

        Unselected images get neutral factors (1 for brightness, contrast, saturation), which leave
        them bit-for-bit unchanged, and keep their original pixels for the hue step.
        """
        batch, channels = x.shape[:2]
        brightness, contrast, saturation, hue = self.jitter
        if channels == 1:
            saturation = hue = 0.0  # no colour to change, as in torchvision
        selected = _coin(batch, self.jitter_p, x.device, generator)  # (B,)
        for strength, adjust in (
            (brightness, adjust_brightness),
            (contrast, adjust_contrast),
            (saturation, adjust_saturation),
        ):
            if strength > 0:
                low, high = max(0.0, 1 - strength), 1 + strength
                factor = _uniform((batch,), low, high, x.device, generator)  # (B,)
                x = adjust(x, torch.where(selected, factor, 1.0))  # (B, C, size, size)
        if hue > 0:
            shift = _uniform((batch,), -hue, hue, x.device, generator)  # (B,)
            x = torch.where(_per_image(selected), adjust_hue(x, shift), x)
        return x

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio},"
            f" flip_p={self.flip_p}, jitter={self.jitter}, jitter_p={self.jitter_p},"
            f" gray_p={self.gray_p}, blur_p={self.blur_p}, blur_sigma={self.blur_sigma},"
            f" blur_kernel={self.blur_kernel}, solarize_p={self.solarize_p}"
        )


def build_augment(
    preset: str, size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.2,
    jitter_strength: float = 0.4, crop: bool = True, view: int = 0,
    blur_sigma: Sequence[float] | None = None,
) -> BatchAugment:
    """The augmentation of a named preset, sized for ``size``-px outputs.

    * ``"v1"``: MoCo v1 -- crop (scale 0.2-1), grayscale p=0.2, colour jitter (0.4, 0.4, 0.4, 0.4)
      on every image, flip.
    * ``"v2"``: MoCo v2 "aug+" -- crop (scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
      grayscale p=0.2, Gaussian blur p=0.5 (sigma and kernel scaled to ``size``), flip.
    * ``"v3"``: MoCo v3 (BYOL's asymmetric pair) -- crop, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
      grayscale p=0.2, then for ``view`` 0 Gaussian blur p=1.0, for ``view`` 1 blur p=0.1 and solarize
      p=0.2; flip. The v3 presets crop 8-100% of the image (``min_scale=0.08``).
    * ``"crop"``: crop (scale 0.2-1) and flip only.
    * ``"none"``: resize and normalise only; the same output as `EvalTransform`.

    ``view`` (0: the query's, 1: the key's) matters for ``"v3"`` only; the other presets draw both views alike.
    ``crop=False`` leaves the random resized crop out, for views cropped already (streamed data, whose crops
    are cut from the original image while decoding it).
    ``min_scale`` is the smallest crop area (0.2 in the papers). ``jitter_strength`` is the colour
    jitter's brightness, contrast and saturation (0.4 in the papers; hue keeps the preset's): on
    one-channel images only brightness and contrast act, and a stronger jitter makes up for it.
    ``blur_sigma`` is the blur's sigma range in output pixels (None: MoCo v2's, scaled to ``size``); its kernel
    then spans at least two sigmas either side (`blur_kernel_for`).
    """
    crop = (min_scale, 1.0) if crop else None
    j = jitter_strength
    blur = {} if blur_sigma is None else {"blur_sigma": tuple(blur_sigma),
                                          "blur_kernel": blur_kernel_for(size, max(blur_sigma))}
    if preset == "v1":
        return BatchAugment(
            size, mean, std, crop_scale=crop, jitter=(j, j, j, 0.4), jitter_p=1.0, gray_p=0.2,
            blur_p=0.0,
        )
    if preset == "v2":
        return BatchAugment(
            size, mean, std, crop_scale=crop, jitter=(j, j, j, 0.1), jitter_p=0.8, gray_p=0.2,
            blur_p=0.5, **blur,
        )
    if preset == "v3":
        return BatchAugment(
            size, mean, std, crop_scale=crop, jitter=(j, j, j / 2, 0.1), jitter_p=0.8, gray_p=0.2,
            blur_p=1.0 if view == 0 else 0.1, solarize_p=0.0 if view == 0 else 0.2, **blur,
        )
    if preset == "crop":
        return BatchAugment(size, mean, std, crop_scale=crop, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    if preset == "none":
        return BatchAugment(
            size, mean, std, crop_scale=None, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0
        )
    allowed = ", ".join(AUGMENT_PRESETS)
    raise ConfigError(f"unknown augmentation preset {preset!r}; choose one of {allowed}")


class EvalTransform(_Normalising):
    """Deterministic view for feature extraction: (B, C, H, W) uint8 -> (B, C, size, size) float.

    The whole image is resized to ``size`` x ``size`` (bilinear, antialiased; skipped when it
    already has that size), then normalised like the training views.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        x = self._resize(images.to(torch.float32))  # (B, C, size, size) in [0, 255]
        return self._normalise(x.div_(255))  # (B, C, size, size)
