"""The `moco` command: parses arguments into configs and calls the library."""

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import config as C
from . import distributed
from .errors import MocoError
from .train.loop import Interrupted

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
    try:
        pretrain(cfg, resume=resume, baselines=args.baselines)
    finally:
        distributed.cleanup()
    return 0


def add_eval_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint of this project, of the official MoCo v1/v2/v3 releases, "
                   "or a torchvision ResNet state_dict")
    p.add_argument("--dataset", choices=C.IMAGE_DATASETS, help="default: the data set the checkpoint was trained on")
    p.add_argument("--data-root", help="folder of the data set (default: the checkpoint's)")
    p.add_argument("--image-size", type=int, help="default: the size the encoder was trained at")
    p.add_argument("--arch", help="architecture of a checkpoint that does not name it (resnet18/34/50)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")


def eval_data(args: argparse.Namespace, encoder) -> tuple:
    """The labelled train and test splits an evaluation command uses: flags, else the checkpoint's config."""
    from .data.sources import load_images

    cfg = encoder.config
    dataset = args.dataset or (cfg.data.dataset if cfg else None)
    if dataset is None:
        raise C.ConfigError(f"{args.checkpoint} does not say what data it was trained on; pass --dataset")
    same = cfg is not None and dataset == cfg.data.dataset
    root = args.data_root or (cfg.data.data_root if same else None)
    size = args.image_size or encoder.size or (cfg.data.image_size if same else None)
    train, test = (load_images(dataset, split, root, size) for split in ("train", "test"))
    if train.labels is None or test.labels is None:
        raise C.ConfigError(f"{dataset} at {root} has no labels; evaluation needs a labelled train and test split")
    if train.channels != encoder.channels:
        raise C.ConfigError(f"the encoder takes {encoder.channels}-channel images but {train.name} has "
                            f"{train.channels}")
    return train, test


def cmd_supervised(args: argparse.Namespace) -> int:
    from .train.supervised import supervised

    cfg, _ = resolve_pretrain_config(args)
    if args.print_config:
        print(C.to_yaml(cfg), end="")
        return 0
    supervised(cfg)
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from .data.augment import EvalTransform
    from .evaluate.knn import knn_eval, pixel_features, reinitialised, vote_accuracy
    from .evaluate.load import load_encoder
    from .runtime import resolve_device

    encoder = load_encoder(args.checkpoint, args.arch)
    train, test = eval_data(args, encoder)
    device = resolve_device(args.device)
    transform = EvalTransform(args.image_size or encoder.size or train.image_size, encoder.mean, encoder.std)
    def run(backbone):
        return knn_eval(backbone.to(device), (train.images, train.labels), (test.images, test.labels),
                        transform.to(device), device, args.k, args.t, vote=args.vote)

    rows = {f"{args.checkpoint} ({encoder.layout})": run(encoder.backbone)}
    if args.baselines:
        rows["raw pixels"] = vote_accuracy(pixel_features(train.images), train.labels, pixel_features(test.images),
                                           test.labels, args.k, args.t, args.vote)
        rows["random encoder"] = run(reinitialised(encoder.backbone))
    how = f"weighted, k={args.k}, t={args.t}" if args.vote == "weighted" else f"majority of the {args.k} cosine-nearest"
    print(f"kNN on {test.name} ({len(test)} images; {how}; memory bank: {len(train)} images of {train.name})")
    for name, acc in rows.items():
        top5 = f"   top-5 {acc['top5']:6.2f}%" if "top5" in acc else ""
        print(f"  {name:<40} top-1 {acc['top1']:6.2f}%{top5}")
    return 0


