"""A pretraining run as users start it: the trainer with its usual hooks (kNN monitor, diagnostics, metrics,
checkpoints), a resume if asked, and the kNN of the result next to its baselines."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .checkpoints import LAST, Resume, find_resume, set_aside
from .config import PretrainConfig
from .evaluate.baselines import knn_baselines, knn_lines
from .evaluate.monitor import KnnMonitor
from .train.hooks import Checkpointer, Diagnostics, MetricsLogger, StepCallback
from .train.setup import build_trainer


@dataclass
class PretrainResult:
    out_dir: Path
    checkpoint: Path
    epochs: int  # completed epochs
    loss: float  # mean loss of the last epoch completed in this call (nan if none)
    knn: dict[str, float] | None = None  # the trained backbone's kNN accuracy on the test split
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # raw pixels, random encoder
    compile_seconds: float | None = None  # with run.compile: the first step, compilation included


def pretrain(
    cfg: PretrainConfig,
    resume: str | Path | Resume | None = None,
    backbone: nn.Module | None = None,
    baselines: bool = True,
    echo: Callable[[str], None] = print,
    on_step: Callable[[int, nn.Module], bool | None] | None = None,
) -> PretrainResult:
    """Pretrain as `cfg` says; continue from a checkpoint (a file, a run folder, or a `Resume` already read) if given.

    `backbone` replaces cfg.model.arch with any module mapping (B, C, H, W) images to (B, D) features.
    With `baselines`, the end also measures kNN on raw pixels and on a randomly initialised encoder.
    `on_step(step, method)` is called after every optimizer step; returning True stops the run (a
    checkpoint is saved, and the result returned).
    """
    trainer = build_trainer(cfg, backbone, echo)
    r, epochs = cfg.run, cfg.optim.epochs
    if resume is not None and not isinstance(resume, Resume):
        resume = find_resume(str(resume), r.out_dir)
    if resume is not None and resume.unreadable and trainer.main:
        set_aside(resume.unreadable)
    monitor = (KnnMonitor(trainer.data, r, epochs, trainer.device)
               if trainer.data.test is not None and trainer.main else None)
    best = resume.state.get("best_knn", -math.inf) if resume else -math.inf
    hooks = [monitor, Diagnostics(), MetricsLogger(r.out_dir, r.tensorboard, r.progress),
             Checkpointer(r.out_dir, r.keep_every, best), StepCallback(on_step) if on_step else None]
    out_dir = Path(r.out_dir)
    if resume is not None:
        trainer.restore(resume.state, str(resume.path))
        if trainer.epoch >= epochs:
            trainer.echo(f"the run is complete: {trainer.epoch} of {epochs} epochs are done, nothing to train; "
                         "pass --epochs N to train it longer")
            metrics = resume.state.get("metrics", {})
            knn = {k.removeprefix("knn_"): v for k, v in metrics.items() if k.startswith("knn_")}
            return PretrainResult(out_dir, resume.path, trainer.epoch, metrics.get("loss", math.nan), knn or None)
    values = trainer.fit([h for h in hooks if h is not None]) or {}
    result = PretrainResult(out_dir, out_dir / LAST, trainer.epoch, values.get("loss", math.nan),
                            compile_seconds=trainer.compile_seconds)
    if "knn_top1" in values:
        result.knn = {k.removeprefix("knn_"): v for k, v in values.items() if k.startswith("knn_")}
    if monitor is not None and baselines:
        backbone, bank, test = trainer.method.backbone, monitor.bank, monitor.test
        result.knn = result.knn or monitor(backbone)
        result.baselines = knn_baselines(backbone, bank, test, monitor.transform, trainer.device, r.knn_k, r.knn_t,
                                         channels_last=r.channels_last)
        echo("\n".join([f"kNN on {test.name} ({len(test)} images; weighted, k={r.knn_k}, t={r.knn_t}; "
                        f"memory bank: {len(bank)} training images)",
                        *knn_lines({"this run's encoder": result.knn, **result.baselines}),
                        f"checkpoint: {result.checkpoint}"]))
    return result
