import numpy as np
import pytest
import torch
from torch import nn

from pipelines.evaluate.metrics import evaluate, expected_calibration_error
from pipelines.register.promotion import decide


def test_ece_hand_computed():
    # Two samples in bin (0.8, 0.867]: confidence 0.85 each, one right -> |0.5 - 0.85| weighted 2/4.
    # Two samples in bin (0.933, 1]: confidence 0.95 each, both right -> |1 - 0.95| weighted 2/4.
    probs = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.95, 0.05], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 0, 0])
    assert abs(expected_calibration_error(probs, labels) - (0.5 * 0.35 + 0.5 * 0.05)) < 1e-6


class Fixed(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_evaluate_accuracy_per_class_and_confusion():
    x = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1, 1])
    ev = evaluate(Fixed(), x, y, 2)
    assert ev.accuracy == 0.75
    assert ev.per_class_accuracy == pytest.approx([1.0, 2 / 3])
    assert np.array_equal(ev.confusion, np.array([[1, 0], [1, 2]]))


def test_promotion_gate():
    assert decide(0.9, None).alias == "champion"
    better = decide(0.95, 0.9, "3")
    assert better.alias == "champion" and abs(better.delta - 0.05) < 1e-12 and "v3" in better.reason
    worse = decide(0.9, 0.9, "3")
    assert worse.alias == "challenger" and worse.delta == 0.0
