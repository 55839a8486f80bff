"""`moco pretrain` and `moco supervised`: the config is the preset, then the YAML file, then the flags."""

import argparse
import sys
from importlib import import_module
from pathlib import Path

from .. import config as C
from .flags import add_fields, given

SECTIONS = {"model": ("model (the encoder and the contrastive task)", C.ModelConfig),
            "data": ("data", C.DataConfig), "optim": ("optimisation", C.OptimConfig), "run": ("run", C.RunConfig)}


def chosen_preset(argv: list[str]) -> str:
    """The --preset in `argv` (its help then shows that preset's defaults), else the default preset."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv) and argv[i + 1] in C.PRESETS:
            return argv[i + 1]
        if arg.startswith("--preset=") and arg.split("=", 1)[1] in C.PRESETS:
            return arg.split("=", 1)[1]
    return C.DEFAULT_PRESET


def add_config_flags(p: argparse.ArgumentParser, argv: list[str]) -> None:
    """--preset, --config, --print-config and one flag per config field, in a group per section."""
    name = chosen_preset(argv)
    p.add_argument("--preset", choices=list(C.PRESETS), default=None,
                   help=f"named recipe: cpu (the default; fast on a CPU), v1/v2 (the papers, ResNet-50), v3-resnet50, "
                   f"v3-vit-small, v3-vit-base (MoCo v3's), v3-cpu (a tiny ViT on a CPU), cifar (the official "
                   f"CIFAR-10 demo), smoke (seconds); the defaults below are {name}'s")
    p.add_argument("--config", metavar="FILE", help="YAML file with sections model, data, optim, run (or flat fields)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    defaults = C.preset(name)
    for section, (title, cls) in SECTIONS.items():
        add_fields(p.add_argument_group(title), cls, getattr(defaults, section))


def config_flags(args: argparse.Namespace) -> dict:
    """The config fields given on the command line, by section."""
    return {section: given(args, cls) for section, (_, cls) in SECTIONS.items()}


def resolve_pretrain_config(args: argparse.Namespace, check=None):
    """preset -> YAML file -> flags. `--resume` continues a run: its stored config, then the file's and the
    flags' fields (a preset other than the run's is refused: it would change the whole recipe silently).
    `check` (default: pretraining's) rejects a config the command cannot run.

    Returns (config, the Resume to continue from or None).
    """
    from ..checkpoints import find_resume
    from ..errors import ConfigError
    from ..train.setup import check_pretrain_config

    for module in getattr(args, "imports", None) or []:
        try:
            import_module(module)  # e.g. a module that registers a method of its own
        except ImportError as e:
            raise ConfigError(f"--import {module}: {e}; put the module on PYTHONPATH") from None
    flags = config_flags(args)
    file = C.load_yaml(args.config) if args.config else {}
    name = args.preset or file.get("preset", C.DEFAULT_PRESET)
    cfg = C.apply_overrides(C.preset(name), file)
    resume = None
    if args.resume:
        out_dir = Path(flags["run"].get("out_dir", cfg.run.out_dir))
        resume = find_resume(args.resume, out_dir)
        if resume is not None:
            stored = C.from_dict(resume.state["config"])
            if name != stored.preset and (args.preset or "preset" in file):
                raise ConfigError(f"{resume.path} is a run of preset {stored.preset}; a resumed run keeps its "
                                  f"recipe, so preset {name} cannot apply: drop --preset (single fields can change "
                                  "with their flags, e.g. --epochs 400), or start a new run in another --out-dir")
            cfg = C.apply_overrides(stored, file)
        elif (out_dir / "config.yaml").is_file() and not (args.preset or args.config):
            print(f"--resume auto: no checkpoint in {out_dir} yet; starting its run (config.yaml) from the beginning",
                  file=sys.stderr)
            cfg = C.from_dict(C.load_yaml(out_dir / "config.yaml"))
        else:
            print(f"--resume auto: no checkpoint in {out_dir}, starting a new run", file=sys.stderr)
    optim = flags["optim"]
    if resume is None and "epochs" in optim and "warmup_epochs" not in optim and cfg.optim.warmup_epochs > 0:
        # A shorter (or longer) schedule keeps the recipe's share of warm-up: 40 of 300 epochs -> 0.13 of 1.
        optim["warmup_epochs"] = cfg.optim.warmup_epochs * optim["epochs"] / cfg.optim.epochs
        print(f"warm-up: {optim['warmup_epochs']:.3g} of {optim['epochs']} epochs, the recipe's share "
              f"({cfg.optim.warmup_epochs:g} of {cfg.optim.epochs}); --warmup-epochs sets it", file=sys.stderr)
    return (check or check_pretrain_config)(C.apply_overrides(cfg, flags)), resume


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..pipeline import pretrain

    cfg, resume = resolve_pretrain_config(args)
    if args.print_config:
        print(C.to_yaml(cfg), end="")
        return 0
    try:
        pretrain(cfg, resume=resume, baselines=args.baselines)
    finally:
        distributed.cleanup()
    return 0


def cmd_supervised(args: argparse.Namespace) -> int:
    from ..checkpoints import load_encoder
    from ..evaluate.baselines import knn_lines, knn_rows
    from ..evaluate.data import EvalConfig, eval_transform, labelled_splits
    from ..runtime import resolve_device
    from ..train.supervised import check_supervised_config, supervised

    cfg, _ = resolve_pretrain_config(args, check_supervised_config)
    if args.print_config:
        print(C.to_yaml(cfg), end="")
        return 0
    path = supervised(cfg)
    encoder = load_encoder(path)
    device = resolve_device(cfg.run.device)
    train, test = labelled_splits(encoder, EvalConfig(), str(path))
    rows = knn_rows("supervised backbone", encoder.backbone, train, test, eval_transform(encoder, train, device),
                    device, cfg.run.knn_k, cfg.run.knn_t, baselines=False)
    print(f"kNN on {test.name} (k={cfg.run.knn_k}, t={cfg.run.knn_t}):\n" + "\n".join(knn_lines(rows)))
    return 0


def register(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = sub.add_parser("pretrain", help="pretrain an encoder with MoCo (or end-to-end, memory bank)",
                       description="Pretrain an encoder. The config is the preset, then the --config YAML file, then "
                       "the flags below; with --resume, the checkpoint's stored config, then the flags.")
    add_config_flags(p, argv)
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint (file or run folder), or from the --out-dir folder's newest "
                   "readable one (auto; a new run if there is none)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="end with kNN on raw pixels and on a random encoder, for comparison (default: on)")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import a Python module first, e.g. one that registers a method of its own with "
                   "moco.register (repeatable; the module must be importable, e.g. on PYTHONPATH)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("supervised", help="supervised pre-training of the same backbone on the same data and budget "
                       "(the transfer baseline)",
                       description="Train backbone + linear classifier with cross-entropy on the labels, with the "
                       "same config (preset, YAML, flags) as `moco pretrain`; the method's fields are ignored. Writes "
                       "OUT_DIR/supervised.pt, which knn, lincls, export and finetune read like a MoCo checkpoint.")
    add_config_flags(p, argv)
    p.set_defaults(func=cmd_supervised, resume=None)
