"""Typed configuration: dataclasses, named presets, YAML files and command-line overrides.

A run's config is resolved as: defaults of the preset -> YAML file -> command-line flags, then
validated before any work starts, printed, and stored in every checkpoint.
"""

import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .runtime import PRECISIONS

DEFAULT_PRESET = "cpu"  # the README's main job
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "lars", "adamw")
NONFINITE = ("stop", "skip")
LOADERS = ("auto", "memory", "stream")
DEVICES = r"auto|cpu|mps|cuda(:\d+)?"  # what --device accepts


def opt(default: Any, help: str) -> Any:
    """A config field with its default and the help text the command line shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The encoder and the contrastive task."""

    method: str = opt("moco", "moco (v1/v2: queue + momentum encoder) | end_to_end | memory_bank (paper Fig. 2) | "
                              "mocov3 (no queue, predictor, symmetric loss), or a method registered with "
                              "moco.register (on the command line: --import its module)")
    arch: str = opt("small_cnn", "small_cnn | resnet18 | resnet34 | resnet50 | vit_tiny | vit_small | vit_base")
    width: int = opt(16, "small_cnn only: channels of the first stage (then 2x, 4x, 8x)")
    last_width: int | None = opt(None, "small_cnn only: channels of the last stage, the feature width (none: 8x "
                                       "width)")
    depths: list[int] = opt([1, 1, 1, 1], "small_cnn only: conv-BN-ReLU layers in each of its 4 stages")
    small_stem: bool = opt(True, "resnets: 3x3 stride-1 stem, no max-pool (for 28-64 px images)")
    patch_size: int | None = opt(None, "ViTs: patch side in pixels (none: 16 from 112 px images up, else 4)")
    head: str = opt("mlp", "linear (v1) | mlp (v2) | v3 (MLP with BN: 2 layers, 3 on ViTs)")
    dim: int = opt(128, "embedding width")
    hidden_dim: int | None = opt(None, "hidden width of the mlp and v3 heads and of MoCo v3's predictor; none: the "
                                       "backbone's width")
    queue_size: int = opt(4096, "K, negatives in the queue (memory_bank: sampled from the bank)")
    key_momentum: float = opt(0.99, "m, momentum of the key encoder (mocov3: m0, raised to 1 on a half cosine)")
    temperature: float = opt(0.2, "T, softmax temperature")
    symmetric: bool = opt(False, "both views as queries")
    shuffle_bn: bool = opt(True, "shuffle keys before the key encoder (with split BN on one process)")
    bn_splits: int = opt(8, "BN groups of the global batch: split BN on one process, divided among processes under torchrun (1 = plain BN)")
    sync_bn: bool = opt(False, "torchrun on GPUs: synchronised BN in the query encoder (moco keeps the keys' per-group "
                               "BN; mocov3 synchronises every BN)")


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    dataset: str = opt("fashion-mnist", "fashion-mnist | digits | cifar10 | cifar100 | folder | shards")
    data_root: str | None = opt(None, "folder of the data set (required for folder; shards: the shards.json)")
    image_size: int | None = opt(None, "crop size; None: the images' own size (64 for folders)")
    augment: str = opt("v2", "v1 | v2 (aug+) | v3 (asymmetric: blur p 1.0 / 0.1, solarize p 0 / 0.2 on the two "
                             "views) | crop | none")
    crop_min_scale: float = opt(0.2, "smallest area of a random resized crop, as a fraction of the image")
    blur_sigma: list[float] | None = opt(None, "v2/v3 Gaussian blur's sigma range in output pixels, e.g. 0.1 1.0 "
                                               "for a visible blur on small images; none: MoCo v2's [0.1, 2.0] for "
                                               "224 px scaled to the crop size (almost no blur at 28 px)")
    jitter_strength: float = opt(0.4, "v1/v2 colour jitter's brightness, contrast and saturation (0.4 in the papers)")
    batch_size: int = opt(256, "images per step (the global batch)")
    train_subset: int | None = opt(None, "use only N training images: the first N (folders: an evenly spaced N, "
                                         "every class keeping its share), chosen before any is decoded")
    strict: bool = opt(False, "folders in memory: fail on the first unreadable image instead of skipping it")
    loader: str = opt("auto", "folders: auto (in memory when the decoded images fit memory_budget, else streamed "
                              "from disk) | memory | stream")
    memory_budget: float | None = opt(None, "GiB the decoded training images may take in memory (none: a quarter "
                                            "of the machine's RAM)")
    workers: int = opt(2, "streamed folders and shards: DataLoader worker processes decoding each process's share")


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    epochs: int = opt(20, "passes over the training images")
    optimizer: str = opt("sgd", "sgd | lars (ResNets in MoCo v3) | adamw (ViTs in MoCo v3)")
    lr: float = opt(0.06, "for a batch of lr_batch_size; scaled linearly with the batch size")
    lr_batch_size: int = opt(256, "images per step (the global batch)")
    sgd_momentum: float = opt(0.9, "SGD and LARS momentum")
    weight_decay: float = opt(5e-4, "weight decay (LARS: not of biases and norm parameters; AdamW: decoupled)")
    schedule: str = opt("cosine", "cosine | step | constant, applied per iteration")
    lr_steps: list[int] = opt([120, 160], "step: epochs where lr x0.1")
    warmup_epochs: float = opt(0.0, "linear warm-up from 0")


