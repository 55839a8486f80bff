"""Fault injection: killed and signalled runs resume exactly; numerical faults, full disks, memory
exhaustion and hostile configs give clear errors, never a lost run or a traceback."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import config_fields
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moco import config as C
from moco.checkpoints import load_checkpoint, save_checkpoint
from moco.cli import main
from moco.errors import ConfigError, DiskFull, NonFiniteLoss, OutOfMemory
from moco.model.base import Method
from moco.pipeline import pretrain
from moco.train.setup import check_pretrain_config
from moco.train.trainer import Trainer

ARGS = ["pretrain", "--preset", "smoke", "--width", "4", "--dim", "16", "--queue-size", "256", "--bn-splits", "4",
        "--batch-size", "64", "--train-subset", "1024", "--epochs", "3", "--threads", "1", "--knn-every", "-1",
        "--no-progress", "--no-baselines", "--no-tensorboard"]

# Runs `moco` in a child process; MOCO_SLOW_SAVE makes every checkpoint write pause inside the write
# (after the temporary file is written, before the rename) and leave a marker, so a test can kill it there.
CHILD = """
import os, sys, time
import moco.files
slow = os.environ.get("MOCO_SLOW_SAVE")
if slow:
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):  # a checkpoint's temporary file
            open(slow, "a").write("in-save\\n")
            time.sleep(3)
    moco.files.os.fsync = fsync
from moco.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *ARGS, "--out-dir", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return max((x["step"] for x in lines), default=0)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight")
    p = child(out)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return load_checkpoint(out / "checkpoint.pt")


def assert_same_run(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name  # both encoders, queue, pointer
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_sigterm_saves_at_a_step_boundary_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    p = child(tmp_path)
    wait_for(lambda: steps_logged(tmp_path) >= 20)  # inside epoch 2 (16 steps an epoch)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    err = p.stderr.read()
    assert "SIGTERM: checkpoint saved at step" in err and "Traceback" not in err
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] % 16 != 0 or saved["step"] > 16  # mid-epoch, or just at an epoch's end
    p = child(tmp_path, "--resume", "auto")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert_same_run(uninterrupted, load_checkpoint(tmp_path / "checkpoint.pt"))


def test_sigkill_at_random_points_and_inside_a_checkpoint_write_loses_nothing(tmp_path, uninterrupted):
    rng = random.Random(0)
    # 1) killed inside a checkpoint write: the temporary file is complete but not yet renamed.
    marker = tmp_path / "marker"
    p = child(tmp_path, env={"MOCO_SLOW_SAVE": str(marker)})
    wait_for(marker.exists)
    p.kill()
    p.wait()
    assert not (tmp_path / "checkpoint.pt").exists()  # the first save never reached its rename
    assert list(tmp_path.glob(".checkpoint.pt.*.tmp"))  # the partial file stays aside, never in place
    # 2) killed at random moments, resumed each time.
    for _ in range(3):
        p = child(tmp_path, "--resume", "auto")
        time.sleep(rng.uniform(2.0, 5.0))
        p.kill()
        p.wait()
        if (tmp_path / "checkpoint.pt").exists():
            load_checkpoint(tmp_path / "checkpoint.pt")  # whatever was there is a complete checkpoint
    p = child(tmp_path, "--resume", "auto")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert_same_run(uninterrupted, load_checkpoint(tmp_path / "checkpoint.pt"))


def tiny(tmp_path, **run) -> C.PretrainConfig:
    return C.apply_overrides(C.preset("smoke"), {
        "model": dict(width=4, dim=16, queue_size=256, bn_splits=4), "data": dict(batch_size=64, train_subset=256),
        "optim": dict(epochs=3), "run": dict(out_dir=str(tmp_path), knn_every=-1, progress=False, **run)})


def nan_loss_at(monkeypatch, bad_steps: set[int]) -> None:
    """Plant a NaN in the loss of the given (1-based) steps."""
    real = Method.loss
    calls = {"n": 0}

    def loss(self, logits, labels):
        calls["n"] += 1
        value = real(self, logits, labels)
        return value * float("nan") if calls["n"] in bad_steps else value

    monkeypatch.setattr(Method, "loss", loss)


