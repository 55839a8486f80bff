"""The pretraining loop: uint8 batches -> two augmented views -> method -> loss -> optimizer step.

What a run observes and writes (metrics, progress, diagnostics, the kNN monitor, checkpoints) are hooks
the loop calls at fixed points; `moco.pipeline.pretrain` assembles the usual ones.
"""

import copy
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist
from ..config import PretrainConfig, from_dict
from ..data.augment import build_augment
from ..data.training import TrainingData
from ..errors import CheckpointError, Interrupted, NonFiniteLoss, OutOfMemory
from ..model import Method
from ..runtime import autocast_dtype, rng_state, seed_everything, set_rng_state, synchronize
from .optim import build_optimizer, pretrain_lr, set_lr
from .signals import StopSignals

NONFINITE_ADVICE = ("the run stopped and its last good checkpoint is kept. Likely causes: a learning rate too high "
                    "(lower --lr or add --warmup-epochs), a temperature too small (raise --temperature); "
                    "--nonfinite skip skips such steps instead")


class StepOutput(NamedTuple):
    loss: torch.Tensor  # () on the device, detached
    accuracy: torch.Tensor  # () pretext accuracy: the share of queries whose positive scores highest


class Hook:
    """A part of a pretraining run that the loop calls at fixed points. Every method is optional; hooks
    run in the order given, so one that adds to an epoch's values comes before one that records them."""

    def on_start(self, trainer: "Trainer") -> None:
        """Before the first step (of this process's run: after a resume, at the resumed position)."""

    def on_epoch_start(self, trainer: "Trainer") -> None:
        """Before the first step of an epoch (or of its rest, after a resume mid-epoch)."""

    def on_step(self, trainer: "Trainer", out: StepOutput | None) -> bool | None:
        """After every optimizer step (`out` None for a skipped non-finite step); True asks the run to stop."""

    def on_epoch_end(self, trainer: "Trainer", values: dict[str, Any]) -> None:
        """After an epoch's last step, with its metrics, which the hook may read or add to."""

    def on_stop(self, trainer: "Trainer") -> None:
        """The run stops before the end of an epoch (a signal, or a hook asked): the place to save."""

    def on_end(self, trainer: "Trainer") -> None:
        """Last, whatever happened (the run finished, stopped or failed)."""


