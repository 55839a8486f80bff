"""A self-contained report of a pretraining run: config, per-epoch metrics, curves and embedding views.

`report(run_dir)` writes `run_dir/report/`: `report.md` next to its PNGs, and `report.html`, one file
with the same content and the PNGs embedded. The t-SNE map and the nearest-neighbour grid embed the
labelled test split of the run's data set with the run's checkpoint; without them the report says why.
Plots are drawn on `matplotlib.figure.Figure` objects, which render with Agg and leave pyplot's global
state (and the caller's backend) alone.
"""

import base64
import html
import io
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checkpoints import LAST, load_encoder
from ..config import PretrainConfig, from_dict, load_yaml, opt
from ..data.sources import ImageSet, has_split, load_images
from ..errors import CheckpointError, ConfigError, DataError
from ..extras import require
from ..files import atomic_write, write_text
from ..runtime import resolve_device
from .data import eval_transform, fit_channels
from .features import extract_features

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

BANK_SIZE = 10_000  # training images searched for neighbours: enough to find close ones, fast on a CPU
MIN_TSNE_POINTS = 10  # fewer make no map worth looking at (and t-SNE needs perplexity < points)
DPI = 110
_QUERY, _SAME, _OTHER = "#1f5fbf", "#2ca02c", "#d62728"  # border colours in the retrieval grid


@dataclass
class Metrics:
    """The rows of a run's metrics.jsonl, deduplicated (a resumed run logs some steps again)."""

    train: list[dict[str, Any]]  # sorted by step
    epochs: list[dict[str, Any]]  # sorted by epoch
    skipped: int  # lines that were not JSON objects (e.g. cut off by a crash)


class _Unavailable(Exception):
    """Why the embedding sections cannot be made (the report says so instead)."""


@dataclass
class ReportConfig:
    """What a run's report shows."""

    out: str | None = opt(None, "output folder (default: RUN_DIR/report)")
    tsne_points: int = opt(2000, "test images in the t-SNE map (0: no map)")
    queries: int = opt(8, "test images whose nearest training images are shown (0: no retrievals)")
    neighbours: int = opt(8, "nearest training images shown for each query")


def report(run_dir: str | Path, options: ReportConfig | None = None, echo: Callable[[str], None] = print) -> Path:
    """Write the report of the run in `run_dir` to options.out (default `run_dir/report`); returns report.html."""
    options = options or ReportConfig()
    out, tsne_points, queries, neighbours = options.out, options.tsne_points, options.queries, options.neighbours
    for name, value, least in (("tsne_points", tsne_points, 0), ("queries", queries, 0), ("neighbours", neighbours, 1)):
        if value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist; pass the out_dir of a `moco pretrain` run")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml, so it is not a run folder of `moco pretrain`")
    config_text = config_path.read_text()
    cfg = from_dict(load_yaml(config_path, config_text))
    metrics = read_metrics(run_dir / "metrics.jsonl")
    require("matplotlib", "moco report (its plots)")
    if tsne_points:
        require("sklearn", "moco report (its t-SNE map)")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    doc = _Document(out)
    doc.heading(f"MoCo pretraining report: {run_dir.resolve().name}", 1)
    doc.paragraph(_summary(run_dir, cfg, metrics))
    doc.heading("Training curves")
    if metrics.train:
        doc.figure(_loss_accuracy_plot(metrics.train, metrics.epochs, cfg), "loss_accuracy.png",
                   "training loss and contrastive accuracy vs step")
        doc.figure(_lr_plot(metrics.train), "learning_rate.png", "learning rate vs step")
    else:
        doc.paragraph("No per-step training metrics were logged.")
    knn_rows = [row for row in metrics.epochs if "knn_top1" in row]
    if knn_rows:
        doc.heading("kNN monitor")
        doc.figure(_knn_plot(knn_rows, cfg), "knn.png", "kNN accuracy vs epoch")
    doc.heading("Per-epoch metrics")
    if metrics.epochs:
        doc.table(*_epoch_table(metrics.epochs))
    else:
        doc.paragraph("No epoch has finished yet.")
    if tsne_points or queries:
        _embedding_sections(doc, run_dir, cfg, tsne_points, queries, neighbours, echo)
    doc.heading("Config")
    doc.paragraph(f"From {config_path}:")
    doc.code(config_text)
    path = doc.write()
    echo(f"report written to {out / 'report.md'} and {path}")
    return path