def test_a_nan_in_the_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {6})
    with pytest.raises(NonFiniteLoss, match="at step 6.*lower --lr.*raise --temperature"):
        pretrain(tiny(tmp_path), baselines=False, echo=lambda s: None)
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 4 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_the_skip_policy_skips_bad_steps_without_touching_the_weights(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {2, 7})
    messages = []
    pretrain(tiny(tmp_path, nonfinite="skip"), baselines=False, echo=messages.append)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 12 and state["metrics"]["skipped_steps"] == 2
    assert sum("non-finite loss, step skipped" in m for m in messages) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")

    def full(obj, f, *a, **k):
        open(f, "wb").write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFull, match="the disk is full.*previous checkpoint.pt is intact"):
        save_checkpoint({"step": 2}, tmp_path / "checkpoint.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_out_of_memory_names_the_largest_batch_that_fits(tmp_path, monkeypatch):
    real = Trainer._train_step

    def limited(self, images, idx):
        if len(images) > 16:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        return real(self, images, idx)

    monkeypatch.setattr(Trainer, "_train_step", limited)
    with pytest.raises(OutOfMemory, match="batch of 64; the largest batch that fits is about 16"):
        pretrain(tiny(tmp_path), baselines=False, echo=lambda s: None)


FIELDS = config_fields()
values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), values, max_size=4))
def test_random_config_values_are_accepted_or_rejected_clearly(overrides):
    try:
        cfg = check_pretrain_config(C.apply_overrides(C.preset("cpu"), overrides))
    except ConfigError as e:
        assert str(e)
        return
    for name, value in overrides.items():  # accepted values must be what was asked, in the right type
        got = getattr(getattr(cfg, C.section_of(name)), name)
        assert got is None or isinstance(got, (int, float, str, list))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(FIELDS)), st.text(min_size=1, max_size=10).filter(lambda s: not s.startswith("-")))
def test_random_command_line_values_never_give_a_traceback(capsys, name, value):
    flag = "--" + name.replace("_", "-")
    try:
        code = main(["pretrain", "--print-config", flag, value] if FIELDS[name] is not bool else
                    ["pretrain", "--print-config", flag])
    except SystemExit as e:  # argparse's own usage error (exit 2), printed without a traceback
        code = e.code
    assert code in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and (code == 0 or "error" in err)


def _valid_image_bytes(kind: str) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["PNG", "JPEG", "random"]), st.floats(0, 1), st.binary(max_size=64)),
                min_size=1, max_size=6))
def test_fuzzed_image_files_are_skipped_and_counted_never_a_crash(tmp_path_factory, files):
    """Truncated and random-byte image files in a folder: each is decoded or skipped and counted."""
    import warnings

    from moco.data.sources import load_images
    from moco.errors import DataError

    root = tmp_path_factory.mktemp("fuzz")
    (root / "good.png").write_bytes(_valid_image_bytes("PNG"))
    for i, (kind, cut, noise) in enumerate(files):
        data = noise if kind == "random" else _valid_image_bytes(kind)[: max(1, int(cut * 4000))] + noise
        (root / f"f{i}.{'jpg' if kind == 'JPEG' else 'png'}").write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            images = load_images("folder", "train", root, 16)
        except DataError as e:  # only when nothing at all could be decoded, which "good.png" rules out
            pytest.fail(f"unexpected DataError: {e}")
    skipped = len(files) + 1 - len(images)
    assert 1 <= len(images) <= len(files) + 1
    if skipped:
        assert any(f"skipped {skipped} unreadable" in str(w.message) for w in caught)


def test_a_batch_larger_than_the_data_set_is_rejected_before_any_work(tmp_path):
    cfg = C.apply_overrides(C.preset("smoke"), {"train_subset": 128, "batch_size": 256, "queue_size": 1024,
                                                  "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="train_subset=128 must be >= batch_size=256"):
        pretrain(cfg)
    assert not (tmp_path / "checkpoint.pt").exists()
