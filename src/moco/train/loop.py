"""The pretraining loop: data -> two augmented views -> MoCo -> InfoNCE -> SGD, with checkpoints."""

import copy
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import distributed as dist
from ..config import PretrainConfig, to_yaml, validate
from ..data.augment import EvalTransform, build_augment
from ..data.shards import ShardStream
from ..data.sources import ImageSet, has_split, load_images
from ..errors import CheckpointError, ConfigError, MocoError
from ..evaluate.knn import knn_accuracy, knn_eval, pixel_features, reinitialised
from ..model import build_moco
from ..runtime import (autocast_dtype, keep_freed_memory, resolve_device, rng_state, seed_everything, set_rng_state,
                       synchronize)
from .checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from .observe import LossWatch, MetricsLog, check_collapse, check_queue_size, key_spread
from .optim import build_optimizer, lr_at, set_lr


@dataclass
class PretrainResult:
    out_dir: Path
    checkpoint: Path
    epochs: int  # completed epochs
    loss: float  # mean loss of the last completed epoch
    knn: dict[str, float] | None = None  # the trained backbone's kNN accuracy on the test split
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # raw pixels, random encoder
    compile_seconds: float | None = None  # with run.compile: the first step, compilation included


@dataclass
class Data:
    """The training images and, when labels exist, the labelled splits of the kNN monitor."""

    train: ImageSet | ShardStream
    test: ImageSet | None
    size: int  # crop size fed to the encoder
    mean: list[float]
    std: list[float]


def load_data(cfg: PretrainConfig) -> Data:
    d = cfg.data
    if d.dataset == "shards":
        train = ShardStream.open(d.data_root, d.workers)
        if d.train_subset is not None:
            train = replace(train, count=min(train.count, d.train_subset))
        mean, std = train.mean_std()
        return Data(train, None, d.image_size or train.image_size, mean, std)
    train = load_images(d.dataset, "train", d.data_root, d.image_size, strict=d.strict)
    if d.train_subset is not None:
        train = ImageSet(train.images[: d.train_subset], None if train.labels is None else train.labels[: d.train_subset],
                         train.classes, train.name + f"[:{d.train_subset}]")
    if len(train) < d.batch_size:
        raise ConfigError(
            f"batch_size={d.batch_size} is larger than the {len(train)} training images of {train.name}; "
            f"use batch_size <= {len(train)}"
        )
    test = None
    if train.labels is not None and has_split(d.dataset, "test", d.data_root):
        test = load_images(d.dataset, "test", d.data_root, d.image_size, strict=d.strict)
        if test.labels is None:
            test = None
    mean, std = train.mean_std()
    return Data(train, test, d.image_size or train.image_size, mean, std)


class Knn:
    """kNN accuracy of a backbone on the test split, with the training images as the memory bank."""

    def __init__(self, data: Data, cfg: PretrainConfig, device: torch.device) -> None:
        self.data, self.cfg, self.device = data, cfg, device
        self.transform = EvalTransform(data.size, data.mean, data.std).to(device)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        r, train, test = self.cfg.run, self.data.train, self.data.test
        return knn_eval(backbone, (train.images, train.labels), (test.images, test.labels), self.transform,
                        self.device, r.knn_k, r.knn_t, r.channels_last)

    def pixels(self) -> dict[str, float]:
        r = self.cfg.run
        train, test = self.data.train, self.data.test
        return knn_accuracy(pixel_features(train.images), train.labels, pixel_features(test.images), test.labels,
                            r.knn_k, r.knn_t)


class Interrupted(Exception):
    """A run stopped by SIGTERM/SIGINT after saving a checkpoint at a step boundary."""

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        name = signal.Signals(signum).name
        super().__init__(f"{name}: checkpoint saved at step {step} in {checkpoint}; continue with --resume auto")


class NonFiniteLoss(MocoError):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(
            f"the {what} became non-finite at step {step}; the run stopped and its last good checkpoint is kept. "
            "Likely causes: a learning rate too high (lower --lr or add --warmup-epochs), a temperature too "
            "small (raise --temperature); --nonfinite skip skips such steps instead"
        )


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