def read_metrics(path: Path) -> Metrics:
    """The train and epoch rows of a metrics.jsonl; DataError when it is missing or holds none."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: the run has logged no metrics (did it reach its first step?)")
    train: dict[int, dict[str, Any]] = {}
    epochs: dict[int, dict[str, Any]] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(row, dict):
            skipped += 1
        elif row.get("tag") == "train" and "step" in row:
            train[row["step"]] = row  # the last row of a step wins: it is from the run that went on
        elif row.get("tag") == "epoch" and "epoch" in row:
            epochs[row["epoch"]] = row
    if not train and not epochs:
        raise DataError(f"{path} holds no training metrics; the run stopped before its first logged step")
    return Metrics([train[s] for s in sorted(train)], [epochs[e] for e in sorted(epochs)], skipped)


def _figure(width: float, height: float) -> "Figure":
    """A figure outside pyplot: rendered by Agg, no global state touched."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _summary(run_dir: Path, cfg: PretrainConfig, metrics: Metrics) -> str:
    m, d, o = cfg.model, cfg.data, cfg.optim
    parts = [
        f"Run folder {run_dir}: {m.method} with a {m.arch} backbone on {d.dataset}, "
        f"K={m.queue_size}, m={m.key_momentum}, T={m.temperature}, batch {d.batch_size}, "
        f"{o.epochs} epochs planned."
    ]
    if metrics.epochs:
        last = metrics.epochs[-1]
        parts.append(
            f"After epoch {last['epoch']} (step {last.get('step', '?')}): loss {last['loss']:.4f}, "
            f"contrastive accuracy {last['acc']:.1f}%"
            + (f", kNN top-1 {last['knn_top1']:.2f}%" if "knn_top1" in last else "")
            + f"; {_duration(sum(row.get('seconds', 0.0) for row in metrics.epochs))} of training."
        )
    if metrics.skipped:
        parts.append(f"{metrics.skipped} unreadable line(s) of metrics.jsonl were skipped.")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _loss_accuracy_plot(train: list[dict], epochs: list[dict], cfg: PretrainConfig) -> "Figure":
    fig = _figure(11, 4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    steps = [row["step"] for row in train]
    loss_ax.plot(steps, [row["loss"] for row in train], lw=1.2, label="running mean since the epoch began")
    acc_ax.plot(steps, [row["acc"] for row in train], lw=1.2, color="tab:orange",
                label="running mean since the epoch began")
    if epochs:
        loss_ax.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o", ms=4, color="tab:blue",
                     label="epoch mean")
        acc_ax.plot([r["step"] for r in epochs], [r["acc"] for r in epochs], "o", ms=4, color="tab:orange",
                    label="epoch mean")
    chance = next((r["chance_loss"] for r in epochs if "chance_loss" in r), None)  # logged by the run
    if chance is not None:
        loss_ax.axhline(chance, ls="--", lw=1, color="grey", label=f"chance: ln(candidates) = {chance:.2f}")
    loss_ax.set(title="InfoNCE training loss", xlabel="step", ylabel="loss")
    acc_ax.set(title="(K+1)-way contrastive accuracy", xlabel="step", ylabel="positive key ranked first (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _lr_plot(train: list[dict]) -> "Figure":
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    # Logged every 20 steps and at each epoch's end: few points are marked so as not to hide the gaps.
    ax.plot([row["step"] for row in train], [row["lr"] for row in train], ".-" if len(train) <= 60 else "-", lw=1.2,
            color="tab:green")
    ax.set(title="Learning rate schedule (as logged)", xlabel="step", ylabel="learning rate")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return fig


def _knn_plot(rows: list[dict], cfg: PretrainConfig) -> "Figure":
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in rows], [r["knn_top1"] for r in rows], "o-", label="top-1")
    if all("knn_top5" in r for r in rows):
        ax.plot([r["epoch"] for r in rows], [r["knn_top5"] for r in rows], "s--", alpha=0.7, label="top-5")
    ax.set(title=f"kNN accuracy on the test split (k={cfg.run.knn_k}, t={cfg.run.knn_t})", xlabel="epoch",
           ylabel="accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _epoch_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = [("epoch", "epoch", "{}"), ("step", "step", "{}"), ("loss", "loss", "{:.4f}"),
               ("acc", "contrastive acc (%)", "{:.2f}"), ("key_spread", "key spread", "{:.3f}")]
    for key, title in (("knn_top1", "kNN top-1 (%)"), ("knn_top5", "kNN top-5 (%)")):
        if any(key in row for row in rows):  # top-5 only with more than 5 classes
            columns.append((key, title, "{:.2f}"))
    columns.append(("seconds", "time (s)", "{:.1f}"))
    body = [[fmt.format(row[key]) if key in row else "–" for key, _, fmt in columns] for row in rows]
    return [title for _, title, _ in columns], body


