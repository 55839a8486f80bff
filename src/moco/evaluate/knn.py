"""Weighted k-nearest-neighbour classification on frozen features (the standard kNN monitor).

Each test feature votes with its k most cosine-similar training features, a neighbour of class c
adding exp(sim / t) to c's score (Wu et al. 2018; the official MoCo CIFAR demo uses k=200, t=0.1).
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from ..errors import ConfigError
from ..model.backbones import build_backbone, is_vit, vit_recipe
from .features import Images, extract_features

VOTES = ("weighted", "majority")


@dataclass
class KnnConfig:
    """The kNN classifier."""

    k: int = opt(200, "neighbours")
    t: float = opt(0.1, "temperature of the vote weights exp(cos/t) (weighted vote)")
    vote: str = opt("weighted", "weighted: each neighbour adds exp(cos/t) (the monitor's) | majority: one vote each "
                                "(textbook kNN, on cosine similarity)")


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, num_classes) of the weighted kNN vote; features must be L2-normalised."""
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start : start + chunk] @ train_features.T  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        weights = (top_sim / t).exp()  # (n, k)
        votes = torch.zeros(top_idx.shape[0], num_classes, dtype=weights.dtype, device=weights.device)  # (n, C)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # (n, C)
        scores.append(votes)
    return torch.cat(scores)  # (N_test, C)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, t: float = 0.1) -> dict[str, float]:
    """Top-1 and, with more than 5 classes, top-5 accuracy (percent) of the weighted kNN classifier."""
    train_labels, test_labels = train_labels.to(train_features.device), test_labels.to(test_features.device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, t)  # (N, C)
    ranked = scores.topk(min(5, num_classes), dim=1).indices  # (N, 5)
    hits = ranked == test_labels[:, None]  # (N, 5)
    out = {"top1": 100.0 * hits[:, 0].float().mean().item()}
    if num_classes > 5:
        out["top5"] = 100.0 * hits.any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def plain_knn_accuracy(train_x: torch.Tensor, train_labels: torch.Tensor, test_x: torch.Tensor,
                       test_labels: torch.Tensor, k: int = 5, chunk: int = 1024) -> float:
    """Top-1 accuracy (percent) of textbook kNN: Euclidean distance, majority vote of the k nearest.

    Ties go to the tied class with the nearest voter (the neighbour of rank r adds 1 + 1e-3 / 2^(r+1)).
    On raw Fashion-MNIST pixels, k=5 gives about 85.5%: the usual baseline a learned encoder must beat.
    """
    k = min(k, train_x.shape[0])
    train_labels, test_labels = train_labels.to(train_x.device), test_labels.to(test_x.device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_x, test_x = train_x.flatten(1).float(), test_x.flatten(1).float()
    train_sq = (train_x * train_x).sum(1)  # (N_train,)
    tie_break = 1 + 1e-3 * 0.5 ** torch.arange(1, k + 1, dtype=torch.float64, device=train_x.device)  # (k,)
    hits = 0
    for start in range(0, test_x.shape[0], chunk):
        # ||a - b||^2 = ||b||^2 - 2 a.b + ||a||^2; the last term does not change the order for a fixed query
        dist = train_sq - 2 * test_x[start : start + chunk] @ train_x.T  # (n, N_train)
        nearest = dist.topk(k, dim=1, largest=False).indices  # (n, k), nearest first
        votes = torch.zeros(nearest.shape[0], num_classes, dtype=torch.float64, device=train_x.device)  # (n, C)
        votes.scatter_add_(1, train_labels[nearest], tie_break.expand(nearest.shape[0], k))  # (n, C)
        hits += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return 100.0 * hits / test_x.shape[0]


def knn_eval(
    backbone: nn.Module,
    train: tuple[torch.Tensor | Images, torch.Tensor],
    test: tuple[torch.Tensor | Images, torch.Tensor],
    transform: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
    k: int = 200,
    t: float = 0.1,
    channels_last: bool = False,
    vote: str = "weighted",
) -> dict[str, float]:
    """kNN accuracy of `backbone`: (uint8 images, labels) of the memory bank `train` and of `test`.

    `vote` "weighted" is the monitor's exp(sim/t) vote (top-1 and top-5); "majority" the textbook vote
    of the k cosine-nearest (top-1 only; `t` unused).
    """
    bank, queries = (extract_features(backbone, x, transform, device, channels_last=channels_last)
                     for x in (train[0], test[0]))
    return vote_accuracy(bank, train[1], queries, test[1], k, t, vote)


def vote_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    t: float | None,
    vote: str,
) -> dict[str, float]:
    """knn_accuracy ("weighted", temperature `t`) or the majority vote ("majority", `t` unused) of L2-normalised
    features.

    On unit vectors the Euclidean order is the cosine order, so the majority vote is plain_knn_accuracy's.
    """
    if vote == "weighted":
        if t is None:
            raise ValueError("a weighted kNN vote needs a temperature t")
        return knn_accuracy(train_features, train_labels, test_features, test_labels, k, t)
    if vote == "majority":
        return {"top1": plain_knn_accuracy(train_features, train_labels, test_features, test_labels, k)}
    raise ValueError(f"unknown kNN vote {vote!r}; choose weighted or majority")


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels as features: flattened, in [0, 1], L2-normalised, (N, C*H*W)."""
    return F.normalize(images.flatten(1).float() / 255.0, dim=1)


def reinitialised(module: nn.Module) -> nn.Module:
    """A copy of `module` with every layer re-initialised: the random-encoder baseline. A ViT of ours is built
    afresh, with its own initialisation (its class token is no layer's to reset)."""
    if is_vit(module):
        weights = module.state_dict()
        try:
            return build_backbone(**vit_recipe(weights)).to(weights["cls_token"].device)
        except (KeyError, ConfigError):  # not one of ours: reset its layers as any module's
            pass
    module = copy.deepcopy(module)
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
        if hasattr(layer, "reset_running_stats"):
            layer.reset_running_stats()
    return module
