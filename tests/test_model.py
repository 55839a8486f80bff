"""The MoCo algorithm, piece by piece, against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.config import ModelConfig
from moco.errors import ConfigError
from moco.model import MoCo, SmallCNN, SplitBatchNorm2d, build_encoder, convert_split_bn


class Linear(nn.Module):
    """A tiny encoder without BN, so keys are an exact function of the inputs."""

    def __init__(self, d_in: int = 6, d_out: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x.flatten(1))


def tiny_moco(K=8, dim=4, m=0.9, T=0.5, **kw) -> MoCo:
    torch.manual_seed(0)
    return MoCo(Linear(6, dim), dim=dim, K=K, m=m, T=T, **kw)


def test_queue_is_fifo_and_wraps_with_a_partial_batch():
    model = tiny_moco(K=5, dim=2)
    batches = [torch.full((2, 2), float(i)) for i in (1, 2, 3)] + [torch.full((1, 2), 4.0)]
    for b in batches:
        model.queue.push(b)
    # 1,1 | 2,2 | 3 then wrap: 3 | 4 -> rows [3, 4, 2, 2, 3]? Trace: ptr 0 -> 2 -> 4 -> (4,0) -> 1 -> 2
    assert model.queue.keys[:, 0].tolist() == [3.0, 4.0, 2.0, 2.0, 3.0]
    assert int(model.queue.ptr) == 2
    # The oldest entries (index 2, 3: batch "2") go next.
    model.queue.push(torch.full((3, 2), 5.0))
    assert model.queue.keys[:, 0].tolist() == [3.0, 4.0, 5.0, 5.0, 5.0]
    assert int(model.queue.ptr) == 0


def test_a_batch_larger_than_the_queue_keeps_its_last_k_keys():
    model = tiny_moco(K=3, dim=2)
    model.queue.push(torch.full((1, 2), 9.0))  # ptr 0 -> 1
    model.queue.push(torch.arange(5.0).repeat(2, 1).T)  # keys 0..4: a FIFO of 3 ends holding 2, 3, 4
    # the last three are written from the oldest slot on: slot 1 <- 2, slot 2 <- 3, slot 0 <- 4
    assert model.queue.keys[:, 0].tolist() == [4.0, 2.0, 3.0]
    assert int(model.queue.ptr) == 1  # slot 1 (key 2) is the oldest again


def test_moco_with_a_queue_smaller_than_the_batch_uses_the_previous_batchs_last_keys():
    model = tiny_moco(K=2, T=1.0)
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    _, _ = model(x1, x1)
    keys_of_step_1 = model.queue.keys.clone()  # (2, D)
    expected = F.normalize(model.encoder_k(x1), dim=1)[-2:]  # the last two keys of the first batch
    assert torch.allclose(keys_of_step_1.sort(dim=0).values, expected.sort(dim=0).values, atol=1e-6)
    logits, labels = model(x2, x2)
    q = F.normalize(model.encoder_q(x2), dim=1)
    assert logits.shape == (4, 3) and labels.tolist() == [0, 0, 0, 0]
    assert torch.allclose(logits[:, 1:], q @ keys_of_step_1.T, atol=1e-5)


def test_momentum_update_matches_hand_computation():
    model = tiny_moco(m=0.9)
    with torch.no_grad():
        model.encoder_q.fc.weight.fill_(1.0)
        model.encoder_k.fc.weight.fill_(3.0)
        model.encoder_q.fc.bias.fill_(-2.0)
        model.encoder_k.fc.bias.fill_(0.0)
    model.momentum_update()
    assert torch.allclose(model.encoder_k.fc.weight, torch.full_like(model.encoder_k.fc.weight, 0.9 * 3 + 0.1 * 1))
    assert torch.allclose(model.encoder_k.fc.bias, torch.full_like(model.encoder_k.fc.bias, -0.2))
    # The query encoder is untouched.
    assert torch.all(model.encoder_q.fc.weight == 1.0)


def test_key_encoder_starts_as_a_copy_and_m0_copies():
    model = tiny_moco(m=0.0)
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and pq.data_ptr() != pk.data_ptr()
    with torch.no_grad():
        model.encoder_q.fc.weight.add_(1.0)
    model.momentum_update()
    assert torch.equal(model.encoder_q.fc.weight, model.encoder_k.fc.weight)


def test_momentum_update_happens_before_the_keys():
    model = tiny_moco(m=0.5, shuffle_bn=False)
    with torch.no_grad():
        model.encoder_k.fc.weight.zero_()
        model.encoder_k.fc.bias.zero_()
    x = torch.randn(3, 6)
    model(x, x)
    expected = F.normalize(0.5 * model.encoder_q(x), dim=1)  # keys of the updated (half) key encoder
    k_ptr = model.queue.keys[:3]
    assert torch.allclose(k_ptr, expected.detach(), atol=1e-6)


def test_infonce_logits_match_hand_computation():
    model = tiny_moco(K=3, dim=2, T=0.5, shuffle_bn=False)
    with torch.no_grad():
        model.queue.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    q = torch.tensor([[0.6, 0.8]])
    k = torch.tensor([[0.0, 1.0]])
    logits = model.logits(q, k)
    assert torch.allclose(logits, torch.tensor([[0.8, 0.6, 0.8, -0.6]]) / 0.5)
    loss = F.cross_entropy(logits, torch.zeros(1, dtype=torch.long))
    e = [math.exp(v / 0.5) for v in (0.8, 0.6, 0.8, -0.6)]
    assert loss.item() == pytest.approx(-math.log(e[0] / sum(e)), rel=1e-6)


def test_forward_returns_logits_labels_and_enqueues_the_keys():
    model = tiny_moco(K=8, dim=4, T=0.2, shuffle_bn=False)
    queue_before = model.queue.keys.clone()
    x_q, x_k = torch.randn(3, 6), torch.randn(3, 6)
    logits, labels = model(x_q, x_k)
    assert logits.shape == (3, 9) and labels.tolist() == [0, 0, 0]
    q = F.normalize(model.encoder_q(x_q), dim=1)
    k = F.normalize(model.encoder_k(x_k), dim=1)  # already updated before the keys
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.2, atol=1e-5)
    # The negatives are the queue as it was before this batch's keys went in.
    assert torch.allclose(logits[:, 1:], q @ queue_before.T / 0.2, atol=1e-5)
    assert torch.allclose(model.queue.keys[:3], k, atol=1e-6)
    assert torch.allclose(model.queue.keys.norm(dim=1), torch.ones(8))


def test_no_gradient_reaches_the_key_encoder_or_the_queue():
    model = tiny_moco()
    logits, labels = model(torch.randn(4, 6), torch.randn(4, 6))
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    assert not model.queue.keys.requires_grad


def test_symmetric_loss_uses_both_views_and_enqueues_once():
    model = tiny_moco(K=8, symmetric=True, shuffle_bn=False)
    x1, x2 = torch.randn(3, 6), torch.randn(3, 6)
    logits, labels = model(x1, x2)
    assert logits.shape == (6, 9) and labels.shape == (6,)
    assert int(model.queue.ptr) == 6  # one enqueue of both views' keys
    q2 = F.normalize(model.encoder_q(x2), dim=1)
    k1 = F.normalize(model.encoder_k(x1), dim=1)
    assert torch.allclose(logits[3:, 0], (q2 * k1).sum(1) / model.T, atol=1e-5)


def test_shuffle_and_unshuffle_are_inverse():
    """Without BN, a key does not depend on its batch-mates: keys of the shuffled batch, unshuffled,
    are the plain keys, row for row."""
    model = tiny_moco()
    x = torch.randn(16, 6)
    model.shuffle_bn = True
    k_shuffled = model.keys(x)
    model.shuffle_bn = False
    assert torch.allclose(k_shuffled, model.keys(x), atol=1e-6)


def test_shuffle_changes_the_bn_groups_of_keys():
    """With split BN, a key computed on a shuffled batch differs from the same key unshuffled:
    the BN statistics came from other images."""
    torch.manual_seed(0)
    enc = convert_split_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), 4)
    model = MoCo(enc, dim=4 * 4 * 4, K=64, shuffle_bn=False)
    x = torch.randn(16, 1, 6, 6)
    plain = model.keys(x)
    model.shuffle_bn = True
    assert not torch.allclose(model.keys(x), plain, atol=1e-4)


def test_split_bn_equals_separate_bn_on_sub_batches():
    torch.manual_seed(0)
    split = SplitBatchNorm2d(3, splits=4)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2)
        split.bias.uniform_(-1, 1)
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict({k: v for k, v in split.state_dict().items()})
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    y = split(x)
    running_means = []
    for g in range(4):
        ref = nn.BatchNorm2d(3)
        ref.load_state_dict(plain.state_dict())
        assert torch.allclose(y[4 * g : 4 * g + 4], ref(x[4 * g : 4 * g + 4]), atol=1e-5)  # sub-batch g: block g
        running_means.append(ref.running_mean)
    assert torch.allclose(split.running_mean, torch.stack(running_means).mean(0), atol=1e-6)
    split.eval()
    plain.load_state_dict(split.state_dict())
    plain.eval()
    assert torch.allclose(split(x), plain(x))


@pytest.mark.parametrize("affine", [True, False])
def test_split_bn_in_channels_last_matches_the_contiguous_path(affine):
    """channels_last: same output (in channels_last), gradients and running statistics as contiguous."""
    torch.manual_seed(0)
    contiguous, channels_last = SplitBatchNorm2d(5, splits=4, affine=affine), SplitBatchNorm2d(5, splits=4, affine=affine)
    if affine:
        with torch.no_grad():
            contiguous.weight.uniform_(0.5, 2)
            contiguous.bias.uniform_(-1, 1)
    channels_last.load_state_dict(contiguous.state_dict())
    x = torch.randn(16, 5, 6, 7) * 3 + 2
    x1 = x.clone().requires_grad_()
    x2 = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    y1, y2 = contiguous(x1), channels_last(x2)
    assert y2.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y1, y2, atol=1e-5)
    grad = torch.randn_like(y1)
    (y1 * grad).sum().backward()
    (y2 * grad).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    if affine:
        assert torch.allclose(contiguous.weight.grad, channels_last.weight.grad, atol=1e-4)
        assert torch.allclose(contiguous.bias.grad, channels_last.bias.grad, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(contiguous, name), getattr(channels_last, name), atol=1e-6), name


def test_split_bn_gradient_is_exact():
    bn = SplitBatchNorm2d(3, splits=2).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(8, 3, 4, 5, dtype=torch.double).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(bn, (x,))


def test_split_bn_traced_for_the_compiler_matches_the_eager_kernels(monkeypatch):
    """Under torch.compile the blocks are concatenated instead of written in place: the same numbers."""
    torch.manual_seed(0)
    eager, traced = SplitBatchNorm2d(5, splits=4), SplitBatchNorm2d(5, splits=4)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 2)
        eager.bias.uniform_(-1, 1)
    traced.load_state_dict(eager.state_dict())
    x = (torch.randn(16, 5, 6, 7) * 3 + 2).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    y1 = eager(x1)
    (y1 * grad).sum().backward()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y2 = traced(x2)
    (y2 * grad).sum().backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(eager, name).grad, getattr(traced, name).grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(eager, name), getattr(traced, name))


def test_split_bn_channels_last_keeps_a_bf16_input_dtype():
    bn = SplitBatchNorm2d(4, splits=2)
    x = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), SplitBatchNorm2d(4, splits=2)(x), atol=0.05)


def test_split_bn_rejects_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="multiple of bn_splits"):
        SplitBatchNorm2d(3, splits=4)(torch.randn(6, 3, 2, 2))


def test_convert_split_bn_keeps_the_state():
    net = SmallCNN(1, 4)
    net.features[1].running_mean.fill_(0.5)
    convert_split_bn(net, 2)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(isinstance(m, SplitBatchNorm2d) for m in bns)
    assert torch.all(net.features[1].running_mean == 0.5)


def test_small_cnn_depths_add_layers_that_keep_width_and_resolution():
    net = SmallCNN(1, 4, last_width=24, depths=[1, 1, 2, 1])
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (1, 4, 1), (4, 8, 2), (8, 16, 2), (16, 16, 1), (16, 24, 2)]
    assert net.stage_ends == [2, 5, 11, 14] and all(isinstance(net.features[i], nn.ReLU) for i in net.stage_ends)
    maps, x = [], torch.randn(2, 1, 28, 28)
    for i, layer in enumerate(net.features):
        x = layer(x)
        if i in net.stage_ends:
            maps.append(tuple(x.shape[1:]))
    assert maps == [(4, 28, 28), (8, 14, 14), (16, 7, 7), (24, 4, 4)]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 24)


def test_small_cnn_default_keeps_the_parameter_names_of_older_checkpoints():
    names = [n for n in SmallCNN(1, 4).state_dict() if n.endswith("weight")]
    assert names == ["features.0.weight", "features.1.weight", "features.3.weight", "features.4.weight",
                     "features.6.weight", "features.7.weight", "features.9.weight", "features.10.weight"]


@pytest.mark.parametrize("depths", [[1, 1, 1], [1, 0, 1, 1]])
def test_small_cnn_rejects_depths_that_are_not_four_stages(depths):
    with pytest.raises(ConfigError, match="4 stages"):
        SmallCNN(1, 4, depths=depths)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_encoders_for_small_images(arch):
    cfg = ModelConfig(arch=arch, width=8, dim=16)
    enc = build_encoder(cfg, in_channels=1, image_size=28)
    assert enc(torch.randn(2, 1, 28, 28)).shape == (2, 16)


def test_a_user_backbone_without_out_dim_is_measured():
    backbone = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc = build_encoder(ModelConfig(head="linear", dim=7), in_channels=3, image_size=16, backbone=backbone)
    assert enc.head.in_features == 5 and enc(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_a_user_backbone_with_a_wrong_output_is_explained():
    with pytest.raises(ConfigError, match="global pool"):
        build_encoder(ModelConfig(), 3, 16, backbone=nn.Conv2d(3, 5, 3))


@pytest.mark.parametrize("kw,match", [(dict(K=0), "K"), (dict(m=1.0), "momentum"), (dict(T=0.0), "temperature"),
                                      (dict(T=float("inf")), "finite")])
def test_bad_hyper_parameters_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny_moco(**kw)