@dataclass
class RunConfig:
    """Where a run writes, on what device, and what it monitors."""

    out_dir: str = opt("runs/moco", "run folder: config, checkpoints, metrics")
    seed: int = opt(0, "seed of initialisation, data order and augmentation")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int | None = opt(None, "torch CPU threads; None: torch's default")
    channels_last: bool = opt(True, "channels-last memory format (faster convolutions)")
    precision: str = opt("auto", "auto (bf16/fp16 autocast on GPUs, bf16 on CPUs with AMX or AMD's AVX512-BF16, else fp32) | fp32 | bf16 | fp16")
    compile: bool = opt(False, "torch.compile the encoders (compile time reported separately)")
    knn_every: int = opt(5, "kNN monitor every N epochs (0: only at the end; -1: never)")
    knn_k: int = opt(200, "kNN neighbours")
    knn_t: float = opt(0.1, "kNN temperature of the vote weights exp(sim/t)")
    knn_bank: int | None = opt(None, "kNN monitor: at most this many training images (evenly spaced) in its memory "
                                     "bank (none: all; large streamed data sets want fewer)")
    keep_every: int = opt(0, "also keep checkpoint_epochNNNN.pt every N epochs (0: only the last and the best)")
    nonfinite: str = opt("stop", "on a non-finite loss or gradient: stop (keeping the last checkpoint) | skip the step")
    tensorboard: bool = opt(True, "write TensorBoard events to out_dir/tensorboard")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class PretrainConfig:
    preset: str = DEFAULT_PRESET
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = ("model", "data", "optim", "run")

def _v3(arch: str, temperature: float, optimizer: str, lr: float, weight_decay: float, epochs: int,
        warmup_epochs: int) -> dict[str, dict[str, Any]]:
    """A MoCo v3 preset for ImageNet: what the release's ResNet-50 and ViT recipes share, and where they differ."""
    return {
        "model": dict(method="mocov3", arch=arch, small_stem=False, head="v3", dim=256, hidden_dim=4096,
                      key_momentum=0.99, temperature=temperature, bn_splits=1),
        "data": dict(augment="v3", image_size=224, crop_min_scale=0.08, batch_size=4096),
        "optim": dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, epochs=epochs,
                      warmup_epochs=warmup_epochs, schedule="cosine"),
    }


