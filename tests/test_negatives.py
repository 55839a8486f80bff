"""The queue study's targeted experiment: own-class shares of the negatives, against a hand computation."""

import math

import pytest
import torch

from benchmarks import negatives as N


def four_images_and_one() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of class 0 at (1, 0) and three of class 1 at (0, 1)."""
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    return features, torch.tensor([0, 0, 1, 1, 1])


def test_the_shares_equal_a_hand_computation() -> None:
    features, labels = four_images_and_one()
    # K=4: every query's queue is the four other images. T=1: an own-class negative (cos 1) weighs e, another 1.
    # Class 0's queries: e / (e + 3) of the weight, 1 of 4 own-class. Class 1's: 2e / (2e + 2), 2 of 4.
    shares = N.own_class_shares(features, labels, K=4, T=1.0, queries=5)
    e = math.e
    assert shares["weight"] == pytest.approx(100 * (2 * e / (e + 3) + 3 * 2 * e / (2 * e + 2)) / 5, abs=0.06)
    assert shares["queue"] == pytest.approx(100 * (2 * 0.25 + 3 * 0.5) / 5)
    assert shares["hardest"] == shares["queue"]  # the 10 hardest of 4 are all of them


def test_the_hardest_negatives_are_the_most_similar(monkeypatch: pytest.MonkeyPatch) -> None:
    features, labels = four_images_and_one()
    monkeypatch.setattr(N, "HARDEST", 1)
    assert N.own_class_shares(features, labels, K=4, T=1.0, queries=5)["hardest"] == 100.0  # always the twin
