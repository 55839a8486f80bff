"""`python -m benchmarks head-probe`: what the v1 -> v2 study's encoders keep of what the augmentation changes.

The targeted experiment behind the MLP-head claim. MoCo v2 credits the MLP head with +5.6 linear points on
ImageNet; the usual account (SimCLR, Sec. 4.2) is that the contrastive loss makes its input invariant to the
augmentations, so with a linear head the backbone itself loses what they change (colour above all), which
ImageNet's classes need; an MLP head absorbs the invariance and leaves that information in the backbone.

If that mechanism is at work, an MLP head's backbone keeps more of the augmented properties than a linear
head's. The probe measures it on the study's head pairs (linear vs MLP at equal temperature, augmentation
and width, both seeds), on the 10,000 test images, by a ridge regression fitted on one half and scored on the
other, from frozen features:

- brightness: each image scaled by a factor drawn in [0.5, 1.5] (clamped to 0-255); R^2 of the log factor;
- flip: half the images mirrored; accuracy of telling which (50% is chance);
- class: the label, as a yardstick (a ridge classifier; the linear protocol trains longer and scores higher).

Both the backbone's features (what evaluation and transfer use) and the head's outputs (where the loss acts)
are probed; raw pixels and a random encoder are the references.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moco import config as C
from moco.checkpoints import load_checkpoint
from moco.data.sources import load_images
from moco.errors import ConfigError
from moco.files import write_text

from .ablate import Point, finished, plan, run_config, run_key
from .negatives import query_encoder
from .provenance import command, commit, machine

BRIGHTNESS = (0.5, 1.5)
RIDGE = 1e-3  # ridge penalty per sample, on standardised features


def ridge_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                  lam: float = RIDGE) -> torch.Tensor:
    """Ridge regression fitted on (train_x (N, D), train_y (N, T)), with a bias, predicting for test_x (M, D).

    Features are standardised with the training half's statistics; the penalty is lam * N (the bias unpenalised
    in effect, as its column is constant and large)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # (D,)
    a = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], dim=1)  # (N, D+1)
    b = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1)], dim=1)  # (M, D+1)
    gram = a.T @ a + lam * len(a) * torch.eye(a.shape[1])  # (D+1, D+1)
    weights = torch.linalg.solve(gram.double(), (a.T @ train_y).double()).float()  # (D+1, T)
    return b @ weights  # (M, T)


