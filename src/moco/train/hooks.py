"""The parts of a pretraining run that the loop calls: checkpoints, metrics and progress, diagnostics,
and a caller's own per-step function."""

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from ..checkpoints import BEST, LAST, save_checkpoint
from ..config import to_yaml
from ..errors import warn
from ..extras import available
from ..files import write_text
from .diagnostics import LossWatch, check_collapse, check_queue_size, key_spread
from .trainer import Hook, StepOutput, Trainer


class Checkpointer(Hook):
    """Writes `config.yaml` at the start, `checkpoint.pt` after every epoch and when a run stops mid-epoch,
    `checkpoint_epochNNNN.pt` every `keep_every` epochs and `checkpoint_best.pt` at the best kNN so far;
    every file atomically (a crash leaves the previous one intact)."""

    def __init__(self, out_dir: str | Path, keep_every: int = 0, best_knn: float = -math.inf) -> None:
        self.out_dir, self.keep_every, self.best_knn = Path(out_dir), keep_every, best_knn

    def on_start(self, trainer: Trainer) -> None:
        if trainer.main:
            write_text(self.out_dir / "config.yaml", to_yaml(trainer.cfg))

    def on_epoch_end(self, trainer: Trainer, values: dict[str, Any]) -> None:
        self.save(trainer, values)

    def on_stop(self, trainer: Trainer) -> None:
        self.save(trainer, {"step": trainer.step, "stopped": True})

    def save(self, trainer: Trainer, metrics: dict[str, Any]) -> Path:
        """The last checkpoint, plus the kept ones. Every process takes part; only the main one writes."""
        state = trainer.state_dict()
        if not trainer.main:
            return self.out_dir / LAST
        at_epoch_end = trainer.step_in_epoch == 0
        is_best = at_epoch_end and "knn_top1" in metrics and metrics["knn_top1"] >= self.best_knn
        if is_best:
            self.best_knn = metrics["knn_top1"]
        state.update(metrics=metrics, best_knn=self.best_knn)
        last = save_checkpoint(state, self.out_dir / LAST)
        if at_epoch_end and self.keep_every > 0 and trainer.epoch % self.keep_every == 0:
            save_checkpoint(state, self.out_dir / f"checkpoint_epoch{trainer.epoch:04d}.pt")
        if is_best:
            save_checkpoint(state, self.out_dir / BEST)
        return last


class MetricsLogger(Hook):
    """`metrics.jsonl` (and TensorBoard events) every `every` steps and every epoch, the progress bar (loss,
    contrastive accuracy, lr, images/s) and the epoch's line; main process only."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, progress: bool = True, every: int = 20) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tensorboard, self.progress, self.every = tensorboard, progress, every
        self.writer = None
        self.bar: tqdm | None = None
        self.rate_from = (0, 0.0)  # (steps seen, clock) that images/s counts from, set at each epoch's start
        self.compiled = False  # whether images/s already restarted after the compiling first step

    def on_start(self, trainer: Trainer) -> None:
        if not trainer.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.tensorboard and not available("tensorboard"):
            warn("TensorBoard events are off: the tensorboard package is not installed "
                 "(pip install 'momentum-contrast[tensorboard]'); metrics.jsonl has every metric")
        elif self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, step: int, tag: str, values: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "step": step, "tag": tag, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{tag}/{name}", value, step)

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.step_in_epoch, desc=f"epoch {trainer.epoch + 1}/"
                        f"{trainer.cfg.optim.epochs}", disable=not (self.progress and trainer.main),
                        dynamic_ncols=True, leave=True)
        self.rate_from = (0, time.perf_counter())

    def on_step(self, trainer: Trainer, out: StepOutput | None) -> None:
        self.bar.update(1)
        if trainer.compile_seconds is not None and not self.compiled:  # images/s counts after compilation
            self.compiled = True
            self.rate_from = (trainer.seen, time.perf_counter())
        last = trainer.step_in_epoch == trainer.steps_per_epoch
        if trainer.seen <= self.rate_from[0] or not (trainer.seen % self.every == 0 or last):
            return
        seen, clock = self.rate_from
        img_s = (trainer.seen - seen) * trainer.cfg.data.batch_size / (time.perf_counter() - clock)
        lr = trainer.optimizer.param_groups[0]["lr"]
        values = {"loss": (trainer.loss_sum / trainer.seen).item(),
                  "acc": 100 * (trainer.acc_sum / trainer.seen).item(), "lr": lr, "img_s": img_s}
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['acc']:.1f}%", lr=f"{lr:.4f}",
                             img_s=f"{img_s:.0f}", refresh=False)
        if trainer.main:
            self.log(trainer.step, "train", values)

    def on_epoch_end(self, trainer: Trainer, values: dict[str, Any]) -> None:
        self.bar.close()
        if trainer.main:
            self.log(trainer.step, "epoch", values)
        spread = f", key spread {values['key_spread']:.2f}" if "key_spread" in values else ""
        knn = f", kNN top-1 {values['knn_top1']:.2f}%" if "knn_top1" in values else ""
        trainer.echo(f"epoch {values['epoch']}: loss {values['loss']:.4f}, contrastive acc {values['acc']:.1f}%"
                     f"{spread}, {values['seconds']:.0f} s{knn}")

    def on_stop(self, trainer: Trainer) -> None:
        self.bar.close()

    def on_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Diagnostics(Hook):
    """Warnings a user should see early (train.diagnostics): a queue that holds an epoch of keys, first losses
    far from log(K+1), a loss stuck after the first epoch, a collapsing embedding; adds `key_spread` and the
    untrained loss `chance_loss` (log of the candidates per query) to each epoch's metrics."""

    def on_start(self, trainer: Trainer) -> None:
        method, batch = trainer.method, trainer.cfg.data.batch_size
        self.watch = LossWatch(*method.chance(batch), scale=method.loss_scale)
        self.watch.checked = trainer.step > 0  # the first losses tell something only about a run from scratch
        if trainer.main and method.queue_size():
            check_queue_size(method.queue_size(), trainer.steps_per_epoch * batch * method.keys_per_image())

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.whole_epoch = trainer.step_in_epoch == 0  # not resumed mid-epoch

    def on_step(self, trainer: Trainer, out: StepOutput | None) -> None:
        if trainer.main and out is not None and not self.watch.checked and trainer.step > self.watch.first_full_step:
            self.watch.step(trainer.step, out.loss.item())

    def on_epoch_end(self, trainer: Trainer, values: dict[str, Any]) -> None:
        values["key_spread"] = key_spread(trainer.method.key_sample())
        values["chance_loss"] = self.watch.chance
        if not trainer.main:
            return
        if self.whole_epoch and trainer.epoch == 1:
            self.watch.epoch_end(values["loss"])
        check_collapse(values["key_spread"])


class StepCallback(Hook):
    """A caller's `on_step(step, method)` after every optimizer step; returning True stops the run."""

    def __init__(self, on_step: Callable[[int, nn.Module], bool | None]) -> None:
        self.callback = on_step

    def on_step(self, trainer: Trainer, out: StepOutput | None) -> bool:
        return bool(self.callback(trainer.step, trainer.method))