# ---------------------------------------------------------------------------------------------
# Embedding views: t-SNE map and nearest-neighbour retrievals


def _embedding_sections(
    doc: "_Document", run_dir: Path, cfg: PretrainConfig, tsne_points: int, queries: int, neighbours: int,
    echo: Callable[[str], None],
) -> None:
    """Add the t-SNE and retrieval sections, or a note saying why they cannot be made."""
    doc.heading("Embeddings of the test split")
    try:
        embedder, train, test = _load_embedding_inputs(run_dir, cfg)
    except (_Unavailable, CheckpointError, DataError) as e:
        doc.paragraph(f"No t-SNE map or nearest-neighbour retrievals: {e}")
        echo(f"report: no t-SNE map or retrievals: {e}")
        return
    subset = _spread(len(test), tsne_points)
    if len(subset) >= MIN_TSNE_POINTS:
        echo(f"report: t-SNE of {len(subset)} {test.name} embeddings")
        fig, note = _tsne_plot(embedder(test.images[subset]), test.labels[subset], test)
        doc.paragraph(note)
        doc.figure(fig, "tsne.png", "t-SNE map of test embeddings, coloured by class")
    elif tsne_points:
        doc.paragraph(f"No t-SNE map: {len(subset)} test images are fewer than the {MIN_TSNE_POINTS} it needs.")
    if queries:
        bank = _spread(len(train), BANK_SIZE)
        picks = _pick_queries(test.labels, queries)
        echo(f"report: nearest neighbours of {len(picks)} {test.name} images among {len(bank)} training images")
        bank_features = embedder(train.images[bank])  # (n_bank, D)
        sims, idx = (embedder(test.images[picks]) @ bank_features.T).topk(min(neighbours, len(bank)), dim=1)
        neighbour_idx = bank[idx]  # (queries, neighbours) indices into train
        same = (train.labels[neighbour_idx] == test.labels[picks].unsqueeze(1)).sum().item()
        doc.paragraph(
            f"Each row: a test image (blue border), then its {idx.shape[1]} nearest of {len(bank)} training "
            f"images by cosine similarity of backbone features (shown above each). Green border: same class "
            f"as the query, red: another class. {same} of {idx.numel()} shown neighbours share the query's class."
        )
        doc.figure(_retrieval_grid(test, picks, train, neighbour_idx, sims), "neighbours.png",
                   "nearest-neighbour retrievals")


def _load_embedding_inputs(
    run_dir: Path, cfg: PretrainConfig
) -> tuple[Callable[[torch.Tensor], torch.Tensor], ImageSet, ImageSet]:
    """(L2-normalised features of uint8 images, labelled train split, labelled test split)."""
    checkpoint = run_dir / LAST
    if not checkpoint.is_file():
        raise _Unavailable(f"the run folder has no {LAST} (yet).")
    encoder = load_encoder(checkpoint)
    d = (encoder.config or cfg).data  # the data the checkpoint was trained on
    if not has_split(d.dataset, "test", d.data_root):
        raise _Unavailable(f"{d.dataset} has no test split here.")
    test = load_images(d.dataset, "test", d.data_root, d.image_size)
    train = load_images(d.dataset, "train", d.data_root, d.image_size)
    if test.labels is None or train.labels is None or test.classes is None:
        raise _Unavailable(f"{test.name} has no labels.")
    train, test = fit_channels(train, encoder), fit_channels(test, encoder)
    device = resolve_device("auto")
    backbone = encoder.backbone.to(device)
    transform = eval_transform(encoder, test, device)
    return lambda images: extract_features(backbone, images, transform, device), train, test


def _spread(n: int, count: int) -> torch.Tensor:
    """min(n, count) indices evenly spread over range(n)."""
    if count >= n:
        return torch.arange(n)
    return torch.from_numpy(np.linspace(0, n - 1, count).round().astype(np.int64))


