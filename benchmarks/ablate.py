"""The paper's ablations (section 4.1 and its appendix) on Fashion-MNIST, at a budget where the encoders learn.

Every point is the main job's recipe (`BASE`) with one change, trained on all 60,000 training images for
`epochs` (10 by default: 2,340 steps of 256 images), once with each seed. End-to-end runs with a larger batch train
for the same number of optimizer steps, not epochs. Each run is scored by weighted kNN (k=200, t=0.1) on the
10,000 test images, next to the same kNN on its randomly initialised encoder (the same seed) and on raw pixels.

Studies:
    momentum     m in {0, 0.9, 0.99, 0.999, 0.9999} (paper Sec. 4.1: m=0 fails, 0.99-0.999 best)
    queue        MoCo's K in {16, 64, 256, 1024, 4096, 16384} (paper Fig. 3: larger is better; below 256 the queue
                 holds part of the previous batch)
    mechanisms   MoCo, memory bank and end-to-end at equal K and equal steps (paper Fig. 3)
    shuffle_bn   shuffling BN on and off (paper Fig. 4: without it the pretext task is cheated)
    v1_v2        v1 (linear head, T=0.07, v1 augmentation), + MLP head and T=0.2, + aug+ (MoCo v2, Table 1)

A run is identified by its whole resolved config: finished runs (in results.csv) are kept, a run that was stopped
continues from its last checkpoint, and a run of an older BASE or older defaults is measured again. A result counts as an effect
only when the difference of the means exceeds the larger of the two points' seed ranges (max - min).
"""

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from moco import config as C
from moco.errors import ConfigError
from moco.files import write_text
from moco.pipeline import pretrain

from .provenance import command, commit, machine, read_rows, write_rows

STUDIES = ("momentum", "queue", "mechanisms", "shuffle_bn", "v1_v2")
# The main job's recipe, spelled out so that a later change of the cpu preset leaves these studies' runs valid: the
# defaults (small CNN 16 wide, MLP head, K=4096, m=0.99, split BN in 8, batch 256, SGD lr 0.06 cosine, aug+) with
# T=0.1, crops of at least 60%, jitter 0.8 and a visible blur.
BASE = {"temperature": 0.1, "crop_min_scale": 0.6, "jitter_strength": 0.8, "blur_sigma": [0.1, 1.0]}
TRAIN_IMAGES = 60000  # Fashion-MNIST's training set: every run uses all of it
QUEUE_SIZES = (16, 64, 256, 1024, 4096, 16384)  # the queue study's K, from a 16th of a batch to 27% of the data
BASE_BATCH = 256  # the recipe's batch (the defaults'); end-to-end's larger batches get the same number of steps


@dataclass(frozen=True)
class Point:
    """One setting of a study: BASE with `overrides`, run once per seed."""

    study: str
    name: str
    overrides: dict[str, Any]