class Trainer:
    """A pretraining run in progress: the method, its optimizer and augmentation, the data, and the position.

    Position: `epoch` completed epochs and `step` optimizer steps. A checkpoint may be taken mid-epoch (on
    SIGTERM/SIGINT), and the data order depends only on (seed, epoch), so a resumed run continues exactly
    where it stopped. Under torchrun every process runs a Trainer on its block of each global batch.
    """

    def __init__(self, cfg: PretrainConfig, method: Method, data: TrainingData, device: torch.device,
                 echo: Callable[[str], None] = print) -> None:
        m, d, r = cfg.model, cfg.data, cfg.run
        self.cfg, self.data, self.device = cfg, data, device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0  # only the main process logs, draws the bar and writes files
        self.echo = echo if self.main else (lambda line: None)
        self.steps_per_epoch = len(data.train) // d.batch_size  # the last partial batch is dropped (split BN)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
        self.method = method.to(device, memory_format=self.memory_format)
        self.precropped = data.train.precropped  # streamed data: two views cut while decoding, (B, 2, C, S, S)
        self.augment_q, self.augment_k = (  # MoCo v3's views are augmented differently; v1/v2's alike
            build_augment(d.augment, data.size, data.mean, data.std, d.crop_min_scale, d.jitter_strength,
                          crop=not self.precropped, view=view, blur_sigma=d.blur_sigma).to(device)
            for view in (0, 1))
        self.optimizer = build_optimizer(method.trainable_parameters(), cfg.optim, d.batch_size)
        if m.sync_bn and self.world > 1:
            method.convert_sync_bn()
        # DDP averages the trained gradients; buffers stay out of its broadcast (every process pushes the same
        # gathered keys into its queue, so the queues agree without copying them each step).
        self.forward = (DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                                broadcast_buffers=False) if self.world > 1 else method)
        self.amp_dtype = autocast_dtype(r.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        if r.compile:
            method.compile_encoders()
        self.epoch, self.step, self.skipped = 0, 0, 0
        self.compile_seconds: float | None = None  # with run.compile: the first step, compilation included
        self.hooks: list[Hook] = []
        self.stop_requested = False  # by a hook
        self.signals = StopSignals(self.echo)
        self.stop_signal: int | None = None  # SIGTERM or SIGINT received (here, or by another process)
        self.loss_sum = torch.zeros((), device=device)  # of the epoch's steps so far
        self.acc_sum = torch.zeros((), device=device)
        self.seen = 0  # the epoch's steps that were not skipped
        self.batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # from the position on

    # -- position and checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs, and where evaluation finds the backbone in it (`backbone`: its prefix in
        `model`); every process takes part (their RNG states are gathered)."""
        backbone = next(name for name, module in self.method.named_modules() if module is self.method.backbone)
        return {"config": asdict(self.cfg), "epoch": self.epoch, "step": self.step,
                "model": self.method.state_dict(), "backbone": backbone, "optimizer": self.optimizer.state_dict(),
                "rng": dist.gather_objects(rng_state()), "data": self.data.input_spec()}

    def restore(self, state: dict[str, Any], path: str) -> None:
        """Continue from a checkpoint's `state` (read from `path`): model, optimizer, RNG state and position."""
        self._check_fits(state["model"], from_dict(state["config"]), path)
        try:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this run: {str(e).splitlines()[0][:300]}") from None
        rngs = state["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:  # another number of processes: the augmentation stream can't continue, so restart it
            seed_everything(self.cfg.run.seed + 1_000_003 * int(state["step"]) + self.rank)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.echo(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    def _check_fits(self, weights: dict[str, torch.Tensor], stored: PretrainConfig, path: str) -> None:
        """A summary of how a checkpoint's tensors differ from this model's, and the likely cause."""
        own = self.method.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        reshaped = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
        if not (missing or unexpected or reshaped):
            return
        parts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})" for names, what in
                 ((missing, "of this model's tensors are not in it"), (unexpected, "of its tensors are not this "
                  "model's"), (reshaped, "have another shape"))
                 if names]
        changed = [f"{k}={v!r} (stored: {getattr(stored.model, k)!r})" for k, v in vars(self.cfg.model).items()
                   if getattr(stored.model, k) != v]
        cause = (f"this run changes the model: {', '.join(changed)}; drop those flags to continue the run, or start "
                 "a new run in another --out-dir" if changed else "it was written for another model")
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(parts)}. {cause}")

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self, hooks: Sequence[Hook] = ()) -> dict[str, Any] | None:
        """Train to cfg.optim.epochs, or until a hook asks to stop; SIGTERM/SIGINT save and raise Interrupted.

        Returns the metrics of the last completed epoch (None if none completed).
        """
        self.hooks = list(hooks)
        values = None
        for hook in self.hooks:
            hook.on_start(self)
        try:
            with self.signals.active():
                while self.epoch < self.cfg.optim.epochs:
                    values = self.run_epoch() or values
                    if self.stop_signal is not None:
                        raise Interrupted(signal.Signals(self.stop_signal).name, self.stop_signal,
                                          str(self.cfg.run.out_dir), self.step)
                    if self.stop_requested:
                        break
        finally:
            for hook in self.hooks:
                hook.on_end(self)
        return values

    def run_epoch(self) -> dict[str, Any] | None:
        """Train the rest of epoch `self.epoch`; its metrics, or None when stopped before its end."""
        self.method.train()
        first = self.step_in_epoch  # > 0 when resuming mid-epoch
        if self.batches is None:  # this process's share of every step from here on (data.order: resumable)
            self.batches = self.data.train.batches(self.epoch, first, self.cfg.data.batch_size, self.cfg.run.seed)
        self.loss_sum = torch.zeros((), device=self.device)
        self.acc_sum = torch.zeros((), device=self.device)
        self.seen, tic = 0, time.perf_counter()
        for hook in self.hooks:
            hook.on_epoch_start(self)
        for i in range(first, self.steps_per_epoch):
            self.method.before_step(self.step / self.total_steps)
            set_lr(self.optimizer, self.lr)
            step_tic = time.perf_counter()
            out = self.train_step(*next(self.batches))
            self.step += 1
            if self.cfg.run.compile and self.compile_seconds is None:
                synchronize(self.device)
                self.compile_seconds = time.perf_counter() - step_tic
                self.echo(f"torch.compile: first step {self.compile_seconds:.1f} s, compilation included "
                          "(left out of images/s)")
            if out is not None:
                self.loss_sum += out.loss
                self.acc_sum += out.accuracy
                self.seen += 1
            if any([bool(hook.on_step(self, out)) for hook in self.hooks]):
                self.stop_requested = True
            self.stop_signal = self.stop_signal or self.signals.received
            if self.world > 1 and dist.any_process(self.stop_signal is not None, self.device):
                self.stop_signal = self.stop_signal or signal.SIGTERM  # all processes stop at the same step
            if (self.stop_requested or self.stop_signal is not None) and i < self.steps_per_epoch - 1:
                for hook in self.hooks:
                    hook.on_stop(self)
                return None
        self.epoch += 1
        if not self.seen:
            raise NonFiniteLoss("loss (every step of the epoch)", self.step, NONFINITE_ADVICE)
        values = {"epoch": self.epoch, "loss": (self.loss_sum / self.seen).item(),
                  "acc": 100 * (self.acc_sum / self.seen).item(), "seconds": time.perf_counter() - tic}
        if self.skipped:
            values["skipped_steps"] = self.skipped
        for hook in self.hooks:
            hook.on_epoch_end(self, values)
        return values

    @property
    def step_in_epoch(self) -> int:
        """Steps done of the current epoch (0 at its start; > 0 after a resume mid-epoch)."""
        return self.step - self.epoch * self.steps_per_epoch

    @property
    def lr(self) -> float:
        """The learning rate of the current step."""
        return pretrain_lr(self.step, self.steps_per_epoch, self.cfg.optim, self.cfg.data.batch_size)

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, idx: torch.Tensor | None) -> StepOutput | None:
        """One optimizer step on this process's uint8 `images` (data-set indices `idx`, None when streamed);
        None for a skipped non-finite step."""
        try:
            return self._train_step(images, idx)
        except RuntimeError as e:  # torch.OutOfMemoryError on accelerators, a RuntimeError on the CPU
            if not is_out_of_memory(e):
                raise
        raise OutOfMemory(self.cfg.data.batch_size, str(self.device), self.largest_batch())

    def _train_step(self, images: torch.Tensor, idx: torch.Tensor | None) -> StepOutput | None:
        images = images.to(self.device, non_blocking=True)  # (B, C, H, W) uint8, or (B, 2, C, S, S) when precropped
        q, k = (images[:, 0], images[:, 1]) if self.precropped else (images, images)  # each view from its own
        x_q = self.augment_q(q).contiguous(memory_format=self.memory_format)  # (B, C, S, S)
        x_k = (self.augment_k(k).contiguous(memory_format=self.memory_format)
               if self.method.needs_key_view else None)  # (B, C, S, S)
        with torch.autocast(self.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits, labels = self.forward(x_q, x_k, None if idx is None else idx.to(self.device))  # (B', C), (B',)
        loss = self.method.loss(logits, labels)  # in fp32
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():  # fp16's scaler skips overflowing steps itself and lowers its scale
            grads = [p.grad for p in self.method.trainable_parameters() if p.grad is not None]
            finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        if not finite.item():  # one host sync per step: a bad update must never reach the weights
            what = "loss" if not torch.isfinite(loss) else "gradient"
            if self.cfg.run.nonfinite == "stop":
                raise NonFiniteLoss(what, self.step + 1, NONFINITE_ADVICE)
            self.skipped += 1
            self.echo(f"step {self.step + 1}: non-finite {what}, step skipped ({self.skipped} so far)")
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return StepOutput(loss.detach(), accuracy)

    def largest_batch(self) -> int:
        """The largest batch (halving from the configured one) whose step fits in memory, state left unchanged."""
        state = copy.deepcopy(self.method.state_dict())
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        rng = rng_state()
        splits = self.cfg.model.bn_splits
        batch = self.cfg.data.batch_size // 2
        train = self.data.train
        try:
            while batch >= splits:
                batch -= batch % splits
                shape = (2,) * self.precropped + (train.channels, train.image_size, train.image_size)
                try:
                    self._train_step(torch.zeros(batch // self.world, *shape, dtype=torch.uint8), torch.arange(batch))
                    return batch
                except RuntimeError as e:
                    if not is_out_of_memory(e):
                        raise
                    batch //= 2
            return 0
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.method.load_state_dict(state)
            self.optimizer.load_state_dict(optimizer_state)
            set_rng_state(rng)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)