def _pick_queries(labels: torch.Tensor, count: int) -> torch.Tensor:
    """`count` fixed indices spread over the classes: round-robin over evenly chosen classes."""
    present = labels.unique().tolist()
    if count < len(present):
        present = [present[i] for i in _spread(len(present), count).tolist()]
    members = [torch.nonzero(labels == c).flatten().tolist() for c in present]
    picks: list[int] = []
    for rank in itertools.count():
        row = [m[rank] for m in members if rank < len(m)]
        if not row:
            break
        picks += row[: count - len(picks)]
        if len(picks) == count:
            break
    return torch.tensor(picks, dtype=torch.int64)


def _tsne_plot(features: torch.Tensor, labels: torch.Tensor, test: ImageSet) -> tuple["Figure", str]:
    from sklearn.manifold import TSNE

    n = features.shape[0]
    points = TSNE(n_components=2, init="pca", random_state=0, learning_rate="auto",
                  perplexity=min(30.0, (n - 1) / 3)).fit_transform(features.numpy())  # (n, 2)
    classes = test.classes or []
    cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"
    fig = _figure(8.5, 6.5)
    ax = fig.subplots()
    colours = _colours(cmap, len(classes))
    for c, name in enumerate(classes):
        mask = (labels == c).numpy()
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=7, color=colours[c], label=name, alpha=0.8, linewidths=0)
    ax.set(title=f"t-SNE of {n} {test.name} embeddings (backbone features)", xlabel="t-SNE 1", ylabel="t-SNE 2",
           xticks=[], yticks=[])
    legend = len(classes) <= 20
    if legend:
        ax.legend(title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    note = (f"{n} test images, evenly spread over {test.name}, mapped to 2-D by t-SNE (PCA init, random_state=0) "
            "and coloured by class; nearby points have similar features. The axes have no units.")
    if not legend:
        note += f" Legend left out: {len(classes)} classes are too many to tell apart by colour."
    return fig, note


def _colours(cmap: str, count: int) -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    colormap = colormaps[cmap]
    if cmap.startswith("tab"):
        return [colormap(i) for i in range(count)]
    return [colormap(x) for x in np.linspace(0, 1, max(count, 1))]


def _retrieval_grid(
    test: ImageSet, picks: torch.Tensor, train: ImageSet, neighbour_idx: torch.Tensor, sims: torch.Tensor
) -> "Figure":
    rows, cols = neighbour_idx.shape[0], neighbour_idx.shape[1] + 1
    fig = _figure(1.25 * cols + 0.3, 1.45 * rows + 0.6)
    fig.suptitle("Nearest training images of test queries (cosine similarity above each neighbour)")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    classes = test.classes or []
    for r in range(rows):
        query_label = int(test.labels[picks[r]])
        _show(axes[r, 0], test.images[picks[r]], _QUERY, f"query\n{classes[query_label]}", bold=True)
        for c in range(1, cols):
            j = int(neighbour_idx[r, c - 1])
            label = int(train.labels[j])
            colour = _SAME if label == query_label else _OTHER
            _show(axes[r, c], train.images[j], colour, f"{float(sims[r, c - 1]):.3f}\n{classes[label]}")
    return fig


def _show(ax: "Axes", image: torch.Tensor, border: str, title: str, bold: bool = False) -> None:
    """One uint8 (C, H, W) image, upscaled with nearest-neighbour, with a coloured border and a title."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(border)
        spine.set_linewidth(4)
    ax.set_title(title, fontsize=7.5, fontweight="bold" if bold else "normal", color=border if bold else "black")


# ---------------------------------------------------------------------------------------------
# Output: Markdown next to the PNGs, and one self-contained HTML page


class _Document:
    """The report, built once and rendered as Markdown (linking the PNGs) and as HTML (embedding them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        self.md.append(text)
        self.html.append(f"<p>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.md.append(f"```yaml\n{text.rstrip()}\n```")
        self.html.append(f"<pre><code>{html.escape(text.rstrip())}</code></pre>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        self.md.append("\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]))
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
        self.html.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig: "Figure", name: str, alt: str) -> None:
        """Save `fig` as `name` in the report folder; link it from the Markdown, embed it in the HTML."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        png = buffer.getvalue()
        atomic_write(self.folder / name, lambda tmp: tmp.write_bytes(png))
        self.md.append(f"![{alt}]({name})")
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>')

    def write(self) -> Path:
        write_text(self.folder / "report.md", "\n\n".join(self.md) + "\n")
        title = html.escape(self.md[0].lstrip("# "))
        page = (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(self.html) + "\n</body></html>\n"
        )
        return write_text(self.folder / "report.html", page)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
    "table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
    "th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}"
    "img{max-width:100%;height:auto}figure{margin:1em 0}"
)
