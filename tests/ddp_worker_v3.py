"""Run by tests/test_mocov3.py under torchrun: a few MoCo v3 steps on each process's share of a fixed global
batch; writes losses, labels and gradients for the test to compare with one process."""

import sys
from pathlib import Path

import torch
from test_mocov3 import STEPS, ddp_batches, make_v3
from torch.nn.parallel import DistributedDataParallel

from moco import distributed as dist


def main(out: Path) -> None:
    dist.setup("cpu")
    rank, world = dist.rank(), dist.world_size()
    torch.set_num_threads(1)
    model = make_v3(bn_splits=2).double()  # 2 BN groups over both processes: one each; fp64: rounding aside
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5, momentum=0.9)
    record = {"loss": [], "labels": [], "grads": []}
    for step, (x1, x2) in enumerate(ddp_batches()):
        model.before_step(step / STEPS)
        logits, labels = ddp(x1.chunk(world)[rank], x2.chunk(world)[rank])  # block r, as the training loop
        loss = model.loss(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        record["loss"].append(mean / world)
        record["labels"].append(labels.clone())
        record["grads"].append([p.grad.clone() for p in model.trainable_parameters()])
    torch.save(record, out / f"rank{rank}.pt")
    dist.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
