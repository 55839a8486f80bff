"""The paper's ablations in miniature: short MoCo runs on Fashion-MNIST with one fixed budget each.

Studies (the paper's section 4.1):
    momentum     m in {0, 0.9, 0.99, 0.999} at K=4096 (paper Table 4: m=0 fails, 0.99-0.999 best)
    mechanisms   MoCo and memory bank across K, end-to-end across batch sizes (paper Fig. 3)
    shuffle_bn   shuffling BN on and off (paper Fig. 4: without it the pretext task is "cheated")
    heads        v1 (linear head, T=0.07, v1 augmentation) vs v2 (MLP head, T=0.2, aug+)
Every run is the CPU preset on the same training subset for the same number of epochs, evaluated by
kNN on the 10,000 test images. Results go to a CSV and a Markdown table, with plots, the commit, the
machine and the command; runs already in the CSV with the same config are not repeated. Each run's
folder (with its checkpoint) is under OUT/runs/, its metrics are copied to OUT/curves/.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moco import config as C
from moco.errors import ConfigError
from moco.files import write_text
from moco.pipeline import pretrain

from .provenance import command, commit, machine, read_rows, write_rows

STUDIES = ("momentum", "mechanisms", "shuffle_bn", "heads")


@dataclass(frozen=True)
class Run:
    study: str
    name: str
    overrides: dict[str, Any]


def plan(studies: tuple[str, ...] = STUDIES) -> list[Run]:
    runs: list[Run] = []
    if "momentum" in studies:
        runs += [Run("momentum", f"m={m}", {"key_momentum": m}) for m in (0.0, 0.9, 0.99, 0.999)]
    if "mechanisms" in studies:
        for K in (256, 1024, 4096, 16384):
            runs.append(Run("mechanisms", f"moco K={K}", {"method": "moco", "queue_size": K}))
            runs.append(Run("mechanisms", f"memory_bank K={K}", {"method": "memory_bank", "queue_size": K}))
        for batch in (128, 256, 512, 1024):  # end-to-end: K = batch - 1
            runs.append(Run("mechanisms", f"end_to_end K={batch - 1}",
                            {"method": "end_to_end", "batch_size": batch}))
    if "shuffle_bn" in studies:
        runs += [Run("shuffle_bn", f"shuffle_bn={on}", {"shuffle_bn": on}) for on in (True, False)]
    if "heads" in studies:
        runs.append(Run("heads", "v1: linear, T=0.07, aug v1", {"head": "linear", "temperature": 0.07,
                                                                 "augment": "v1"}))
        runs.append(Run("heads", "v2: mlp, T=0.2, aug+", {"head": "mlp", "temperature": 0.2, "augment": "v2"}))
    return runs


def run_key(cfg: C.PretrainConfig) -> str:
    """What a finished run is matched on: its whole resolved config but the folder it wrote to. A run
    measured under an earlier CPU preset therefore does not count as done once the preset changes."""
    settings = asdict(cfg)
    del settings["run"]["out_dir"]
    return json.dumps(settings, sort_keys=True)


def ablate(out_dir: str | Path = "docs/ablations", studies: tuple[str, ...] = STUDIES, epochs: int = 3,
           train_subset: int = 20000, seed: int = 0, echo=print) -> Path:
    """Run the studies (skipping runs already in out_dir/results.csv) and write the table and plots."""
    unknown = set(studies) - set(STUDIES)
    if unknown:
        raise ConfigError(f"unknown studies {sorted(unknown)}; choose from {', '.join(STUDIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = {(r["study"], r["name"]): r for r in read_rows(csv_path)}
    base = {"epochs": epochs, "train_subset": train_subset, "seed": seed, "knn_every": 0, "tensorboard": False,
            "progress": False}
    for i, run in enumerate(plan(studies)):
        cfg = C.apply_overrides(C.preset("cpu"), {**base, **run.overrides, "out_dir": str(out / "runs" / slug(run))})
        key = run_key(cfg)
        curve_path = out / "curves" / f"{slug(run)}.jsonl"
        if rows.get((run.study, run.name), {}).get("config") == key:
            echo(f"[{i + 1}] {run.study}: {run.name}: done before, kept")
            keep_curve(Path(cfg.run.out_dir), curve_path)
            continue
        echo(f"[{i + 1}] {run.study}: {run.name}")
        tic = time.perf_counter()
        result = pretrain(cfg, baselines=False, echo=lambda s: None)
        keep_curve(Path(cfg.run.out_dir), curve_path)
        curve = [json.loads(x) for x in curve_path.read_text().splitlines()]
        rows[(run.study, run.name)] = {
            "study": run.study, "name": run.name, "knn_top1": round(result.knn["top1"], 2),
            "knn_top5": round(result.knn["top5"], 2), "final_loss": round(result.loss, 4),
            "final_pretext_acc": round(next(r["acc"] for r in reversed(curve) if r["tag"] == "epoch"), 2),
            "max_pretext_acc": round(max(r["acc"] for r in curve if r["tag"] == "train"), 2),
            "minutes": round((time.perf_counter() - tic) / 60, 2), "commit": commit(), "config": key,
        }
        echo(f"    kNN top-1 {result.knn['top1']:.2f}%, loss {result.loss:.3f}")
        write_rows(csv_path, list(rows.values()))  # after every run: an interrupted ablation keeps its results
    header = {"commit of each run": ", ".join(sorted({r.get("commit") or "unknown" for r in rows.values()})),
              "table written at commit": commit(), "machine": machine(), "command": command("ablate"),
              "budget": f"{epochs} epochs on the first {train_subset} Fashion-MNIST training images, CPU preset"}
    write_markdown(out / "results.md", list(rows.values()), header)
    plot(out, list(rows.values()))
    return out / "results.md"


def keep_curve(run_dir: Path, curve_path: Path) -> None:
    """Copy a run's metrics next to the results (the run folders, with their checkpoints, are not kept)."""
    source = run_dir / "metrics.jsonl"
    if source.is_file():
        curve_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(curve_path, source.read_text())


