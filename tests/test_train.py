"""Training end to end: real runs on Fashion-MNIST, resume, folders, the command line."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import config_fields
from PIL import Image

from moco import config as C
from moco.checkpoints import load_checkpoint
from moco.cli import main
from moco.errors import ConfigError
from moco.pipeline import pretrain


def tiny(tmp_path, **overrides) -> C.PretrainConfig:
    """A run of seconds: 512 Fashion-MNIST images, a narrow CNN."""
    base = {"model": dict(width=8, dim=32, queue_size=256, bn_splits=4),
            "data": dict(batch_size=64, train_subset=512),
            "optim": dict(epochs=2),
            "run": dict(out_dir=str(tmp_path / "run"), knn_every=-1, tensorboard=False, progress=False)}
    cfg = C.apply_overrides(C.preset("smoke"), base)
    return C.apply_overrides(cfg, overrides)


def test_a_short_real_run_lowers_the_loss_and_beats_a_random_encoder(tmp_path):
    cfg = tiny(tmp_path, model=dict(width=16, queue_size=1024), data=dict(batch_size=128, train_subset=8192),
               optim=dict(epochs=4, schedule="constant"), run=dict(knn_every=2))
    result = pretrain(cfg, echo=lambda s: None)
    lines = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["tag"] == "train"]
    epochs = [r for r in lines if r["tag"] == "epoch"]
    assert [r["epoch"] for r in epochs if "knn_top1" in r] == [2, 4]
    assert epochs[-1]["loss"] < epochs[0]["loss"] - 0.3, [r["loss"] for r in epochs]
    assert train[-1]["loss"] < train[1]["loss"]
    random, pixels = result.baselines["random encoder"]["top1"], result.baselines["raw pixels"]["top1"]
    assert result.knn["top1"] > random + 3, (result.knn, random)
    assert 60 < pixels < 90  # kNN on 6,144 raw Fashion-MNIST images


class Killed(Exception):
    pass


def kill_after_epoch(n: int):
    """An echo that stops the run while it reports epoch n + 1: epoch n's checkpoint is the last one."""

    def echo(line: str) -> None:
        if line.startswith(f"epoch {n + 1}:"):
            raise Killed

    return echo


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    cfg = tiny(tmp_path / "a", optim=dict(epochs=3))
    pretrain(cfg, baselines=False, echo=lambda s: None)
    full = load_checkpoint(tmp_path / "a" / "run" / "checkpoint.pt")

    cfg = tiny(tmp_path / "b", optim=dict(epochs=3))
    with pytest.raises(Killed):
        pretrain(cfg, baselines=False, echo=kill_after_epoch(1))  # epoch 2 is computed, then lost
    ckpt = tmp_path / "b" / "run" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["epoch"] == 1
    pretrain(cfg, resume=ckpt, baselines=False, echo=lambda s: None)
    resumed = load_checkpoint(ckpt)

    assert resumed["epoch"] == full["epoch"] == 3 and resumed["step"] == full["step"]
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name  # both encoders, the queue and its pointer
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_checkpoint_holds_everything_and_the_config(tmp_path):
    cfg = tiny(tmp_path, optim=dict(epochs=1))
    pretrain(cfg, baselines=False, echo=lambda s: None)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert C.from_dict(state["config"]) == cfg
    keys = state["model"].keys()
    assert {"queue.keys", "queue.ptr"} <= keys
    assert any(k.startswith("encoder_q.backbone.") for k in keys) and any(k.startswith("encoder_k.head.") for k in keys)
    assert state["model"]["queue.keys"].shape == (256, 32) and int(state["model"]["queue.ptr"]) == (8 * 64) % 256
    assert "cpu" in state["rng"][0] and state["optimizer"]["state"]


