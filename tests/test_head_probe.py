"""The v1 -> v2 study's targeted experiment: the ridge probe against hand computations and known answers."""

import pytest
import torch

from benchmarks import head_probe as H


def test_ridge_recovers_an_exact_linear_map() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 4.0  # (200, 1)
    assert torch.allclose(H.ridge_predict(x[:100], y[:100], x[100:], lam=1e-9), y[100:], atol=1e-3)


def test_ridge_shrinks_towards_the_mean_as_the_penalty_grows() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    # x standardised: z sums to 0, so the normal equations separate. With the penalty lam * N on both the slope
    # and the bias: slope = sum(z y) / (sum(z^2) + N lam), bias = sum(y) / (N + N lam), N = 4.
    z = (x - 1.5) / x.std()
    lam = 0.5
    slope = (z * y).sum() / ((z * z).sum() + 4 * lam)
    bias = y.sum() / (4 + 4 * lam)
    assert torch.allclose(H.ridge_predict(x, y, x, lam=lam), bias + slope * z, atol=1e-5)


def test_r_squared_by_hand() -> None:
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert H.r_squared(target, target) == 1.0
    assert H.r_squared(torch.full((4,), 2.5), target) == pytest.approx(0.0)
    # residuals 0.5 each: 0.25 mean square; target variance 1.25 -> 0.8
    assert H.r_squared(target + 0.5, target) == pytest.approx(0.8)


def tiny_probe() -> H.Probe:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (400, 1, 6, 6), generator=gen, dtype=torch.uint8)
    return H.Probe(images, torch.arange(400) % 4, seed=0)


def test_features_that_encode_the_answers_score_perfectly() -> None:
    probe = tiny_probe()
    answers = {"bright": probe.log_factor, "mirrored": probe.flipped.float().unsqueeze(1)}
    classes = torch.nn.functional.one_hot(probe.labels, 4).float()

    def oracle(images: torch.Tensor) -> torch.Tensor:
        which = "bright" if images is probe.bright else "mirrored"
        return torch.cat([answers[which], classes], dim=1)  # (N, 5)

    assert probe.measure(oracle) == {"brightness_r2": pytest.approx(1.0, abs=0.01), "flip_acc": 100.0,
                                     "class_acc": 100.0}


def test_noise_features_score_chance() -> None:
    probe = tiny_probe()
    gen = torch.Generator().manual_seed(2)
    scores = probe.measure(lambda images: torch.randn(len(images), 3, generator=gen))
    assert scores["brightness_r2"] < 0.05
    assert 35 < scores["flip_acc"] < 65
    assert 10 < scores["class_acc"] < 40


def test_the_probe_inputs_are_the_originals_brightened_or_mirrored() -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (400, 1, 6, 6), generator=gen, dtype=torch.uint8)
    probe = H.Probe(images, torch.zeros(400, dtype=torch.long), seed=0)
    factor = probe.log_factor.exp().view(-1, 1, 1, 1)
    assert torch.equal(probe.bright, (images.float() * factor).round().clamp(0, 255).to(torch.uint8))
    assert torch.equal(probe.mirrored[probe.flipped], images[probe.flipped].flip(-1))
    assert torch.equal(probe.mirrored[~probe.flipped], images[~probe.flipped])
    assert sorted(torch.cat([probe.fit, probe.score]).tolist()) == list(range(400))
