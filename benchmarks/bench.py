"""`python -m benchmarks bench`: how fast the library pretrains, against a faithful reference, on one machine.

Two modes, each in one process, on the same data (Fashion-MNIST by default) and the same model:

throughput
    Images/s over whole training steps (augmentation, forward, backward, SGD and the loop's own work),
    after a warm-up, the median of several timed windows, for the library's `pretrain` and for the
    reference (`reference.py`: per-image PIL augmentation in DataLoader workers, the official model
    code). Also: model FLOPs per image of a training step, the FLOP/s the library achieves as a
    fraction of the machine's measured matmul peak (fp32, or bf16 under bf16 autocast), and peak memory.
time-to-accuracy
    kNN top-1 on the test split against training wall-clock time, within a fixed budget, for both;
    evaluation time is excluded from the budget and reported separately.

The reference runs first in both modes: the library's CPU set-up changes process-wide state that the
official recipe leaves alone (`runtime.keep_freed_memory`), and would otherwise carry over into it.

Each run replaces (same setup) or appends an entry in `<out>/<mode>-<machine>.json`, and the Markdown
page `<out>.md` (docs/benchmarks.md) is regenerated from all results files, never written by hand.
"""

import copy
import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moco import config as C
from moco.config import opt
from moco.data.augment import EvalTransform
from moco.data.training import TrainingData, load_training_data
from moco.errors import ConfigError
from moco.evaluate.features import extract_features
from moco.evaluate.knn import pixel_features, plain_knn_accuracy, vote_accuracy
from moco.extras import require
from moco.files import write_text
from moco.model import build_method
from moco.pipeline import PretrainResult, pretrain
from moco.runtime import autocast_dtype, resolve_device, seed_everything, synchronize
from moco.train.setup import check_pretrain_config

from .provenance import commit, machine_info
from .reference import reference_model, train_reference

MODES = ("throughput", "time-to-accuracy", "per-epoch")


@dataclass
class BenchSettings:
    """What `python -m benchmarks bench` measures; stored with every result."""

    mode: str = opt("throughput", "throughput | time-to-accuracy | per-epoch")
    preset: str = opt("cpu", "the pretraining recipe both implementations run")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    batch_size: int | None = opt(None, "images per step (default: the preset's)")
    threads: int | None = opt(None, "torch CPU threads (default: torch's)")
    train_subset: int | None = opt(None, "use only the first N training images")
    warmup: int = opt(10, "steps before the first timed window")
    steps: int = opt(20, "steps per timed window")
    windows: int = opt(5, "timed windows; the median is reported")
    workers: int | None = opt(None, "DataLoader worker processes of the reference (default: one per CPU core)")
    reference: bool = opt(True, "also measure the faithful reference implementation")
    profile: bool = opt(False, "also list the top operators of the library's step")
    minutes: float = opt(10.0, "time-to-accuracy: training budget of each implementation")
    every: float = opt(60.0, "time-to-accuracy: seconds of training between kNN evaluations")
    epochs: int | None = opt(None, "per-epoch: epochs of both runs' schedule, kNN after each (none: the preset's)")
    seed: int = opt(0, "seed of both runs")
    overrides: dict[str, str] = field(default_factory=dict)  # config fields changed from the preset's (--set)

    def __post_init__(self) -> None:
        if self.workers is None:
            self.workers = os.cpu_count() or 1

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if min(self.warmup, self.steps, self.windows) < 1:
            raise ConfigError("warmup, steps and windows must be >= 1")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.minutes <= 0 or self.every <= 0:
            raise ConfigError("minutes and every must be > 0")

    def setup(self) -> dict[str, Any]:
        """The settings that make two results comparable: a new result replaces an old one with the same."""
        keys = ["preset", "device", "batch_size", "threads", "train_subset", "workers", "reference"]
        if self.mode == "time-to-accuracy":
            keys += ["minutes", "every"]
        if self.mode == "per-epoch":
            keys.append("epochs")
        if self.overrides:
            keys.append("overrides")
        if self.mode != "throughput" and self.seed != 0:  # another seed is another sample, kept beside seed 0's
            keys.append("seed")
        return {k: getattr(self, k) for k in keys}

    def command(self) -> str:
        """The full command line that repeats this run."""
        args = ["python -m benchmarks bench", "--mode", self.mode, "--preset", self.preset, "--device", self.device,
                "--warmup", self.warmup, "--steps", self.steps, "--windows", self.windows, "--workers", self.workers,
                "--seed", self.seed]
        for flag, value in (("--batch-size", self.batch_size), ("--threads", self.threads),
                            ("--train-subset", self.train_subset)):
            if value is not None:
                args += [flag, value]
        if self.mode == "time-to-accuracy":
            args += ["--minutes", self.minutes, "--every", self.every]
        if self.mode == "per-epoch" and self.epochs is not None:
            args += ["--epochs", self.epochs]
        for name, value in self.overrides.items():
            args += ["--set", f"{name}={value}"]
        if not self.reference:
            args.append("--no-reference")
        if self.profile:
            args.append("--profile")
        return " ".join(str(a) for a in args)


def bench_config(s: BenchSettings, out_dir: str, epochs: int) -> C.PretrainConfig:
    """The preset's pretraining config, quiet (no monitor, bar or TensorBoard), for `epochs` epochs; its warm-up
    keeps its share of the schedule."""
    planned = C.apply_overrides(C.preset(s.preset), s.overrides).optim
    overrides: dict[str, Any] = {**s.overrides, "device": s.device, "threads": s.threads, "seed": s.seed,
                                 "out_dir": out_dir, "epochs": epochs, "knn_every": -1, "tensorboard": False,
                                 "progress": False, "warmup_epochs": planned.warmup_epochs / planned.epochs * epochs}
    if s.batch_size is not None:
        overrides["batch_size"] = s.batch_size
    if s.train_subset is not None:
        overrides["train_subset"] = s.train_subset
    return check_pretrain_config(C.apply_overrides(C.preset(s.preset), overrides))