def _real_images() -> list[Image.Image]:
    """Real photographs (scikit-learn's sample images) and real Fashion-MNIST items."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 RGB
    from moco.data.sources import load_images

    items = load_images("fashion-mnist", "test").images[:40, 0].numpy()
    return photos, [Image.fromarray(a) for a in items]


def test_pretraining_on_a_folder_of_real_images_of_mixed_sizes_and_modes(tmp_path):
    photos, items = _real_images()
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("photos", "items"):
        (root / cls).mkdir(parents=True)
    for i in range(40):
        photo = photos[i % 2]
        w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
        x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
        crop = photo.crop((x, y, x + w, y + h))
        mode = ["RGB", "L", "P", "RGBA", "CMYK"][i % 5]
        ext = "jpg" if mode in ("RGB", "L", "CMYK") else "png"
        crop.convert(mode).save(root / "photos" / f"{i}.{ext}")
        item = items[i].resize((int(rng.integers(20, 90)),) * 2)
        item.convert(["L", "RGB", "LA"][i % 3]).save(root / "items" / f"{i}.png")
    code = main(["pretrain", "--preset", "smoke", "--dataset", "folder", "--data-root", str(root), "--image-size", "32",
                 "--batch-size", "16", "--bn-splits", "4", "--queue-size", "64", "--train-subset", "none",
                 "--epochs", "2", "--out-dir", str(tmp_path / "run"), "--no-progress", "--no-baselines"])
    assert code == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 2 * (80 // 16)
    assert state["model"]["encoder_q.backbone.features.0.weight"].shape[1] == 3  # RGB input


def test_every_option_of_the_command_line_works_in_one_real_run(tmp_path):
    """A run with every non-default choice at once: linear head, symmetric loss, no shuffle BN,
    step schedule with warm-up, explicit device/threads, TensorBoard, kNN monitor each epoch."""
    out = tmp_path / "run"
    argv = ["pretrain", "--preset", "smoke", "--arch", "small_cnn", "--width", "4", "--no-small-stem",
            "--head", "linear", "--dim", "16", "--hidden-dim", "32", "--queue-size", "512", "--key-momentum", "0.9",
            "--temperature", "0.1", "--symmetric", "--no-shuffle-bn", "--bn-splits", "2",
            "--dataset", "fashion-mnist", "--image-size", "24", "--augment", "v1", "--batch-size", "64",
            "--train-subset", "256", "--no-strict", "--epochs", "2", "--lr", "0.1", "--lr-batch-size", "128",
            "--sgd-momentum", "0.8", "--weight-decay", "1e-4", "--schedule", "step", "--lr-steps", "1",
            "--warmup-epochs", "0.5", "--out-dir", str(out), "--seed", "3", "--device", "cpu", "--threads", "1",
            "--no-channels-last", "--knn-every", "1", "--knn-k", "20", "--knn-t", "0.07", "--tensorboard",
            "--no-progress", "--no-baselines"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    cfg = C.from_dict(state["config"])
    assert cfg.model.symmetric and not cfg.model.shuffle_bn and cfg.optim.lr_steps == [1] and cfg.run.seed == 3
    assert state["model"]["queue.keys"].shape == (512, 16) and int(state["model"]["queue.ptr"]) == (2 * 4 * 128) % 512
    assert list((out / "tensorboard").iterdir())
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("knn_top1" in e for e in epochs)
    # Step schedule at epoch 1 (lr x0.1) after warm-up: lr of the last step = 0.1 * 64/128 * 0.1.
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x][-1]
    assert last["lr"] == pytest.approx(0.005)


def test_resume_auto_from_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["pretrain", "--preset", "smoke", "--train-subset", "256", "--out-dir", out, "--no-progress",
              "--no-baselines", "--resume", "auto"]
    assert main([*common, "--epochs", "1"]) == 0
    assert "starting a new run" in capsys.readouterr().err
    assert main([*common, "--epochs", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(f"{out}/checkpoint.pt")["epoch"] == 2


def test_errors_are_one_clear_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moco", "pretrain", "--dataset", "folder", "--data-root",
                        str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("moco: error:") and "nope" in r.stderr
    r = subprocess.run([sys.executable, "-m", "moco", "pretrain", "--resume", str(tmp_path / "x.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_help_lists_every_option():
    r = subprocess.run([sys.executable, "-m", "moco", "pretrain", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in config_fields():
        assert "--" + name.replace("_", "-") in r.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train_in_fp32_master_weights(tmp_path, precision, monkeypatch):
    """Autocast paths (fp16 with its GradScaler is for GPUs: let through here) run on the CPU too: the loss is fp32,
    the weights stay fp32."""
    from moco.train import setup

    monkeypatch.setattr(setup, "check_device", lambda cfg, device: None)
    cfg = tiny(tmp_path, model=dict(width=4, dim=16, queue_size=128), data=dict(batch_size=32, train_subset=64),
               optim=dict(epochs=1), run=dict(precision=precision))
    result = pretrain(cfg, baselines=False, echo=lambda s: None)
    state = load_checkpoint(result.checkpoint)
    assert math.isfinite(result.loss) and state["step"] == 2
    assert state["model"]["encoder_q.backbone.features.0.weight"].dtype == torch.float32
    assert state["model"]["queue.keys"].dtype == torch.float32


def test_fp16_on_a_cpu_is_refused_before_any_work(tmp_path):
    cfg = tiny(tmp_path, run=dict(precision="fp16", device="cpu"))
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA GPU"):
        pretrain(cfg, echo=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_compiled_encoders_keep_the_checkpoint_layout(tmp_path):
    cfg = tiny(tmp_path, model=dict(width=4, dim=16, queue_size=128), data=dict(batch_size=32, train_subset=64),
               optim=dict(epochs=1), run=dict(compile=True))
    lines: list[str] = []
    result = pretrain(cfg, baselines=False, echo=lines.append)
    keys = load_checkpoint(result.checkpoint)["model"].keys()
    assert "encoder_q.backbone.features.0.weight" in keys and not any("_orig_mod" in k for k in keys)
    # Compilation is timed on its own, once: the first step.
    assert result.compile_seconds is not None and result.compile_seconds > 0
    assert sum(line.startswith("torch.compile: first step") for line in lines) == 1
