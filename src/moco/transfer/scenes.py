"""Scenes for dense-task transfer: real Fashion-MNIST items composed onto larger canvases.

The MoCo paper transfers its features to detection and segmentation on COCO and VOC. Here the same
protocol runs in minutes on a CPU: each scene is a blank canvas holding 1-5 Fashion-MNIST items
at random positions and scales, with the annotations those benchmarks have: a box, an instance mask
and a class per item, and a semantic mask per scene.

The items come from the **test** split only, which pretraining never sees (it uses the train split),
so a pretrained encoder has not memorised them. The 10k test items are split once, by a fixed
permutation, into a scene-train pool (70%) and a scene-test pool (30%): whatever the seed, the items
of fine-tuning scenes never appear in evaluation scenes.

Annotation conventions (those of COCO and VOC):
    boxes     (K, 4) float32 x1, y1, x2, y2 in pixels, x2/y2 exclusive: the tight box of the mask
    labels    (K,) int64 in 1..len(classes); 0 is the background in semantic masks
    masks     (K, H, W) bool: the item's pixels brighter than FOREGROUND_THRESHOLD
    semantic  (H, W) uint8: 0 background, label of the item, IGNORE (255) on its soft edges
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sources import FASHION_MNIST_CLASSES, ImageSet, load_images
from ..errors import ConfigError

IGNORE = 255
FOREGROUND_THRESHOLD = 16  # of 255: an item's pixel is foreground above it (covers ~95% of its non-zero pixels)
POOL_SEED = 2020  # fixed, so that the scene-train and scene-test pools never depend on a run's seed
TEST_POOL_FRACTION = 0.3
ITEM_SCALE = (0.21, 0.5)  # an item's side as a fraction of the canvas: 20-48 px on 96 px canvases
MAX_ITEMS = 5
_PLACEMENT_TRIES = 30


@dataclass
class Scenes:
    """Annotated images; one list entry per image. Images may differ in size (data read from files)."""

    images: list[torch.Tensor]  # each (C, H, W) uint8, C = 1 or 3
    boxes: list[torch.Tensor]  # each (K, 4) float32 x1 y1 x2 y2, x2/y2 exclusive
    labels: list[torch.Tensor]  # each (K,) int64 in 1..len(classes)
    masks: list[torch.Tensor]  # each (K, H, W) bool
    semantic: list[torch.Tensor]  # each (H, W) uint8: 0 background, 1..len(classes), IGNORE
    classes: list[str]  # classes[i - 1] is the name of label i
    name: str
    sources: list[torch.Tensor] | None = None  # built-in scenes: each (K,) index of the item in the source split

    def __post_init__(self) -> None:
        n = len(self.images)
        if not all(len(x) == n for x in (self.boxes, self.labels, self.masks, self.semantic)):
            raise ValueError(f"Scenes {self.name}: images, boxes, labels, masks and semantic differ in length")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images[0].shape[0]

    @property
    def num_classes(self) -> int:
        """Object classes, the background not counted."""
        return len(self.classes)

    @property
    def canvas(self) -> int:
        """The longest image side: the size detectors resize to (every built-in scene has it)."""
        return max(max(img.shape[1:]) for img in self.images)


def make_scenes(n_train: int, n_test: int, size: int = 96, seed: int = 0,
                source: ImageSet | None = None) -> tuple[Scenes, Scenes]:
    """`n_train` fine-tuning and `n_test` evaluation scenes of `size` x `size` pixels, 1 channel.

    `source` defaults to the Fashion-MNIST test split; the same arguments always give the same scenes.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"scenes {name} must be an integer >= 1, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ConfigError(f"scene size must be an integer >= 32 pixels, got {size!r}")
    source = source if source is not None else load_images("fashion-mnist", "test")
    if source.labels is None or source.classes is None:
        raise ConfigError(f"{source.name} has no labels; scenes need labelled items")
    train_pool, test_pool = scene_pools(len(source))
    train = _compose(source, train_pool, n_train, size, np.random.default_rng([seed, 0]), f"{source.name}:scenes-train")
    test = _compose(source, test_pool, n_test, size, np.random.default_rng([seed, 1]), f"{source.name}:scenes-test")
    return train, test


