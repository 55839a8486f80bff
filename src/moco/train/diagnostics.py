"""What a run should warn about before a user has wasted a day: the two most common MoCo complaints,
"the loss is stuck" and collapse, and a dictionary that holds the query's own image."""

import math

import torch

from ..errors import warn


def check_queue_size(K: int, keys_per_epoch: int) -> None:
    """Warn when the queue holds about an epoch of keys or more: it then holds an earlier key of the
    query's own image, a negative that is really a positive (a false negative)."""
    if K >= keys_per_epoch:
        warn(f"queue size K={K} >= the {keys_per_epoch} keys of one epoch: every image's own earlier key sits "
             f"in the queue as a negative; use K <= {keys_per_epoch // 4} for this data set")
    elif K > keys_per_epoch // 2:
        warn(f"queue size K={K} is close to the {keys_per_epoch} keys of one epoch: many images will meet their "
             f"own earlier key as a negative; use K <= {keys_per_epoch // 4} for this data set")


class LossWatch:
    """Compares the loss of the first steps after the negatives are all real keys to chance: log(K+1) (times the
    method's `loss_scale`).

    Before training has done much, every key looks alike and InfoNCE over 1 + K candidates is near
    log(K + 1) (11.09 for K=65536). Far above: the positive is scored below the negatives (a bug, a
    too small T, a too high lr). Far below: the pretext task is too easy from the start, usually BN
    statistics leaking the positive (shuffle_bn off) or too weak augmentation. After the first epoch,
    a loss still near log(K + 1) means the model is not learning.
    """

    def __init__(self, candidates: int, first_full_step: int, window: int = 10, scale: float = 1.0) -> None:
        # log(K + 1): a uniform guess among the positive and K negatives, times the method's loss scale
        self.chance = scale * math.log(candidates)
        self.first_full_step = first_full_step  # the random initial keys are gone from then on
        self.window = window
        self.losses: list[float] = []
        self.checked = False

    def step(self, step: int, loss: float) -> None:
        if self.checked or step < self.first_full_step:
            return
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return
        self.checked = True
        mean = sum(self.losses) / len(self.losses)
        if mean > self.chance + 1.0:
            warn(f"the first losses ({mean:.2f}) are well above chance={self.chance:.2f}: positives score below "
                 "negatives; check the temperature (too small?), the learning rate (too high?) and a custom encoder")
        elif mean < 0.5 * self.chance:
            warn(f"the first losses ({mean:.2f}) are far below chance={self.chance:.2f}: the task is too easy "
                 "from the start; keep shuffle_bn on with bn_splits > 1 (BN statistics leak the positive) and use "
                 "stronger augmentation")

    def epoch_end(self, mean_loss: float) -> None:
        if mean_loss > 0.97 * self.chance:
            warn(f"the loss ({mean_loss:.2f}) is stuck near chance={self.chance:.2f} after an epoch: the model is "
                 "not learning; try a higher lr, a higher temperature, or check the augmentations")


def key_spread(keys: torch.Tensor) -> float:
    """Mean per-dimension std of the normalised keys (N, D), times sqrt(D).

    About 1 for keys spread over the sphere, 0 when every key is the same vector (collapse); nan for fewer
    than two keys.
    """
    if keys.shape[0] < 2:
        return math.nan
    return (keys.float().std(dim=0).mean() * math.sqrt(keys.shape[1])).item()


def check_collapse(spread: float, threshold: float = 0.1) -> None:
    if spread < threshold:
        warn(f"the embedding is collapsing: keys' spread {spread:.3f} (1 = spread out, 0 = all keys equal); "
             "check key_momentum (too low?), lr (too high?) and that shuffle_bn is on")