def equal_steps_epochs(epochs: int, batch: int) -> int:
    """Epochs with `batch` that make as many optimizer steps as `epochs` with the preset's batch (rounded)."""
    steps = epochs * (TRAIN_IMAGES // BASE_BATCH)
    return max(1, round(steps / (TRAIN_IMAGES // batch)))


def plan(studies: tuple[str, ...], epochs: int) -> list[Point]:
    """The points of the chosen studies, in the order they run."""
    points: list[Point] = []
    if "momentum" in studies:
        points += [Point("momentum", f"m={m}", {"key_momentum": m}) for m in (0.0, 0.9, 0.99, 0.999, 0.9999)]
    if "queue" in studies:
        points += [Point("queue", f"K={K}", {"queue_size": K}) for K in QUEUE_SIZES]
    if "mechanisms" in studies:
        for K in (256, 1024):  # end-to-end's K is its batch minus one: 255 and 1023
            points += [Point("mechanisms", f"moco K={K}", {"queue_size": K}),
                       Point("mechanisms", f"memory_bank K={K}", {"method": "memory_bank", "queue_size": K}),
                       Point("mechanisms", f"end_to_end K={K - 1}",
                             {"method": "end_to_end", "batch_size": K, "epochs": equal_steps_epochs(epochs, K)})]
    if "shuffle_bn" in studies:
        for group, splits in ((32, 8), (8, 32)):  # BN groups of 32 images (the paper's per GPU) and of 8
            points += [Point("shuffle_bn", f"shuffle, groups of {group}", {"bn_splits": splits}),
                       Point("shuffle_bn", f"no shuffle, groups of {group}", {"bn_splits": splits, "shuffle_bn": False})]
    if "v1_v2" in studies:
        points += [Point("v1_v2", "v1: linear head, T=0.07, aug v1", {"head": "linear", "temperature": 0.07,
                                                                       "augment": "v1"}),
                   Point("v1_v2", "+ MLP head, T=0.2", {"head": "mlp", "temperature": 0.2, "augment": "v1"}),
                   Point("v1_v2", "+ aug+ (v2)", {"head": "mlp", "temperature": 0.2, "augment": "v2"}),
                   # the head alone, at equal temperature and augmentation: v1's, and the base's (an MLP, T=0.1)
                   Point("v1_v2", "MLP head, T=0.07, aug v1", {"head": "mlp", "temperature": 0.07, "augment": "v1"}),
                   Point("v1_v2", "linear head, the base's T=0.1 and aug", {"head": "linear"}),
                   Point("v1_v2", "MLP head, the base's T=0.1 and aug", {}),
                   # the same pair with 256 features (a last stage of 256 channels) for the head's 128 outputs
                   Point("v1_v2", "linear head, 256 features", {"head": "linear", "last_width": 256}),
                   Point("v1_v2", "MLP head, 256 features", {"last_width": 256})]
    return points


def run_key(cfg: C.PretrainConfig) -> str:
    """What a finished run is matched on: its whole resolved config but the folder it wrote to and its CPU threads. A
    run measured under an earlier BASE (or earlier defaults) therefore does not count as done once they change."""
    settings = asdict(cfg)
    del settings["run"]["out_dir"], settings["run"]["threads"]
    return json.dumps(settings, sort_keys=True)


def finished(csv_path: Path) -> dict[str, dict[str, Any]]:
    """The rows of the results CSV by run key. A stored config is read back as a config first, so that a field
    added to the configs since (at its default) leaves the run's key unchanged."""
    return {run_key(C.from_dict(json.loads(r["config"]))): r for r in read_rows(csv_path)}


def run_config(point: Point, seed: int, epochs: int, out: Path, threads: int | None = None) -> C.PretrainConfig:
    """The point's config for one seed; its folder is named by the config, so a changed config never continues an
    old run's checkpoint."""
    base = {"epochs": epochs, "seed": seed, "threads": threads, "knn_every": 0, "tensorboard": False,
            "progress": False}
    cfg = C.apply_overrides(C.PretrainConfig(preset="ablation"), {**BASE, **base, **point.overrides})
    digest = hashlib.sha1(run_key(cfg).encode()).hexdigest()[:10]
    return C.apply_overrides(cfg, {"out_dir": str(out / "runs" / digest)})


def ablate(out_dir: str | Path = "docs/ablations", studies: tuple[str, ...] = STUDIES, epochs: int = 10,
           seeds: tuple[int, ...] = (0, 1), threads: int | None = None, train: bool = True,
           echo: Callable[[str], None] = print) -> Path:
    """Run the studies' points with every seed (keeping finished runs), then write the tables, the claims and plots.
    With `train` False, only write them from the runs finished so far (a point lacking runs is left out).

    Two ablations may share an output folder (e.g. one thread each on a 2-core machine, with different studies or
    seeds): each merges its results into the CSV as it was on disk just before writing."""
    unknown = set(studies) - set(STUDIES)
    if unknown:
        raise ConfigError(f"unknown studies {sorted(unknown)}; choose from {', '.join(STUDIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = finished(csv_path)
    points = plan(studies, epochs)
    for i, point in enumerate(points if train else []):
        for seed in seeds:
            cfg = run_config(point, seed, epochs, out, threads)
            key = run_key(cfg)
            label = f"[{i + 1}/{len(points)}] {point.study}: {point.name}, seed {seed}"
            rows |= finished(csv_path)
            if key in rows:
                echo(f"{label}: done before, kept")
                continue
            echo(label)
            r = measure(cfg, point, out)
            echo(f"    kNN {r['knn_top1']}% (random encoder {r['random_encoder']}%), {r['minutes']} min")
            rows = finished(csv_path) | {key: r}
            write_rows(csv_path, list(rows.values()))  # after every run: an interrupted study keeps its results
    # The page holds every study's finished runs, not only those of the studies just run.
    keys = [(run_key(run_config(p, s, epochs, out)), p, s) for p in plan(STUDIES, epochs) for s in seeds]
    table = [{**rows[k], "study": p.study, "name": p.name, "seed": s} for k, p, s in keys if k in rows]
    header = {"commit of each run": ", ".join(sorted({r["commit"] for r in table})), "table written at commit": commit(),
              "machine": machine(), "command": command("ablate"),
              "budget": f"the main job's recipe for {epochs} epochs ({epochs * (TRAIN_IMAGES // BASE_BATCH)} steps of "
                        f"{BASE_BATCH}) on all {TRAIN_IMAGES} Fashion-MNIST training images; end-to-end with a larger "
                        f"batch for the same number of steps; seeds {', '.join(map(str, seeds))}"}
    write_markdown(out / "results.md", table, header)
    plot(out, table)
    return out / "results.md"


def measure(cfg: C.PretrainConfig, point: Point, out: Path) -> dict[str, Any]:
    """Train one run (continuing its checkpoint if it was stopped) and return its results row."""
    run_dir = Path(cfg.run.out_dir)
    tic = time.perf_counter()
    result = pretrain(cfg, resume="auto", echo=lambda s: None)
    if not result.baselines:  # stopped after its last epoch, before the baselines: measure it all again
        shutil.rmtree(run_dir)
        result = pretrain(cfg, echo=lambda s: None)
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep_curve(run_dir, out / "curves" / f"{run_dir.name}.jsonl")
    epochs = [r for r in curve if r["tag"] == "epoch"]
    return {"name": point.name, "seed": cfg.run.seed, "run": run_dir.name,
            "knn_top1": round(result.knn["top1"], 2), "random_encoder": round(result.baselines["random encoder"]["top1"], 2),
            "raw_pixels": round(result.baselines["raw pixels"]["top1"], 2), "final_loss": round(result.loss, 4),
            "final_pretext_acc": round(epochs[-1]["acc"], 2),
            "max_pretext_acc": round(max(r["acc"] for r in curve if r["tag"] == "train"), 2),
            "steps": epochs[-1]["step"], "minutes": round((time.perf_counter() - tic) / 60, 2), "commit": commit(),
            "config": run_key(cfg)}


def keep_curve(run_dir: Path, curve_path: Path) -> None:
    """Copy a run's metrics next to the results (the run folders, with their checkpoints, are not kept in git)."""
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(curve_path, (run_dir / "metrics.jsonl").read_text())


# -- what the runs show ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """A point's kNN top-1 over its seeds."""

    mean: float
    spread: float  # max - min over the seeds
    seeds: int
    margin: float  # the smallest gain over the same seed's random encoder

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.spread / 2:.2f}" if self.seeds > 1 else f"{self.mean:.2f} (1 seed)"


def stats(rows: list[dict[str, Any]], column: str = "knn_top1") -> dict[str, Stat]:
    """{point name: Stat} of the rows of one study."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    return {name: Stat(mean(float(r[column]) for r in rs), max(float(r[column]) for r in rs) -
                       min(float(r[column]) for r in rs), len(rs),
                       min(float(r["knn_top1"]) - float(r["random_encoder"]) for r in rs))
            for name, rs in by.items()}


def beats(a: Stat, b: Stat) -> bool:
    """a is better than b by more than the seeds' spread (and both have at least 2 seeds)."""
    return a.seeds > 1 and b.seeds > 1 and a.mean - b.mean > max(a.spread, b.spread)


def verdict(ok: bool, *points: Stat) -> str:
    """"**shown**" or "not shown"; "not yet (one seed)" while a point the claim rests on has a single seed."""
    if any(p.seeds < 2 for p in points):
        return "not yet (one seed)"
    return "**shown**" if ok else "not shown"


def queue_verdict(q: dict[str, Stat]) -> str:
    """Larger K is better: over all sizes (a trend, not two end points), or up to a size where it saturates.

    Saturated at the i-th size: each size up to it beats the one before, and every larger size still beats the
    size before it (larger is never worse than the rise, but no longer better)."""
    sizes, names = list(q.values()), [n.removeprefix("K=") for n in q]  # in order of K
    if any(p.seeds < 2 for p in sizes):
        return "not yet (one seed)"
    if beats(sizes[-1], sizes[0]) and not any(beats(a, b) for i, a in enumerate(sizes) for b in sizes[i + 1:]):
        return "**shown**"
    top = 0
    while top + 1 < len(sizes) and beats(sizes[top + 1], sizes[top]):
        top += 1
    if top == 0 or not all(beats(p, sizes[top - 1]) for p in sizes[top + 1:]):
        return "not shown"
    flat = [p.mean for p in sizes[top:]]
    return (f"**shown** up to K={names[top]} ({sizes[0].mean:.2f} -> {sizes[top].mean:.2f}); saturated from there "
            f"(K={names[top]}-{names[-1]} within {max(flat) - min(flat):.2f})")


def claims(table: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(paper claim, paper's numbers, measured here, shown?) for every study with all its points measured."""
    s = {study: stats([r for r in table if r["study"] == study]) for study in STUDIES}
    out = []
    m = s["momentum"]
    if len(m) == 5:
        top = max(m["m=0.99"], m["m=0.999"], key=lambda stat: stat.mean)
        out.append(("a slowly moving key encoder: m=0 fails, accuracy rises up to m=0.99-0.999",
                    "m=0 fails, 0.9: 55.2, 0.99: 57.8, 0.999: 59.0, 0.9999: 58.9",
                    ", ".join(f"{n.removeprefix('m=')}: {v}" for n, v in m.items()),
                    verdict(beats(top, m["m=0.9"]) and beats(top, m["m=0.0"]), *m.values())))
    q = s["queue"]
    if len(q) == len(QUEUE_SIZES):
        out.append(("a larger dictionary is better", "all three mechanisms improve as K grows (Fig. 3)",
                    ", ".join(f"{n.removeprefix('K=')}: {v}" for n, v in q.items()) +
                    f" (the largest K is {QUEUE_SIZES[-1] / TRAIN_IMAGES:.0%} of the training set)", queue_verdict(q)))
    mech = s["mechanisms"]
    if len(mech) == 6:
        pairs = [(mech[f"moco K={K}"], mech[f"memory_bank K={K}"], mech[f"end_to_end K={K - 1}"]) for K in (256, 1024)]
        out.append(("at equal K, the memory bank is below MoCo", "2.6 points below at K=65536",
                    "; ".join(f"K={K}: MoCo {mo}, memory bank {mb}" for K, (mo, mb, _) in zip((256, 1024), pairs)),
                    verdict(all(beats(mo, mb) for mo, mb, _ in pairs), *mech.values())))
        out.append(("at equal K, end-to-end is on par with MoCo (where it fits in memory)",
                    "about equal up to K=1024",
                    "; ".join(f"K={K}: MoCo {mo}, end-to-end {e2e}" for K, (mo, _, e2e) in zip((256, 1024), pairs)),
                    verdict(not any(beats(mo, e2e) or beats(e2e, mo) for mo, _, e2e in pairs), *mech.values())))
    sb = s["shuffle_bn"]
    if len(sb) == 4:
        pretext = stats([r for r in table if r["study"] == "shuffle_bn"], "final_pretext_acc")
        shown, measured = False, []
        for group in (32, 8):
            on, off = f"shuffle, groups of {group}", f"no shuffle, groups of {group}"
            shown |= beats(sb[on], sb[off]) and pretext[off].mean > pretext[on].mean
            measured.append(f"groups of {group}: kNN {sb[on]} with shuffle, {sb[off]} without, final pretext "
                            f"accuracy {pretext[on].mean:.1f}% vs {pretext[off].mean:.1f}%")
        out.append(("without shuffling BN the pretext task is cheated: its accuracy races up, kNN falls",
                    "pretext accuracy > 99.9% early, linear accuracy lower", "; ".join(measured),
                    verdict(shown, *sb.values())))
    v = s["v1_v2"]
    names = ("v1: linear head, T=0.07, aug v1", "+ MLP head, T=0.2", "+ aug+ (v2)")
    if all(n in v for n in names):
        v1, mlp, v2 = (v[n] for n in names)
        out.append(("MoCo v2: the MLP head gains", "60.6 -> 66.2 (+5.6, T=0.2)", f"{v1} -> {mlp}",
                    verdict(beats(mlp, v1), mlp, v1)))
        out.append(("MoCo v2: aug+ (blur) gains on top", "66.2 -> 67.3 (+1.1; aug+ alone: 60.6 -> 63.4)", f"{mlp} -> {v2}",
                    verdict(beats(v2, mlp), v2, mlp)))
    pairs = {"T=0.07, aug v1": ("v1: linear head, T=0.07, aug v1", "MLP head, T=0.07, aug v1"),
             "T=0.1, the base's aug": ("linear head, the base's T=0.1 and aug", "MLP head, the base's T=0.1 and aug"),
             "T=0.1, 256 features": ("linear head, 256 features", "MLP head, 256 features")}
    pairs = {at: pair for at, pair in pairs.items() if all(n in v for n in pair)}
    if pairs:
        measured = "; ".join(f"{at}: linear {v[lin]} -> MLP {v[mlp]}" for at, (lin, mlp) in pairs.items())
        gains = [at for at, (lin, mlp) in pairs.items() if beats(v[mlp], v[lin])]
        shown = verdict(bool(gains), *(v[n] for pair in pairs.values() for n in pair))
        if gains and len(gains) < len(pairs):
            shown += f" at {', '.join(gains)} only"
        out.append(("the MLP head alone, at equal temperature and augmentation", "T=0.07: 60.6 -> 62.9 (Table 1)",
                    measured, shown))
    return out


def write_markdown(path: Path, table: list[dict[str, Any]], header: dict[str, str]) -> None:
    lines = ["# Ablations (measured)", ""] + [f"- {k}: `{v}`" for k, v in header.items()] + [""]
    lines += ["kNN top-1 (%) as mean ± half the range over the seeds. An effect is shown when the difference of the "
              "means exceeds the larger of the two seed ranges.", "",
              "| paper claim | paper (ImageNet, linear top-1) | measured here (kNN top-1) | shown? |", "|---|---|---|---|"]
    lines += [f"| {c} | {p} | {m} | {v} |" for c, p, m, v in claims(table)]
    lines += [""]
    for study in STUDIES:
        selected = [r for r in table if r["study"] == study]
        if not selected:
            continue
        s = stats(selected)
        lines += [f"## {study}", "", "| point | kNN top-1 | per seed | random encoder | raw pixels | gain over random "
                  "(min) | pretext acc, final | steps |", "|---|---|---|---|---|---|---|---|"]
        for name, stat in s.items():
            rs = [r for r in selected if r["name"] == name]
            lines.append(f"| {name} | {stat} | {' / '.join(str(r['knn_top1']) for r in rs)} | "
                         f"{' / '.join(str(r['random_encoder']) for r in rs)} | {rs[0]['raw_pixels']} | "
                         f"{stat.margin:+.2f} | {' / '.join(str(r['final_pretext_acc']) for r in rs)} | "
                         f"{rs[0]['steps']} |")
        lines += ["", f"![{study}]({study}.png)", ""]
    write_text(path, "\n".join(lines) + "\n")


def plot(out: Path, table: list[dict[str, Any]]) -> None:
    """One figure a study: kNN top-1 of every point (mean, seed range as error bars), with the random encoder and
    raw pixels; for shuffle BN and v1/v2 also the pretext accuracy during training (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for study in STUDIES:
        selected = [r for r in table if r["study"] == study]
        if not selected:
            continue
        s = stats(selected)
        curves = study in ("shuffle_bn", "v1_v2")
        fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(10 if curves else 6, 3.8), squeeze=False)
        ax = axes[0][0]
        names = list(s)
        ax.errorbar(range(len(names)), [s[n].mean for n in names], yerr=[s[n].spread / 2 for n in names], fmt="o",
                    capsize=4, label="MoCo (mean, seed range)")
        ax.axhline(mean(float(r["random_encoder"]) for r in selected), color="gray", ls="--", label="random encoder")
        ax.axhline(float(selected[0]["raw_pixels"]), color="gray", ls=":", label="raw pixels")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set(title=study, ylabel="kNN top-1 (%)")
        ax.legend(fontsize=7)
        if curves:
            first = min(int(r["seed"]) for r in selected)
            for r in selected:
                path = out / "curves" / f"{r['run']}.jsonl"
                if int(r["seed"]) != first or not path.is_file():
                    continue
                train = [json.loads(x) for x in path.read_text().splitlines() if '"train"' in x]
                axes[0][1].plot([c["step"] for c in train], [c["acc"] for c in train], label=r["name"])
            axes[0][1].set(title="pretext (K+1)-way accuracy, first seed", xlabel="step", ylabel="%")
            axes[0][1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{study}.png", dpi=120)
        plt.close(fig)