def scene_pools(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint indices of the items that train scenes and test scenes draw from, the same for every seed."""
    order = np.random.default_rng(POOL_SEED).permutation(n)
    n_test = max(1, round(n * TEST_POOL_FRACTION))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _compose(source: ImageSet, pool: np.ndarray, n: int, size: int, rng: np.random.Generator, name: str) -> Scenes:
    lo, hi = (max(8, round(f * size)) for f in ITEM_SCALE)
    images, boxes, labels, masks, semantic, sources = [], [], [], [], [], []
    for _ in range(n):
        canvas = torch.zeros(1, size, size, dtype=torch.uint8)
        sem = torch.zeros(size, size, dtype=torch.uint8)
        placed: list[tuple[int, int, int]] = []  # (x, y, side) of each pasted square
        item_boxes, item_labels, item_masks, item_sources = [], [], [], []
        for _ in range(int(rng.integers(1, MAX_ITEMS + 1))):
            spot = _free_spot(placed, size, lo, hi, rng)
            if spot is None:  # the canvas is too full for another item that does not overlap
                break
            x, y, side = spot
            index = int(rng.choice(pool))
            item = F.interpolate(source.images[index:index + 1].float(), size=(side, side), mode="bilinear",
                                 antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            fg = item[0] > FOREGROUND_THRESHOLD  # (side, side)
            if not fg.any():
                continue
            placed.append(spot)
            canvas[:, y:y + side, x:x + side] = item
            label = int(source.labels[index]) + 1
            region = sem[y:y + side, x:x + side]
            region[(item[0] > 0) & ~fg] = IGNORE
            region[fg] = label
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y:y + side, x:x + side] = fg
            item_masks.append(mask)
            item_boxes.append(mask_box(mask))
            item_labels.append(label)
            item_sources.append(index)
        images.append(canvas)
        semantic.append(sem)
        masks.append(torch.stack(item_masks) if item_masks else torch.zeros(0, size, size, dtype=torch.bool))
        boxes.append(torch.stack(item_boxes) if item_boxes else torch.zeros(0, 4))
        labels.append(torch.tensor(item_labels, dtype=torch.int64))
        sources.append(torch.tensor(item_sources, dtype=torch.int64))
    classes = list(source.classes) if source.classes else list(FASHION_MNIST_CLASSES)
    return Scenes(images, boxes, labels, masks, semantic, classes, name, sources)


def _free_spot(placed: list[tuple[int, int, int]], size: int, lo: int, hi: int,
               rng: np.random.Generator) -> tuple[int, int, int] | None:
    """A square (x, y, side) that overlaps no placed square, or None after a few random tries."""
    for _ in range(_PLACEMENT_TRIES):
        side = int(rng.integers(lo, hi + 1))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(x + side <= px or px + ps <= x or y + side <= py or py + ps <= y for px, py, ps in placed):
            return x, y, side
    return None


def mask_box(mask: torch.Tensor) -> torch.Tensor:
    """The tight box (4,) float32 x1 y1 x2 y2 (x2, y2 exclusive) of a non-empty (H, W) mask."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


def semantic_from_instances(masks: torch.Tensor, labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) uint8 class map of (K, H, W) instance masks; smaller instances are painted over larger ones."""
    sem = torch.zeros(height, width, dtype=torch.uint8)
    for k in torch.argsort(masks.flatten(1).sum(1), descending=True).tolist():
        sem[masks[k]] = int(labels[k])
    return sem


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) images with `channels` channels: grey replicated to RGB, or RGB to grey."""
    c = image.shape[-3]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)
        return (image.float() * weights).sum(-3, keepdim=True).round().to(image.dtype)
    raise ConfigError(f"cannot turn {c}-channel images into the {channels} channels the encoder takes")
