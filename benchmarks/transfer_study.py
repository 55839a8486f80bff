"""The paper's transfer comparison (Tables 2-5) in miniature, on one CPU.

Three initialisations of the same backbone (MoCo pretraining, supervised pre-training with the same data
and budget, random) are each fine-tuned with the same schedule for detection (Faster R-CNN FPN) and
semantic segmentation (DeepLabV3 head) on scenes composed of real Fashion-MNIST items from the test split,
which pretraining never sees. Results: a CSV, a Markdown table, plots, with the commit, machine and command.
"""

import time
from dataclasses import asdict
from pathlib import Path

from moco import config as C
from moco.checkpoints import load_encoder
from moco.files import write_text
from moco.pipeline import pretrain
from moco.train.supervised import supervised
from moco.transfer.detection import DetectionConfig, finetune_detection
from moco.transfer.scenes import make_scenes
from moco.transfer.segmentation import SegmentationConfig, finetune_segmentation

from .provenance import command, commit, machine, read_rows, write_rows

INITS = ("moco", "supervised", "random")
TASKS = ("detect", "segment")


def transfer_study(out: str | Path = "docs/transfer", moco: str | None = None, supervised_ckpt: str | None = None,
                   runs: str | Path = "runs/transfer", n_train: int = 1000, n_test: int = 300, size: int = 96,
                   detect: DetectionConfig | None = None, segment: SegmentationConfig | None = None,
                   echo=print) -> Path:
    """Fine-tune every initialisation on every task; finished rows in out/results.csv are kept."""
    out, runs = Path(out), Path(runs)
    out.mkdir(parents=True, exist_ok=True)
    detect, segment = detect or DetectionConfig(), segment or SegmentationConfig()
    base = C.apply_overrides(C.preset("cpu"), {"out_dir": str(runs / "moco"), "progress": False, "knn_every": 0})
    if moco is None:
        moco = str(runs / "moco" / "checkpoint.pt")
        if not Path(moco).is_file():
            echo("pretraining MoCo (CPU preset) ...")
            pretrain(base, baselines=False, echo=echo)
    if supervised_ckpt is None:
        supervised_ckpt = str(runs / "supervised" / "supervised.pt")
        if not Path(supervised_ckpt).is_file():
            echo("supervised pre-training (same backbone, data and budget) ...")
            cfg = load_encoder(moco).config or base  # the MoCo run's own backbone, data and budget
            supervised(C.apply_overrides(cfg, {"out_dir": str(runs / "supervised"), "progress": False}), echo=echo)
    encoders = {"moco": load_encoder(moco), "supervised": load_encoder(supervised_ckpt), "random": None}
    reference = encoders["moco"]
    arch = reference.arch
    train, test = make_scenes(n_train, n_test, size)
    echo(f"scenes: {n_train} for fine-tuning, {n_test} for evaluation, {size}x{size} px, items from "
         "the Fashion-MNIST test split")
    csv_path = out / "results.csv"
    rows = {(r["init"], r["task"]): r for r in read_rows(csv_path)}
    for task in TASKS:
        for init in INITS:
            if (init, task) in rows:
                echo(f"{task} / {init}: done before, kept")
                continue
            tic = time.perf_counter()
            encoder = encoders[init]
            # a random small_cnn is built as wide as the pretrained one
            shape = ({"width": reference.config.model.width, "last_width": reference.config.model.last_width}
                     if reference.config else {})
            if task == "detect":
                metrics = finetune_detection(encoder, arch, train, test, DetectionConfig(**{**asdict(detect), **shape}),
                                             echo=echo)
            else:
                metrics = finetune_segmentation(encoder, arch, train, test,
                                                SegmentationConfig(**{**asdict(segment), **shape}), echo=echo)
            rows[(init, task)] = {"task": task, "init": init, **{k: round(v, 2) for k, v in metrics.items()},
                                  "minutes": round((time.perf_counter() - tic) / 60, 1), "commit": commit()}
            write_rows(csv_path, list(rows.values()))
    header = {"commit of each run": ", ".join(sorted({r["commit"] for r in rows.values()})),
              "machine": machine(), "command": command("transfer"),
              "backbone": f"{arch} (width {reference.config.model.width})" if reference.config else arch,
              "scenes": f"{n_train} train / {n_test} test, {size}px, 1-5 Fashion-MNIST test-split items each",
              "moco checkpoint": moco, "supervised checkpoint": supervised_ckpt,
              "detection schedule": _schedule(detect), "segmentation schedule": _schedule(segment)}
    _markdown(out / "results.md", list(rows.values()), header)
    _plot(out, list(rows.values()))
    return out / "results.md"


def _schedule(cfg) -> str:
    return (f"{cfg.iterations} iterations, batch {cfg.batch_size}, lr {cfg.lr} (x0.1 at {cfg.lr_steps}), "
            f"warm-up {cfg.warmup_iters}, norm {cfg.norm}, the same for every initialisation")


def _markdown(path: Path, rows: list[dict], header: dict[str, str]) -> None:
    lines = ["# Transfer: MoCo vs supervised vs random initialisation (measured)", ""]
    lines += [f"- {k}: `{v}`" for k, v in header.items()] + [""]
    for task, metrics in (("detect", ("AP", "AP50", "AP75")), ("segment", ("mIoU", "pixel_acc"))):
        selected = [r for r in rows if r["task"] == task]
        if not selected:
            continue
        title = "Detection (Faster R-CNN, FPN), box AP on the test scenes" if task == "detect" else \
            "Semantic segmentation (DeepLabV3 head), mIoU on the test scenes"
        lines += [f"## {title}", "", "| initialisation | " + " | ".join(metrics) + " | minutes |",
                  "|---|" + "---|" * (len(metrics) + 1)]
        lines += ["| " + r["init"] + " | " + " | ".join(f"{float(r[m]):.1f}" for m in metrics) + f" | {r['minutes']} |"
                  for r in selected]
        lines += ["", f"![{task}]({task}.png)", ""]
    write_text(path, "\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict]) -> None:
    from matplotlib.figure import Figure

    for task, metrics in (("detect", ("AP", "AP50", "AP75")), ("segment", ("mIoU", "pixel_acc"))):
        selected = [r for r in rows if r["task"] == task]
        if not selected:
            continue
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        width = 0.8 / len(selected)
        for i, r in enumerate(selected):
            ax.bar([j + i * width for j in range(len(metrics))], [float(r[m]) for m in metrics], width, label=r["init"])
        ax.set_xticks([j + width * (len(selected) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.set(ylabel="%", title=f"{'Detection' if task == 'detect' else 'Segmentation'}: same schedule for each init")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=120)
