"""`python -m benchmarks bench | ablate | negatives | head-probe | transfer`: the studies and benchmarks behind docs/."""

import argparse
import sys
import warnings
from dataclasses import replace

from moco.cli.flags import Parser, add_fields, build
from moco.errors import ConfigError, MocoError
from moco.transfer.finetune import NORMS

from .ablate import STUDIES, ablate
from .bench import BenchSettings, bench
from .data_path import DataPathSettings
from .data_path import run as run_data_path
from .gpu_check import GpuCheckSettings, gpu_check, publish
from .transfer_study import transfer_study


def field_values(pairs: list[str]) -> dict[str, str]:
    """{"width": "32"} from ["width=32"]; the config checks names and types when it applies them."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set {pair!r}: write FIELD=VALUE, e.g. --set width=32")
        values[name.strip().replace("-", "_")] = value.strip()
    return values


def cmd_bench(args: argparse.Namespace) -> None:
    bench(replace(build(args, BenchSettings), overrides=field_values(args.set)), args.out)


def cmd_data(args: argparse.Namespace) -> None:
    run_data_path(build(args, DataPathSettings), args.out)


def cmd_gpu_check(args: argparse.Namespace) -> None:
    if args.publish:
        print(f"wrote {publish(args.publish)}")
        return
    gpu_check(build(args, GpuCheckSettings), args.out)


def cmd_ablate(args: argparse.Namespace) -> None:
    path = ablate(args.out, tuple(args.studies), args.epochs, tuple(args.seeds), args.threads, not args.table_only)
    print(f"wrote {path} (table), results.csv and plots next to it")


def cmd_negatives(args: argparse.Namespace) -> None:
    from .negatives import negatives

    print(f"wrote {negatives(args.out, args.queries, args.train_subset)}")


def cmd_head_probe(args: argparse.Namespace) -> None:
    from .head_probe import head_probe

    print(f"wrote {head_probe(args.out, tuple(args.checkpoints))}")


def cmd_transfer(args: argparse.Namespace) -> None:
    from moco.transfer.detection import DetectionConfig
    from moco.transfer.segmentation import SegmentationConfig

    def configs(cls):
        """The task's default config, its schedule (warm-up, lr steps) stretched to --iterations."""
        cfg = cls()
        changes = {k: v for k, v in (("batch_size", args.batch_size), ("threads", args.threads), ("lr", args.lr),
                                     ("norm", args.norm), ("trainable_layers", args.trainable_layers),
                                     ("clip_grad", args.clip_grad))
                   if v is not None}
        if args.iterations is not None:
            scale = args.iterations / cfg.iterations
            changes |= {"iterations": args.iterations, "warmup_iters": int(cfg.warmup_iters * scale),
                        "lr_steps": [max(1, int(step * scale)) for step in cfg.lr_steps]}
        if args.warmup_iters is not None:
            changes["warmup_iters"] = args.warmup_iters
        return replace(cfg, **changes)

    path = transfer_study(args.out, args.moco, args.supervised, args.runs, args.scenes_train, args.scenes_test,
                          args.scene_size, configs(DetectionConfig), configs(SegmentationConfig), tuple(args.seeds),
                          tuple(args.tasks))
    print(f"wrote {path} (table), results.csv and plots next to it")


