"""The paper's transfer comparison (Tables 2-5) in miniature, on one CPU.

Three initialisations of the same backbone (MoCo pretraining, supervised pre-training with the same data
and budget, random) are each fine-tuned with the same schedule and the same seeds for detection (Faster R-CNN
FPN) and semantic segmentation (DeepLabV3 head) on scenes composed of real Fashion-MNIST items from the test
split, which pretraining never sees. The paper's claim, MoCo >= supervised >> random, is judged per task over
the seeds. Results: a CSV, a Markdown table with the claims, plots, with the commit, machine and command.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import mean

from moco import config as C
from moco.checkpoints import load_encoder
from moco.files import write_text
from moco.pipeline import pretrain
from moco.train.supervised import supervised
from moco.transfer.detection import DetectionConfig, finetune_detection
from moco.transfer.finetune import FinetuneConfig
from moco.transfer.scenes import make_scenes
from moco.transfer.segmentation import SegmentationConfig, finetune_segmentation

from .provenance import command, commit, machine, read_rows, write_rows

INITS = ("moco", "supervised", "random")
TASKS = ("detect", "segment")
METRICS = {"detect": ("AP", "AP50", "AP75"), "segment": ("mIoU", "pixel_acc")}  # the first is the one judged
TITLES = {"detect": "Detection (Faster R-CNN, FPN), box AP on the test scenes",
          "segment": "Semantic segmentation (DeepLabV3 head), mIoU on the test scenes"}
# what does not change a result: where and how fast it runs, and the seed (a column of its own)
NOT_SETTING = ("device", "threads", "log_every", "seed")


@dataclass(frozen=True)
class Spread:
    """One metric of one initialisation over the seeds."""

    mean: float
    spread: float  # max - min over the seeds
    seeds: int

    def __str__(self) -> str:
        return f"{self.mean:.1f} ± {self.spread / 2:.1f}" if self.seeds > 1 else f"{self.mean:.1f} (1 seed)"


def spread(values: list[float]) -> Spread:
    return Spread(mean(values), max(values) - min(values), len(values))


def above(a: Spread, b: Spread) -> bool:
    """a is better than b by more than the larger of their seed ranges."""
    return a.mean - b.mean > max(a.spread, b.spread)


def judge(moco: Spread, sup: Spread, rand: Spread) -> str:
    """The paper's claim for one task: MoCo >= supervised (not below it beyond the seeds' range) >> random (both
    above random beyond the seeds' range). Needs two seeds of each."""
    if min(moco.seeds, sup.seeds, rand.seeds) < 2:
        return "not yet (one seed)"
    failed = [why for ok, why in ((not above(sup, moco), "MoCo below supervised"),
                                  (above(sup, rand), "supervised not above random"),
                                  (above(moco, rand), "MoCo not above random")) if not ok]
    return "**shown**" if not failed else "not shown: " + ", ".join(failed)


def setting(cfg: FinetuneConfig, checkpoints: dict[str, object]) -> str:
    """What a finished row is matched on: the schedule and the checkpoints, not the seed or the threads."""
    fields = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTING}
    return json.dumps({**fields, "checkpoints": checkpoints}, sort_keys=True)


def file_digest(path: str) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def stored_setting(row: dict[str, str], cfg: FinetuneConfig) -> str:
    """A row's setting with the fields added to `cfg`'s class since it was written at their defaults, so that a
    new option leaves finished rows matched."""
    defaults = {k: v for k, v in asdict(type(cfg)()).items() if k not in NOT_SETTING}
    return json.dumps({**defaults, **json.loads(row["setting"])}, sort_keys=True)