def slug(run: Run) -> str:
    return f"{run.study}-{run.name}".replace(" ", "_").replace("=", "").replace(":", "").replace(",", "")


def write_markdown(path: Path, rows: list[dict[str, Any]], header: dict[str, str]) -> None:
    lines = ["# Ablations (measured)", ""] + [f"- {k}: `{v}`" for k, v in header.items()] + [""]
    for study in STUDIES:
        selected = [r for r in rows if r["study"] == study]
        if not selected:
            continue
        lines += [f"## {study}", "", "| run | kNN top-1 | kNN top-5 | final loss | pretext acc (final / max) | minutes |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {float(r['knn_top1']):.2f} | {float(r['knn_top5']):.2f} | "
                  f"{float(r['final_loss']):.3f} | {float(r['final_pretext_acc']):.1f} / "
                  f"{float(r['max_pretext_acc']):.1f} | {float(r['minutes']):.1f} |" for r in selected]
        lines += ["", f"![{study}]({study}.png)", ""]
    write_text(path, "\n".join(lines) + "\n")


def plot(out: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def knn(r):
        return float(r["knn_top1"])

    by = {s: [r for r in rows if r["study"] == s] for s in STUDIES}
    if by["momentum"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = [r["name"] for r in by["momentum"]]
        ax.bar(names, [knn(r) for r in by["momentum"]], color="tab:blue")
        ax.set(title="Key-encoder momentum m (K=4096)", ylabel="kNN top-1 (%)",
               ylim=(min(knn(r) for r in by["momentum"]) - 5, max(knn(r) for r in by["momentum"]) + 2))
        fig.tight_layout()
        fig.savefig(out / "momentum.png", dpi=120)
        plt.close(fig)
    if by["mechanisms"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for mech, style in (("moco", "o-"), ("memory_bank", "s--"), ("end_to_end", "^:")):
            pts = sorted((int(r["name"].split("K=")[1]), knn(r)) for r in by["mechanisms"] if r["name"].startswith(mech))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mech)
        ax.set_xscale("log", base=2)
        ax.set(title="Three mechanisms across K", xlabel="K (negatives)", ylabel="kNN top-1 (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "mechanisms.png", dpi=120)
        plt.close(fig)
    for study in ("shuffle_bn", "heads"):
        if not by[study]:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for r in by[study]:
            path = out / "curves" / f"{slug(Run(r['study'], r['name'], {}))}.jsonl"
            curve = [json.loads(x) for x in path.read_text().splitlines() if '"train"' in x] if path.is_file() else []
            axes[0].plot([c["step"] for c in curve], [c["acc"] for c in curve], label=r["name"])
        axes[0].set(title="pretext (K+1)-way accuracy", xlabel="step", ylabel="%")
        axes[0].legend(fontsize=8)
        axes[1].bar([r["name"] for r in by[study]], [knn(r) for r in by[study]], color="tab:green")
        axes[1].set(title="kNN top-1 on the test set", ylabel="%",
                    ylim=(min(knn(r) for r in by[study]) - 5, max(knn(r) for r in by[study]) + 2))
        axes[1].tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{study}.png", dpi=120)
        plt.close(fig)

