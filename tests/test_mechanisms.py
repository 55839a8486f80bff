"""End-to-end and memory bank: the paper's other two mechanisms, with MoCo's interface."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.config import ModelConfig
from moco.errors import ConfigError
from moco.model import EndToEnd, MemoryBank, MoCo, build_method


def encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4))


def grads(module: nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_end_to_end_gives_gradients_to_the_key_path_and_moco_does_not():
    x_q, x_k = torch.randn(5, 6), torch.randn(5, 6)
    e2e = EndToEnd(encoder(), T=0.5, shuffle_bn=False)
    logits, labels = e2e(x_q, x_k)
    # The same loss with the keys detached: the difference is the gradient through the key path.
    F.cross_entropy(logits, labels).backward()
    full = [p.grad.clone() for p in e2e.encoder_q.parameters()]
    e2e.zero_grad()
    q = F.normalize(e2e.encoder_q(x_q), dim=1)
    k = F.normalize(e2e.encoder_q(x_k), dim=1).detach()
    F.cross_entropy(q @ k.T / 0.5, torch.arange(5)).backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(full, e2e.encoder_q.parameters()))

    moco = MoCo(encoder(), dim=4, K=16, shuffle_bn=False)
    logits, labels = moco(x_q, x_k)
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in moco.encoder_k.parameters())


def test_end_to_end_logits_put_the_positive_first_and_the_rest_of_the_batch_after():
    e2e = EndToEnd(encoder(), T=0.5, shuffle_bn=False)
    x_q, x_k = torch.randn(4, 6), torch.randn(4, 6)
    logits, labels = e2e(x_q, x_k)
    q = F.normalize(e2e.encoder_q(x_q), dim=1)
    k = F.normalize(e2e.encoder_q(x_k), dim=1)
    sim = q @ k.T / 0.5
    assert logits.shape == (4, 4) and labels.tolist() == [0] * 4
    for i in range(4):
        others = [sim[i, j] for j in range(4) if j != i]
        assert torch.allclose(logits[i], torch.stack([sim[i, i], *others]), atol=1e-6)
    # Same loss as the usual "labels = arange" form.
    assert torch.allclose(F.cross_entropy(logits, labels), F.cross_entropy(sim, torch.arange(4)), atol=1e-6)


def test_memory_bank_updates_exactly_the_rows_of_the_images_seen():
    bank = MemoryBank(encoder(), dim=4, num_images=10, K=6, T=0.1, bank_momentum=0.5)
    before = bank.bank.clone()
    index = torch.tensor([7, 2])
    x = torch.randn(2, 6)
    logits, labels = bank(x, None, index)
    q = F.normalize(bank.encoder_q(x), dim=1).detach()
    assert logits.shape == (2, 7)
    # The positive is the stored feature of the same image, as it was before this step.
    assert torch.allclose(logits[:, 0], (q * before[index]).sum(1) / 0.1, atol=1e-5)
    expected = F.normalize(0.5 * before[index] + 0.5 * q, dim=1)
    assert torch.allclose(bank.bank[index], expected, atol=1e-6)
    untouched = [i for i in range(10) if i not in (7, 2)]
    assert torch.equal(bank.bank[untouched], before[untouched])
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(10), atol=1e-6)


def test_memory_bank_negatives_are_sampled_from_the_bank():
    bank = MemoryBank(encoder(), dim=4, num_images=5, K=5, T=1.0)
    before = bank.bank.clone()
    x = torch.randn(1, 6)
    logits, _ = bank(x, None, torch.tensor([0]))
    q = F.normalize(bank.encoder_q(x), dim=1).detach()
    possible = (q @ before.T)[0]  # (5,): every row of the bank as it was when sampled
    for v in logits[0, 1:]:
        assert torch.isclose(v, possible, atol=1e-5).any()
    assert bank.needs_key_view is False


def test_build_picks_the_mechanism_and_rejects_bad_ones():
    cfg = ModelConfig(width=4, dim=8, queue_size=16, bn_splits=1)
    assert isinstance(build_method(ModelConfig(**{**vars(cfg), "method": "end_to_end"}), 1, 8), EndToEnd)
    mb = build_method(ModelConfig(**{**vars(cfg), "method": "memory_bank"}), 1, 8, num_images=100)
    assert isinstance(mb, MemoryBank) and mb.bank.shape == (100, 8)
    with pytest.raises(ConfigError, match="number of images"):
        MemoryBank(encoder(), dim=4, num_images=5, K=6)