# Presets are overrides of the defaults above.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Fast on a 2-core CPU: the README's main job. The defaults above, tuned on Fashion-MNIST (kNN top-1,
    # k=200 / k=20), where the garment fills a centred 28x28 frame:
    # - a stronger colour jitter for the one channel (only brightness and contrast act): +1.2 / +0.8 in
    #   5-epoch runs;
    # - crops of at least 60% of the image instead of 20%, and T=0.1: +1.1 / +1.1 in 5-minute runs
    #   (`python -m benchmarks bench --mode time-to-accuracy --minutes 5`; crops of 50% or 70% gained 0.6-1.0, 35% nothing,
    #   T=0.1 alone 0.3-0.6). Our guess at why: a small crop of a garment shows too little of it to tell a shirt
    #   from a coat;
    # - a visible blur (sigma 0.1-1.0 px; MoCo v2's range scaled to 28 px leaves the images unchanged): +0.45 / +0.48
    #   in 10-epoch runs with two seeds (docs/ablations.md);
    # - the last stage 256 wide instead of 128 (the feature width: linear protocol 89.40 after 40 epochs, 88.38 with
    #   128 after 50; kNN k=200 near 86 from epoch 25) and 28 epochs;
    # - batches of 128 (lr 0.03 by the linear scaling), twice the steps per epoch: kNN 85.77 and 86.24 in two runs
    #   of 28 epochs against 85.62 with 256 (linear protocol unchanged, 89.09), for about 25% more time an epoch:
    #   14.3 minutes of training on 2 Xeon cores. Batches of 64 learned no faster per epoch than 128, and were slower.
    # - a second conv-BN-ReLU layer in the third stage (`depths` 1 1 2 1: 64 channels on the 7x7 map), 24 epochs:
    #   an epoch costs 19% more, so 24 epochs take the flat network's time for 28. In seven runs on a Zen 4 (24 or
    #   28 epochs, T=0.1 or 0.07) kNN was 85.98-86.45 (mean 86.23), against 85.28-86.24 (mean 85.80) in four of
    #   the flat network; the linear protocol 88.75-89.22, about as before (88.79-89.11). With 24 epochs the
    #   README's command reached kNN 86.17, linear 88.92; with 28, 85.98 and 89.22, which would take about 17
    #   minutes on the Xeon with AMX (estimated, not measured). T=0.07 gained 0.3 kNN on the flat network, nothing on this one; the symmetric loss (14 epochs,
    #   the same time) lost 0.6 (docs/ablations.md, "At the full budget").
    "cpu": {"model": dict(temperature=0.1, last_width=256, depths=[1, 1, 2, 1]),
            "data": dict(jitter_strength=0.8, crop_min_scale=0.6, blur_sigma=[0.1, 1.0], batch_size=128),
            "optim": dict(epochs=24)},
    # MoCo v1 (paper, ImageNet): R50, linear head, K=65536, m=0.999, T=0.07, lr 0.03, steps at 120/160.
    "v1": {
        "model": dict(arch="resnet50", small_stem=False, head="linear", queue_size=65536, key_momentum=0.999,
                      temperature=0.07),
        "data": dict(augment="v1", image_size=224),
        "optim": dict(epochs=200, lr=0.03, weight_decay=1e-4, schedule="step", lr_steps=[120, 160]),
    },
    # MoCo v2: v1 + MLP head, T=0.2, aug+ (blur), cosine schedule.
    "v2": {
        "model": dict(arch="resnet50", small_stem=False, head="mlp", queue_size=65536, key_momentum=0.999,
                      temperature=0.2),
        "data": dict(augment="v2", image_size=224),
        "optim": dict(epochs=200, lr=0.03, weight_decay=1e-4, schedule="cosine"),
    },
    # The official CIFAR-10 demo: R18 with a small stem, split BN in 8, K=4096, m=0.99, T=0.1.
    "cifar": {
        "model": dict(arch="resnet18", small_stem=True, head="linear", queue_size=4096, key_momentum=0.99,
                      temperature=0.1, bn_splits=8),
        "data": dict(dataset="cifar10", augment="v1", batch_size=512),
        "optim": dict(epochs=200, lr=0.06, lr_batch_size=512, weight_decay=5e-4, schedule="cosine"),
    },
    # MoCo v3 (ICCV 2021, the release's recipes): no queue, BN-MLP projector (dim 256, hidden 4096) and predictor,
    # symmetric loss, momentum m0 -> 1 on a cosine, asymmetric BYOL augmentation with crops of 8-100%; a batch of
    # 4096 (lr given for 256 and scaled to the batch used), 1 BN group on one process (the release syncs BN).
    "v3-resnet50": _v3(arch="resnet50", temperature=1.0, optimizer="lars", lr=0.6, weight_decay=1e-6,
                       epochs=100, warmup_epochs=10),
    "v3-vit-small": _v3(arch="vit_small", temperature=0.2, optimizer="adamw", lr=1.5e-4, weight_decay=0.1,
                        epochs=300, warmup_epochs=40),
    "v3-vit-base": _v3(arch="vit_base", temperature=0.2, optimizer="adamw", lr=1.5e-4, weight_decay=0.1,
                       epochs=300, warmup_epochs=40),
    # MoCo v3 with a tiny ViT (4 blocks, 96 wide, 7x7 px patches) on Fashion-MNIST in minutes on a CPU: the v3
    # recipe at a small scale (AdamW, lr for 256 raised for a short run, hidden 1024), with the cpu preset's
    # augmentation strengths for the centred 28 px garments, in fp32 (bf16 autocast was slower for it on AMX).
    "v3-cpu": {
        "model": dict(method="mocov3", arch="vit_tiny", patch_size=7, head="v3", dim=256, hidden_dim=1024,
                      key_momentum=0.99, temperature=0.2, bn_splits=1),
        "data": dict(augment="v3", jitter_strength=0.8, crop_min_scale=0.6),
        "optim": dict(optimizer="adamw", lr=1e-3, weight_decay=0.1, epochs=10, warmup_epochs=1),
        "run": dict(precision="fp32"),
    },
    # Seconds, for tests and trying things out.
    "smoke": {
        "model": dict(width=8, dim=32, queue_size=512),
        "data": dict(batch_size=64, train_subset=2048),
        "optim": dict(epochs=1),
        "run": dict(knn_every=0, tensorboard=False),
    },
}


