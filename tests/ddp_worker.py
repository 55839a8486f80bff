"""Run by tests/test_distributed.py under torchrun: a few MoCo steps on each process's share of a
fixed global batch; writes losses, gradients and queues for the test to compare."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from test_distributed import batches, make_model
from torch.nn.parallel import DistributedDataParallel

from moco import distributed as dist


def main(out: Path) -> None:
    dist.setup("cpu")
    rank, world = dist.rank(), dist.world_size()
    torch.set_num_threads(1)
    model = make_model(bn_groups=1)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9)
    record = {"loss": [], "grads": []}
    for step, (x_q, x_k) in enumerate(batches()):
        torch.manual_seed(100 + step)  # the same permutation draw as the single process
        logits, labels = ddp(x_q.chunk(world)[rank], x_k.chunk(world)[rank])  # block r, as the training loop
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        record["loss"].append(mean / world)
        record["grads"].append([p.grad.clone() for p in model.encoder_q.parameters()])
    record["queue"] = model.queue.keys.clone()
    record["queue_ptr"] = model.queue.ptr.clone()
    torch.save(record, out / f"rank{rank}.pt")
    dist.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
