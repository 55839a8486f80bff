"""MoCo v3 against hand computations: the loss, the momentum schedule, LARS, the frozen patch projection, the
predictor on the query side, the heads, the position embeddings, and two processes against one."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moco.config import apply_overrides, preset
from moco.data.augment import build_augment, solarize
from moco.model import Encoder, MoCoV3, bn_mlp, build_method
from moco.model.backbones import sincos_position_embedding, vit
from moco.pipeline import pretrain
from moco.train.lars import LARS
from moco.train.optim import build_optimizer

HERE = Path(__file__).parent
STEPS, B = 3, 4  # per-process batch B, global batch 2B


def make_v3(bn_splits: int = 1, **model) -> MoCoV3:
    """A tiny ViT MoCo v3 on 8 px images, as the config builds it."""
    torch.manual_seed(0)
    cfg = apply_overrides(preset("smoke"), {"model": dict(
        method="mocov3", arch="vit_tiny", patch_size=4, head="v3", dim=8, hidden_dim=16, bn_splits=bn_splits,
        temperature=0.5, key_momentum=0.9, **model)})
    return build_method(cfg.model, 1, 8)


def ddp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * B, 1, 8, 8, generator=g, dtype=torch.float64),
             torch.randn(2 * B, 1, 8, 8, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def infonce_by_hand(q: torch.Tensor, k: torch.Tensor, T: float) -> float:
    """Mean over queries i of -log(exp(q_i.k_i / T) / sum_j exp(q_i.k_j / T)), cosine similarities, in floats."""
    q, k = q.double(), k.double()
    total = 0.0
    for i in range(q.shape[0]):
        sims = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) / T for j in range(k.shape[0])]
        total += math.log(sum(math.exp(s) for s in sims)) - sims[i]
    return total / q.shape[0]


def linear_v3(T: float = 0.5) -> MoCoV3:
    """MoCo v3 with linear layers only (no BN), so every tensor can be followed by hand."""
    torch.manual_seed(0)
    encoder = Encoder(nn.Flatten(), nn.Linear(4, 3, bias=False))
    return MoCoV3(encoder, nn.Linear(3, 3, bias=False), m0=0.9, T=T)


def test_loss_is_both_directions_times_2T():
    model = linear_v3(T=0.5)
    x1, x2 = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    W, P = model.encoder_q.head.weight.detach(), model.predictor.weight.detach()
    q1, q2 = x1.flatten(1) @ W.T @ P.T, x2.flatten(1) @ W.T @ P.T  # queries: encoder then predictor
    k1, k2 = x1.flatten(1) @ W.T, x2.flatten(1) @ W.T  # keys: the momentum encoder (= encoder at the start), no predictor
    logits, labels = model(x1, x2)
    assert logits.shape == (10, 5) and labels.tolist() == [0, 1, 2, 3, 4] * 2
    expected = 2 * 0.5 * (infonce_by_hand(q1, k2, 0.5) + infonce_by_hand(q2, k1, 0.5))
    assert model.loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_no_gradient_into_the_momentum_encoder_and_the_predictor_trains():
    model = linear_v3()
    logits, labels = model(torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2))
    model.loss(logits, labels).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert model.predictor.weight.grad is not None and model.encoder_q.head.weight.grad is not None
    trained = {id(p) for p in model.trainable_parameters()}
    assert trained == {id(model.predictor.weight), id(model.encoder_q.head.weight)}
    assert not any(k.startswith("predictor") for k in model.encoder_k.state_dict())  # backbone + projector only


def test_momentum_rises_from_m0_to_1_on_a_half_cosine():
    model = linear_v3()
    for progress, m in ((0.0, 0.9), (0.5, 1 - 0.5 * 0.1), (0.25, 1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.1),
                        (1.0, 1.0)):
        model.before_step(progress)
        assert model.m == pytest.approx(m, abs=1e-12)


def test_momentum_update_uses_the_scheduled_coefficient():
    model = linear_v3()
    with torch.no_grad():
        model.encoder_q.head.weight.add_(1.0)  # query and key encoders now differ
    before_k, q = model.encoder_k.head.weight.clone(), model.encoder_q.head.weight.clone()
    model.before_step(0.5)  # m = 0.95
    model(torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2))
    assert torch.allclose(model.encoder_k.head.weight, 0.95 * before_k + 0.05 * q, atol=1e-6)


def test_the_trainer_sets_the_momentum_of_every_step(tmp_path):
    cfg = apply_overrides(preset("smoke"), {"model": dict(method="mocov3", head="v3", dim=16, hidden_dim=32,
                                                          key_momentum=0.9, bn_splits=1),
                                            "data": dict(augment="v3", train_subset=256, batch_size=64),
                                            "optim": dict(epochs=2, optimizer="lars", lr=0.3),
                                            "run": dict(out_dir=str(tmp_path), progress=False)})
    seen: list[tuple[int, float]] = []
    pretrain(cfg, baselines=False, echo=lambda _: None, on_step=lambda step, method: seen.append((step, method.m)))
    total = 8  # 2 epochs of 4 steps
    assert [s for s, _ in seen] == list(range(1, total + 1))
    for step, m in seen:  # step s ran with the coefficient of progress (s - 1) / total
        assert m == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * (step - 1) / total)) * 0.1)


def test_lars_update_of_a_weight_and_of_a_bias_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.5, -2.0]]), torch.tensor([0.2, 0.4])
    opt.step()
    u = torch.tensor([[0.5 + 1.5, -2.0 + 2.0]])  # g + wd w = (2, 0), norm 2
    v_w = u * 0.001 * 5 / 2  # trust ratio
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 0.1 * v_w)
    assert torch.allclose(b, torch.tensor([1.0, -1.0]) - 0.1 * torch.tensor([0.2, 0.4]))  # no decay, no scaling
    w_before, b_before = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([0.2, 0.4])
    opt.step()  # momentum: v <- 0.9 v + u
    u2 = torch.tensor([[1.0, 0.0]]) + 0.5 * w_before
    v_w2 = 0.9 * v_w + u2 * 0.001 * w_before.norm() / u2.norm()
    assert torch.allclose(w, w_before - 0.1 * v_w2)
    assert torch.allclose(b, b_before - 0.1 * (0.9 * torch.tensor([0.2, 0.4]) + torch.tensor([0.2, 0.4])))


def test_lars_leaves_a_zero_weight_unscaled():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(w, -torch.ones(2, 2))


def test_optimizers_of_the_config():
    params = [nn.Parameter(torch.ones(2, 2))]
    cfg = preset("v3-vit-small").optim
    adamw = build_optimizer(params, cfg, batch_size=4096)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == pytest.approx(1.5e-4 * 16)
    assert adamw.param_groups[0]["weight_decay"] == 0.1
    lars = build_optimizer(params, preset("v3-resnet50").optim, batch_size=1024)
    assert isinstance(lars, LARS) and lars.param_groups[0]["lr"] == pytest.approx(0.6 * 4)


def test_the_patch_projection_and_position_embeddings_stay_fixed_while_the_rest_trains():
    model = make_v3()
    backbone = model.encoder_q.backbone
    fixed = {n: p.detach().clone() for n, p in backbone.named_parameters() if n.startswith(("patch_embed", "pos_embed"))}
    assert set(fixed) == {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"}
    block = backbone.blocks[0].attn.qkv.weight.detach().clone()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        logits, labels = model(torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8))
        opt.zero_grad()
        model.loss(logits, labels).backward()
        opt.step()
    params = dict(backbone.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in fixed.items())
    assert not torch.equal(backbone.blocks[0].attn.qkv.weight, block)
    assert torch.equal(model.encoder_k.backbone.patch_embed.proj.weight, fixed["patch_embed.proj.weight"])


def test_heads_of_the_release():
    mlp = bn_mlp(3, 10, 16, 8)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear)) and mlp[-1].affine is False
    vit_model = make_v3()
    assert len([m for m in vit_model.encoder_q.head if isinstance(m, nn.Linear)]) == 3  # ViT projector: 3 layers
    assert isinstance(vit_model.predictor[-1], nn.BatchNorm1d)  # ViT predictor ends with a BN
    torch.manual_seed(0)
    cfg = apply_overrides(preset("smoke"), {"model": dict(method="mocov3", arch="resnet18", head="v3", dim=8,
                                                          hidden_dim=16, bn_splits=1)})
    resnet_model = build_method(cfg.model, 1, 8)
    assert len([m for m in resnet_model.encoder_q.head if isinstance(m, nn.Linear)]) == 2  # ResNet projector: 2
    assert isinstance(resnet_model.predictor[-1], nn.Linear)  # the ResNet predictor has no last BN
    last_bns = [block.bn2 for block in resnet_model.encoder_q.backbone.layer1]  # BasicBlock: bn2 is the last
    assert all(torch.equal(bn.weight, torch.zeros_like(bn.weight)) for bn in last_bns)  # zero-init residual


def test_sincos_position_embedding_by_hand():
    pe = sincos_position_embedding(2, 4)  # one frequency (omega = 1): [sin r, cos r, sin c, cos c]
    assert pe.shape == (1, 5, 4) and torch.equal(pe[0, 0], torch.zeros(4))
    for p, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1)), start=1):
        assert torch.allclose(pe[0, p], torch.tensor([math.sin(r), math.cos(r), math.sin(c), math.cos(c)]))
    pe = sincos_position_embedding(3, 8)  # two frequencies: 1 and 1 / 10000^(1/2)
    r, c = 2, 1  # patch 2 * 3 + 1 = 7, after the class token
    w = [1.0, 0.01]
    expected = [math.sin(r * f) for f in w] + [math.cos(r * f) for f in w] + [math.sin(c * f) for f in w] + [
        math.cos(c * f) for f in w]
    assert torch.allclose(pe[0, 8], torch.tensor(expected), atol=1e-6)


def test_vit_is_built_for_its_image_size_and_patch():
    model = vit("vit_tiny", 1, 28)
    assert model.patch_embed.patch_size == (4, 4) and model.pos_embed.shape == (1, 50, 96)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 96)
    assert vit("vit_small", 3, 224).patch_embed.patch_size == (16, 16)
    assert vit("vit_small", 3, 224).blocks[0].attn.num_heads == 12  # MoCo v3's ViT-S: 12 heads


def test_solarize_and_the_asymmetric_views():
    x = torch.tensor([0.0, 0.25, 127 / 255, 128 / 255, 1.0])
    assert torch.allclose(solarize(x), torch.tensor([0.0, 0.25, 127 / 255, 127 / 255, 0.0]))
    first, second = (build_augment("v3", 32, [0.5] * 3, [0.2] * 3, view=v) for v in (0, 1))
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert first.jitter == second.jitter == (0.4, 0.4, 0.2, 0.1) and first.gray_p == 0.2
    images = torch.randint(0, 256, (4000, 3, 8, 8), dtype=torch.uint8)
    plain = build_augment("none", 8, [0.0] * 3, [1.0] * 3)
    only_solarize = type(second)(8, [0.0] * 3, [1.0] * 3, crop_scale=None, flip_p=0.0, jitter_p=0.0, gray_p=0.0,
                                 solarize_p=0.2)
    torch.manual_seed(0)
    out, ref = only_solarize(images), plain(images)
    changed = (out != ref).flatten(1).any(1).float().mean().item()
    assert 0.17 < changed < 0.23  # p = 0.2 of the images


def test_two_processes_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(HERE / "ddp_worker_v3.py"), str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert ranks[0]["labels"][0].tolist() == [0, 1, 2, 3] * 2  # positives: this process's block of the keys
    assert ranks[1]["labels"][0].tolist() == [4, 5, 6, 7] * 2

    # One process, the global batch, the same 2 BN groups. In fp64: the class token's gradient passes a LayerNorm of
    # a near-zero vector (initialised N(0, 1e-6)) that amplifies fp32 rounding by about 1000.
    model = make_v3(bn_splits=2).double()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5, momentum=0.9)
    for step, (x1, x2) in enumerate(ddp_batches()):
        model.before_step(step / STEPS)
        logits, labels = model(x1, x2)
        loss = model.loss(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for rank in ranks:
            assert torch.allclose(rank["loss"][step], loss, atol=1e-5), (step, rank["loss"][step], loss)
            for g_ddp, p in zip(rank["grads"][step], model.trainable_parameters(), strict=True):
                assert torch.allclose(g_ddp, p.grad, atol=1e-5), step


class Killed(Exception):
    pass


def test_a_killed_v3_run_resumes_exactly(tmp_path):
    """The momentum schedule, AdamW's moments and the frozen ViT parts continue as if nothing happened."""

    def cfg(out):
        return apply_overrides(preset("v3-cpu"), {"hidden_dim": 32, "dim": 16, "train_subset": 256, "batch_size": 64,
                                                  "epochs": 3, "warmup_epochs": 1, "out_dir": str(out),
                                                  "progress": False, "knn_every": -1, "tensorboard": False})

    def kill_in_epoch_2(line: str) -> None:
        if line.startswith("epoch 2:"):
            raise Killed

    pretrain(cfg(tmp_path / "a"), baselines=False, echo=lambda _: None)
    with pytest.raises(Killed):
        pretrain(cfg(tmp_path / "b"), baselines=False, echo=kill_in_epoch_2)
    pretrain(cfg(tmp_path / "b"), resume=tmp_path / "b", baselines=False, echo=lambda _: None)
    full, resumed = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in "ab")
    assert full["step"] == resumed["step"] == 12
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_sync_bn_reaches_every_bn_of_the_method():
    model = make_v3()
    model.convert_sync_bn()
    for part in (model.encoder_q, model.encoder_k, model.predictor):
        bns = [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)


def test_the_random_encoder_baseline_of_a_vit_is_built_afresh():
    from moco.evaluate.knn import reinitialised

    backbone = make_v3().encoder_q.backbone
    with torch.no_grad():
        backbone.cls_token.fill_(3.0)  # as if trained
    fresh = reinitialised(backbone)
    assert fresh.cls_token.abs().max() < 1e-4  # the release's N(0, 1e-6), not the trained token
    assert torch.equal(fresh.pos_embed, backbone.pos_embed)  # the same fixed sin-cos positions
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)


def test_a_shorter_schedule_keeps_the_presets_share_of_warm_up(capsys):
    from moco.cli import main

    assert main(["pretrain", "--preset", "v3-vit-small", "--epochs", "3", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "warmup_epochs: 0.4\n" in out and "40 of 300" in err  # 40/300 of 3 epochs
    assert main(["pretrain", "--preset", "v3-vit-small", "--epochs", "3", "--warmup-epochs", "1", "--print-config"]) == 0
    assert "warmup_epochs: 1.0\n" in capsys.readouterr().out  # given: kept as it is