def build_parser() -> Parser:
    parser = Parser(prog="python -m benchmarks", description="The project's benchmarks and studies; results go "
                    "to docs/ with the commit, machine and command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    p = sub.add_parser("bench", help="pretraining speed and time to accuracy, the library against a faithful "
                       "reference", description="Measures, in one process on the same data and model, the images/s of "
                       "the library's pretraining step and of a reference written from the paper and the official "
                       "code (per-image PIL augmentation in DataLoader workers), FLOPs per image, the fraction of the "
                       "machine's matmul peak (in the dtype it computes in) and peak memory (--mode throughput); or "
                       "kNN top-1 against training time within a budget (--mode time-to-accuracy). Results go to "
                       "OUT/<mode>-<machine>.json and OUT.md is regenerated from all results files.")
    add_fields(p, BenchSettings, skip=("overrides",))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a field of the preset's config, e.g. --set width=32 (repeatable)")
    p.add_argument("--out", default="docs/benchmarks", help="results folder; the Markdown page is OUT.md")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="the full-resolution data path on an ImageNet-like folder, against torchvision",
                       description="Images/s per core of a streamed folder (decode + two crops of 224 px of the "
                       "originals in workers) against torchvision's ImageFolder with the official v2 two-crop "
                       "transform, JPEG decode alone, peak RSS at two folder sizes, and the CPU cores a GPU needs. "
                       "Makes its photo folders once (a few minutes).")
    add_fields(p, DataPathSettings)
    p.add_argument("--out", default="docs/benchmarks", help="results folder; the Markdown page is OUT.md")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("gpu-check", help="one prepared run of the CUDA paths and their figures, under 8 minutes",
                       description="On a machine with one CUDA GPU, in priority order and within --budget-minutes "
                       "(8 by default): the machine and its fp32/bf16 matmul peaks; the CUDA tests (tests/test_gpu.py: "
                       "AMP in both dtypes with the gradient scaler, channels_last, compile, the device's augmentation "
                       "against the CPU's, a real CUDA out-of-memory error, SyncBN, one NCCL process under torchrun, "
                       "resume); throughput against the faithful reference of the small CNN at 28 px, ResNet-18 at "
                       "32 px, ResNet-50 (v2) and ViT-S/16 (v3) at 224 px in fp32 and bf16 (images/s, peak GPU memory, "
                       "share of the matmul peak); the 224-px data path from real JPEGs with the machine's CPU "
                       "workers and JPEG decoding on the GPU, against ResNet-50's step rate; time to accuracy of the "
                       "main job's recipe and a ResNet-18 version (--accuracy-minutes each); bf16 compiled last. "
                       "Writes OUT/results.json, summary.md, log.txt and tests.xml. --device cpu is the dry run "
                       "(tiny sizes, about a minute). A step that would start past the budget is recorded as not run.")
    add_fields(p, GpuCheckSettings)
    p.add_argument("--out", default="runs/gpu-check", help="folder of results.json, summary.md, log.txt, tests.xml")
    p.add_argument("--publish", metavar="RESULTS_JSON", help="instead of measuring: add a gpu-check's entries to "
                   "docs/benchmarks and regenerate docs/benchmarks.md")
    p.set_defaults(func=cmd_gpu_check)

    p = sub.add_parser("ablate", help="the paper's ablations on Fashion-MNIST, with seeds",
                       description="Runs of the cpu preset with one change each, on all 60,000 Fashion-MNIST training "
                       "images, every point with each seed: momentum m, queue size K, the three mechanisms at equal K "
                       "and steps, shuffle BN on/off, v1 -> v2. Writes results.csv, results.md (the paper's claims, "
                       "shown or not, and the tables) and PNG plots. Finished runs are kept, a stopped run continues "
                       "from its checkpoint, and runs of an older preset are measured again.")
    p.add_argument("--out", default="docs/ablations", help="output folder")
    p.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES), help="which studies")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (end-to-end: as many steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every point")
    p.add_argument("--threads", type=int, help="torch CPU threads of each run (none: torch's default)")
    p.add_argument("--table-only", action="store_true", help="write the tables and plots from the finished runs, "
                   "training nothing")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("negatives", help="the queue study's targeted experiment: where the negatives' weight falls",
                       description="For each encoder of the queue study (seed 0) and queues of K = 256 ... 16384 random "
                       "training images: the share of the InfoNCE negatives' softmax weight, and of the 10 hardest "
                       "negatives, that is of the query's own class. Writes OUT/negatives.md.")
    p.add_argument("--out", default="docs/ablations", help="the ablations' folder (results.csv, runs/)")
    p.add_argument("--queries", type=int, default=1000, help="queries measured per encoder and K")
    p.add_argument("--train-subset", type=int, default=20000, help="images the queries and queues are drawn from")
    p.set_defaults(func=cmd_negatives)

    p = sub.add_parser("head-probe", help="the v1 -> v2 study's targeted experiment: what each head's backbone keeps",
                       description="For the v1 -> v2 study's linear/MLP head pairs (equal temperature, augmentation and "
                       "width; every seed): how well a ridge regression recovers a random brightness factor and a "
                       "random mirroring of the test images, and the class, from the backbone's features and from the "
                       "head's outputs; raw pixels and a random encoder for reference. Writes OUT/head_probe.md.")
    p.add_argument("--out", default="docs/ablations", help="the ablations' folder (results.csv, runs/)")
    p.add_argument("--checkpoints", nargs="*", default=[], metavar="CHECKPOINT", help="more pretraining "
                   "checkpoints to probe after the study's (e.g. the main job with either head)")
    p.set_defaults(func=cmd_head_probe)

    p = sub.add_parser("transfer", help="the paper's transfer study in miniature: MoCo vs supervised vs random",
                       description="Fine-tune MoCo, supervised and random initialisations of the same backbone with "
                       "the same schedule for detection (Faster R-CNN FPN, box AP) and segmentation (mIoU) on scenes "
                       "of Fashion-MNIST test-split items. Pretrains (CPU preset) and trains the supervised baseline "
                       "if no checkpoints are given. Finished rows of OUT/results.csv are kept.")
    p.add_argument("--moco", help="MoCo checkpoint (default: pretrain one in RUNS/moco)")
    p.add_argument("--supervised", help="supervised checkpoint (default: train one in RUNS/supervised)")
    p.add_argument("--out", default="docs/transfer", help="results folder")
    p.add_argument("--runs", default="runs/transfer", help="folder of the pretraining runs it makes")
    p.add_argument("--scenes-train", type=int, default=1000)
    p.add_argument("--scenes-test", type=int, default=300)
    p.add_argument("--scene-size", type=int, default=96)
    p.add_argument("--iterations", type=int, help="fine-tuning iterations (default: the fine-tuning configs')")
    p.add_argument("--batch-size", type=int, help="fine-tuning batch (default: the fine-tuning configs')")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the fine-tuning configs')")
    p.add_argument("--norm", choices=NORMS, help="the backbone's normalisation while "
                   "fine-tuning (default: the fine-tuning configs')")
    p.add_argument("--trainable-layers", type=int, help="backbone units trained, from the last (default: all)")
    p.add_argument("--warmup-iters", type=int, help="fine-tuning warm-up iterations (default: the fine-tuning "
                   "configs', scaled with --iterations)")
    p.add_argument("--clip-grad", type=float, help="clip the gradients' global L2 norm to this (default: no clipping)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds of every initialisation")
    p.add_argument("--tasks", nargs="+", choices=("detect", "segment"), default=["detect", "segment"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=cmd_transfer)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, category, *a, **k: f"benchmarks: warning: {message}\n"
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MocoError as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
