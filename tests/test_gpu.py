"""The CUDA paths: mixed precision in both dtypes with the gradient scaler, channels_last and compile, the
augmentation on the device against the CPU's on the same parameters, a real out-of-memory error and its batch
suggestion, SyncBN conversion, a one-process NCCL run under torchrun, resume on the device, and kNN on the device.

Marked `gpu`: they run where MOCO_TEST_DEVICE names a device (`python -m benchmarks gpu-check` sets it; "cuda"
by default) and skip with a reason on a machine without it. `gpu-check --device cpu` runs those that mean
something on a CPU, so the file can't rot between visits to a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco import config as C
from moco.checkpoints import load_checkpoint
from moco.data.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)
from moco.errors import OutOfMemory
from moco.model import build_method
from moco.pipeline import pretrain

DEVICE = os.environ.get("MOCO_TEST_DEVICE", "cuda")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="no CUDA GPU here; `python -m benchmarks gpu-check` runs these on one"),
]
cuda_only = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA only (the CPU suite covers the CPU path)")


def tiny(out: Path, **changes) -> C.PretrainConfig:
    """Two epochs of a narrow CNN on 512 Fashion-MNIST images, on the device under test."""
    run = dict(out_dir=str(out), device=DEVICE, knn_every=-1, progress=False, tensorboard=False)
    run |= changes.pop("run", {})
    return C.apply_overrides(C.preset("smoke"), {
        "model": dict(width=8, dim=32, queue_size=512, bn_splits=4), "data": dict(batch_size=64, train_subset=512),
        "optim": dict(epochs=2), "run": run, **changes})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_a_finite_fp32_loss(precision, tmp_path):
    if precision == "fp16" and not DEVICE.startswith("cuda"):
        pytest.skip("fp16 autocast is refused on a CPU (a config error, tested in the CPU suite)")
    result = pretrain(tiny(tmp_path, run=dict(precision=precision)), baselines=False, echo=lambda s: None)
    losses = torch.tensor([m["loss"] for m in metrics(tmp_path) if m["tag"] == "train"])
    assert result.epochs == 2 and torch.isfinite(losses).all()
    assert losses[-1] < math.log(512 + 1)  # below chance, log(K+1): the positives are found


@cuda_only
def test_fp16_uses_the_gradient_scaler(tmp_path):
    from moco.train.trainer import Trainer

    seen = {}
    real = Trainer._train_step

    def spy(self, images, idx):
        seen["scaler"] = self.scaler.is_enabled()
        seen["dtype"] = self.amp_dtype
        return real(self, images, idx)

    Trainer._train_step = spy
    try:
        pretrain(tiny(tmp_path, run=dict(precision="fp16")), baselines=False, echo=lambda s: None)
    finally:
        Trainer._train_step = real
    assert seen == {"scaler": True, "dtype": torch.float16}


@cuda_only
def test_channels_last_and_compile_train(tmp_path):
    cfg = tiny(tmp_path, run=dict(compile=True, channels_last=True, precision="bf16"))
    result = pretrain(cfg, baselines=False, echo=lambda s: None)
    assert result.compile_seconds is not None and result.epochs == 2


def test_the_augmentation_on_the_device_equals_the_cpu_one_on_the_same_parameters():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 40, 40, generator=g)  # (B, 3, H, W) in [0, 1]
    boxes = sample_crop_boxes(16, 40, 40, (0.2, 1.0), (3 / 4, 4 / 3), generator=g)  # (B, 4)
    flip = torch.rand(16, generator=g) < 0.5
    factors = 0.6 + 0.8 * torch.rand(4, 16, generator=g)  # brightness, contrast, saturation; hue below
    sigma = 0.1 + 1.9 * torch.rand(16, generator=g)

    def pipeline(x: torch.Tensor, device: str) -> torch.Tensor:
        on = {name: t.to(device) for name, t in dict(boxes=boxes, flip=flip, f=factors, sigma=sigma).items()}
        x = resized_crop(x.to(device), on["boxes"], 32, on["flip"])  # (B, 3, 32, 32)
        x = adjust_brightness(x, on["f"][0])
        x = adjust_contrast(x, on["f"][1])
        x = adjust_saturation(x, on["f"][2])
        x = adjust_hue(x, on["f"][3] - 1.0)
        x = gaussian_blur(x, on["sigma"], 5)
        return torch.cat([rgb_to_grayscale(x), solarize(x)], dim=1).cpu()  # (B, 6, 32, 32)

    torch.testing.assert_close(pipeline(images, DEVICE), pipeline(images, "cpu"), atol=2e-5, rtol=1e-5)


@cuda_only
def test_a_real_out_of_memory_names_a_batch_that_fits(tmp_path):
    torch.cuda.empty_cache()
    fraction = 2 * 2**30 / torch.cuda.get_device_properties(0).total_memory  # this process may use 2 GiB
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        cfg = tiny(tmp_path, model=dict(arch="resnet18", small_stem=True, queue_size=65536, bn_splits=1),
                   data=dict(batch_size=8192, train_subset=8192, image_size=64))
        with pytest.raises(OutOfMemory, match=r"the largest batch that fits is about (\d+)") as caught:
            pretrain(cfg, baselines=False, echo=lambda s: None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "cuda" in str(caught.value)
    suggested = int(str(caught.value).split("about ")[1].split(":")[0])
    assert 0 < suggested < 8192


def test_sync_bn_replaces_every_batch_norm_of_the_method():
    cfg = C.apply_overrides(C.preset("v3-cpu"), {"arch": "resnet18", "small_stem": True})
    method = build_method(cfg.model, 1, 28)
    method.convert_sync_bn()
    kinds = {type(m).__name__ for m in method.modules() if "BatchNorm" in type(m).__name__}
    assert kinds == {"SyncBatchNorm"}, kinds


@cuda_only
def test_one_process_nccl_run_under_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "moco", "pretrain",
               "--preset", "smoke", "--device", "cuda", "--epochs", "1", "--train-subset", "512",
               "--out-dir", str(tmp_path), "--no-progress", "--no-baselines", "--knn-every", "-1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def largest_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' floating-point tensors."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def test_a_run_resumed_on_the_device_equals_an_uninterrupted_one(tmp_path):
    """cuDNN's algorithms and atomic adds round differently from run to run, so two uninterrupted runs differ a
    little; a resumed run may differ from one no more than that (a lost RNG, optimizer or queue state differs by
    orders of magnitude more)."""
    whole, again, halves = tmp_path / "whole", tmp_path / "again", tmp_path / "halves"
    for out in (whole, again):
        pretrain(tiny(out, run=dict(precision="fp32")), baselines=False, echo=lambda s: None)
    cfg = tiny(halves, run=dict(precision="fp32"))
    pretrain(cfg, baselines=False, echo=lambda s: None, on_step=lambda step, method: step == 8)  # stop after epoch 1
    pretrain(cfg, resume=halves, baselines=False, echo=lambda s: None)
    a, a2, b = (load_checkpoint(p / "checkpoint.pt")["model"] for p in (whole, again, halves))
    noise, resumed = largest_gap(a, a2), largest_gap(a, b)
    assert resumed <= 4 * noise + 1e-5, f"resumed run {resumed:.2e} from the uninterrupted one; run to run {noise:.2e}"


def test_knn_on_the_device_equals_the_cpu_one(tmp_path):
    """The kNN monitor and `moco knn` vote on the device with the labels wherever they are."""
    from moco.evaluate.knn import knn_accuracy, plain_knn_accuracy

    gen = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(2000, 32, generator=gen), dim=1)  # (N, D)
    test = torch.nn.functional.normalize(torch.randn(500, 32, generator=gen), dim=1)  # (M, D)
    train_labels, test_labels = torch.randint(10, (2000,), generator=gen), torch.randint(10, (500,), generator=gen)
    on_cpu = knn_accuracy(train, train_labels, test, test_labels, k=50, t=0.1)
    on_device = knn_accuracy(train.to(DEVICE), train_labels, test.to(DEVICE), test_labels, k=50, t=0.1)
    assert on_device == pytest.approx(on_cpu, abs=0.21)  # a near-tie may flip one of 500 on other hardware
    plain = plain_knn_accuracy(train.to(DEVICE), train_labels, test.to(DEVICE), test_labels, k=5)
    assert plain == pytest.approx(plain_knn_accuracy(train, train_labels, test, test_labels, k=5), abs=0.21)
    cfg = tiny(tmp_path, run=dict(knn_every=1))
    pretrain(cfg, baselines=False, echo=lambda s: None)
    scores = [m["knn_top1"] for m in metrics(tmp_path) if "knn_top1" in m]
    assert len(scores) == 2 and all(10 < s <= 100 for s in scores), scores
