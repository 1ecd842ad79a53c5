import numpy as np
import pytest
import torch
from torch import nn

from pipelines.evaluate.metrics import evaluate, expected_calibration_error
from pipelines.register.promotion import Paired, decide


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


def test_mcnemar_gate_by_hand():
    # 5 images right only for the candidate, none only for the champion: P(X >= 5 | n=5, 1/2) = 1/32.
    wins = Paired.of([1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 0])
    assert (wins.only_candidate, wins.only_champion, wins.images) == (5, 0, 7)
    assert wins.p_value() == pytest.approx(1 / 32)
    assert decide(6 / 7, 1 / 7, "2", wins).alias == "champion"
    # 3 of 3 discordant images: p = 1/8, not enough at 0.05 although the accuracy rose.
    few = Paired(3, 0, 359)
    assert few.p_value() == pytest.approx(1 / 8)
    slight = decide(0.9666, 0.9582, "2", few)
    assert slight.alias == "challenger" and "McNemar exact p = 0.125" in slight.reason
    # 6 wins, 1 loss: P(X >= 6 | n=7) = (7 + 1) / 128.
    assert Paired(6, 1, 359).p_value() == pytest.approx(8 / 128)
    # An identical model: no discordant image, p = 1, never promoted.
    same = decide(0.9582, 0.9582, "1", Paired(0, 0, 359))
    assert same.alias == "challenger" and same.p_value == 1.0 and same.delta == 0.0
    # min_delta is applied on top of the test.
    assert decide(0.99, 0.97, "1", Paired(30, 0, 1000), min_delta=0.03).alias == "challenger"
    with pytest.raises(ValueError, match="different images"):
        Paired.of([1, 0], [1, 0, 1])


def _outcome(method, seed, val_acc, test_acc=0.9):
    from pipelines.engine.loop import TrainResult
    from pipelines.evaluate.compare import StudentOutcome
    from pipelines.evaluate.metrics import Evaluation

    evaluation = Evaluation(test_acc, 0.3, 0.01, [test_acc] * 10, np.zeros((10, 10)))
    return StudentOutcome(method, seed, nn.Identity(), TrainResult(), evaluation, val_acc)


def test_the_choice_is_the_best_method_on_mean_validation_then_its_best_seed():
    from pipelines.evaluate.compare import choose_student

    # "lucky" has the single best seed, "steady" the better mean: steady is chosen, its seed 1.
    outcomes = [_outcome("lucky", 0, 0.99), _outcome("lucky", 1, 0.80),
                _outcome("steady", 0, 0.92), _outcome("steady", 1, 0.93)]
    choice = choose_student(outcomes)
    assert (choice.outcome.method, choice.outcome.seed) == ("steady", 1)
    assert choice.reason == ("steady has the best mean validation accuracy over its 2 seed(s): 0.9250; next lucky "
                             "0.8950; its seed 1 scored best on validation (0.9300)")
    # A seed at chance does not count toward its method's mean.
    outcomes.append(_outcome("lucky", 2, 0.99, test_acc=0.1))
    assert choose_student(outcomes).outcome.method == "steady"