class OutOfMemory(MocoError):
    def __init__(self, batch: int, device: torch.device, fits: int) -> None:
        hint = (f"the largest batch that fits is about {fits}: use --batch-size {fits} (the lr scales with it)"
                if fits else "not even a batch of bn_splits images fits: use a smaller model or image size")
        super().__init__(f"out of memory on {device} for a batch of {batch}; {hint}")


def check_distributed(cfg: PretrainConfig, world: int) -> None:
    """What a run on `world` processes needs: a divisible global batch and BN groups, the MoCo mechanism."""
    if world == 1:
        return
    m, d = cfg.model, cfg.data
    if d.batch_size % world or m.bn_splits % world:
        raise ConfigError(f"batch_size={d.batch_size} and bn_splits={m.bn_splits} count all {world} processes "
                          f"together: make both multiples of {world} (e.g. bn_splits={world}: one BN group a process)")
    if m.mechanism != "moco":
        raise ConfigError(f"mechanism={m.mechanism} runs on one process; use mechanism=moco with torchrun")
    if m.sync_bn and not torch.cuda.is_available():
        raise ConfigError("sync_bn needs GPUs (NCCL); on CPUs use split BN (bn_splits)")


class Trainer:
    """A pretraining run: data, model, optimizer and position, and one method per part of the loop.

    Position: `epoch` completed epochs and `step` optimizer steps; a checkpoint may be taken mid-epoch
    (on SIGTERM/SIGINT), and the data order depends only on (seed, epoch), so a resumed run continues
    exactly where it stopped.
    """

    def __init__(self, cfg: PretrainConfig, backbone: nn.Module | None = None,
                 echo: Callable[[str], None] = print) -> None:
        validate(cfg)
        m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
        ddp_device = dist.setup(r.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        check_distributed(cfg, self.world)
        self.main = self.rank == 0  # only the main process logs, draws the bar and writes files
        self.cfg, self.echo = cfg, (echo if self.main else lambda line: None)
        self.device = ddp_device if self.world > 1 else resolve_device(r.device)
        if r.threads is not None:
            torch.set_num_threads(r.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        seed_everything(r.seed)  # the same initial weights everywhere (DDP also broadcasts them)
        self.out_dir = Path(r.out_dir)
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        self.echo(f"# moco pretrain: config (also in {self.out_dir / 'config.yaml'})\n{to_yaml(cfg)}")
        echo = self.echo

        self.data = load_data(cfg)
        train = self.data.train
        echo(f"data: {train.name}, {len(train)} images {train.channels}x{train.image_size}x{train.image_size}, "
             f"crop {self.data.size}px; "
             f"kNN monitor: {'on ' + self.data.test.name if self.data.test is not None else 'off (no labelled test split)'}"
             f"; device: {self.device}"
             + (f", {self.world} processes, {d.batch_size // self.world} images each a step" if self.world > 1 else ""))
        self.steps_per_epoch = len(train) // d.batch_size  # the last partial batch is dropped (split BN needs full groups)
        if m.mechanism == "moco" and self.main:
            check_queue_size(m.queue_size, self.steps_per_epoch * d.batch_size * (2 if m.symmetric else 1))

        self.model = build_moco(m, train.channels, self.data.size, backbone, num_images=len(train)).to(self.device)
        self.memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.augment = build_augment(d.augment, self.data.size, self.data.mean, self.data.std,
                                     d.crop_min_scale, d.jitter_strength).to(self.device)
        self.optimizer = build_optimizer(self.model.encoder_q.parameters(), o, d.batch_size)
        if m.sync_bn and self.world > 1:  # the query's BN over the global batch; the key encoder keeps its groups
            self.model.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.encoder_q)
        # DDP averages the query encoder's gradients; the queue stays out of its buffer broadcast (every
        # process enqueues the same gathered keys, so the queues agree without copying them each step).
        self.forward = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                                else None, broadcast_buffers=False)
                        if self.world > 1 else self.model)
        seed_everything(r.seed + self.rank)  # each process draws its own augmentations
        self.amp_dtype = autocast_dtype(r.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if r.compile:
            self.model.encoder_q.compile()
            self.model.encoder_k.compile()
        echo(f"precision: {'fp32' if self.amp_dtype is None else str(self.amp_dtype).removeprefix('torch.') + ' autocast'}"
             f"; channels_last: {r.channels_last}; compile: {r.compile}")
        self.knn = Knn(self.data, cfg, self.device) if self.data.test is not None and self.main else None
        self.watch = LossWatch(*self.model.chance(d.batch_size))
        self.epoch, self.step, self.skipped = 0, 0, 0
        self.compile_seconds: float | None = None  # set by the first step when compiling
        self.best_knn = -math.inf
        self.stop_requested = False  # by on_step
        self.stop_signal: int | None = None  # SIGTERM or SIGINT received

    # -- checkpoints ------------------------------------------------------------------------------

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint: model, optimizer, RNG state and position."""
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this model/config: {e}") from None
        rngs = state["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:  # another number of processes: the augmentation stream can't continue, so restart it
            seed_everything(self.cfg.run.seed + 1_000_003 * int(state["step"]) + self.rank)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_knn = state.get("best_knn", -math.inf)
        self.echo(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    def save(self, metrics: dict) -> Path:
        """Write the last checkpoint (atomically), plus the kept ones: every `keep_every` epochs, the best kNN.

        Every process takes part (their RNG states are gathered); only the main process writes.
        """
        d = self.data
        rngs = dist.gather_objects(rng_state())
        if not self.main:
            return self.out_dir / LAST
        at_epoch_end = self.step == self.epoch * self.steps_per_epoch
        is_best = at_epoch_end and "knn_top1" in metrics and metrics["knn_top1"] >= self.best_knn
        if is_best:
            self.best_knn = metrics["knn_top1"]
        state = {"config": asdict(self.cfg), "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rng": rngs, "metrics": metrics,
                 "best_knn": self.best_knn,
                 "data": {"channels": d.train.channels, "size": d.size, "mean": d.mean, "std": d.std}}
        last = save_checkpoint(state, self.out_dir / LAST)
        keep = self.cfg.run.keep_every
        if at_epoch_end and keep > 0 and self.epoch % keep == 0:
            save_checkpoint(state, self.out_dir / f"checkpoint_epoch{self.epoch:04d}.pt")
        if is_best:
            save_checkpoint(state, self.out_dir / BEST)
        return last

    # -- one step ----------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One SGD step on this process's uint8 `images` (data-set indices `idx`, None when streamed);
        (loss, pretext accuracy), or None for a skipped non-finite step."""
        try:
            return self._train_step(images, idx)
        except RuntimeError as e:  # torch.OutOfMemoryError on accelerators, a RuntimeError on the CPU
            if not is_out_of_memory(e):
                raise
        raise OutOfMemory(self.cfg.data.batch_size, self.device, self.largest_batch())

    def largest_batch(self) -> int:
        """The largest batch (halving from the configured one) whose step fits in memory, state left unchanged."""
        state = copy.deepcopy(self.model.state_dict())
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        rng = rng_state()
        batch = self.cfg.data.batch_size // 2
        try:
            while batch >= self.cfg.model.bn_splits:
                try:
                    batch -= batch % self.cfg.model.bn_splits
                    d = self.data
                    self._train_step(torch.zeros(batch // self.world, d.train.channels, d.train.image_size,
                                                 d.train.image_size, dtype=torch.uint8), torch.arange(batch))
                    return batch
                except RuntimeError as e:
                    if not is_out_of_memory(e):
                        raise
                    batch //= 2
            return 0
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.load_state_dict(state)
            self.optimizer.load_state_dict(optimizer_state)
            set_rng_state(rng)

    def _train_step(self, images: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        images = images.to(self.device, non_blocking=True)  # (B, C, H, W) uint8
        x_q = self.augment(images).contiguous(memory_format=self.memory_format)  # (B, C, S, S)
        x_k = (self.augment(images).contiguous(memory_format=self.memory_format)
               if self.model.uses_key_view else None)  # (B, C, S, S)
        with torch.autocast(self.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits, labels = self.forward(x_q, x_k, None if idx is None else idx.to(self.device))  # (B, 1 + K), (B,)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.encoder_q.parameters() if p.grad is not None]
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():  # fp16's scaler skips overflowing steps itself and lowers its scale
            finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        if not finite.item():  # one host sync per step: a bad update must never reach the weights
            what = "loss" if not torch.isfinite(loss) else "gradient"
            if self.cfg.run.nonfinite == "stop":
                raise NonFiniteLoss(self.step + 1, what)
            self.skipped += 1
            self.echo(f"step {self.step + 1}: non-finite {what}, step skipped ({self.skipped} so far)")
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss.detach(), accuracy

    # -- the loop ------------------------------------------------------------------------------------

    def epoch_batches(self, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(uint8 images, their indices) of this process for the steps `first`.. of the current epoch.

        In memory, the order depends only on (seed, epoch), so a resumed run sees the same batches;
        process r takes block r of each global batch, as split BN's group r would. Streamed shards are
        reshuffled each epoch; a run resumed mid-epoch skips the batches already seen.
        """
        d, seed = self.cfg.data, self.cfg.run.seed
        train = self.data.train
        if isinstance(train, ShardStream):
            stream = train.batches(self.epoch, d.batch_size // self.world, seed)
            for _ in range(self.steps_per_epoch):
                images = next(stream)
                if first > 0:
                    first -= 1
                    continue
                yield images, None
            return
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + self.epoch))
        for i in range(first, self.steps_per_epoch):
            idx = order[i * d.batch_size : (i + 1) * d.batch_size].chunk(self.world)[self.rank]
            yield train.images[idx], idx

    def run_epoch(self, on_step: Callable[[int, nn.Module], bool | None] | None) -> dict | None:
        """Train the rest of epoch `self.epoch`; its metrics, or None when stopped before its end."""
        cfg, d, o, r = self.cfg, self.cfg.data, self.cfg.optim, self.cfg.run
        self.model.train()
        first = self.step - self.epoch * self.steps_per_epoch  # > 0 when resuming mid-epoch
        batches = self.epoch_batches(first)
        loss_sum = torch.zeros((), device=self.device)
        acc_sum = torch.zeros((), device=self.device)
        seen, tic = 0, time.perf_counter()
        rate_from = (0, tic)  # (steps seen, clock) that images/s counts from: after compilation
        bar = tqdm(range(first, self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{o.epochs}",
                   disable=not (r.progress and self.main), dynamic_ncols=True, leave=True)
        for i in bar:
            lr = lr_at(self.step, self.steps_per_epoch, o, d.batch_size)
            set_lr(self.optimizer, lr)
            step_tic = time.perf_counter()
            out = self.train_step(*next(batches))
            self.step += 1
            if r.compile and self.compile_seconds is None:
                synchronize(self.device)
                self.compile_seconds = time.perf_counter() - step_tic
                self.echo(f"torch.compile: first step {self.compile_seconds:.1f} s, compilation included "
                          "(left out of images/s)")
                rate_from = (seen + (out is not None), time.perf_counter())
            if out is not None:
                loss_sum += out[0]
                acc_sum += out[1]
                seen += 1
                if self.main and not self.watch.checked and self.step > self.watch.first_full_step:
                    self.watch.step(self.step, out[0].item())
            if seen > rate_from[0] and (seen % 20 == 0 or i == self.steps_per_epoch - 1):
                img_s = (seen - rate_from[0]) * d.batch_size / (time.perf_counter() - rate_from[1])
                values = {"loss": (loss_sum / seen).item(), "acc": 100 * (acc_sum / seen).item(), "lr": lr,
                          "img_s": img_s}
                bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['acc']:.1f}%", lr=f"{lr:.4f}",
                                img_s=f"{img_s:.0f}", refresh=False)
                if self.main:
                    self.metrics.log(self.step, "train", values)
            if on_step is not None and on_step(self.step, self.model):
                self.stop_requested = True
            if self.world > 1 and dist.any_process(self.stop_signal is not None, self.device):
                self.stop_signal = self.stop_signal or signal.SIGTERM  # all processes stop at the same step
            if (self.stop_requested or self.stop_signal is not None) and i < self.steps_per_epoch - 1:
                bar.close()
                self.save({"step": self.step, "stopped": True})
                return None
        bar.close()
        self.epoch += 1
        if not seen:
            raise NonFiniteLoss(self.step, "loss (every step of the epoch)")
        values = {"epoch": self.epoch, "loss": (loss_sum / seen).item(), "acc": 100 * (acc_sum / seen).item(),
                  "key_spread": key_spread(self.model.key_sample()), "seconds": time.perf_counter() - tic}
        if self.skipped:
            values["skipped_steps"] = self.skipped
        knn_every, last = r.knn_every, self.epoch == o.epochs
        if self.knn is not None and knn_every >= 0 and (last or (knn_every > 0 and self.epoch % knn_every == 0)):
            values.update({f"knn_{k}": v for k, v in self.knn(self.model.encoder_q.backbone).items()})
        if self.main:
            self.metrics.log(self.step, "epoch", values)
        self.echo("epoch {epoch}: loss {loss:.4f}, contrastive acc {acc:.1f}%, key spread {key_spread:.2f}, "
                  "{seconds:.0f} s".format(**values)
                  + (f", kNN top-1 {values['knn_top1']:.2f}%" if "knn_top1" in values else ""))
        if self.main:
            if first == 0 and self.epoch == 1:
                self.watch.epoch_end(values["loss"])
            check_collapse(values["key_spread"])
        self.save(values)
        return values

    def fit(self, on_step: Callable[[int, nn.Module], bool | None] | None = None,
            baselines: bool = True) -> PretrainResult:
        """Train to cfg.optim.epochs (or until `on_step` returns True); SIGTERM/SIGINT save and stop."""
        self.metrics = MetricsLog(self.out_dir, self.cfg.run.tensorboard) if self.main else None
        values: dict | None = {}
        with stop_on_signals(self):
            try:
                while self.epoch < self.cfg.optim.epochs:
                    values = self.run_epoch(on_step)
                    if self.stop_signal is not None:
                        raise Interrupted(self.stop_signal, self.out_dir / LAST, self.step)
                    if self.stop_requested:
                        break
            finally:
                if self.main:
                    self.metrics.close()
        knn = ({"top1": values["knn_top1"], "top5": values["knn_top5"]}
               if values and "knn_top1" in values else None)
        result = PretrainResult(self.out_dir, self.out_dir / LAST, self.epoch, (values or {}).get("loss", math.nan),
                                knn, compile_seconds=self.compile_seconds)
        if self.knn is not None and baselines:
            backbone = self.model.encoder_q.backbone
            if result.knn is None:
                result.knn = self.knn(backbone)
            result.baselines = {"raw pixels": self.knn.pixels(), "random encoder": self.knn(reinitialised(backbone))}
            self.echo(summary(result, self.cfg, self.data))
        return result


@contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """While training, SIGTERM and a first SIGINT ask for a checkpoint and a stop at the next step boundary;
    a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        if trainer.stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        trainer.echo(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
                     "(Ctrl-C again to stop at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def pretrain(
    cfg: PretrainConfig,
    resume: str | Path | None = None,
    backbone: nn.Module | None = None,
    baselines: bool = True,
    echo: Callable[[str], None] = print,
    on_step: Callable[[int, nn.Module], bool | None] | None = None,
) -> PretrainResult:
    """Pretrain as `cfg` says; resume from a checkpoint path if given.

    `backbone` replaces cfg.model.arch with any module mapping (B, C, H, W) images to (B, D) features.
    With `baselines`, the end also measures kNN on raw pixels and on a randomly initialised encoder.
    `on_step(step, model)` is called after every optimizer step; returning True stops the run (a
    checkpoint is saved, and the result returned).
    """
    trainer = Trainer(cfg, backbone, echo)
    if resume is not None:
        trainer.restore(resume)
    return trainer.fit(on_step, baselines)


def summary(result: PretrainResult, cfg: PretrainConfig, data: Data) -> str:
    r = cfg.run
    rows = [("this run's encoder", result.knn), *result.baselines.items()]
    lines = [f"kNN on {data.test.name} ({len(data.test)} images; weighted, k={r.knn_k}, t={r.knn_t}; "
             f"memory bank: {len(data.train)} training images)"]
    lines += [f"  {name:<24} top-1 {acc['top1']:6.2f}%   top-5 {acc['top5']:6.2f}%" for name, acc in rows]
    lines.append(f"checkpoint: {result.checkpoint}")
    return "\n".join(lines)