def cmd_lincls(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from torch import nn

    from .evaluate.knn import reinitialised
    from .evaluate.linear import LinearConfig, linear_probe
    from .evaluate.load import load_encoder

    encoder = load_encoder(args.checkpoint, args.arch)
    train, test = eval_data(args, encoder)
    cfg = LinearConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                       schedule=args.schedule, lr_steps=args.lr_steps, batch_size=args.batch_size,
                       augment=args.augment, seed=args.seed, device=args.device)
    candidates = {f"{args.checkpoint} ({encoder.layout})": encoder}
    if args.baselines:
        candidates["raw pixels"] = replace(encoder, backbone=nn.Flatten())
        candidates["random encoder"] = replace(encoder, backbone=reinitialised(encoder.backbone))
    results = {}
    for name, candidate in candidates.items():
        print(f"# linear protocol: {name}")
        results[name] = linear_probe(candidate, train, test, cfg, progress=args.progress)
    print(f"linear classification on {test.name} ({len(test)} images; frozen features, {cfg.epochs} epochs, "
          f"lr {cfg.lr} {cfg.schedule}, batch {cfg.batch_size}, augment {cfg.augment})")
    for name, r in results.items():
        print(f"  {name:<40} best top-1 {r.best_top1:6.2f}% (epoch {r.best_epoch})   final top-1 "
              f"{r.final_top1:6.2f}%  top-5 {r.final_top5:6.2f}%")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .evaluate.embed import embed

    dataset = "folder" if args.data not in C.IMAGE_DATASETS else args.data
    root = args.data if dataset == "folder" else args.data_root
    embed(args.checkpoint, dataset, root, args.split, args.out, args.arch, args.batch_size, args.device,
          args.normalize)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluate.report import report

    path = report(args.run_dir, args.out, args.tsne_points, args.queries, args.neighbours)
    print(f"wrote {path}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from .data.shards import write_shards

    index = write_shards(args.folder, args.out, args.image_size, args.shard_size, args.seed)
    print(f"pretrain from them with: moco pretrain --dataset shards --data-root {index}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .experiments.transfer_study import transfer_study
    from .transfer.detection import DetectionConfig
    from .transfer.segmentation import SegmentationConfig

    def configs(cls):
        """The task's default config, its schedule (warm-up, lr steps) stretched to --iterations."""
        cfg = cls()
        changes = {k: v for k, v in (("batch_size", args.batch_size), ("threads", args.threads)) if v is not None}
        if args.iterations is not None:
            scale = args.iterations / cfg.iterations
            changes |= {"iterations": args.iterations, "warmup_iters": int(cfg.warmup_iters * scale),
                        "lr_steps": [max(1, int(step * scale)) for step in cfg.lr_steps]}
        return replace(cfg, **changes)

    path = transfer_study(args.out, args.moco, args.supervised, args.runs, args.scenes_train, args.scenes_test,
                          args.scene_size, configs(DetectionConfig), configs(SegmentationConfig))
    print(f"wrote {path} (table), results.csv and plots next to it")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .experiments.ablate import ablate

    path = ablate(args.out, tuple(args.studies), args.epochs, args.train_subset, args.seed)
    print(f"wrote {path} (table), results.csv and plots next to it")
    return 0


def field_values(pairs: Sequence[str]) -> dict[str, str]:
    """{"width": "32"} from ["width=32"]; the config checks names and types when it applies them."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise C.ConfigError(f"--set {pair!r}: write FIELD=VALUE, e.g. --set width=32")
        values[name.strip().replace("-", "_")] = value.strip()
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from .experiments.bench import BenchSettings, bench

    settings = BenchSettings(mode=args.mode, preset=args.preset, device=args.device, batch_size=args.batch_size,
                             threads=args.threads, train_subset=args.train_subset, warmup=args.warmup,
                             steps=args.steps, windows=args.windows, workers=args.workers,
                             reference=not args.skip_reference, profile=args.profile, minutes=args.minutes,
                             every=args.every, seed=args.seed, overrides=field_values(args.set))
    bench(settings, args.out)
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

    p = sub.add_parser(
        "supervised",
        help="supervised pre-training of the same backbone on the same data and budget (the transfer baseline)",
        description="Train backbone + linear classifier with cross-entropy on the labels, with the same config "
        "(preset, YAML, flags) as `moco pretrain`; the MoCo-only fields are ignored. Writes OUT_DIR/supervised.pt, "
        "which knn, lincls, export and finetune read like a MoCo checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=list(C.PRESETS), default=None, help="as for pretrain")
    p.add_argument("--config", metavar="FILE", help="YAML file with sections model, data, optim, run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(resume=None)
    add_config_flags(p)
    p.set_defaults(func=cmd_supervised)

    p = sub.add_parser("knn", help="kNN accuracy (weighted or majority vote) of a checkpoint's frozen features",
                       description="Weighted kNN classification on frozen backbone features: the training split "
                       "is the memory bank, the test split the queries; neighbours vote with exp(cos/t), or one vote "
                       "each with --vote majority.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_eval_data_flags(p)
    p.add_argument("--k", type=int, default=200, help="neighbours")
    p.add_argument("--t", type=float, default=0.1, help="temperature of the vote weights")
    p.add_argument("--vote", choices=("weighted", "majority"), default="weighted",
                   help="weighted: each neighbour adds exp(cos/t) (the monitor); majority: one vote each (textbook "
                   "kNN, on cosine similarity)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also raw pixels and a randomly initialised encoder of the same architecture")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("lincls", help="linear classification protocol on frozen features",
                       description="The paper's linear protocol: the backbone frozen in eval mode (BN statistics "
                       "fixed), a new fc initialised N(0, 0.01), SGD with lr 30 and no weight decay. Reports best and "
                       "final top-1/top-5 and fails loudly if any backbone weight changed.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_eval_data_flags(p)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=30.0, help="for batch 256, scaled linearly with --batch-size")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["step", "cosine"], default="step")
    p.add_argument("--lr-steps", type=int, nargs="+", default=[60, 80], help="step schedule: epochs of lr x0.1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--augment", choices=["none", "crop"], default="none",
                   help="none: features of whole images computed once (fast); crop: the paper's random resized "
                   "crop + flip through the frozen backbone at every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also raw pixels and a randomly initialised encoder under the same protocol")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_lincls)

    p = sub.add_parser("embed", help="features of every image of a folder or data set, to .npy or .safetensors",
                       description="Backbone features (L2-normalised by default) of every image of DATA, a folder "
                       "of images or a data set name, for retrieval and clustering. .npy writes FILE.files.txt "
                       "(and FILE.labels.npy) beside it; .safetensors keeps the file list in its metadata.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data", help=f"an image folder, or one of {', '.join(C.IMAGE_DATASETS[:-1])}")
    p.add_argument("--out", required=True, help="output file: .npy or .safetensors")
    p.add_argument("--split", default="train", help="train | test (data sets and train/test folders)")
    p.add_argument("--data-root", help="folder of a named data set")
    p.add_argument("--arch", help="architecture of a checkpoint that does not name it")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True, help="L2-normalise")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("report", help="an HTML and Markdown report of a pretraining run, with plots",
                       description="Loss, contrastive accuracy, LR and kNN curves, a t-SNE map of the test "
                       "embeddings coloured by class and a grid of nearest-neighbour retrievals.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a run folder of moco pretrain (config.yaml, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    p.add_argument("--tsne-points", type=int, default=2000)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--neighbours", type=int, default=8)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("shard", help="pack an image folder into WebDataset tar shards",
                       description="Decode the images of FOLDER once (shorter side to --image-size, centre crop, as "
                       "the in-memory folder loader does), shuffle them and write OUT/shard-NNNNNN.tar files of "
                       "PNGs (+ class labels) and OUT/shards.json; pretrain with --dataset shards --data-root "
                       "OUT/shards.json. The index may list URLs instead of files.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="an image folder (class sub-folders or flat)")
    p.add_argument("out", help="output folder")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=2000, help="images per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before packing")
    p.set_defaults(func=cmd_shard)

    from .transfer.detection import add_finetune_parser
    from .transfer.export import add_export_parser

    add_export_parser(sub)
    add_finetune_parser(sub)

    p = sub.add_parser("transfer", help="the paper's transfer study in miniature: MoCo vs supervised vs random",
                       description="Fine-tune MoCo, supervised and random initialisations of the same backbone with "
                       "the same schedule for detection (Faster R-CNN FPN, box AP) and segmentation (mIoU) on scenes "
                       "of Fashion-MNIST test-split items. Pretrains (CPU preset) and trains the supervised baseline "
                       "if no checkpoints are given. Finished rows of OUT/results.csv are kept.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--moco", help="MoCo checkpoint (default: pretrain one in RUNS/moco)")
    p.add_argument("--supervised", help="supervised checkpoint (default: train one in RUNS/supervised)")
    p.add_argument("--out", default="docs/transfer", help="results folder")
    p.add_argument("--runs", default="runs/transfer", help="folder of the pretraining runs it makes")
    p.add_argument("--scenes-train", type=int, default=1000)
    p.add_argument("--scenes-test", type=int, default=300)
    p.add_argument("--scene-size", type=int, default=96)
    p.add_argument("--iterations", type=int, help="fine-tuning iterations (default: the fine-tuning configs')")
    p.add_argument("--batch-size", type=int, help="fine-tuning batch (default: the fine-tuning configs')")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=cmd_transfer)

    from .experiments.ablate import STUDIES

    p = sub.add_parser("ablate", help="the paper's ablations in miniature on Fashion-MNIST",
                       description="Short runs of the CPU preset with one fixed budget each: momentum m, the three "
                       "mechanisms across K, shuffle BN on/off, v1 vs v2 heads. Writes results.csv, results.md and "
                       "PNG plots; runs already in results.csv with the same config are kept.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="docs/ablations", help="output folder")
    p.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES), help="which studies")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--train-subset", type=int, default=20000, help="training images per run")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("bench", help="pretraining speed: the library against a faithful reference",
                       description="Measures, in one process on the same data and model, the images/s of the "
                       "library's pretraining step and of a reference written from the paper and the official "
                       "code (per-image PIL augmentation in DataLoader workers), FLOPs per image, the fraction of "
                       "the machine's matmul peak (in the dtype it computes in) and peak memory (--mode "
                       "throughput); or kNN top-1 against training time within a budget (--mode time-to-accuracy). Results go to OUT/<mode>-<machine>"
                       ".json and OUT.md is regenerated from all results files.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["throughput", "time-to-accuracy"], default="throughput")
    p.add_argument("--preset", choices=list(C.PRESETS), default="cpu", help="the pretraining recipe both run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--train-subset", type=int, help="use only the first N training images")
    p.add_argument("--warmup", type=int, default=10, help="steps before the first timed window")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--workers", type=int, help="DataLoader worker processes of the reference (default: one per "
                   "CPU core)")
    p.add_argument("--skip-reference", action="store_true", help="measure the library only")
    p.add_argument("--profile", action="store_true", help="also list the top operators of the library's step")
    p.add_argument("--minutes", type=float, default=10.0, help="time-to-accuracy: training budget of each")
    p.add_argument("--every", type=float, default=60.0,
                   help="time-to-accuracy: seconds of training between kNN evaluations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a field of the preset's config, e.g. --set width=32 (repeatable)")
    p.add_argument("--out", default="docs/benchmarks", help="results folder; the Markdown page is OUT.md")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"moco: warning: {message}\n"
    try:
        return args.func(args)
    except MocoError as e:
        print(f"moco: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"moco: stopped by {e}", file=sys.stderr)
        return 128 + e.signum  # 143 for SIGTERM, 130 for SIGINT, as the shell reports them
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
