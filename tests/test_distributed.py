"""torch.distributed: shuffling BN across processes and the queue, checked against one process.

A real 2-process gloo run (torchrun) on the CPU: one process with batch 2B and split BN in 2 groups
computes the same losses, gradients and queue as two processes with batch B each.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moco.checkpoints import load_checkpoint
from moco.model import MoCo, convert_split_bn

STEPS, B = 3, 8  # per-process batch B, global batch 2B
HERE = Path(__file__).parent


def make_model(bn_groups: int) -> MoCo:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(6, 5))
    return MoCo(convert_split_bn(encoder, bn_groups), dim=5, K=64, m=0.9, T=0.2)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * B, 1, 8, 8, generator=g), torch.randn(2 * B, 1, 8, 8, generator=g))
            for _ in range(STEPS)]


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Two processes on this machine. --standalone binds a free port itself: picking one here and passing it
    on leaves a window in which a parallel test's launcher can take it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_two_processes_equal_one_process_with_split_bn(tmp_path):
    r = torchrun(str(HERE / "ddp_worker.py"), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]

    model = make_model(bn_groups=2)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9)
    for step, (x_q, x_k) in enumerate(batches()):
        torch.manual_seed(100 + step)
        logits, labels = model(x_q, x_k)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for rank in ranks:
            assert torch.allclose(rank["loss"][step], loss, atol=1e-5), (step, rank["loss"][step], loss)
            for g_ddp, p in zip(rank["grads"][step], model.encoder_q.parameters()):
                assert torch.allclose(g_ddp, p.grad, atol=1e-5), step
    # Every process holds the same queue, and it is the single process's queue.
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"]) and int(ranks[0]["queue_ptr"]) == STEPS * 2 * B
    assert torch.allclose(ranks[0]["queue"], model.queue.keys, atol=1e-5)


def test_torchrun_pretraining_and_resume_with_another_number_of_processes(tmp_path):
    out = tmp_path / "run"
    common = ["--preset", "smoke", "--width", "4", "--dim", "16", "--queue-size", "256", "--bn-splits", "2",
              "--batch-size", "64", "--train-subset", "512", "--threads", "1", "--knn-every", "-1", "--no-progress",
              "--no-baselines", "--no-tensorboard", "--out-dir", str(out)]
    r = torchrun("-m", "moco", "pretrain", *common, "--epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes, 32 images each a step" in r.stdout
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 8 and len(state["rng"]) == 2
    assert int(state["model"]["queue.ptr"]) == (8 * 64) % 256
    # The same global batch on one process continues the run.
    r = subprocess.run([sys.executable, "-m", "moco", "pretrain", *common, "--epochs", "2", "--resume", "auto"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 16 and len(state["rng"]) == 1