def transfer_study(out: str | Path = "docs/transfer", moco: str | None = None, supervised_ckpt: str | None = None,
                   runs: str | Path = "runs/transfer", n_train: int = 1000, n_test: int = 300, size: int = 96,
                   detect: DetectionConfig | None = None, segment: SegmentationConfig | None = None,
                   seeds: tuple[int, ...] = (0, 1), tasks: tuple[str, ...] = TASKS, echo=print) -> Path:
    """Fine-tune every initialisation on every task with every seed; finished rows of out/results.csv (same
    schedule, checkpoints, scenes and seed) are kept, so a stopped study continues where it was."""
    out, runs = Path(out), Path(runs)
    out.mkdir(parents=True, exist_ok=True)
    configs = {"detect": detect or DetectionConfig(), "segment": segment or SegmentationConfig()}
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
    # a random small_cnn is built as wide as the pretrained one
    model = reference.config.model if reference.config else None
    shape = {"width": model.width, "last_width": model.last_width, "depths": model.depths} if model else {}
    scenes = {"train": n_train, "test": n_test, "size": size}
    train, test = make_scenes(n_train, n_test, size)
    echo(f"scenes: {n_train} for fine-tuning, {n_test} for evaluation, {size}x{size} px, items from "
         "the Fashion-MNIST test split")
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    done = {(r["task"], r["init"], int(r["seed"]), stored_setting(r, configs[r["task"]]))
            for r in rows if "setting" in r and r["task"] in configs}
    # a checkpoint is matched on its bytes as well as its path: a new pretraining run at the same path is new rows
    checkpoints = {"moco": moco, "supervised": supervised_ckpt, "scenes": json.dumps(scenes),
                   "sha256": {"moco": file_digest(moco), "supervised": file_digest(supervised_ckpt)}}
    for task in tasks:
        cfg = replace(configs[task], **shape)
        key = setting(cfg, checkpoints)
        for seed in seeds:
            for init in INITS:
                if (task, init, seed, key) in done:
                    echo(f"{task} / {init} / seed {seed}: done before, kept")
                    continue
                echo(f"{task} / {init} / seed {seed}")
                tic = time.perf_counter()
                run = finetune_detection if task == "detect" else finetune_segmentation
                metrics = run(encoders[init], arch, train, test, replace(cfg, seed=seed), echo=echo)
                rows.append({"task": task, "init": init, "seed": seed,
                             **{k: round(v, 2) for k, v in metrics.items()},
                             "minutes": round((time.perf_counter() - tic) / 60, 1), "commit": commit(),
                             "setting": key})
                done.add((task, init, seed, key))
                write_rows(csv_path, rows)
    current = {task: setting(replace(configs[task], **shape), checkpoints) for task in tasks}
    selected = [r for r in rows if r["task"] in current and "setting" in r
                and stored_setting(r, configs[r["task"]]) == current[r["task"]] and int(r["seed"]) in seeds]
    header = {"commit of each run": ", ".join(sorted({r["commit"] for r in selected})),
              "machine": machine(), "command": command("transfer"),
              "backbone": (f"{arch} (width {shape['width']}, last stage {shape['last_width']}, layers per stage "
                           f"{' '.join(map(str, shape['depths']))})" if shape else arch),
              "scenes": f"{n_train} train / {n_test} test, {size}px, 1-5 Fashion-MNIST test-split items each",
              "moco checkpoint": moco, "supervised checkpoint": supervised_ckpt,
              **{f"{task} schedule": _schedule(configs[task]) for task in tasks},
              "seeds": ", ".join(str(s) for s in seeds)}
    _markdown(out / "results.md", selected, header)
    _plot(out, selected)
    return out / "results.md"


def _schedule(cfg: FinetuneConfig) -> str:
    return (f"{cfg.iterations} iterations, batch {cfg.batch_size}, lr {cfg.lr} (x0.1 at {cfg.lr_steps}), "
            f"warm-up {cfg.warmup_iters}, norm {cfg.norm}, trainable layers {cfg.trainable_layers}, "
            "the same for every initialisation")


def table(rows: list[dict], task: str) -> dict[str, dict[str, Spread]]:
    """{init: {metric: Spread over the seeds}} of one task."""
    return {init: {m: spread([float(r[m]) for r in rows if r["task"] == task and r["init"] == init])
                   for m in METRICS[task]}
            for init in INITS if any(r["task"] == task and r["init"] == init for r in rows)}


def claims(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(task, paper's numbers, measured here, shown?) for every task with all three initialisations."""
    paper = {"detect": "VOC detection AP 55.9 / 53.5 / 33.8 (Table 2)",
             "segment": "Cityscapes semantic segmentation mIoU 75.3 / 74.6 / 65.3 (Table 6)"}
    out = []
    for task in TASKS:
        t = table(rows, task)
        if all(init in t for init in INITS):
            first = METRICS[task][0]
            measured = " / ".join(str(t[init][first]) for init in INITS)
            out.append((f"{task}: MoCo >= supervised >> random ({first})", paper[task], measured,
                        judge(*(t[init][first] for init in INITS))))
    return out


def _markdown(path: Path, rows: list[dict], header: dict[str, str]) -> None:
    lines = ["# Transfer: MoCo vs supervised vs random initialisation (measured)", ""]
    lines += [f"- {k}: `{v}`" for k, v in header.items()] + [""]
    lines += ["Mean ± half the range over the seeds. A difference counts when it exceeds the larger of the two "
              "seed ranges.", "", "| paper claim | paper (MoCo / supervised / random) | measured here (MoCo / "
              "supervised / random) | shown? |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(c)} |" for c in claims(rows)] + [""]
    for task in TASKS:
        t = table(rows, task)
        if not t:
            continue
        metrics = METRICS[task]
        lines += [f"## {TITLES[task]}", "", "| initialisation | " + " | ".join(metrics) + " | per seed | minutes |",
                  "|---|" + "---|" * (len(metrics) + 2)]
        for init, values in t.items():
            mine = [r for r in rows if r["task"] == task and r["init"] == init]
            mine.sort(key=lambda r: int(r["seed"]))
            per_seed = " / ".join(f"{float(r[metrics[0]]):.1f}" for r in mine)
            minutes = " / ".join(str(r["minutes"]) for r in mine)
            lines += [f"| {init} | " + " | ".join(str(values[m]) for m in metrics) + f" | {per_seed} | {minutes} |"]
        lines += ["", f"![{task}]({task}.png)", ""]
    write_text(path, "\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict]) -> None:
    from matplotlib.figure import Figure

    for task in TASKS:
        t = table(rows, task)
        if not t:
            continue
        metrics = METRICS[task]
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        width = 0.8 / len(t)
        for i, (init, values) in enumerate(t.items()):
            ax.bar([j + i * width for j in range(len(metrics))], [values[m].mean for m in metrics], width,
                   yerr=[values[m].spread / 2 for m in metrics], capsize=3, label=init)
        ax.set_xticks([j + width * (len(t) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.set(ylabel="%", title=f"{'Detection' if task == 'detect' else 'Segmentation'}: same schedule for each init")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=120)
