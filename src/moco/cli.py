"""The `moco` command: parses arguments into configs and calls the library."""

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import config as C
from .errors import MocoError

FLAG_SECTIONS = {"model": "model (the encoder and the contrastive task)", "data": "data", "optim": "optimisation",
                 "run": "run"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (--queue-size, --lr, ...); unset flags keep the preset's or file's value."""
    groups = {s: parser.add_argument_group(title) for s, title in FLAG_SECTIONS.items()}
    for section, f, tp in C.all_fields():
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} (default: {_default(f)})"
        if tp is bool:
            groups[section].add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                         default=argparse.SUPPRESS, help=help_)
        else:
            metavar = "N [N ...]" if "list" in str(tp) else f.name.upper()
            groups[section].add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                                         nargs="+" if "list" in str(tp) else None, help=help_)


def _default(f) -> Any:
    return f.default_factory() if callable(f.default_factory) else f.default


def resolve_pretrain_config(args: argparse.Namespace) -> tuple[C.PretrainConfig, str | None]:
    """preset -> YAML file -> flags; with --resume, the checkpoint's config replaces preset and file."""
    from .train.checkpoint import find_resume, load_checkpoint

    flags = {f.name: getattr(args, f.name) for _, f, _ in C.all_fields() if hasattr(args, f.name)}
    file = C.load_yaml(args.config) if args.config else {}
    name = args.preset or file.get("preset", "cpu")
    cfg = C.apply_overrides(C.preset(name), file)
    resume = None
    if args.resume:
        out_dir = flags.get("out_dir", cfg.run.out_dir)
        path = find_resume(args.resume, out_dir)
        if path is None:
            print(f"--resume auto: no checkpoint in {out_dir}, starting a new run", file=sys.stderr)
        else:
            cfg = C.from_dict(load_checkpoint(path)["config"])
            resume = str(path)
    return C.validate(C.apply_overrides(cfg, flags)), resume


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train.loop import pretrain

    cfg, resume = resolve_pretrain_config(args)
    if args.print_config:
        print(C.to_yaml(cfg), end="")
        return 0
    pretrain(cfg, resume=resume, baselines=args.baselines)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco", description="Momentum Contrast (MoCo v1/v2): self-supervised pretraining of image encoders."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "pretrain",
        help="pretrain an encoder with MoCo",
        description="Pretrain an encoder with MoCo. The config is the preset, then the --config YAML file, "
        "then the flags below. With --resume, the checkpoint's config is the base instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=list(C.PRESETS), default=None,
                   help="named recipe: cpu (default; fast on a CPU), v1/v2 (the papers, ResNet-50), "
                   "cifar (the official CIFAR-10 demo), smoke (seconds)")
    p.add_argument("--config", metavar="FILE", help="YAML file with sections model, data, optim, run")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint (file or run folder), or the run folder's last one (auto)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="end with kNN on raw pixels and on a random encoder, for comparison")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_config_flags(p)
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"moco: warning: {message}\n"
    try:
        return args.func(args)
    except MocoError as e:
        print(f"moco: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
