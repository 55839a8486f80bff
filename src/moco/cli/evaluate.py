"""`moco knn`, `moco lincls`, `moco embed`, `moco report`: evaluation of a checkpoint (or a run folder)."""

import argparse

from .flags import add_fields, build

CHECKPOINT_HELP = ("a checkpoint of this project (pretraining or supervised), of the official MoCo v1/v2/v3 "
                   "releases, a torchvision ResNet state_dict, or a safetensors export")


def _encoder(args: argparse.Namespace):
    from ..checkpoints import load_encoder
    from ..evaluate.data import EvalConfig

    return load_encoder(args.checkpoint, build(args, EvalConfig).arch)


def _splits(args: argparse.Namespace, encoder):
    from ..evaluate.data import EvalConfig, labelled_splits
    from ..runtime import resolve_device

    source = build(args, EvalConfig)
    train, test = labelled_splits(encoder, source, args.checkpoint)
    return train, test, resolve_device(source.device)


def cmd_knn(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..evaluate.baselines import knn_lines, knn_rows
    from ..evaluate.data import eval_transform
    from ..evaluate.knn import VOTES, KnnConfig

    cfg = build(args, KnnConfig)
    if cfg.vote not in VOTES or cfg.k < 1 or cfg.t <= 0:
        raise ConfigError(f"kNN needs k >= 1, t > 0 and vote one of {', '.join(VOTES)}; got k={cfg.k}, t={cfg.t}, "
                          f"vote={cfg.vote!r}")
    encoder = _encoder(args)
    train, test, device = _splits(args, encoder)
    rows = knn_rows(f"{args.checkpoint} ({encoder.layout})", encoder.backbone, train, test,
                    eval_transform(encoder, train, device), device, cfg.k, cfg.t, cfg.vote, args.baselines)
    how = (f"weighted, k={cfg.k}, t={cfg.t}" if cfg.vote == "weighted"
           else f"majority of the {cfg.k} cosine-nearest")
    print(f"kNN on {test.name} ({len(test)} images at {test.image_size} px; {how}; memory bank: {len(train)} images "
          f"of {train.name})")
    print("\n".join(knn_lines(rows, width=40)))
    return 0


def cmd_lincls(args: argparse.Namespace) -> int:
    from ..evaluate.baselines import linear_lines, linear_rows
    from ..evaluate.linear import LinearConfig, check_config, protocol_config

    encoder = _encoder(args)
    cfg = build(args, LinearConfig, protocol_config(getattr(args, "protocol", "auto"), encoder))
    check_config(cfg)
    train, test, device = _splits(args, encoder)
    results = linear_rows(f"{args.checkpoint} ({encoder.layout})", encoder, train, test, cfg, device,
                          args.baselines, progress=args.progress)
    lr = (f"lr chosen from {', '.join(f'{x:g}' for x in cfg.lr_search)} on a held-out 10% of {train.name}"
          if cfg.lr_search else f"lr {cfg.lr:g}")
    print(f"linear classification on {test.name} ({len(test)} images at {test.image_size} px; frozen features, "
          f"protocol {cfg.protocol}: {cfg.epochs} epochs, {cfg.schedule} schedule, {lr}, batch {cfg.batch_size}, "
          f"augment {cfg.augment})")
    print("\n".join(linear_lines(results)))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..data.sources import DATASETS
    from ..evaluate.data import EvalConfig
    from ..evaluate.embed import EmbedConfig, embed

    source = build(args, EvalConfig)
    named = args.data in DATASETS and args.data != "folder"
    source = replace(source, dataset=args.data if named else "folder",
                     data_root=source.data_root if named else args.data)
    embed(args.checkpoint, args.out, source, build(args, EmbedConfig))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluate.report import ReportConfig, report

    print(f"wrote {report(args.run_dir, build(args, ReportConfig))}")
    return 0


def register(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    from ..evaluate.data import EvalConfig
    from ..evaluate.embed import EmbedConfig
    from ..evaluate.knn import KnnConfig
    from ..evaluate.linear import LinearConfig
    from ..evaluate.report import ReportConfig

    def evaluation(name: str, cls: type, help_: str, description: str) -> argparse.ArgumentParser:
        """A command that evaluates a checkpoint on labelled data, next to the baselines."""
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("checkpoint", help=CHECKPOINT_HELP)
        add_fields(p, cls)
        add_fields(p, EvalConfig)
        p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                       help="also raw pixels and a randomly initialised encoder of the same architecture (default: on)")
        return p

    evaluation("knn", KnnConfig, "kNN accuracy (weighted or majority vote) of a checkpoint's frozen features",
               "kNN classification on frozen backbone features: the training split is the memory bank, the test "
               "split the queries; neighbours vote with exp(cos/t), or one vote each with --vote majority."
               ).set_defaults(func=cmd_knn)
    p = evaluation("lincls", LinearConfig, "linear classification protocol on frozen features",
                   "The paper's linear protocol: the backbone frozen in eval mode (BN statistics fixed), a new fc "
                   "initialised N(0, 0.01), SGD with lr 30 and no weight decay. Reports best and final top-1 (and "
                   "top-5 with more than 5 classes), and fails loudly if any backbone weight changed.")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(func=cmd_lincls)

    p = sub.add_parser("embed", help="features of every image of a folder or data set, to .npy or .safetensors",
                       description="Backbone features (L2-normalised by default) of every image of DATA, a folder of "
                       "images or a data set name, for retrieval and clustering. .npy writes FILE.files.txt (and "
                       "FILE.labels.npy) beside it; .safetensors keeps the file list in its metadata.")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("data", help="an image folder, or fashion-mnist, digits, cifar10, cifar100")
    p.add_argument("--out", required=True, help="output file: .npy or .safetensors")
    add_fields(p, EmbedConfig)
    add_fields(p, EvalConfig, skip=("dataset",))
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("report", help="an HTML and Markdown report of a pretraining run, with plots",
                       description="Loss, contrastive accuracy, LR and kNN curves, a t-SNE map of the test "
                       "embeddings coloured by class and a grid of nearest-neighbour retrievals (needs the report "
                       "extra: matplotlib, scikit-learn).")
    p.add_argument("run_dir", help="a run folder of moco pretrain (config.yaml, metrics.jsonl, checkpoint.pt)")
    add_fields(p, ReportConfig)
    p.set_defaults(func=cmd_report)
