"""`python -m benchmarks negatives`: where the InfoNCE loss of the queue study's encoders puts its negatives' weight.

The targeted experiment behind the queue-size claim. A query's loss spreads its push among the K negatives in
proportion to exp(sim / T). A negative of the query's own class pushes apart two images that a classifier (and
kNN) should keep together. The experiment takes each trained encoder of the queue study (seed 0) and queries
drawn from the training images. It builds queues of K other random training images and measures:

- the share of the negatives' softmax weight that falls on the query's own class;
- the share of its own class among the 10 hardest negatives.

Drawn at random, a queue is about 10% own-class on Fashion-MNIST's 10 classes, and 0.1% on ImageNet's 1,000. The
larger K is, the nearer its hardest negatives come to the query. So on a data set of few classes, a larger
queue adds mostly false negatives. Labels only measure here; nothing trains on them. The features are the query
encoder's head outputs, where the loss is computed, on whole images (no augmentation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco import config as C
from moco.checkpoints import load_checkpoint
from moco.data.sources import load_images
from moco.errors import ConfigError
from moco.files import write_text
from moco.model import build_method

from .ablate import finished, plan, run_config, run_key
from .provenance import command, commit, machine

SIZES = (256, 1024, 4096, 16384)
HARDEST = 10


def query_encoder(checkpoint: Path, trained: bool = True) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor],
                                                                  C.PretrainConfig]:
    """A pretraining checkpoint's query encoder (backbone and head) in eval mode, the normalisation of its uint8
    input images, and its config. With `trained` False: the same architecture as built (the random encoder)."""
    state = load_checkpoint(checkpoint)
    cfg, data = C.from_dict(state["config"]), state["data"]
    method = build_method(cfg.model, data["channels"], data["size"])
    if trained:
        method.load_state_dict(state["model"])
    method.eval()
    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)  # (1, C, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)  # (1, C, 1, 1)
    return method.encoder_q, lambda images: (images.float() / 255 - mean) / std, cfg


@torch.no_grad()
def head_features(checkpoint: Path, images: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, float]:
    """L2-normalised outputs of the checkpoint's query encoder (backbone and head), (N, D), and its temperature."""
    encoder, normalise, cfg = query_encoder(checkpoint)
    out = [F.normalize(encoder(normalise(x)).float(), dim=1) for x in images.split(batch)]  # [(b, D)]
    return torch.cat(out), cfg.model.temperature  # (N, D)


def own_class_shares(features: torch.Tensor, labels: torch.Tensor, K: int, T: float, queries: int,
                     seed: int = 0) -> dict[str, float]:
    """Mean over `queries` random queries of the own-class share of the negatives' weight, of the 10 hardest
    negatives, and of the queue (its chance level), for queues of K random other images."""
    gen = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    query_idx = torch.randperm(n, generator=gen)[:queries]  # (Q,)
    weight, hardest, drawn = [], [], []
    for i in query_idx.tolist():
        queue = torch.randperm(n - 1, generator=gen)[:K]  # (K,) indices of the other images
        queue += (queue >= i).long()  # skip the query itself
        sim = features[queue] @ features[i]  # (K,)
        same = labels[queue] == labels[i]  # (K,)
        w = torch.softmax(sim / T, dim=0)  # (K,) each negative's share of the push
        weight.append(w[same].sum().item())
        hardest.append(same[sim.topk(min(HARDEST, K)).indices].float().mean().item())
        drawn.append(same.float().mean().item())
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    return {"weight": round(mean(weight), 1), "hardest": round(mean(hardest), 1), "queue": round(mean(drawn), 1)}


def queue_checkpoints(out: Path, epochs: int = 10, seed: int = 0) -> dict[int, Path]:
    """The queue study's finished run of each K (`seed`), by K."""
    rows = finished(out / "results.csv")
    found = {}
    for point in plan(("queue",), epochs):
        key = run_key(run_config(point, seed, epochs, out))
        if key in rows:
            found[point.overrides["queue_size"]] = out / "runs" / rows[key]["run"] / "checkpoint.pt"
    missing = [K for K, path in found.items() if not path.is_file()]
    if not found or missing:
        raise ConfigError(f"the queue study's checkpoints are missing in {out / 'runs'} (K={missing or 'all'}): "
                          "run `python -m benchmarks ablate --studies queue` first")
    return found


def negatives(out_dir: str | Path = "docs/ablations", queries: int = 1000, train_subset: int = 20000) -> Path:
    """Measure every queue-study encoder at every K; write OUT/negatives.md."""
    out = Path(out_dir)
    data = load_images("fashion-mnist", "train")
    images, labels = data.images[:train_subset], data.labels[:train_subset]
    rows: list[dict[str, Any]] = []
    for trained_K, path in sorted(queue_checkpoints(out).items()):
        features, T = head_features(path, images)
        for K in SIZES:
            rows.append({"trained": trained_K, "K": K, **own_class_shares(features, labels, K, T, queries)})
            print(f"encoder trained with K={trained_K}, queue of {K}: {rows[-1]}")
    lines = ["# Where the negatives' weight falls (the queue study's encoders)", "",
             f"- commit `{commit()}`; machine `{machine()}`", f"- command: `{command('negatives')}`",
             f"- {queries} queries and queues drawn from the first {train_subset} training images; seed-0 encoders",
             "", "Own-class share (%) of the negatives' softmax weight / of the 10 hardest negatives / of the queue "
             "(chance).", "", "| encoder trained with | " + " | ".join(f"queue of {K}" for K in SIZES) + " |",
             "|---|" + "---|" * len(SIZES)]
    for trained_K in sorted({r["trained"] for r in rows}):
        cells = [f"{r['weight']} / {r['hardest']} / {r['queue']}" for r in rows if r["trained"] == trained_K]
        lines.append(f"| K={trained_K} | " + " | ".join(cells) + " |")
    write_text(out / "negatives.md", "\n".join(lines) + "\n")
    return out / "negatives.md"