def preset(name: str) -> PretrainConfig:
    """The config of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PretrainConfig(preset=name)
    return apply_overrides(cfg, PRESETS[name])


def apply_overrides(cfg: PretrainConfig, overrides: dict[str, Any]) -> PretrainConfig:
    """A copy of `cfg` with `{section: {field: value}}` (or flat `{field: value}`) applied, type-checked."""
    cfg = from_dict(asdict(cfg))
    for key, value in overrides.items():
        if key == "preset":
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a mapping of field: value")
            for name, v in value.items():
                _set(cfg, key, name, v)
        else:
            _set(cfg, section_of(key), key, value)
    return cfg


def section_of(name: str) -> str:
    """The section that holds field `name` (field names are unique across sections)."""
    for section in SECTIONS:
        if name in _field_types(section):
            return section
    raise ConfigError(f"unknown config field {name!r}; see `moco pretrain --help` for the fields")


def _field_types(section: str) -> dict[str, Any]:
    cls = type(getattr(PretrainConfig(), section))
    return typing.get_type_hints(cls)


def _set(cfg: PretrainConfig, section: str, name: str, value: Any) -> None:
    types_ = _field_types(section)
    if name not in types_:
        raise ConfigError(f"unknown field {name!r} in config section {section!r}; allowed: {', '.join(types_)}")
    setattr(getattr(cfg, section), name, coerce(value, types_[name], name))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` converted to type `tp` (int, float, str, bool, optional, list[int]); ConfigError if it can't be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], name)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [coerce(v, item, name) for v in value]
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError
        out = tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {getattr(tp, '__name__', tp)}, got {value!r}") from None
    if tp is float and not math.isfinite(out):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return out


def from_dict(d: dict[str, Any]) -> PretrainConfig:
    """The config stored by `asdict` (e.g. in a checkpoint)."""
    cfg = PretrainConfig(preset=d.get("preset", DEFAULT_PRESET))
    for section in SECTIONS:
        for name, value in d.get(section, {}).items():
            _set(cfg, section, _RENAMED.get(name, name), value)
    return cfg


# Fields renamed since checkpoints were first written: a stored config still loads.
_RENAMED = {"mechanism": "method"}


def load_yaml(path: str | Path, text: str | None = None) -> dict[str, Any]:
    """A YAML config file (or its `text`, already read), parsed with the safe loader (a config file can never
    run code)."""
    path = Path(path)
    if text is None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text() if text is None else text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, optim, run)")
    return data


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Reject values that cannot work, naming the field and the allowed values.

    Names that other parts own (data sets and augmentations, architectures, heads and methods) are checked
    by those parts: `moco.data.check_data_config`, `moco.model.check_model_config`.
    """
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(o.optimizer in OPTIMIZERS, f"optimizer={o.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    need(m.patch_size is None or m.patch_size >= 1, f"patch_size must be >= 1 or none, got {m.patch_size}")
    need(o.schedule in SCHEDULES, f"schedule={o.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    need(0.0 <= m.key_momentum < 1.0, f"key_momentum (m) must be in [0, 1), got {m.key_momentum}")
    need(m.temperature > 0, f"temperature (T) must be > 0, got {m.temperature}")
    need(m.width >= 1 and m.dim >= 1, "width and dim must be >= 1")
    need(m.last_width is None or m.last_width >= 1, "last_width must be >= 1")
    need(len(m.depths) == 4 and min(m.depths) >= 1,
         f"depths must be 4 numbers >= 1 (layers in each stage of small_cnn), got {m.depths}")
    need(m.hidden_dim is None or m.hidden_dim >= 1, f"hidden_dim must be >= 1 or none, got {m.hidden_dim}")
    need(m.queue_size >= 1, f"queue_size must be >= 1, got {m.queue_size}")
    need(m.bn_splits >= 1, f"bn_splits must be >= 1, got {m.bn_splits}")
    need(d.batch_size >= 2, f"batch_size must be >= 2, got {d.batch_size}")
    need(0 < d.crop_min_scale <= 1, f"crop_min_scale must be in (0, 1], got {d.crop_min_scale}")
    need(d.blur_sigma is None or (len(d.blur_sigma) == 2 and 0 < d.blur_sigma[0] <= d.blur_sigma[1]),
         f"blur_sigma must be two numbers 0 < low <= high (pixels), got {d.blur_sigma}")
    need(0 <= d.jitter_strength <= 1, f"jitter_strength must be in [0, 1] (brightness factors in [1 - s, 1 + s]), "
         f"got {d.jitter_strength}")
    need(d.image_size is None or d.image_size >= 8, f"image_size must be >= 8 or none, got {d.image_size}")
    need(d.train_subset is None or d.train_subset >= d.batch_size,
         f"train_subset={d.train_subset} must be >= batch_size={d.batch_size}")
    need(d.workers >= 0, f"workers must be >= 0, got {d.workers}")
    need(d.loader in LOADERS, f"loader={d.loader!r} is unknown; choose one of {', '.join(LOADERS)}")
    need(d.memory_budget is None or d.memory_budget > 0, f"memory_budget must be > 0 GiB, got {d.memory_budget}")
    need(r.knn_bank is None or r.knn_bank >= 1, f"knn_bank must be >= 1 or none, got {r.knn_bank}")
    need(o.epochs >= 1, f"epochs must be >= 1, got {o.epochs}")
    need(o.lr > 0, f"lr must be > 0, got {o.lr}")
    need(o.lr_batch_size >= 1, f"lr_batch_size must be >= 1, got {o.lr_batch_size}")
    need(0 <= o.sgd_momentum < 1, f"sgd_momentum must be in [0, 1), got {o.sgd_momentum}")
    need(o.weight_decay >= 0, f"weight_decay must be >= 0, got {o.weight_decay}")
    need(0 <= o.warmup_epochs < o.epochs, f"warmup_epochs must be in [0, epochs={o.epochs}), got {o.warmup_epochs}")
    need(r.knn_k >= 1 and r.knn_t > 0, f"knn_k must be >= 1 and knn_t > 0, got {r.knn_k}, {r.knn_t}")
    need(r.knn_every >= -1, f"knn_every must be >= -1, got {r.knn_every}")
    need(r.precision in PRECISIONS, f"precision={r.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    need(r.keep_every >= 0, f"keep_every must be >= 0, got {r.keep_every}")
    need(r.nonfinite in NONFINITE, f"nonfinite={r.nonfinite!r} is unknown; choose one of {', '.join(NONFINITE)}")
    need(r.threads is None or r.threads >= 1, f"threads must be >= 1 or none, got {r.threads}")
    need(re.fullmatch(DEVICES, r.device) is not None,
         f"device={r.device!r} is unknown; choose auto, cpu, cuda, cuda:N or mps")
    return cfg


# Rules for `check_fields`: (test, what the value must be).
Rule = tuple[Callable[[Any], bool], str]
POSITIVE_INT: Rule = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
POSITIVE: Rule = (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Rule = (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "a finite number >= 0")
FRACTION: Rule = (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)")


def one_of(choices: tuple[str, ...]) -> Rule:
    return (lambda v: v in choices, f"one of {', '.join(choices)}")


def optional(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v), f"{rule[1]} or none")


def every(rule: Rule) -> Rule:
    return (lambda v: isinstance(v, list) and all(rule[0](x) for x in v), f"a list, each {rule[1]}")


def check_fields(cfg: Any, what: str, rules: dict[str, Rule]) -> None:
    """Raise ConfigError for the first field of `cfg` that breaks its rule, e.g. "linear epochs must be an
    integer >= 1, got 0"."""
    for name, (ok, must) in rules.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise ConfigError(f"{what} {name} must be {must}, got {value!r}")


def to_yaml(cfg: PretrainConfig) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