# -- measuring -------------------------------------------------------------------------------------


class Windows:
    """on_step hook: times `windows` runs of `steps` optimizer steps after `warmup` steps, then stops training."""

    def __init__(self, warmup: int, steps: int, windows: int, device: torch.device) -> None:
        self.warmup, self.steps, self.windows, self.device = warmup, steps, windows, device
        self.marks: list[float] = []  # clock at the start of each window and at the end of the last

    def __call__(self, step: int, model: nn.Module) -> bool:
        if step >= self.warmup and (step - self.warmup) % self.steps == 0:
            synchronize(self.device)
            self.marks.append(time.perf_counter())
        return len(self.marks) > self.windows

    def images_per_second(self, batch_size: int) -> list[float]:
        return [self.steps * batch_size / (end - start) for start, end in zip(self.marks, self.marks[1:])]


def reset_peak_memory(device: torch.device) -> float:
    """Start new high-water marks of RSS and CUDA memory; returns the RSS now, in MiB.

    On Linux, writing 5 to /proc/self/clear_refs resets the RSS high-water mark that getrusage reports;
    elsewhere the mark keeps covering the whole process.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _maxrss_mib(resource.RUSAGE_SELF)


def _maxrss_mib(who: int) -> float:
    """getrusage's maximum resident set size in MiB (kilobytes on Linux, bytes on macOS)."""
    return resource.getrusage(who).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def timed(run: Callable[[Windows], None], s: BenchSettings, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Run a training loop under a `Windows` hook; its images/s (median and per window), peak memory, load."""
    hook = Windows(s.warmup, s.steps, s.windows, device)
    load_before = os.getloadavg()
    rss_start = reset_peak_memory(device)
    run(hook)
    per_window = hook.images_per_second(batch_size)
    result = {"img_s": round(statistics.median(per_window), 1), "windows": [round(v, 1) for v in per_window],
              "rss_start_mib": round(rss_start), "peak_rss_mib": round(_maxrss_mib(resource.RUSAGE_SELF)),
              "load_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    if device.type == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return result


def epochs_for_steps(steps: int, steps_per_epoch: int) -> int:
    """Enough epochs for `steps` steps, so the schedule never ends a measurement early."""
    return math.ceil(steps / steps_per_epoch) + 1


def measure_ours(s: BenchSettings, n_train: int, device: torch.device) -> dict[str, Any]:
    """Throughput of the library's own `pretrain` (all of its loop, checkpoints at epoch ends included)."""
    probe = bench_config(s, "", 1)
    batch = probe.data.batch_size
    epochs = epochs_for_steps(s.warmup + s.steps * s.windows, n_train // batch)
    runs: list[PretrainResult] = []
    with tempfile.TemporaryDirectory(prefix="moco-bench-") as tmp:
        cfg = bench_config(s, tmp, epochs)
        result = timed(lambda hook: runs.append(pretrain(cfg, baselines=False, echo=lambda _: None, on_step=hook)),
                       s, batch, device)
    if runs[0].compile_seconds is not None:  # the first step, before the warm-up ends and the windows start
        result["compile_s"] = round(runs[0].compile_seconds, 1)
    return result


def measure_reference(s: BenchSettings, data: TrainingData, device: torch.device) -> dict[str, Any]:
    """Throughput of the reference loop on the same images; also the largest worker's peak RSS."""
    cfg = bench_config(s, "", 1)
    batch = cfg.data.batch_size
    epochs = epochs_for_steps(s.warmup + s.steps * s.windows, len(data.train) // batch)
    seed_everything(s.seed)

    def run(hook: Windows) -> None:
        train_reference(cfg, data.train.images, data.size, data.mean, data.std, device, s.workers, hook, epochs)

    result = timed(run, s, batch, device)
    if s.workers:  # the workers have exited and been waited for when train_reference returns
        result["workers_peak_rss_mib"] = round(_maxrss_mib(resource.RUSAGE_CHILDREN))
    return result


def flops_per_image(model: nn.Module, batch: int, channels: int, size: int, device: torch.device,
                    memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Model FLOPs per image of one training step: query forward + backward, key forward, logits, loss.

    Counted by torch's FlopCounterMode (convolutions and matrix products; a multiply-add is 2 FLOPs) on
    a copy of `model`, whose state (queue, key encoder, BN statistics) is left untouched. The count
    does not depend on the pixel values, so random views stand in for augmented ones.
    """
    model = copy.deepcopy(model).train()
    views = torch.randn(2, batch, channels, size, size, device=device)  # (2, B, C, S, S)
    x_q, x_k = (v.contiguous(memory_format=memory_format) for v in views)  # (B, C, S, S) each
    with FlopCounterMode(display=False) as counter:
        logits, labels = model(x_q, x_k)  # (B, 1 + K), (B,)
        F.cross_entropy(logits, labels).backward()
    return counter.get_total_flops() / batch


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 20) -> float:
    """The machine's matmul FLOP/s in `dtype` as measured here: the fastest of `repeats` (n x n) @ (n x n)
    products.

    The fastest, not the median: a peak is what the machine can do, and a moment of load elsewhere on a
    shared host would otherwise lower it and inflate every fraction computed from it.
    """
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)  # (n, n) each
    out = torch.empty(n, n, device=device, dtype=dtype)  # (n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        tic = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        seconds.append(time.perf_counter() - tic)
    return 2 * n**3 / min(seconds)


def profile_ours(s: BenchSettings, n_train: int, device: torch.device, steps: int = 10,
                 top: int = 12) -> list[dict[str, Any]]:
    """The `top` operators of the library's step by self time, over `steps` steps after s.warmup steps.

    "ProfilerStep*" is the time of a step spent outside any operator: Python and the loop's own work.
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    batch = bench_config(s, "", 1).data.batch_size
    epochs = epochs_for_steps(s.warmup + steps, n_train // batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory(prefix="moco-bench-") as tmp:
        cfg = bench_config(s, tmp, epochs)
        with profile(activities=activities, schedule=schedule(wait=0, warmup=s.warmup, active=steps, repeat=1)) as prof:

            def hook(step: int, model: nn.Module) -> bool:
                prof.step()
                return step >= s.warmup + steps

            pretrain(cfg, baselines=False, echo=lambda _: None, on_step=hook)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    on_device = device.type == "cuda"  # then ranked by the device's time: the host mostly waits or queues
    ranked = sorted(events, key=lambda e: e.self_device_time_total if on_device else e.self_cpu_time_total,
                    reverse=True)[:top]
    rows = [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
             "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": round(e.count / steps, 1)}
            for e in ranked]
    if on_device:
        for row, e in zip(rows, ranked):
            row["device_ms_per_step"] = round(e.self_device_time_total / 1000 / steps, 2)
    return rows


# -- the two modes ----------------------------------------------------------------------------------


def throughput(s: BenchSettings, device: torch.device, echo: Callable[[str], None]) -> dict[str, Any]:
    """Both implementations' images/s, FLOPs per image, fraction of the matmul peak, peak memory."""
    probe = bench_config(s, "", 1)
    # Loaded once and held through both measurements, so both peak RSS figures include this copy.
    data = load_training_data(probe.data)
    channels, batch = data.train.channels, probe.data.batch_size
    memory_format = torch.channels_last if probe.run.channels_last else torch.contiguous_format
    ours_model = build_method(probe.model, channels, data.size).to(device, memory_format=memory_format)
    ours_flops = flops_per_image(ours_model, batch, channels, data.size, device, memory_format)
    if s.reference:  # built before any measurement: a config the reference cannot run fails at once
        reference_flops = flops_per_image(reference_model(probe, channels, data.size).to(device), batch, channels,
                                          data.size, device)
    # The peak of the dtype ours computes in: bf16 products under bf16 autocast, fp32 otherwise.
    dtype = autocast_dtype(probe.run.precision, device) or torch.float32
    peak_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    peak = matmul_peak(device, dtype)
    echo(f"{peak_dtype} matmul peak (2048^3, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    result: dict[str, Any] = {"matmul_peak_flops": round(peak), "matmul_peak_dtype": peak_dtype}
    if s.reference:  # first: ours changes process-wide settings (runtime.keep_freed_memory) the recipe does not
        reference = measure_reference(s, data, device)
        reference["flops_per_image"] = round(reference_flops)
        result["reference"] = reference
        echo(f"reference: {reference['img_s']:.0f} img/s (windows {reference['windows']}), peak RSS "
             f"{reference['peak_rss_mib']} MiB (+ workers {reference.get('workers_peak_rss_mib', 0)} MiB); "
             f"{reference_flops / 1e6:.1f} MFLOP per image and step")
    ours = measure_ours(s, len(data.train), device)
    ours["flops_per_image"] = round(ours_flops)
    achieved = ours_flops * ours["img_s"]
    result.update(ours=ours, achieved_flops=round(achieved), fraction_of_peak=round(achieved / peak, 4))
    echo(f"ours:      {ours['img_s']:.0f} img/s (windows {ours['windows']}), peak RSS {ours['peak_rss_mib']} MiB; "
         f"{ours_flops / 1e6:.1f} MFLOP per image and step -> {achieved / 1e9:.1f} GFLOP/s = "
         f"{100 * achieved / peak:.1f}% of the matmul peak")
    if "compile_s" in ours:
        echo(f"ours:      torch.compile {ours['compile_s']:g} s (the first step; outside the timed windows)")
    if s.reference:
        result["speedup"] = round(ours["img_s"] / result["reference"]["img_s"], 2)
        echo(f"ours / reference: {result['speedup']:.2f}x")
    for name in ("ours", "reference"):
        if name in result and max(result[name]["windows"]) > 1.25 * min(result[name]["windows"]):
            echo(f"  {name}: the windows range over more than 25%: the machine's load changed while measuring; "
                 "rerun when it is quiet")
    if s.profile:
        result["profile"] = profile_ours(s, len(data.train), device)
        echo("ours, top operators by self time:\n" + "\n".join(
            f"  {p['op']:<40} {p['ms_per_step']:8.2f} ms/step  {100 * p['share']:5.1f}%"
            + (f"  device {p['device_ms_per_step']:8.2f} ms/step" if "device_ms_per_step" in p else "")
            for p in result["profile"]))
    return result


class Deadline:
    """on_step hook for a training-time budget: kNN top-1 every `every` s of training, stop after `budget` s.

    The training clock starts when the hook is made and excludes the time spent evaluating, which is
    added up separately. Evaluations land on the first step past each mark, so their times are the
    actual training times, not the marks.
    """

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float]], budget: float, every: float,
                 device: torch.device) -> None:
        self.evaluate, self.budget, self.every, self.device = evaluate, budget, every, device
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.next = min(every, budget)
        self.points: list[dict[str, float]] = []
        self.last: tuple[int, nn.Module] | None = None  # the latest (step, model) seen

    def training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def __call__(self, step: int, model: nn.Module) -> bool:
        self.last = (step, model)
        if self.training_seconds() < self.next:
            return False
        synchronize(self.device)
        elapsed = self.training_seconds()
        self.record(step, model, elapsed)
        self.next = min((math.floor(elapsed / self.every) + 1) * self.every, self.budget)
        return elapsed >= self.budget

    def record(self, step: int, model: nn.Module, elapsed: float) -> None:
        tic = time.perf_counter()
        scores = self.evaluate(model)
        seconds = time.perf_counter() - tic
        self.eval_seconds += seconds
        self.points.append({"minutes": round(elapsed / 60, 3), "step": step,
                            **{name: round(value, 2) for name, value in scores.items()},
                            "eval_seconds": round(seconds, 1)})

    def finish(self) -> None:
        """Evaluate the final model when training ended (its epochs done) before the budget."""
        if self.last is not None and (not self.points or self.points[-1]["step"] != self.last[0]):
            self.record(*self.last, self.training_seconds())


# kNN protocols of the time-to-accuracy curves: (name, k, t), on cosine similarity. The first is the training
# loop's monitor (Wu et al. 2018, the official CIFAR demo); the second DINO's (Caron et al. 2021), which weighs
# the local neighbourhood more; the third (t None) textbook kNN, a majority vote of the 5 nearest, the
# classifier of the usual raw-pixel baseline.
KNN_PROTOCOLS = (("knn_top1", 200, 0.1), ("knn20_top1", 20, 0.07), ("knn5_top1", 5, None))


def knn_protocols(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Top-1 of every KNN_PROTOCOLS entry, from L2-normalised (features, labels) of the train and test sets."""
    return {name: vote_accuracy(*train, *test, k, t, "weighted" if t is not None else "majority")["top1"]
            for name, k, t in KNN_PROTOCOLS}


def protocol_label(protocol: dict[str, Any]) -> str:
    """"k=200" for a weighted vote, "5-NN" for a majority vote."""
    return f"k={protocol['k']}" if protocol["t"] is not None else f"{protocol['k']}-NN"


def curve_summary(points: list[dict[str, Any]]) -> str:
    """"1.5 min 83.09% / 86.06% / 86.50%, ...": every protocol at every checkpoint."""
    return ", ".join(f"{p['minutes']:.1f} min " + " / ".join(f"{p[n]:.2f}%" for n, _, _ in KNN_PROTOCOLS)
                     for p in points)


def knn_scoring(probe: C.PretrainConfig, device: torch.device, echo: Callable[[str], None],
                ) -> tuple[TrainingData, dict[str, Any], Callable[[nn.Module], dict[str, float]]]:
    """The training data, a result holding the raw pixels' scores, and the evaluation both implementations get:
    every KNN_PROTOCOLS entry on the query backbone's features of the training (bank) and test images."""
    data = load_training_data(probe.data)
    train, test = data.train, data.test
    transform = EvalTransform(data.size, data.mean, data.std).to(device)
    pixels = knn_protocols((pixel_features(train.images), train.labels), (pixel_features(test.images), test.labels))
    plain = plain_knn_accuracy(train.images / 255.0, train.labels, test.images / 255.0, test.labels, k=5)
    echo("raw pixels: " + ", ".join(f"{n} {v:.2f}%" for n, v in pixels.items())
         + f", textbook 5-NN (Euclidean) {plain:.2f}%")
    result: dict[str, Any] = {"raw_pixels": {**{n: round(v, 2) for n, v in pixels.items()},
                                             "plain_5nn_top1": round(plain, 2)},
                              "knn_protocols": [{"name": n, "k": k, "t": t} for n, k, t in KNN_PROTOCOLS]}

    def evaluate(model: nn.Module) -> dict[str, float]:
        backbone = model.encoder_q.backbone
        features = [extract_features(backbone, x.images, transform, device, channels_last=probe.run.channels_last)
                    for x in (train, test)]
        return knn_protocols((features[0], train.labels), (features[1], test.labels))

    return data, result, evaluate


class EveryEpoch:
    """on_step hook: the evaluation's scores after the last step of every epoch, echoed as they come."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float]], steps_per_epoch: int,
                 echo: Callable[[str], None]) -> None:
        self.evaluate, self.steps_per_epoch, self.echo = evaluate, steps_per_epoch, echo
        self.points: list[dict[str, float]] = []

    def __call__(self, step: int, model: nn.Module) -> bool:
        if step % self.steps_per_epoch == 0:
            scores = self.evaluate(model)
            self.points.append({"epoch": step // self.steps_per_epoch, "step": step,
                                **{name: round(value, 2) for name, value in scores.items()}})
            self.echo(json.dumps(self.points[-1]))
        return False


def per_epoch(s: BenchSettings, device: torch.device, echo: Callable[[str], None]) -> dict[str, Any]:
    """kNN top-1 after every epoch of the same schedule (s.epochs, or the preset's), for ours and the reference.

    Both train on the same images with the same recipe and seed, each with its own augmentation, loss, momentum
    update and learning-rate schedule (ours per step, the reference's per epoch, as the official code); the
    evaluation is the same function. This compares what an epoch of each teaches, whatever its speed.
    """
    probe = bench_config(s, "", 1)
    epochs = s.epochs or C.apply_overrides(C.preset(s.preset), s.overrides).optim.epochs
    data, result, evaluate = knn_scoring(probe, device, echo)
    steps_per_epoch = len(data.train) // probe.data.batch_size
    result["epochs"] = epochs
    if s.reference:
        seed_everything(s.seed)
        hook = EveryEpoch(evaluate, steps_per_epoch, lambda line: echo(f"reference {line}"))
        tic = time.perf_counter()
        train_reference(probe, data.train.images, data.size, data.mean, data.std, device, s.workers, hook, epochs)
        result["reference"] = {"curve": hook.points, "minutes": round((time.perf_counter() - tic) / 60, 2)}
        echo("reference: " + epoch_summary(hook.points))
    with tempfile.TemporaryDirectory(prefix="moco-bench-") as tmp:
        hook = EveryEpoch(evaluate, steps_per_epoch, lambda line: echo(f"ours {line}"))
        tic = time.perf_counter()
        pretrain(bench_config(s, tmp, epochs), baselines=False, echo=lambda _: None, on_step=hook)
        result["ours"] = {"curve": hook.points, "minutes": round((time.perf_counter() - tic) / 60, 2)}
    echo("ours: " + epoch_summary(result["ours"]["curve"]))
    return result


def epoch_summary(points: list[dict[str, Any]]) -> str:
    """"epoch 1 80.12%, epoch 2 ...": kNN k=200 after every epoch."""
    return ", ".join(f"epoch {p['epoch']} {p['knn_top1']:.2f}%" for p in points)


def time_to_accuracy(s: BenchSettings, device: torch.device, echo: Callable[[str], None]) -> dict[str, Any]:
    """kNN top-1 against training time within s.minutes, for ours and the reference, plus raw pixels.

    Each training clock starts before the implementation loads its data and builds its model, and
    stops at the budget. Each run's cosine schedule lasts the epochs that implementation is expected to
    finish in the budget (from its throughput, measured first), so it anneals its learning rate by the
    deadline as a run planned for that budget would: a longer schedule would be cut off at a high
    learning rate, a shorter one would end before the budget. Every checkpoint is scored with each kNN
    protocol (KNN_PROTOCOLS); raw pixels are scored the same way and with textbook kNN (Euclidean on the
    unnormalised pixels, majority of 5).
    """
    probe = bench_config(s, "", 1)
    data, result, evaluate = knn_scoring(probe, device, echo)
    batch, n_train = probe.data.batch_size, len(data.train)
    budget = 60 * s.minutes
    result["budget_minutes"] = s.minutes

    def planned_epochs(img_s: float) -> int:
        return max(1, math.ceil(budget * img_s / (n_train // batch * batch)))

    if s.reference:  # first, as in throughput()
        speed = measure_reference(s, data, device)
        epochs = planned_epochs(speed["img_s"])
        echo(f"reference: {speed['img_s']:.0f} img/s -> cosine schedule of {epochs} epochs")
        seed_everything(s.seed)
        hook = Deadline(evaluate, budget, s.every, device)
        own = load_training_data(probe.data)  # inside the clock, as pretrain's own loading is for ours
        train_reference(probe, own.train.images, own.size, own.mean, own.std, device, s.workers, hook, epochs)
        hook.finish()
        result["reference"] = {"img_s": speed["img_s"], "schedule_epochs": epochs, "curve": hook.points,
                               "eval_seconds": round(hook.eval_seconds, 1)}
        echo("reference: " + curve_summary(hook.points))
    speed = measure_ours(s, n_train, device)
    epochs = planned_epochs(speed["img_s"])
    echo(f"ours: {speed['img_s']:.0f} img/s -> cosine schedule of {epochs} epochs for {s.minutes:g} minutes")
    with tempfile.TemporaryDirectory(prefix="moco-bench-") as tmp:
        cfg = bench_config(s, tmp, epochs)
        hook = Deadline(evaluate, budget, s.every, device)
        pretrain(cfg, baselines=False, echo=lambda _: None, on_step=hook)
        hook.finish()
    result["ours"] = {"img_s": speed["img_s"], "schedule_epochs": epochs, "curve": hook.points,
                      "eval_seconds": round(hook.eval_seconds, 1)}
    echo("ours: " + curve_summary(hook.points))
    return result


# -- where results go ----------------------------------------------------------------------------------


def results_path(out: Path, mode: str, slug: str) -> Path:
    return out / f"{mode}-{slug}.json"


def read_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["entries"] if path.is_file() else []


def save_result(out: Path, entry: dict[str, Any]) -> Path:
    """Add `entry` to its machine's results file, replacing an entry with the same mode and setup."""
    path = results_path(out, entry["mode"], entry["machine"]["slug"])
    entries = [e for e in read_results(path) if e["setup"] != entry["setup"]] + [entry]
    write_text(path, json.dumps({"entries": entries}, indent=1) + "\n")
    return path


def table_path(out: Path) -> Path:
    """The Markdown page built from the results in `out`: docs/benchmarks -> docs/benchmarks.md."""
    return out.parent / f"{out.name}.md"


def plot_curve(path: Path, entry: dict[str, Any]) -> None:
    """kNN top-1 against training minutes (per-epoch mode: epochs), ours and the reference, with the raw-pixel levels:
    a panel a protocol."""
    require("matplotlib", "the benchmark (its plots)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = entry["result"]
    protocols = r["knn_protocols"]
    x = "epoch" if entry["mode"] == "per-epoch" else "minutes"
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        name = protocol["name"]
        for impl, style in (("ours", "o-"), ("reference", "s--")):
            if impl in r:
                curve = r[impl]["curve"]
                ax.plot([p[x] for p in curve], [p[name] for p in curve], style, label=impl)
        ax.axhline(r["raw_pixels"][name], color="gray", linestyle=":", label="raw pixels, same kNN")
        ax.axhline(r["raw_pixels"]["plain_5nn_top1"], color="gray", linestyle="-.", label="raw pixels, textbook 5-NN")
        title = (f"weighted kNN k={protocol['k']}, t={protocol['t']}" if protocol["t"] is not None
                 else f"majority of the {protocol['k']} nearest (cosine)")
        ax.set(title=title, xlabel="epoch" if x == "epoch" else "training minutes (evaluation excluded)",
               ylabel="top-1 (%)")
        ax.legend()
    fig.suptitle(f"{'Accuracy per epoch' if x == 'epoch' else 'Time to accuracy'} ({entry['machine']['slug']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def peak_note(result: dict[str, Any]) -> str:
    """" bf16" (or " fp16") when the peak is not fp32's: ours computed in that dtype."""
    dtype = result.get("matmul_peak_dtype", "fp32")
    return "" if dtype == "fp32" else f" {dtype}"


def machine_name(machine: dict[str, Any]) -> str:
    """The GPU's name, or the CPU's model name with AMX said (Xeons with and without it share one name)."""
    if "gpu" in machine:
        return machine["gpu"]
    return machine["cpu"] + (" with AMX" if "amx_bf16" in machine.get("isa", []) else "")


def spread(measured: dict[str, Any]) -> str:
    """Median images/s with the range of the windows, e.g. "2517 (2163-2548)"; a wide range means a busy machine.
    With torch.compile, its time (the first step) follows: "2517 (2163-2548); compile 41.2 s"."""
    compiled = f"; compile {measured['compile_s']:g} s" if "compile_s" in measured else ""
    return f"{measured['img_s']:.0f} ({min(measured['windows']):.0f}-{max(measured['windows']):.0f}){compiled}"


def recipe(settings: dict[str, Any]) -> str:
    """The preset and the fields changed from it, e.g. "cpu" or "cpu (width=32)"."""
    changed = settings.get("overrides") or {}
    return settings["preset"] + (f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def write_table(out: Path) -> Path:
    """Regenerate the Markdown page from every results file in `out`."""
    entries = sorted((e for p in sorted(out.glob("*.json")) for e in read_results(p)), key=lambda e: e["date"])
    runs = [e for e in entries if e["mode"] == "throughput"]
    curves = [e for e in entries if e["mode"] == "time-to-accuracy"]
    epoch_curves = [e for e in entries if e["mode"] == "per-epoch"]
    title = "Benchmarks" if out.name == "benchmarks" else f"Benchmark runs: {out.name}"
    lines = [f"# {title}", "",
             f"Generated by `python -m benchmarks bench` from the results files in `{out.name}/`; rerun it (or edit those files), "
             "do not edit this page."]
    throughput_lines = ["", "## Throughput", "",
             "Images/s over whole training steps (augmentation included) after a warm-up, median of the timed "
             "windows (their range in brackets: a wide range means the machine was busy), both implementations in "
             "one process on the same data and model, the reference first (ours then changes process-wide "
             "settings, such as glibc's malloc options, that the official recipe does not). *Ours* is the library's `pretrain`; the *reference* follows "
             "the official recipe (per-image PIL augmentation in DataLoader workers, the official model code; "
             "`benchmarks/reference.py`). FLOPs per image count one training step (query forward + "
             "backward, key forward; a multiply-add is 2 FLOPs); the peak is the fastest of 20 2048x2048 "
             "`torch.mm` measured in the same process, in the dtype ours computes in (fp32; bf16 marked so, under "
             "bf16 autocast). Peak RSS includes Python, torch and the data set; the reference's workers are "
             "extra processes. Load is the 1-minute load average before and after each measurement (compare it "
             "with the number of cores).", "",
             "| machine | device, threads | preset, batch | ours img/s | reference img/s | ours / ref | "
             "MFLOP/img | ours GFLOP/s (of peak) | peak RSS MiB ours / ref (+workers) | load ours; ref | commit | "
             "date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if runs:  # a folder of time-to-accuracy runs alone has no throughput section
        lines += throughput_lines
    for e in runs:
        m, st, r = e["machine"], e["settings"], e["result"]
        ours, ref = r["ours"], r.get("reference")
        load = "{:.1f}-{:.1f}".format(*ours["load_1min"]) + (
            "; {:.1f}-{:.1f}".format(*ref["load_1min"]) if ref else "")
        rss = f"{ours['peak_rss_mib']} / " + (
            f"{ref['peak_rss_mib']} (+{ref.get('workers_peak_rss_mib', 0)})" if ref else "-")
        lines.append(
            f"| {machine_name(m)}, {m['cores']} cores | {m['device']}, {m['threads']} | {recipe(st)}, {e['batch_size']} | "
            f"{spread(ours)} | {spread(ref) if ref else '-'} | {str(r['speedup']) + 'x' if ref else '-'} | "
            f"{ours['flops_per_image'] / 1e6:.1f} | {r['achieved_flops'] / 1e9:.1f} "
            f"({100 * r['fraction_of_peak']:.1f}% of {r['matmul_peak_flops'] / 1e9:.0f}{peak_note(r)}) | {rss} | {load} | "
            f"`{e['commit']}` | {e['date'][:10]} |")
    for e in runs:
        if "profile" in e["result"]:
            rows = e["result"]["profile"]
            on_device = "device_ms_per_step" in rows[0]
            lines += ["", f"### Where ours spends a step: {machine_name(e['machine'])}, {e['date'][:10]}", "",
                      ("Top operators and kernels by the device's self time (torch.profiler), with the host's; "
                       "`ProfilerStep*`'s device time spans the whole step, profiler's overhead included."
                       if on_device else "Top operators by self time (torch.profiler); `ProfilerStep*` is time "
                       "outside any operator (Python, the loop itself)."), "",
                      "| operator | ms/step | share | calls/step |" + (" device ms/step |" if on_device else ""),
                      "|---|---|---|---|" + ("---|" if on_device else "")]
            lines += [f"| `{p['op'][:90]}` | {p['ms_per_step']:.2f} | {100 * p['share']:.1f}% | {p['calls_per_step']:g} |"
                      + (f" {p['device_ms_per_step']:.2f} |" if on_device else "") for p in rows]
    if curves:
        lines += ["", "## Time to accuracy", "",
                  "kNN top-1 on the 10,000 test images, against the training set, at checkpoints of a fixed "
                  "training-time budget; evaluation time is excluded from the budget. Each run's cosine schedule is "
                  "sized to the epochs it is expected to finish in the budget. kNN protocols on cosine similarity: "
                  "two weighted votes (votes exp(sim/t)), k=200, t=0.1 (the training loop's monitor, as in the "
                  "official CIFAR demo) and k=20, t=0.07 (DINO's), and 5-NN, a plain majority vote of the 5 "
                  "nearest (results from commit 04c2f35 on). Raw pixels are scored with each, and with textbook kNN "
                  "(Euclidean on the unnormalised pixels, majority of the 5 nearest)."]
    for e in curves:
        r = e["result"]
        names = [n for n in ("ours", "reference") if n in r]
        protocols = r["knn_protocols"]
        pixels = r["raw_pixels"]
        lines += ["", f"### {machine_name(e['machine'])}, {r['budget_minutes']:g} minutes, {e['date'][:10]} "
                  f"(`{e['commit']}`)", "",
                  "Raw pixels: " + ", ".join(f"{protocol_label(p)} {pixels[p['name']]:.2f}%" for p in protocols)
                  + f", textbook 5-NN (Euclidean) {pixels['plain_5nn_top1']:.2f}%. " + " ".join(
                      f"{n}: {r[n]['img_s']:.0f} img/s, schedule {r[n]['schedule_epochs']} epochs, "
                      f"evaluation {r[n]['eval_seconds']:.0f} s." for n in names),
                  f"Load (1 min) at the start: {e['load_1min'][0]:.1f}. Command: `{e['command']}`", "",
                  "| checkpoint | " + " | ".join(
                      f"{n}: minutes, step, " + " / ".join(protocol_label(p) for p in protocols) for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for i in range(max(len(r[n]["curve"]) for n in names)):
            cells = []
            for n in names:
                curve = r[n]["curve"]
                cells.append(f"{curve[i]['minutes']:.2f}, {curve[i]['step']}, "
                             + " / ".join(f"**{curve[i][p['name']]:.2f}%**" for p in protocols)
                             if i < len(curve) else "")
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        lines += ["", f"![time to accuracy]({out.name}/{e['plot']})"]
    lines += epoch_table(epoch_curves, out.name)
    from .data_path import table as data_table

    lines += data_table([e for e in entries if e["mode"] == "data"], machine_name)
    path = table_path(out)
    write_text(path, "\n".join(lines) + "\n")
    return path


def epoch_table(entries: list[dict[str, Any]], folder: str) -> list[str]:
    """The per-epoch section: kNN after every epoch of the same schedule, ours and the reference side by side."""
    if not entries:
        return []
    lines = ["", "## Accuracy per epoch", "",
             "kNN top-1 on the 10,000 test images after every epoch, ours and the reference trained with the same "
             "recipe, schedule length and seed, each with its own augmentation, loss and momentum code; the "
             "evaluation is the same function (the protocols of the time-to-accuracy section). First the summaries "
             "over seeds, then every run."]
    lines += seed_table(entries)
    for e in entries:
        r = e["result"]
        protocols = r["knn_protocols"]
        names = [n for n in ("ours", "reference") if n in r]
        lines += ["", f"### {machine_name(e['machine'])}, {recipe(e['settings'])}, {r['epochs']} epochs, "
                  f"seed {e['settings']['seed']}, {e['date'][:10]} (`{e['commit']}`)", "",
                  " ".join(f"{n}: {r[n]['minutes']:.1f} minutes in all, evaluation included." for n in names)
                  + f" Command: `{e['command']}`", "",
                  "| epoch | " + " | ".join(f"{n}: " + " / ".join(protocol_label(p) for p in protocols)
                                          for n in names) + (" | ours - reference, k=200 |" if len(names) == 2 else " |"),
                  "|---|" + "---|" * (len(names) + (len(names) == 2))]
        for i, point in enumerate(r["ours"]["curve"]):
            cells = [" / ".join(f"{r[n]['curve'][i][p['name']]:.2f}" for p in protocols)
                     if i < len(r[n]["curve"]) else "" for n in names]
            if len(names) == 2 and i < len(r["reference"]["curve"]):
                cells.append(f"{point['knn_top1'] - r['reference']['curve'][i]['knn_top1']:+.2f}")
            lines.append(f"| {point['epoch']} | " + " | ".join(cells) + " |")
        lines += ["", f"![accuracy per epoch]({folder}/{e['plot']})"]
    return lines


def _setup_key(e: dict[str, Any], *ignored: str) -> str:
    """Machine and setup of a results entry, less the seed and `ignored` setup fields, as a dictionary key."""
    setup = {k: v for k, v in e["setup"].items() if k not in ("seed", *ignored)}
    return json.dumps([machine_name(e["machine"]), e["machine"]["slug"], setup], sort_keys=True)


def with_stored_reference(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch runs of ours alone (`--no-reference`), each given the reference curve of the latest stored run
    with the same seed, machine and setup; runs with no such run are left out.

    While `benchmarks/reference.py` and the encoder it builds are unchanged, the reference trains the same program
    from the same seed whatever our commit, so a stored run of it pairs with a later run of ours as a fresh one
    would, at a third of the cost; after such a change, run the reference again. The copy names the reference's
    commit in ``reference_commit``."""
    stored = {(_setup_key(e, "reference"), e["settings"]["seed"]): e for e in entries if "reference" in e["result"]}
    paired = []
    for e in (e for e in entries if "reference" not in e["result"]):
        match = stored.get((_setup_key(e, "reference"), e["settings"]["seed"]))
        if match is not None:
            result = {**e["result"], "reference": match["result"]["reference"]}
            paired.append({**e, "result": result, "reference_commit": match["commit"]})
    return paired


def seed_groups(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Per-epoch runs of both implementations that differ only in the seed, grouped (machine and setup alike),
    groups of two seeds or more, in the order of their first run. Runs of ours alone join with their stored
    reference (`with_stored_reference`), in groups of their own."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in [e for e in entries if "reference" in e["result"]] + with_stored_reference(entries):
        groups.setdefault(_setup_key(e), []).append(e)
    return [g for g in groups.values() if len({e["settings"]["seed"] for e in g}) >= 2]


def seed_summary(group: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per epoch, over the seeds of `group`: the mean kNN (k=200) of ours and of the reference, and the mean of
    their paired difference (ours - reference) with its standard deviation, standard error and the number of seeds
    at or above the reference."""
    rows = []
    for i in range(min(min(len(e["result"][n]["curve"]) for n in ("ours", "reference")) for e in group)):
        ours = [e["result"]["ours"]["curve"][i]["knn_top1"] for e in group]
        reference = [e["result"]["reference"]["curve"][i]["knn_top1"] for e in group]
        diff = [o - r for o, r in zip(ours, reference)]
        sd = statistics.stdev(diff)
        rows.append({"epoch": group[0]["result"]["ours"]["curve"][i]["epoch"], "ours": statistics.fmean(ours),
                     "reference": statistics.fmean(reference), "diff": statistics.fmean(diff), "sd": sd,
                     "se": sd / math.sqrt(len(diff)), "at_or_above": sum(d >= 0 for d in diff)})
    return rows


def seed_table(entries: list[dict[str, Any]]) -> list[str]:
    """The per-epoch section's summary over seeds: one table for each group of runs that differ only in the seed."""
    lines = []
    for group in seed_groups(entries):
        e, n = group[0], len(group)
        seeds = ", ".join(str(s) for s in sorted(x["settings"]["seed"] for x in group))
        commits = ", ".join(dict.fromkeys(f"`{x['commit']}`" for x in group))
        source, alone = f"the runs below; commits {commits}", ""
        if "reference_commit" in e:
            stored = ", ".join(dict.fromkeys(f"`{x['reference_commit']}`" for x in group))
            source = (f"ours: the runs of ours alone below, commits {commits}; the reference: the stored runs of the "
                      f"same seeds, commits {stored}")
            alone = ", ours alone against the stored reference"
        lines += ["", f"### Over {n} seeds: {machine_name(e['machine'])}, {recipe(e['settings'])}, "
                  f"{e['result']['epochs']} epochs{alone}", "",
                  f"Seeds {seeds} ({source}). kNN k=200: the mean of each implementation, "
                  "and ours - reference paired by seed: its mean, standard deviation (SD) and standard error of the "
                  "mean (SE = SD / sqrt(seeds)); a mean within about two SE of 0 cannot be told from no difference.",
                  "", "| epoch | ours, mean | reference, mean | ours - reference: mean | SD | SE | seeds at or above |",
                  "|---|---|---|---|---|---|---|"]
        for r in seed_summary(group):
            lines.append(f"| {r['epoch']} | {r['ours']:.2f} | {r['reference']:.2f} | {r['diff']:+.2f} | "
                         f"{r['sd']:.2f} | {r['se']:.2f} | {r['at_or_above']} of {n} |")
    return lines


def bench(s: BenchSettings, out: str | Path = "docs/benchmarks", echo: Callable[[str], None] = print) -> Path:
    """Run one benchmark, save its entry in its results file, regenerate the Markdown page; returns the file."""
    s.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(s.device)
    s = replace(s, device=str(device))  # results of "auto" and of the device it picked are the same setup
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    load = os.getloadavg()
    echo(f"benchmarks bench {s.mode}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    if load[0] > 0.5 * (os.cpu_count() or 1):
        echo("  (the machine is busy: figures will be low and noisy)")
    tic = time.perf_counter()
    result = {"throughput": throughput, "time-to-accuracy": time_to_accuracy, "per-epoch": per_epoch}[s.mode](
        s, device, echo)
    entry = {"mode": s.mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
             "command": s.command(), "machine": machine_info(device),
             "load_1min": [round(load[0], 2), round(os.getloadavg()[0], 2)],
             "seconds": round(time.perf_counter() - tic, 1), "batch_size": bench_config(s, "", 1).data.batch_size,
             "setup": s.setup(), "settings": asdict(s), "result": result}
    if s.mode != "throughput":
        # One file per setup: "-v3-cpu" for another preset, "-width-24" for --set width=24, "-ours" alone.
        variant = ("" if s.preset == C.DEFAULT_PRESET else f"-{s.preset}")
        variant += "".join(f"-{k}-{v}" for k, v in s.overrides.items()) + ("" if s.reference else "-ours")
        variant += f"-seed{s.seed}" if s.seed != 0 else ""
        length = f"{s.minutes:g}min" if s.mode == "time-to-accuracy" else f"{result['epochs']}ep"
        name = f"{s.mode}-{entry['machine']['slug']}-{length}{variant}"
        entry["plot"] = re.sub(r"[^A-Za-z0-9._-]+", "-", name) + ".png"
        plot_curve(out / entry["plot"], entry)
    path = save_result(out, entry)
    echo(f"wrote {path} and {write_table(out)}")
    return path