def r_squared(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """1 - residual variance / target variance."""
    return 1 - ((prediction - target) ** 2).mean().item() / target.var(unbiased=False).item()


class Probe:
    """The probe's fixed inputs: test images brightened or flipped at random, and the halves it fits and scores."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        n = len(images)
        factor = torch.empty(n).uniform_(*BRIGHTNESS, generator=gen)  # (N,)
        self.log_factor = factor.log().unsqueeze(1)  # (N, 1)
        self.bright = (images.float() * factor.view(-1, 1, 1, 1)).round_().clamp_(0, 255).to(torch.uint8)
        self.flipped = torch.rand(n, generator=gen) < 0.5  # (N,)
        self.mirrored = torch.where(self.flipped.view(-1, 1, 1, 1), images.flip(-1), images)  # (N, C, H, W)
        self.labels = labels
        order = torch.randperm(n, generator=gen)
        self.fit, self.score = order[: n // 2], order[n // 2:]

    def measure(self, features: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Brightness R^2, flip and class accuracy (%) from `features`: uint8 images (N, C, H, W) -> (N, D)."""
        bright, mirrored = features(self.bright), features(self.mirrored)  # (N, D) each
        fit, score = self.fit, self.score
        brightness = r_squared(ridge_predict(bright[fit], self.log_factor[fit], bright[score]), self.log_factor[score])
        sign = self.flipped.float().unsqueeze(1) * 2 - 1  # (N, 1) +-1
        flip = (ridge_predict(mirrored[fit], sign[fit], mirrored[score]).squeeze(1) > 0) == self.flipped[score]
        onehot = F.one_hot(self.labels, int(self.labels.max()) + 1).float()  # (N, classes)
        guess = ridge_predict(bright[fit], onehot[fit], bright[score]).argmax(1)  # (M,)
        return {"brightness_r2": round(brightness, 3), "flip_acc": round(100 * flip.float().mean().item(), 1),
                "class_acc": round(100 * (guess == self.labels[score]).float().mean().item(), 1)}


@torch.no_grad()
def encoder_views(checkpoint: Path, random: bool = False) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Feature functions of a checkpoint's query encoder, {"backbone": f, "head": f}; with `random`, the same
    architecture freshly initialised (seed 0)."""
    torch.manual_seed(0)
    encoder, normalise, _ = query_encoder(checkpoint, trained=not random)

    def view(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def features(images: torch.Tensor) -> torch.Tensor:
            return torch.cat([module(normalise(x)).float().flatten(1) for x in images.split(1000)])  # (N, D)
        return features

    return {"backbone": view(encoder.backbone), "head": view(encoder)}


def head_pairs(out: Path, epochs: int = 10) -> list[tuple[Point, int, Path]]:
    """(point, seed, checkpoint) of the v1 -> v2 study's head pairs (equal T, aug and width), for every seed run."""
    rows = finished(out / "results.csv")
    pairs = [p for p in plan(("v1_v2",), epochs) if p.name.startswith(("linear head", "MLP head", "v1: linear"))
             and "T=0.2" not in p.name]
    found = []
    for point in pairs:
        for seed in (0, 1, 2, 3):
            key = run_key(run_config(point, seed, epochs, out))
            if key in rows:
                found.append((point, seed, out / "runs" / rows[key]["run"] / "checkpoint.pt"))
    missing = [str(path) for _, _, path in found if not path.is_file()]
    if not found or missing:
        raise ConfigError(f"the v1 -> v2 study's checkpoints are missing ({', '.join(missing) or 'all'}): run "
                          "`python -m benchmarks ablate --studies v1_v2` first")
    return found


def head_probe(out_dir: str | Path = "docs/ablations", extra: tuple[str, ...] = ()) -> Path:
    """Probe every head-pair encoder of the v1 -> v2 study, then the `extra` checkpoints; write OUT/head_probe.md."""
    out = Path(out_dir)
    test = load_images("fashion-mnist", "test")
    probe = Probe(test.images, test.labels)
    pixels = probe.measure(lambda images: images.float().flatten(1) / 255)
    found = head_pairs(out)
    rows = []
    for point, seed, path in found:
        views = encoder_views(path)
        rows.append({"point": point.name, "seed": seed, **{k: probe.measure(f) for k, f in views.items()}})
        print(f"{point.name}, seed {seed}: {rows[-1]}")
    for path in extra:
        cfg = C.from_dict(load_checkpoint(Path(path))["config"])
        name = f"`{path}` ({cfg.model.head} head, {cfg.optim.epochs} epochs)"
        views = encoder_views(Path(path))
        rows.append({"point": name, "seed": cfg.run.seed, **{k: probe.measure(f) for k, f in views.items()}})
        print(f"{name}: {rows[-1]}")
    random_views = encoder_views(found[0][2], random=True)
    random = {k: probe.measure(f) for k, f in random_views.items()}
    lines = ["# What the encoders keep of what the augmentation changes (the v1 -> v2 head pairs)", "",
             f"- commit `{commit()}`; machine `{machine()}`", f"- command: `{command('head-probe')}`",
             f"- the v1 -> v2 study's 10-epoch encoders{' and the checkpoints named' if extra else ''}; 10,000 test "
             f"images, ridge fitted on 5,000 and scored on the other 5,000; brightness factors in {list(BRIGHTNESS)}",
             "",
             "Brightness R^2 / flip accuracy (%) / class accuracy (%), per seed, from the backbone's features and "
             "from the head's outputs.", "",
             "| encoder | seed | backbone | head output |", "|---|---|---|---|"]
    cell = lambda m: f"{m['brightness_r2']:.3f} / {m['flip_acc']:.1f} / {m['class_acc']:.1f}"  # noqa: E731
    for row in rows:
        lines.append(f"| {row['point']} | {row['seed']} | {cell(row['backbone'])} | {cell(row['head'])} |")
    lines += [f"| random encoder ({found[0][0].name}'s architecture) | - | {cell(random['backbone'])} | "
              f"{cell(random['head'])} |", f"| raw pixels | - | {cell(pixels)} | - |"]
    write_text(out / "head_probe.md", "\n".join(lines) + "\n")
    return out / "head_probe.md"
