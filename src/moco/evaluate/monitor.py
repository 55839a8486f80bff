"""The kNN monitor: a training hook that measures the backbone by kNN on the labelled test split."""

from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..data.augment import EvalTransform
from ..data.training import TrainingData
from ..train.trainer import Hook, Trainer
from .knn import knn_eval


class KnnMonitor(Hook):
    """Weighted kNN (k, t of the run config) of the backbone's features every `knn_every` epochs (0: only at
    the end, -1: never), the training images as the memory bank; adds knn_top1 (and top5) to the epoch's
    metrics. Main process only."""

    def __init__(self, data: TrainingData, run: RunConfig, epochs: int, device: torch.device) -> None:
        self.run, self.epochs, self.device = run, epochs, device
        self.bank, self.test = data.bank(run.knn_bank), data.test  # as evaluation sees them
        self.transform = EvalTransform(data.size, data.mean, data.std).to(device)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        r = self.run
        return knn_eval(backbone, (self.bank, self.bank.labels), (self.test, self.test.labels), self.transform,
                        self.device, r.knn_k, r.knn_t, r.channels_last)

    def on_epoch_end(self, trainer: Trainer, values: dict[str, Any]) -> None:
        every, epoch = self.run.knn_every, trainer.epoch
        if every >= 0 and (epoch == self.epochs or (every > 0 and epoch % every == 0)):
            values.update({f"knn_{k}": v for k, v in self(trainer.method.backbone).items()})
