"""A faithful reference MoCo, written from the paper's Algorithm 1 and the official recipe.

`python -m benchmarks bench` measures the library against this. It makes the official implementation's choices,
not the library's optimisations:

* augmentation: torchvision transforms applied image by image to PIL images, two independent views
  per image (`TwoCropsTransform`), in DataLoader worker processes;
* model: query encoder + deep-copied key encoder, momentum update as a Python loop over the
  parameters, queue stored as (dim, K), logits with `einsum` and `cat`, dequeue by slicing (which
  needs K % batch == 0);
* SGD with the learning rate set once per epoch (cosine), fp32, default (contiguous) memory format.

Shuffling BN on one process is emulated, as in the official CIFAR-10 demo, by a shuffled key batch
and the demo's split BN, which folds the sub-batches into channels (`FoldedSplitBatchNorm2d`).
The encoder (backbone + head) is built by the library's `build_encoder` from the same config, so both
sides have the same architecture and FLOPs; everything around it is independent of the library.
"""

import copy
import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from moco.config import PretrainConfig
from moco.data.augment import default_blur_sigma
from moco.errors import ConfigError
from moco.model import SplitBatchNorm2d, build_encoder, convert_split_bn
from moco.train.schedule import scaled_lr

# Called after every optimizer step with (steps done, model); returning True stops training.
StepHook = Callable[[int, nn.Module], bool | None]


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from `sigma`, as the official MoCo v2 class."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class FoldedSplitBatchNorm2d(SplitBatchNorm2d):
    """The official CIFAR demo's split BN: sub-batch j = samples j, j+G, ..., folded into channels.

    (N, C, H, W) -> (N/G, G*C, H, W), a view of contiguous activations: one BN call normalises every
    (group, channel) pair. The same statistics as the library's SplitBatchNorm2d on the batch
    reordered group by group; the running statistics are the mean over the groups.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.splits
        if not self.training or g == 1:
            return nn.BatchNorm2d.forward(self, x)
        running_mean = self.running_mean.repeat(g)  # (G*C,)
        running_var = self.running_var.repeat(g)  # (G*C,)
        y = F.batch_norm(x.view(n // g, g * c, h, w), running_mean, running_var, self.weight.repeat(g),
                         self.bias.repeat(g), True, self.momentum, self.eps)  # (N/G, G*C, H, W)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(g, c).mean(0))
            self.running_var.copy_(running_var.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y.view(n, c, h, w)


class TwoCropsTransform:
    """Two independent random views of one image: the query's and the key's."""

    def __init__(self, base_transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base_transform = base_transform

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.base_transform(image), self.base_transform(image)]


def reference_transform(
    augment: str, size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.2,
    jitter_strength: float = 0.4, blur_sigma: Sequence[float] | None = None,
) -> transforms.Compose:
    """The official per-image pipeline of an augmentation preset (v2 is "aug+").

    The strengths are the library presets' (see `moco.data.augment.build_augment`); the blur's sigma
    range is `blur_sigma` (pixels) or, by default, MoCo v2's [0.1, 2] for 224 px scaled to `size`, as the
    library scales it.
    """
    crop = transforms.RandomResizedCrop(size, scale=(min_scale, 1.0))
    j = jitter_strength
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if augment == "v2":
        ops = [
            crop,
            transforms.RandomApply([transforms.ColorJitter(j, j, j, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur(tuple(blur_sigma or default_blur_sigma(size)))], p=0.5),
            transforms.RandomHorizontalFlip(),
        ]
    elif augment == "v1":
        ops = [crop, transforms.RandomGrayscale(p=0.2), transforms.ColorJitter(j, j, j, 0.4),
               transforms.RandomHorizontalFlip()]
    elif augment == "crop":
        ops = [crop, transforms.RandomHorizontalFlip()]
    elif augment == "none":
        ops = [transforms.Resize((size, size))]
    else:
        raise ConfigError(f"the reference has no augmentation {augment!r}; choose v1, v2, crop or none")
    return transforms.Compose(ops + finish)


class PILImages(Dataset):
    """uint8 images (N, C, H, W) served one at a time as PIL images, as torchvision's data sets do."""

    def __init__(self, images: torch.Tensor, transform: Callable[[Image.Image], list[torch.Tensor]]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        array = self.images[i].permute(1, 2, 0).numpy()  # (H, W, C) uint8
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # mode L or RGB
        return self.transform(image)


class ReferenceMoCo(nn.Module):
    """MoCo as the official builder writes it, around an encoder mapping images to (B, dim)."""

    def __init__(
        self, encoder: nn.Module, dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.07,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.shuffle_bn = shuffle_bn
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = F.normalize(self.queue, dim=0)  # (dim, K), one key per column
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0, f"K={self.K} must be a multiple of the batch ({batch_size})"
        self.queue[:, ptr : ptr + batch_size] = keys.T  # (dim, B)
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official single-GPU shuffle: a random permutation and its inverse."""
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)  # (B,)
        idx_unshuffle = torch.argsort(idx_shuffle)  # (B,)
        return x[idx_shuffle], idx_unshuffle

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views (B, C, H, W) -> logits (B, 1 + K) with the positive at 0, labels (B,) of zeros."""
        q = F.normalize(self.encoder_q(im_q), dim=1)  # (B, dim)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            if self.shuffle_bn:
                im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)  # (B, dim)
            if self.shuffle_bn:
                k = k[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # (B, 1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # (B, K)
        logits = torch.cat([l_pos, l_neg], dim=1)  # (B, 1 + K)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # (B,)
        self._dequeue_and_enqueue(k)
        return logits, labels


def reference_model(cfg: PretrainConfig, channels: int, size: int) -> ReferenceMoCo:
    """The reference model of `cfg`: the library's encoder architecture, with split BN, in ReferenceMoCo."""
    m = cfg.model
    if m.method != "moco" or m.symmetric:
        raise ConfigError("the reference implements plain MoCo only: method=moco, symmetric=false")
    if m.queue_size % cfg.data.batch_size:
        raise ConfigError(f"the reference dequeues by slicing: queue_size K={m.queue_size} must be a multiple "
                          f"of batch_size={cfg.data.batch_size}")
    encoder = convert_split_bn(build_encoder(m, channels, size), m.bn_splits,
                               {nn.BatchNorm2d: FoldedSplitBatchNorm2d})
    return ReferenceMoCo(encoder, m.dim, m.queue_size, m.key_momentum, m.temperature, m.shuffle_bn)


def reference_loader(
    cfg: PretrainConfig, images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
    workers: int, pin_memory: bool = False,
) -> DataLoader:
    """Shuffled batches of two views [(B, C, S, S), (B, C, S, S)], augmented image by image in workers.

    Workers persist across epochs (one start-up per run, not per epoch as in the official script), so
    the reference pays for augmentation, not for process start-up.
    """
    d = cfg.data
    transform = TwoCropsTransform(reference_transform(d.augment, size, mean, std, d.crop_min_scale, d.jitter_strength,
                                                      d.blur_sigma))
    return DataLoader(PILImages(images, transform), batch_size=d.batch_size, shuffle=True, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0)


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, lr: float, epochs: int) -> None:
    """The official cosine schedule, stepped once per epoch."""
    for group in optimizer.param_groups:
        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def train_reference(
    cfg: PretrainConfig, images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
    device: torch.device, workers: int, on_step: StepHook, epochs: int | None = None,
) -> ReferenceMoCo:
    """The official training loop on uint8 `images` (N, C, H, W) for `epochs` (default cfg's) epochs.

    `on_step(step, model)` runs after every optimizer step, as in the library's `pretrain`; True stops.
    """
    epochs = epochs or cfg.optim.epochs
    o = cfg.optim
    model = reference_model(cfg, images.shape[1], size).to(device)
    criterion = nn.CrossEntropyLoss()
    lr = scaled_lr(o.lr, cfg.data.batch_size, o.lr_batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=o.sgd_momentum, weight_decay=o.weight_decay)
    loader = reference_loader(cfg, images, size, mean, std, workers, pin_memory=device.type == "cuda")
    model.train()
    step = 0
    for epoch in range(epochs):
        adjust_learning_rate(optimizer, epoch, lr, epochs)
        for im_q, im_k in loader:
            im_q = im_q.to(device, non_blocking=True)  # (B, C, S, S)
            im_k = im_k.to(device, non_blocking=True)  # (B, C, S, S)
            output, target = model(im_q, im_k)  # (B, 1 + K), (B,)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if on_step(step, model):
                return model
    return model
