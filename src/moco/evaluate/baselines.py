"""An encoder's accuracy next to the two baselines that give it meaning: the same protocol on raw pixels,
and on a randomly initialised encoder of the same architecture (kNN and the linear protocol alike)."""

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..checkpoints import LoadedEncoder
from ..data.augment import EvalTransform
from ..data.sources import ImageSet
from .features import Images
from .knn import knn_eval, pixel_features, reinitialised, vote_accuracy
from .linear import LinearConfig, LinearResult, linear_probe

RAW_PIXELS, RANDOM_ENCODER = "raw pixels", "random encoder"


def knn_rows(name: str, backbone: nn.Module, train: Images, test: Images, transform: EvalTransform,
             device: torch.device, k: int, t: float, vote: str = "weighted", baselines: bool = True,
             channels_last: bool = False) -> dict[str, dict[str, float]]:
    """{name: accuracy} of kNN on `backbone`'s features (train: the memory bank, test: the queries), and with
    `baselines` the rows of `knn_baselines`."""
    rows = {name: knn_eval(backbone.to(device), (train, train.labels), (test, test.labels), transform, device, k, t,
                           channels_last, vote)}
    if baselines:
        rows |= knn_baselines(backbone, train, test, transform, device, k, t, vote, channels_last)
    return rows


def knn_baselines(backbone: nn.Module, train: Images, test: Images, transform: EvalTransform,
                  device: torch.device, k: int, t: float, vote: str = "weighted",
                  channels_last: bool = False) -> dict[str, dict[str, float]]:
    """The same kNN on raw pixels (flattened, in [0, 1]; for images in memory) and on a re-initialised copy of
    `backbone`."""
    random = reinitialised(backbone).to(device)
    rows = {}
    if isinstance(train, ImageSet) and isinstance(test, ImageSet):  # a streamed set's pixels would not fit memory
        rows[RAW_PIXELS] = vote_accuracy(pixel_features(train.images), train.labels, pixel_features(test.images),
                                         test.labels, k, t, vote)
    rows[RANDOM_ENCODER] = knn_eval(random, (train, train.labels), (test, test.labels), transform, device, k, t,
                                    channels_last, vote)
    return rows


def knn_lines(rows: dict[str, dict[str, float]], width: int = 24) -> list[str]:
    """One line a row: "  name   top-1 84.08%   top-5 99.72%" (top-5 where measured)."""
    return [f"  {name:<{width}} top-1 {acc['top1']:6.2f}%" + (f"   top-5 {acc['top5']:6.2f}%" if "top5" in acc else "")
            for name, acc in rows.items()]


def linear_rows(name: str, encoder: LoadedEncoder, train: ImageSet, test: ImageSet, cfg: LinearConfig,
                device: torch.device, baselines: bool = True, echo: Callable[[str], None] = print,
                progress: bool = True) -> dict[str, LinearResult]:
    """{name: result} of the linear protocol on `encoder`, and with `baselines` on raw pixels (the normalised
    image, flattened) and on a re-initialised copy of its backbone."""
    candidates = {name: encoder}
    if baselines:
        candidates[RAW_PIXELS] = replace(encoder, backbone=nn.Flatten())
        candidates[RANDOM_ENCODER] = replace(encoder, backbone=reinitialised(encoder.backbone))
    results = {}
    for label, candidate in candidates.items():
        echo(f"# linear protocol: {label}")
        results[label] = linear_probe(candidate, train, test, cfg, device, echo, progress)
    return results


def linear_lines(results: dict[str, LinearResult], width: int = 40) -> list[str]:
    """One line a row: best top-1 (its epoch), final top-1 and top-5 (where measured), and the lr a search chose."""
    return [f"  {name:<{width}} best top-1 {r.best_top1:6.2f}% (epoch {r.best_epoch})   final top-1 "
            f"{r.final_top1:6.2f}%" + (f"  top-5 {r.final_top5:6.2f}%" if r.final_top5 is not None else "")
            + (f"  (lr {r.lr:g} chosen)" if r.search else "")
            for name, r in results.items()]
